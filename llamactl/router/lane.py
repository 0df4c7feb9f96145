"""A lane: one routable target (a switch group or a single profile) with its bounded FIFO queue.

One dispatcher task per lane owns every state change: it decides which member serves (forced by
`llamactl switch`, pinned by the request at the head of the queue, or the switching policy), loads it on
demand, drains and hard-switches, hands slots to waiting requests (at most `slots` in flight for the
active member), and unloads after the idle TTL. With `keep_both_warm` it also loads the other members in
the background once one serves (tasks it owns; their results reach the state through the dispatcher), so
every switch is a drain. Request handlers only enqueue a Ticket, await its grant and release it; they
never act on the lane's state. A queued request is never dropped by a switch: it
stays in the queue until the new member is ready, or fails with QueueTimeout / EngineUnavailable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llamactl.policy import Decision, GroupState, PolicyConfig, Role, decide
from llamactl.router.backends import Backends, Upstream
from llamactl.router.catalog import LaneSpec
from llamactl.router.errors import BadRequest, EngineUnavailable, QueueFull, QueueTimeout
from llamactl.router.telemetry import Telemetry

log = logging.getLogger("llamactl.router")
WARM_SWITCH_COST_S = 0.1


@dataclass
class LaneConfig:
    max_queue: int = 64
    queue_timeout_s: float = 300.0
    idle_ttl_s: float = 0.0  # 0: never unload when idle
    keep_both_warm: bool = False  # switch without stopping the other member (the service sets it per lane)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


@dataclass(eq=False)
class Ticket:
    cls: str
    pin: str | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    future: asyncio.Future[Upstream] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    profile: str | None = None  # the member that granted it
    role: Role | None = None
    granted_at: float | None = None
    released: bool = False

    @property
    def waiting(self) -> bool:
        return not self.future.done()


class Lane:
    def __init__(self, spec: LaneSpec, backends: Backends, telemetry: Telemetry, config: LaneConfig,
                 clock=time.monotonic) -> None:
        self.spec = spec
        self.name = spec.name
        self.backends = backends
        self.telemetry = telemetry
        self.config = config
        self.keep_both_warm = config.keep_both_warm
        self.warm_reason = "set by configuration"
        self.clock = clock
        self.queue: deque[Ticket] = deque()
        self.in_flight = 0
        self.active: str = spec.member("spec") or next(iter(spec.members))
        self.upstreams: dict[str, Upstream] = {}
        self.state = "unloaded"
        self.forced: str | None = None
        self.last_decision: Decision | None = None
        self.last_decision_at: float | None = None
        self.last_switch_at = clock()
        self.switch_cost_s: float | None = None
        self.load_s: dict[str, float] = {}
        self.switches: deque[dict[str, Any]] = deque(maxlen=20)
        self.last_error: str | None = None
        self.idle_since = clock()
        self.service_s: float | None = None  # EWMA of a request's time holding a slot
        self._gauges: tuple | None = None
        self._gauge_shape: tuple | None = None
        self._wake = asyncio.Event()
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []
        self._tasks: asyncio.TaskGroup | None = None  # the dispatcher's: background warm-ups
        self._warming: dict[str, asyncio.Task[None]] = {}
        self._warmed: dict[str, Upstream] = {}  # loaded in the background, not yet taken in by the dispatcher
        self._not_warm: set[str] = set()  # stopped by `down` or failed: loaded only when chosen again
        self._update_gauges()

    # ------------------------------------------------------------------ request side
    def role_of(self, profile: str) -> Role:
        return self.spec.members[profile]

    def retry_after_s(self) -> int:
        per_request = self.service_s or 1.0
        slots = self.spec.slots.get(self.active, 1)
        return max(1, math.ceil(per_request * (len(self.queue) + 1) / slots))

    async def acquire(self, ticket: Ticket, *, front: bool = False) -> Upstream:
        """Wait in the queue for a slot; returns the upstream to send the request to."""
        if ticket.pin is not None and ticket.pin not in self.spec.members:
            raise BadRequest(f"profile '{ticket.pin}' is not a member of '{self.name}'")
        if not front and len(self.queue) >= self.config.max_queue:
            self.telemetry.rejected.labels(self.name, "queue_full").inc()
            retry = self.retry_after_s()
            raise QueueFull(
                f"queue of '{self.name}' is full ({self.config.max_queue} waiting); retry in {retry}s",
                headers={"Retry-After": str(retry)}, extra={"retry_after_s": retry},
            )
        if front:
            self.queue.appendleft(ticket)
        else:
            self.queue.append(ticket)
            self.telemetry.arrival(self.name, ticket.cls)
        if self.state == "ready" and len(self.queue) == 1 and self.active in self.upstreams:
            # Fast path: the lane is serving and idle enough; run the dispatcher's decision inline so the
            # grant does not wait for a turn of the event loop.
            target = self._target()
            if target is not None and target[0] == self.active:
                self._dispatch()
        self._changed()
        try:
            async with asyncio.timeout(self.config.queue_timeout_s):
                return await ticket.future
        except TimeoutError:
            self._abandon(ticket)
            self.telemetry.rejected.labels(self.name, "queue_timeout").inc()
            waited = time.perf_counter() - ticket.enqueued_at
            raise QueueTimeout(
                f"waited {waited:.1f}s in the queue of '{self.name}' (limit {self.config.queue_timeout_s:.0f}s); "
                f"lane state: {self.state}" + (f", last error: {self.last_error}" if self.last_error else ""),
                extra={"lane_state": self.state},
            ) from None
        except BaseException:
            self._abandon(ticket)
            raise

    def _abandon(self, ticket: Ticket) -> None:
        fut = ticket.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release(ticket)  # it was granted a slot it will not use
            return
        fut.cancel()
        try:
            self.queue.remove(ticket)
        except ValueError:
            pass
        self._changed()

    def release(self, ticket: Ticket, *, upstream_failed: bool = False) -> None:
        if ticket.released or ticket.granted_at is None:
            return
        ticket.released = True
        self.in_flight -= 1
        held = time.perf_counter() - ticket.granted_at
        self.service_s = held if self.service_s is None else 0.8 * self.service_s + 0.2 * held
        if upstream_failed and ticket.profile:
            # The engine refused the connection or broke it: ask the backends again before the next grant.
            self.upstreams.pop(ticket.profile, None)
        if self.in_flight == 0:
            self.idle_since = self.clock()
        self._changed()

    # ------------------------------------------------------------------ control
    async def force(self, member: str | None, *, timeout_s: float = 600.0) -> None:
        """Force a member (None: back to automatic). Returns once it serves; raises if it fails to start."""
        if member is not None and member not in self.spec.members:
            raise BadRequest(f"'{member}' is not a member of '{self.name}'; members: {', '.join(self.spec.members)}")
        self.forced = member
        self._changed()
        if member is None or (self.active == member and member in self.upstreams):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((member, fut))
        async with asyncio.timeout(timeout_s):
            await fut

    def engine_down(self, profile: str) -> None:
        """The service saw `profile`'s engine die or hang: the next grant asks the backends again
        (which restart it, after their backoff)."""
        self._forget_warm(profile)
        if self.upstreams.pop(profile, None) is not None:
            self._changed()

    def mark_failed(self, profile: str, error: Exception) -> None:
        """The service gave up on `profile` (a crash loop): fail what waits for it, with the reason."""
        self._forget_warm(profile)
        self._not_warm.add(profile)
        self.upstreams.pop(profile, None)
        if profile == self.active or self.forced == profile:
            self._fail_start(profile, error)
        else:
            self._changed()

    async def unload(self, profile: str) -> None:
        """Stop `profile` now (`llamactl down` on a daemon); a later request loads it again."""
        if self.forced == profile:
            self.forced = None
        self._not_warm.add(profile)  # stopped on purpose: not loaded again in the background
        await self._stop(profile, "down")
        if profile == self.active:
            self.state = "unloaded"
        self._changed()

    def status(self) -> dict[str, Any]:
        d = self.last_decision
        return {
            "lane": self.name,
            "group": self.spec.is_group,
            "members": dict(self.spec.members),
            "slots": dict(self.spec.slots),
            "active": self.active,
            "loaded": sorted(self.upstreams),
            "state": self.state,
            "forced": self.forced,
            "queue_depth": sum(1 for t in self.queue if t.waiting),
            "in_flight": self.in_flight,
            "switch_cost_s": self.switch_cost_s,
            "keep_both_warm": self.keep_both_warm,
            "warm_reason": self.warm_reason,
            "last_decision": None if d is None else {
                "target": self.spec.member(d.target), "role": d.target, "switch": d.switch, "reason": d.reason,
                "expected_seconds": dict(d.seconds),
                "age_s": round(self.clock() - (self.last_decision_at or self.clock()), 3),
            },
            "recent_switches": list(self.switches),
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ dispatcher
    def _changed(self) -> None:
        self._update_gauges()
        self._wake.set()

    def _update_gauges(self) -> None:
        t = self.telemetry
        if self._gauges is None:
            self._gauges = (t.queue_depth.labels(self.name), t.in_flight.labels(self.name))
        self._gauges[0].set(sum(1 for x in self.queue if x.waiting))
        self._gauges[1].set(self.in_flight)
        shape = (self.active, self.state, tuple(sorted(self.upstreams)))
        if shape == self._gauge_shape:
            return  # member gauges only change with the lane's state
        self._gauge_shape = shape
        for member in self.spec.members:
            t.active_member.labels(self.name, member).set(1 if member == self.active else 0)
            state = "ready" if member in self.upstreams else (
                self.state if member == self.active and self.state in ("loading", "switching", "failed") else "stopped")
            for s in ("ready", "loading", "switching", "failed", "stopped"):
                t.profile_state.labels(member, s).set(1 if s == state else 0)

    def _head(self) -> Ticket | None:
        while self.queue and not self.queue[0].waiting:
            self.queue.popleft()
        return self.queue[0] if self.queue else None

    def policy_state(self) -> GroupState:
        queued: dict[str, int] = {}
        for t in self.queue:
            if t.waiting and t.pin is None:
                queued[t.cls] = queued.get(t.cls, 0) + 1
        loaded = self.active in self.upstreams
        others_warm = all(m in self.upstreams for m in self.spec.members)
        # both members running (keep_both_warm): a switch is only a drain, of what is in flight now
        drain_s = self.in_flight * (self.service_s or 0.0) / max(1, self.spec.slots.get(self.active, 1))
        return GroupState(
            active=self.role_of(self.active) if loaded else None,
            seconds_since_switch=self.clock() - self.last_switch_at,
            switch_cost_s=WARM_SWITCH_COST_S + drain_s if others_warm else self.switch_cost_s,
            queued=queued,
            recent=self.telemetry.recent(self.name),
            evidence=self.telemetry.evidence(self.name),
        )

    def _target(self) -> tuple[str, str] | None:
        if self.forced is not None:
            return self.forced, "forced"
        head = self._head()
        if head is None:
            return None
        if head.pin is not None:
            return head.pin, "pinned"
        if not self.spec.is_group:
            return self.active, "only"
        decision = decide(self.policy_state(), self.config.policy)
        if self.last_decision is None or decision.target != self.last_decision.target or decision.switch:
            log.info("lane %s: %s", self.name, decision.reason)
        self.last_decision, self.last_decision_at = decision, self.clock()
        return self.spec.member(decision.target) or self.active, "policy"

    async def run(self) -> None:
        """The dispatcher loop; runs until cancelled (which cancels its warm-ups)."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                await self._loop()
            finally:
                self._tasks = None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            if self._warmed:
                self.upstreams.update(self._warmed)
                self._warmed.clear()
                self._update_gauges()
            timeout: float | None = None
            target = self._target()
            if target is None:
                if self.upstreams and self.in_flight == 0 and self.config.idle_ttl_s > 0:
                    remaining = self.config.idle_ttl_s - (self.clock() - self.idle_since)
                    if remaining <= 0:
                        await self._unload_all("idle")
                        continue
                    timeout = remaining
            else:
                profile, trigger = target
                if profile != self.active or profile not in self.upstreams:
                    if profile != self.active and self.in_flight > 0:
                        self.state = "draining"
                    else:
                        await self._bring_up(profile, trigger)
                        continue
                else:
                    self._dispatch()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _dispatch(self) -> None:
        slots = self.spec.slots.get(self.active, 1)
        upstream = self.upstreams[self.active]
        while self.in_flight < slots:
            head = self._head()
            if head is None or (head.pin is not None and head.pin != self.active):
                break
            self.queue.popleft()
            self.in_flight += 1
            head.profile, head.role, head.granted_at = self.active, self.role_of(self.active), time.perf_counter()
            head.future.set_result(upstream)
        self.state = "ready"
        self._update_gauges()

    async def _bring_up(self, profile: str, trigger: str) -> None:
        old = self.active if self.active in self.upstreams else None
        switching = old is not None and old != profile
        self.state = "switching" if switching else "loading"
        self.active = profile
        self._update_gauges()
        started = self.clock()
        warm = switching and profile in self.upstreams  # both loaded: a switch is only a drain
        if switching and not self.keep_both_warm:
            await self._stop(old, "switch")  # type: ignore[arg-type]
        try:
            self.telemetry.loads.labels(profile).inc()
            try:
                upstream = await self.backends.ensure_ready(profile)
            except Exception as e:  # noqa: BLE001
                if not (switching and self.keep_both_warm):
                    raise
                # It did not load beside the other member (memory the plan did not foresee, say): switch
                # the hard way from now on, which frees the other member's memory first.
                self._switch_hard_from_now(profile, old, e)
                await self._stop(old, "switch")  # type: ignore[arg-type]
                upstream = await self.backends.ensure_ready(profile)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting requests
            self._fail_start(profile, e)
            return
        self._not_warm.discard(profile)
        elapsed = self.clock() - started
        self.upstreams[profile] = upstream
        self.state = "ready"
        self.last_error = None
        if switching:
            self.last_switch_at = self.clock()
            if not warm:  # the cost of a restart: what a switch costs when the other member is not loaded
                self.switch_cost_s = elapsed if self.switch_cost_s is None else 0.5 * self.switch_cost_s + 0.5 * elapsed
            self.telemetry.switches.labels(self.name, old, profile, trigger).inc()
            self.telemetry.switch_seconds.labels(self.name).observe(elapsed)
            reason = self.last_decision.reason if trigger == "policy" and self.last_decision else trigger
            self.switches.append({"from": old, "to": profile, "trigger": trigger, "seconds": round(elapsed, 3),
                                  "reason": reason, "at_unix": round(time.time(), 3)})
            log.info("lane %s: switched %s -> %s in %.2fs (%s)", self.name, old, profile, elapsed, reason)
        else:
            self.load_s[profile] = elapsed
            self.last_switch_at = self.clock()
            if self.switch_cost_s is None and self.spec.is_group:
                self.switch_cost_s = elapsed  # a first estimate: a switch costs about one load
        self._resolve_waiters(profile, None)
        self._changed()
        if self.keep_both_warm:
            self._warm_others()

    def _warm_others(self) -> None:
        """Load the members that are not loaded, in the background: the next switch is then a drain."""
        if self._tasks is None:
            return
        for member in self.spec.members:
            if (member not in self.upstreams and member not in self._warming and member not in self._warmed
                    and member not in self._not_warm):
                self._warming[member] = self._tasks.create_task(self._warm(member), name=f"warm:{member}")

    def _switch_hard_from_now(self, profile: str, beside: str | None, error: Exception) -> None:
        self.keep_both_warm = False
        self.warm_reason = f"loading {profile} beside {beside} failed: {getattr(error, 'message', error)}"
        log.warning("lane %s: %s; switching hard from now on", self.name, self.warm_reason)

    def _forget_warm(self, profile: str) -> None:
        warming = self._warming.pop(profile, None)
        if warming is not None:
            warming.cancel()
        self._warmed.pop(profile, None)

    async def _warm(self, profile: str) -> None:
        try:
            self.telemetry.loads.labels(profile).inc()
            upstream = await self.backends.ensure_ready(profile)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - not fatal: switches go back to stop-then-start
            self._switch_hard_from_now(profile, self.active, e)
            return
        finally:
            if self._warming.get(profile) is asyncio.current_task():
                del self._warming[profile]
        log.info("lane %s: %s loaded beside %s (both warm)", self.name, profile, self.active)
        self._warmed[profile] = upstream
        self._changed()

    def _fail_start(self, profile: str, error: Exception) -> None:
        self.state = "failed"
        self.last_error = f"{profile}: {error}"
        log.error("lane %s: cannot start %s: %s", self.name, profile, error)
        if self.forced == profile:
            self.forced = None  # do not retry a failing forced start in a loop
        failure = EngineUnavailable(
            f"profile '{profile}' (lane '{self.name}') could not be started: {getattr(error, 'message', error)}",
            hint=getattr(error, "hint", None), extra={"profile": profile},
        )
        while self.queue:
            ticket = self.queue.popleft()
            if ticket.waiting:
                ticket.future.set_exception(failure)
        self._resolve_waiters(profile, failure)
        self._changed()

    def _resolve_waiters(self, profile: str, error: Exception | None) -> None:
        keep = []
        for member, fut in self._waiters:
            if fut.done():
                continue
            if member == profile:
                fut.set_exception(error) if error else fut.set_result(None)
            else:
                keep.append((member, fut))
        self._waiters = keep

    async def _stop(self, profile: str, reason: str) -> None:
        self.upstreams.pop(profile, None)
        self.telemetry.unloads.labels(profile, reason).inc()
        await self._stop_engine(profile)

    async def _stop_engine(self, profile: str) -> None:
        """Stop `profile` in the backends (idempotent), a background warm-up of it included."""
        self._forget_warm(profile)
        try:
            await self.backends.stop(profile)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("lane %s: stopping %s failed: %s", self.name, profile, e)

    async def _unload_all(self, reason: str) -> None:
        loaded = list(self.upstreams)
        for profile in loaded:
            log.info("lane %s: unloading %s (%s)", self.name, profile, reason)
            await self._stop(profile, reason)
        for profile in self.spec.members:
            if profile not in loaded:
                # A background warm-up may be half-way through a start (its task already cancelled, the
                # start finishing in the backends): stopping is idempotent, so make sure.
                await self._stop_engine(profile)
        self.state = "unloaded"
        self._changed()

    async def shutdown(self) -> None:
        await self._unload_all("shutdown")
