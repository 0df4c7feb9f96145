"""A lane: one routable target (a switch group or a single profile) with its bounded FIFO queue.

One writer. The lane's dispatcher (`run`) is the only code that changes its state. Request handlers
(`acquire`, `release`), control commands (`force`, `unload`) and the daemon's engine callbacks
(`engine_down`, `mark_failed`) post an event to the dispatcher's inbox and, where they need an answer,
await a future the dispatcher resolves. The dispatcher never awaits an engine itself: loads and stops
run as tasks it owns, and their outcome comes back as an event. So a `down` during a load is handled at
once (the load is cancelled and the engine stopped), and no handler ever sees half a change.

What the dispatcher decides, each turn: which member serves (forced by `llamactl switch`, pinned by the
request at the head of the queue, or the switching policy), loading it on demand, draining and switching,
handing slots to waiting requests (at most `slots` in flight on the active member), and unloading after
the idle TTL. With `keep_both_warm` it also loads the other members in the background once one serves,
so every switch is a drain. A queued request is never dropped by a switch: it stays in the queue until
the new member is ready, or fails with QueueTimeout / EngineUnavailable.

Time comes from the injected `clock` (monotonic seconds), so tests drive a lane with a manual clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamactl.router.policy import ClassEvidence, Decision, GroupState, PolicyConfig, Role, decide, samples_needed
from llamactl.router.backends import Backends, Upstream, fetch_models, serving_now, worker_down
from llamactl.router.catalog import LaneSpec
from llamactl.router.choices import (
    Choice, choose, depth_choice, depth_choices, entry_depth, member_of, middle_out, process_for, split_choice,
)
from llamactl.router.errors import BadRequest, EngineUnavailable, QueueFull, QueueTimeout
from llamactl.router.runs import Runs
from llamactl.box.scheduler import BoxScheduler
from llamactl.router.telemetry import Telemetry
from llamactl.rpc.errors import WorkerError

log = logging.getLogger("llamactl.router")
WARM_SWITCH_COST_S = 0.1


class LaneState(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # waiting for the active member's requests to finish before a switch
    SWITCHING = "switching"
    FAILED = "failed"


@dataclass
class LaneConfig:
    max_queue: int = 64
    queue_timeout_s: float = 300.0
    idle_ttl_s: float = 0.0  # 0: never unload when idle
    keep_both_warm: bool = False  # switch without stopping the other member (the daemon sets it per lane)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # A group member that fails to start is passed over (the others serve) for this long, doubled at each
    # failure in a row up to passed_over_max_s; then the policy may choose it again.
    passed_over_s: float = 600.0
    passed_over_max_s: float = 6 * 3600.0


@dataclass(eq=False)
class Ticket:
    cls: str
    pin: str | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    future: asyncio.Future[Upstream] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    profile: str | None = None  # the member that granted it (whose behaviour the request gets)
    role: Role | None = None
    choice: Choice | None = None  # what it was given: member, the process serving it, drafting, depth, why
    granted_at: float | None = None  # perf_counter, for the request's queue wait
    held_since: float | None = None  # the lane's clock, for its service time
    released: bool = False
    evidence: bool = True  # generation the policy learns from; tokenize, embeddings etc. are not
    pending: tuple[str, str] | None = None  # (class, choice) it is counted under as a sample on its way

    @property
    def waiting(self) -> bool:
        return not self.future.done()


@dataclass
class _Load:
    """A member being loaded: in the foreground (it will serve) or in the background (kept warm)."""

    task: asyncio.Task[Upstream | Exception]
    started: float
    switch_from: str | None = None  # the member it replaces, when it is a switch
    trigger: str = ""
    member: str | None = None  # the choice it is loaded for (a depth choice of it: served at that depth)


class Lane:
    def __init__(self, spec: LaneSpec, backends: Backends, telemetry: Telemetry, config: LaneConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
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
        self.active: str = spec.member("spec") or next(iter(spec.members))  # the member whose engine serves now
        # The member whose behaviour unpinned requests get now: `active`, or a member `active`'s engine serves
        # per request (a plain twin of a drafting process, drafting off: `hosts`).
        self.serving: str = self.active
        self.hosts: dict[str, str] = {}  # member -> the member whose engine serves it per request (self-tested)
        # Drafting members whose engine honours a per-request depth (self-tested), and the depths they offer as
        # choices MEMBER@DEPTH (served by the member's own engine); the members whose depths were refused, why.
        self.live_depths: dict[str, tuple[int, ...]] = {}
        self.depths_refused: dict[str, str] = {}
        self._choice_hosts: dict[str, str] = {}  # MEMBER@DEPTH -> MEMBER, for live_depths
        self._why = "policy"  # the trigger behind `serving` (a bounded label)
        self.last_choice: Choice | None = None  # what the last request granted was given
        self.upstreams: dict[str, Upstream] = {}  # members that serve now
        self.state = LaneState.UNLOADED
        self.forced: str | None = None
        self.closed = False  # shut down (router shutdown, or retired by a reload): starts nothing again
        self.last_decision: Decision | None = None
        self.last_decision_at: float | None = None
        self.last_switch_at = clock()
        self.switch_cost_s: float | None = None
        self.load_s: dict[str, float] = {}
        self.switches: deque[dict[str, Any]] = deque(maxlen=20)
        self.last_error: str | None = None
        self._fault_logged_at, self._faults_unlogged = -math.inf, 0  # _log_fault's rate limit
        self.idle_since = clock()
        self.service_s: float | None = None  # EWMA of a request's time holding a slot
        self._inbox: deque[Callable[[], None]] = deque()
        self._ended = False  # the dispatcher has stopped: every question is answered at once (an error)
        self._asks: set[asyncio.Future[Any]] = set()  # questions posted and not yet answered
        self._arriving: set[Ticket] = set()  # tickets posted but not yet in the queue
        self._queued_in_inbox = 0  # tickets posted but not yet in the queue (counted against max_queue)
        self._wake = asyncio.Event()
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []  # force(): member -> serving
        self._drain_waiters: list[asyncio.Future[None]] = []  # drained(): woken at each turn
        self._loads: dict[str, _Load] = {}
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._not_warm: set[str] = set()  # stopped by `down` or failed: loaded only when chosen again
        self._start_failures: dict[str, tuple[int, float, str]] = {}  # group member -> (in a row, last at, why)
        self._granted: dict[str, int] = {}  # class -> unpinned requests served (exploration's budget)
        self._explored: dict[str, int] = {}  # class -> of those, sent to an under-measured member
        self._exploring: tuple[str, str, int] | None = None  # (class, member, requests left) being explored
        self._explored_at: dict[tuple[str, str], float] = {}  # (class, member) -> when last explored
        self._pending: dict[tuple[str, str], int] = {}  # (class, choice) -> evidence requests granted, not done
        # A member reloaded to be explored serves every class for a trial of this many more requests (besides
        # the explored class's), so one reload measures it on the whole mix before the policy judges it.
        self._trial_left = 0
        self.runs = Runs()  # runs of one class in the unpinned arrivals: how long the one going on may last
        self._explore_spent_s = 0.0  # reload seconds spent exploring (the way back counted too)
        self._serving_since: float | None = None  # when a member first served: exploration's budget grows with it
        self._tasks: asyncio.TaskGroup | None = None  # the dispatcher's: loads and stops
        self._gauges: tuple | None = None
        self._gauge_shape: tuple | None = None
        self._update_gauges()
        # Told of each state change the dispatcher makes (the router's event stream); must not block.
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        # The box's memory scheduler (the daemon's): a load asks it for room first. None: no arbitration.
        self.box: BoxScheduler | None = None
        self.keep = False  # `keep = true` on a member: the box never evicts this lane
        self._force_transient = False  # the forced member is only until it serves (serve_once)
        self._was_idle = True

    def _emit(self, what: str, **data: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(what, data)
            except Exception as e:  # noqa: BLE001 - a listener must never stop the dispatcher
                log.warning("lane %s: event listener failed: %s", self.name, e)

    # ------------------------------------------------------------------ posting (any task)
    def _post(self, event: Callable[[], None]) -> None:
        self._inbox.append(event)
        self._wake.set()

    def _ask(self, event: Callable[[asyncio.Future[Any]], None]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._ended:
            fut.set_exception(self._ended_error())
            return fut
        self._asks.add(fut)
        fut.add_done_callback(self._asks.discard)
        self._post(lambda: None if fut.done() else event(fut))
        return fut

    def _ended_error(self) -> EngineUnavailable:
        return EngineUnavailable(f"'{self.name}' is shut down (the router is stopping or reloading)")

    # ------------------------------------------------------------------ request side
    def role_of(self, profile: str) -> Role:
        return self.spec.members[profile]

    def waiting(self) -> int:
        return sum(1 for t in self.queue if t.waiting)

    def retry_after_s(self) -> int:
        per_request = self.service_s or 1.0
        slots = self.spec.slots.get(self.active, 1)
        return max(1, math.ceil(per_request * (len(self.queue) + 1) / slots))

    async def acquire(self, ticket: Ticket, *, front: bool = False) -> Upstream:
        """Wait in the queue for a slot; returns the upstream to send the request to."""
        if ticket.pin is not None and ticket.pin not in self.spec.members and ticket.pin not in self._choice_hosts:
            member, depth = split_choice(ticket.pin)
            if depth is not None and member in self.spec.choice_depths:
                why = self.depths_refused.get(member) or "its engine's self-test has not said so yet"
                raise BadRequest(f"'{ticket.pin}': {member} does not draft at a depth chosen per request ({why})",
                                 hint=f"name '{member}' (its own depth), or the group '{self.name}'")
            raise BadRequest(f"profile '{ticket.pin}' is not a member of '{self.name}'")
        if not front and len(self.queue) + self._queued_in_inbox >= self.config.max_queue:
            self.telemetry.rejected.labels(self.name, "queue_full").inc()
            retry = self.retry_after_s()
            raise QueueFull(
                f"queue of '{self.name}' is full ({self.config.max_queue} waiting); retry in {retry}s",
                headers={"Retry-After": str(retry)}, extra={"retry_after_s": retry},
            )
        if not front and ticket.evidence:
            self.telemetry.arrival(self.name, ticket.cls)
        if self._ended:
            raise self._ended_error()
        self._queued_in_inbox += 1
        self._arriving.add(ticket)
        self._post(lambda: self._enqueue(ticket, front))
        try:
            async with asyncio.timeout(self.config.queue_timeout_s):
                return await ticket.future
        except TimeoutError:
            self._post(lambda: self._abandon(ticket))
            self.telemetry.rejected.labels(self.name, "queue_timeout").inc()
            waited = time.perf_counter() - ticket.enqueued_at
            raise QueueTimeout(
                f"waited {waited:.1f}s in the queue of '{self.name}' (limit {self.config.queue_timeout_s:.0f}s); "
                f"lane state: {self.state.value}" + (f", last error: {self.last_error}" if self.last_error else ""),
                extra={"lane_state": self.state.value},
            ) from None
        except BaseException:
            self._post(lambda: self._abandon(ticket))
            raise

    def release(self, ticket: Ticket, *, upstream_failed: bool = False) -> None:
        """The request is done with its slot (`upstream_failed`: the engine refused or broke it)."""
        if ticket.released or ticket.granted_at is None:
            return
        ticket.released = True
        self._post(lambda: self._released(ticket, upstream_failed))

    # ------------------------------------------------------------------ control side
    async def force(self, member: str | None, *, timeout_s: float = 600.0, transient: bool = False) -> None:
        """Force a member (None: back to automatic). Returns once it serves; raises if it fails to start.
        `transient`: only until it serves (serve_once), so requests pinned to another member wait meanwhile."""
        if member is not None and member not in self.spec.members:
            self.check_choice(member)
        fut = self._ask(lambda f: self._force(member, f, transient))
        async with asyncio.timeout(timeout_s):
            await fut

    def check_choice(self, name: str) -> None:
        """`name` is no member: it must be one of a member's depth choices (MEMBER@DEPTH), else a BadRequest
        saying what there is."""
        member, depth = split_choice(name)
        if depth is None or member not in self.spec.members:
            choices = [*self.spec.members, *(depth_choice(m, d) for m, ds in self.spec.choice_depths.items()
                                             for d in ds)]
            raise BadRequest(f"'{name}' is not a member of '{self.name}'; members: {', '.join(choices)}")
        depths = self.spec.choice_depths.get(member)
        if not depths:
            raise BadRequest(f"'{member}' has no depths to choose from; list them in its profile "
                             f"([speculation] depths = [2, 4, 8, 16]) or switch to '{member}'")
        if depth not in depths:
            raise BadRequest(f"'{member}' has no depth {depth}; its depths: {', '.join(map(str, depths))}",
                             extra={"depths": list(depths)})

    def choices(self) -> dict[str, Role]:
        """What the policy chooses between: the members, a member with live depths as one choice per depth."""
        out: dict[str, Role] = {}
        for member, role in self.spec.members.items():
            depths = self.live_depths.get(member)
            out.update({depth_choice(member, d): role for d in middle_out(depths)} if depths else {member: role})
        return out

    def base_of(self, name: str) -> str:
        """The member a choice belongs to (a member is its own)."""
        return self._choice_hosts.get(name, name)

    def _as_choice(self, member: str) -> str:
        """The choice `member` is served as: itself, or where it has live depths, the one of them serving now,
        else its entry depth."""
        depths = self.live_depths.get(member)
        if not depths:
            return member
        if self.serving != member and self.base_of(self.serving) == member:
            return self.serving
        return depth_choice(member, entry_depth(depths, self.spec.depths.get(member)))

    async def serve_once(self, member: str, *, timeout_s: float) -> None:
        """Make `member` serve now (`llamactl up`, a preload, the page's load button) without keeping the lane
        forced to it afterwards, unless it already was."""
        previous = self.forced
        try:
            await self.force(member, timeout_s=timeout_s, transient=previous is None)
        finally:
            if previous is None and self.forced == member:
                await self.force(None)

    async def unload(self, profile: str, why: str = "llamactl down") -> bool:
        """Stop `profile` now (`llamactl down`), cancelling a load in progress; returns once it is stopped.
        Requests queued for it fail (their error names `why`: who stopped it); a later request loads it again.
        True if it was loaded or loading."""
        return await self._ask(lambda f: self._unload(profile, f, why))

    def engine_down(self, profile: str) -> None:
        """The engine of `profile` died or hung: the next grant asks the backends again (they restart it)."""
        self._post(lambda: self._engine_down(profile))

    def mark_failed(self, profile: str, error: Exception) -> None:
        """The engine of `profile` was given up on (a crash loop): fail what waits for it, with the reason."""
        self._post(lambda: self._failed(profile, error))

    async def shutdown(self) -> None:
        """Cancel loads and stop every member (the router's shutdown; the dispatcher must be running). The lane
        starts nothing afterwards: a forced member is not loaded again, what waits or arrives fails."""
        await self._ask(self._shutdown)

    async def drained(self) -> None:
        """Returns once nothing is queued or in flight (a reload retiring this lane waits for it)."""
        while self.in_flight or self.waiting() or self._queued_in_inbox:
            self._drain_waiters.append(fut := asyncio.get_running_loop().create_future())
            self._wake.set()
            await fut

    # ------------------------------------------------------------------ the box's side
    def box_idle(self) -> bool:
        """Nothing in flight, queued or loading: the box may have this lane's engines stopped."""
        return not (self.in_flight or self.waiting() or self._queued_in_inbox or self._loads or self.forced)

    def box_idle_s(self) -> float:
        return max(0.0, self.clock() - self.idle_since) if self.box_idle() else 0.0

    def box_keep(self) -> bool:
        return self.keep

    async def evict(self, reason: str) -> bool:
        """The box needs this lane's memory: stop every member if the lane is still idle (checked by the
        dispatcher, so a request that arrived meanwhile keeps it); True once stopped, False if it is busy."""
        return await self._ask(lambda f: self._evict(reason, f))

    def status(self) -> dict[str, Any]:
        d = self.last_decision
        return {
            "lane": self.name,
            "group": self.spec.is_group,
            "members": dict(self.spec.members),
            "slots": dict(self.spec.slots),
            "active": self.serving,
            "process": self.active,
            "per_request": dict(self.hosts),
            "depths": {m: list(ds) for m, ds in self.live_depths.items()},
            "depths_refused": dict(self.depths_refused),
            "last_choice": None if self.last_choice is None else dataclasses.asdict(self.last_choice),
            "loaded": sorted(self.upstreams),
            "loading": sorted(self._loads),
            "state": self.state.value,
            "forced": self.forced,
            "queue_depth": self.waiting(),
            "in_flight": self.in_flight,
            "switch_cost_s": self.switch_cost_s,
            "keep_both_warm": self.keep_both_warm,
            "warm_reason": self.warm_reason,
            "last_decision": None if d is None else {
                "target": d.target, "role": self.spec.members.get(d.target), "switch": d.switch,
                "explore": d.explore, "reason": d.reason,
                "expected_seconds": dict(d.seconds),
                "age_s": round(self.clock() - (self.last_decision_at or self.clock()), 3),
            },
            "recent_switches": list(self.switches),
            "last_error": self.last_error,
            "passed_over": {m: {"for_s": round(until - self.clock(), 1), "reason": self._start_failures[m][2]}
                            for m in self.spec.members if (until := self._passed_over_until(m)) is not None},
        }

    # ------------------------------------------------------------------ the dispatcher
    async def run(self) -> None:
        """The dispatcher loop; runs until cancelled. Cancelling it cancels its loads (and so the engine
        starts behind them); stopping the engines is `shutdown`'s job, before."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                while True:
                    self._wake.clear()
                    try:
                        self.step()
                        timeout = self._idle_timeout()
                    except Exception as e:  # a bug in one turn must not end the dispatcher (nor the router)
                        self._turn_failed(e)
                        timeout = None
                    try:
                        async with asyncio.timeout(timeout):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
            finally:
                self._tasks = None
                self._end()

    def _turn_failed(self, error: Exception) -> None:
        """A turn raised: what it was doing is not to be trusted, so the requests waiting are answered now (503,
        the error named) rather than left to their timeouts; the lane goes on with the next event."""
        what = f"{type(error).__name__}: {str(error)[:200]}"
        self._log_fault("lane %s: the dispatcher failed (%s); the requests waiting are answered 503 and it goes on",
                        self.name, what)
        self.last_error = f"dispatcher: {what}"
        self._answer_waiting(EngineUnavailable(
            f"'{self.name}': the router failed to dispatch this request ({what}); the router's log has the "
            "traceback. Retry; if it repeats, report it"))

    def _answer_waiting(self, error: Exception) -> None:
        """Fail every question posted and every request arriving or queued, and empty those."""
        for fut in [*self._asks, *(t.future for t in (*self._arriving, *self.queue))]:
            if not fut.done():
                fut.set_exception(error)
        self._asks.clear()
        self._arriving.clear()
        self.queue.clear()

    def _log_fault(self, message: str, *args: object) -> None:
        """A fault with its traceback, at most once a minute per lane (a fault that repeats on every turn would
        flood the log); the repeats in between are counted in the next one."""
        now = time.monotonic()
        if now - self._fault_logged_at < 60.0:
            self._faults_unlogged += 1
            return
        repeats = f" ({self._faults_unlogged} more faults since the last logged)" if self._faults_unlogged else ""
        log.exception(message + repeats, *args)
        self._fault_logged_at, self._faults_unlogged = now, 0

    def _end(self) -> None:
        """The dispatcher stopped: answer every question and request still waiting (nothing will later)."""
        self._ended = True
        self._inbox.clear()
        error = self._ended_error()
        self._answer_waiting(error)
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(error)
        self._waiters = []
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters = []

    def step(self) -> None:
        """One turn: apply every posted event, then decide. Synchronous: nothing else runs meanwhile."""
        while self._inbox:
            self._inbox.popleft()()
        self._decide()
        self._update_gauges()
        idle = self.box_idle()
        if idle and not self._was_idle and self.box is not None:
            self.box.poke()  # a load waiting for this lane's memory may go on
        self._was_idle = idle
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _idle_timeout(self) -> float | None:
        if self._head() is None and self.upstreams and self.in_flight == 0 and self.config.idle_ttl_s > 0:
            return max(0.0, self.config.idle_ttl_s - (self.clock() - self.idle_since))
        return None

    def _decide(self) -> None:
        if self.closed:
            self._fail_all(EngineUnavailable(f"'{self.name}' is shut down (the router is stopping or reloading)"))
            return
        target = self._target()
        if target is None:
            if self._idle_timeout() == 0.0 and not self._loads:
                self._unload_all("idle", None)
            elif self.state is LaneState.DRAINING and self.in_flight == 0:
                # the switch it drained for was called off (its member stopped, or back to automatic)
                self.state = LaneState.READY if self.active in self.upstreams else LaneState.UNLOADED
            return
        member, trigger = target
        member = self._as_choice(member)  # a member with live depths is served at one of them
        profile = self._process_of(member)  # the engine that serves it: its own, or a host's per request
        if profile == self.active and profile in self.upstreams:
            if member != self.serving:
                self._switch_within(member, trigger)
            self._why = trigger
            self._dispatch()
            return
        if profile == self.active and profile in self._loads:
            return  # it is loading: its outcome comes back as an event
        if profile != self.active and self.in_flight > 0 and self.active in self.upstreams:
            self.state = LaneState.DRAINING
            return
        self._bring_up(profile, trigger, member)
        if profile == self.active and profile in self.upstreams:  # both were loaded: a warm switch, served now
            if member != self.serving:
                self._switch_within(member, trigger)
            self._why = trigger
            self._dispatch()

    def _process_of(self, member: str) -> str:
        if member in self._choice_hosts:
            return self._choice_hosts[member]  # a depth choice: its member's own engine, always
        return process_for(member, self.hosts, set(self.upstreams))

    def set_hosts(self, hosts: dict[str, str], depths: dict[str, tuple[int, ...]] | None = None,
                  refused: dict[str, str] | None = None) -> None:
        """From the engine self-test: members a speculative twin's engine serves per request (drafting off);
        drafting members whose depths are chosen per request (`depths`: member -> depths), and those whose
        depths are not (`refused`: member -> why)."""
        self._post(lambda: self._set_hosts(hosts, depths or {}, refused or {}))

    def set_depths(self, depths: dict[str, tuple[int, ...]], refused: dict[str, str] | None = None) -> None:
        """Depth choices alone (the dispatcher need not run: the simulator sets them before it starts)."""
        self._set_depths(depths, refused or {})

    def _set_depths(self, depths: dict[str, tuple[int, ...]], refused: dict[str, str]) -> None:
        self.live_depths = {m: tuple(ds) for m, ds in depths.items() if m in self.spec.choice_depths and ds}
        self.depths_refused = {m: why for m, why in refused.items() if m in self.spec.members}
        self._choice_hosts = depth_choices(self.live_depths)
        if self.serving in self.live_depths:
            self.serving = self._as_choice(self.serving)
        if self.live_depths:
            log.info("lane %s: draft depth chosen per request: %s", self.name,
                     "; ".join(f"{m} at {', '.join(map(str, ds))}" for m, ds in self.live_depths.items()))
            self._emit("depths", depths={m: list(ds) for m, ds in self.live_depths.items()})

    def _set_hosts(self, hosts: dict[str, str], depths: dict[str, tuple[int, ...]] | None = None,
                   refused: dict[str, str] | None = None) -> None:
        self._set_depths(depths or {}, refused or {})
        self.hosts = {m: h for m, h in hosts.items() if m in self.spec.members and h in self.spec.members}
        for member, host in self.hosts.items():
            if member != self.active and (member in self.upstreams or member in self._loads) and (
                    host in self.upstreams or host in self._loads):
                log.info("lane %s: stopping %s, kept warm beside %s, which serves it per request", self.name, member, host)
                self._emit("unloaded", member=member, reason="served per request")
                self._stop(member, "per_request")
        if self.hosts:
            log.info("lane %s: served per request from one engine: %s", self.name,
                     ", ".join(f"{m} by {h} (drafting off)" for m, h in self.hosts.items()))
            self._emit("per_request", hosts=dict(self.hosts))

    def _switch_within(self, member: str, trigger: str) -> None:
        """The engine serving now serves `member` too, per request: a switch that costs nothing (no reload, no
        drain), recorded like one."""
        old, self.serving = self.serving, member
        self._resolve_waiters(self.base_of(member), None)
        if self._exploring is not None and self._exploring[1] != member:
            self._exploring, self._trial_left = None, 0
        self.last_switch_at = self.clock()
        self.telemetry.switches.labels(self.name, old, member, trigger).inc()
        reason = self.last_decision.reason if trigger in ("policy", "explore") and self.last_decision else trigger
        self.switches.append({"from": old, "to": member, "trigger": trigger, "seconds": 0.0, "reason": reason,
                              "at_unix": round(time.time(), 3), "process": self.active})
        log.info("lane %s: %s -> %s per request on %s's engine (%s)", self.name, old, member, self.active, reason)
        self._emit("switched", member=member, previous=old, trigger=trigger, reason=reason, seconds=0.0, warm=True,
                   process=self.active)
        self._resolve_waiters(member, None)

    def _dispatch(self) -> None:
        slots = self.spec.slots.get(self.active, 1)
        upstream = self.upstreams[self.active]
        while self.in_flight < slots:
            head = self._head()
            if head is None or (head.pin is not None and self._process_of(head.pin) != self.active):
                break
            self.queue.popleft()
            self.in_flight += 1
            serving = self.serving
            if head.pin is None:
                self._granted[head.cls] = self._granted.get(head.cls, 0) + 1
                exploring = self._exploring
                if exploring is not None and exploring[:2] == (head.cls, serving):
                    self._explored[head.cls] = self._explored.get(head.cls, 0) + 1
                    self._exploring = (head.cls, serving, exploring[2] - 1) if exploring[2] > 1 else None
                elif exploring is not None and exploring[1] == serving and self._trial_left > 0:
                    self._trial_left -= 1
                if self._exploring is None:
                    self._trial_left = 0
            member = serving if head.pin is None else self._as_choice(head.pin)
            choice = choose(member, self.active, self.spec.members, self.spec.depths,
                            "pinned" if head.pin is not None else self._why)
            head.profile, head.role = choice.member, self.role_of(choice.member)
            head.choice = self.last_choice = choice
            if head.evidence:
                head.pending = (head.cls, choice.key)
                self._pending[head.pending] = self._pending.get(head.pending, 0) + 1
            head.granted_at, head.held_since = time.perf_counter(), self.clock()
            head.future.set_result(upstream)
        self.state = LaneState.READY

    def _head(self) -> Ticket | None:
        while self.queue and not self.queue[0].waiting:
            self.queue.popleft()
        return self.queue[0] if self.queue else None

    def policy_state(self, only: str | None = None) -> GroupState:
        """The snapshot the policy decides on (`only`: among that member's depth choices alone)."""
        queued: dict[str, int] = {}
        for t in self.queue:
            if t.waiting and t.pin is None:
                queued[t.cls] = queued.get(t.cls, 0) + 1
        loaded = self.active in self.upstreams
        # a switch to a member that is loaded is only a drain, of what is in flight now; else a restart; to one
        # the serving engine serves per request, nothing
        drain_s = self.in_flight * (self.service_s or 0.0) / max(1, self.spec.slots.get(self.active, 1))
        running = set(self.upstreams)
        choices = self.choices()
        process = {m: self._process_of(m) for m in choices}
        costs = {m: 0.0 if loaded and process[m] == self.active else
                 WARM_SWITCH_COST_S + drain_s if process[m] in running else self.switch_cost_s
                 for m in choices if m != self.serving}
        members = self._choosable()
        if only is not None:
            members = {m: v for m, v in members.items() if self.base_of(m) == only} or members
        head = self._head()
        return GroupState(
            active=self.serving if loaded else None,
            seconds_since_switch=self.clock() - self.last_switch_at,
            switch_cost_s=costs or self.switch_cost_s,
            queued=queued,
            recent=self.telemetry.recent(self.name),
            evidence=self.telemetry.evidence(self.name),
            members=members,
            head_class=head.cls if head is not None and head.pin is None else None,
            explore_due=self._explore_due(),
            loaded=frozenset(m for m in choices if process[m] in running),
            head_run=self._head_run(),
            explored=frozenset(k for k, at in self._explored_at.items()
                               if self.clock() - at < self.config.policy.explore_memory_s),
            explore_budget_s=self._explore_budget_s(),
            mix=self.telemetry.mix(self.name),
            slots={m: self.spec.slots.get(self.base_of(m), 1) for m in choices},
            pending=dict(self._pending),
        )

    def _explore_budget_s(self) -> float:
        if self._serving_since is None:
            return 0.0
        return self.config.policy.explore_share * (self.clock() - self._serving_since) - self._explore_spent_s

    def _explore_due(self) -> dict[str, bool]:
        """Per class: may its next request explore? Only within `explore_share` of its requests."""
        share = self.config.policy.explore_share
        return {c: self._explored.get(c, 0) + 1 <= share * (n + 1) for c, n in self._granted.items()}

    def _head_run(self) -> tuple[str, int] | None:
        """The class of the unpinned requests at the head of the queue, and how many are expected in a row: those
        queued, and where the whole queue is of that class, the arrivals still to come in its run (`Runs`)."""
        cls, n, whole = None, 0, True
        for t in self.queue:
            if not t.waiting:
                continue
            if t.pin is not None or (cls is not None and t.cls != cls):
                whole = False
                break
            cls, n = t.cls, n + 1
        if cls is None:
            return None
        return cls, self.runs.next_of(cls, n) if whole else n

    def _target(self) -> tuple[str, str] | None:
        head = self._head()
        if self.forced is not None:
            forced = self.forced
            if not self._force_transient:
                self._fail_pinned_elsewhere(forced)
            if (forced in self.live_depths and head is not None and head.pin is None
                    and self.base_of(self.serving) == forced and self.active in self.upstreams):
                return self._policy_target(head, only=forced)[0], "forced"  # the member forced, its depth chosen
            return forced, "forced"
        if head is None:
            return None
        if head.pin is not None:
            return head.pin, "pinned"
        if not self.spec.is_group:
            return self.active, "only"
        return self._policy_target(head)

    def _policy_target(self, head: Ticket, only: str | None = None) -> tuple[str, str]:
        """The policy's choice for the head of the queue (`only`: among that member's depth choices)."""
        exploring = self._exploring
        if exploring is not None and (exploring[0] == head.cls or (
                exploring[1] == self.serving and self._trial_left > 0)) and (
                only is None or self.base_of(exploring[1]) == only):
            return exploring[1], "explore"
        if self.active in self._loads and self.active not in self.upstreams:
            last = self.last_decision.target if self.last_decision is not None else self.active
            # decided already: let the load finish before deciding again
            return last if last in self._choice_hosts and self._process_of(last) == self.active else self.active, \
                "loading"
        state = self.policy_state(only)
        try:
            decision = decide(state, self.config.policy)
        except Exception as e:  # a fault in the policy must not end the dispatcher (every request would fail)
            stay = state.active or next(iter(state.members))
            what = "stays on" if state.active else "loads"
            self._log_fault("lane %s: the switching policy failed; it %s %s", self.name, what, stay)
            decision = Decision(stay, state.active is None,
                                f"the switching policy failed ({type(e).__name__}); {what} {stay}", {})
        if self.last_decision is None or decision.target != self.last_decision.target or decision.switch:
            log.info("lane %s: %s", self.name, decision.reason)
        self.last_decision, self.last_decision_at = decision, self.clock()
        if decision.explore:
            # a reload serves a short trial of every class; a depth or drafting-off choice of the engine serving
            # is no reload (its choices are per request: other classes keep their own)
            reload = self._process_of(decision.target) not in self.upstreams
            # a free choice (the engine serving serves it per request) is asked again for each request, so its
            # decision may come with samples measured or on their way already: only the missing ones are asked for
            free = self._process_of(decision.target) == self.active != decision.target
            have = 0 if not free else state.evidence.get(head.cls, ClassEvidence()).n.get(decision.target, 0) + \
                self._pending.get((head.cls, decision.target), 0)
            self._exploring = (head.cls, decision.target, max(1, samples_needed(self.config.policy, decision.target) - have))
            self._trial_left = 2 * self.config.policy.min_samples * max(1, len(self._granted)) if reload else 0
            self._explored_at[(head.cls, decision.target)] = self.clock()
        return decision.target, "explore" if decision.explore else "policy"

    # ------------------------------------------------------------------ events (dispatcher only)
    def _enqueue(self, ticket: Ticket, front: bool) -> None:
        self._queued_in_inbox -= 1
        self._arriving.discard(ticket)
        if not ticket.waiting:
            return  # gave up before it reached the queue
        if front:
            self.queue.appendleft(ticket)
        else:
            self.queue.append(ticket)
            if ticket.pin is None:
                self.runs.arrived(ticket.cls)

    def _abandon(self, ticket: Ticket) -> None:
        fut = ticket.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            if not ticket.released:  # granted a slot it will not use
                ticket.released = True
                self._released(ticket, False)
            return
        fut.cancel()
        try:
            self.queue.remove(ticket)
        except ValueError:
            pass

    def _released(self, ticket: Ticket, upstream_failed: bool) -> None:
        self.in_flight -= 1
        if ticket.pending is not None:
            left = self._pending.get(ticket.pending, 0) - 1
            if left > 0:
                self._pending[ticket.pending] = left
            else:
                self._pending.pop(ticket.pending, None)
        held = self.clock() - (ticket.held_since if ticket.held_since is not None else self.clock())
        self.service_s = held if self.service_s is None else 0.8 * self.service_s + 0.2 * held
        process = ticket.choice.process if ticket.choice is not None else ticket.profile
        if upstream_failed and process:
            # The engine refused the connection or broke it: ask the backends again before the next grant. The
            # engine that served it, not the member: a plain member or a depth served per request is its host's.
            self.upstreams.pop(process, None)
        if self.in_flight == 0:
            self.idle_since = self.clock()

    def _force(self, member: str | None, fut: asyncio.Future[None], transient: bool = False) -> None:
        self._force_transient = transient
        superseded = [(m, f) for m, f in self._waiters if m != member and not f.done()]
        if superseded and self.forced is not None and self.forced != member:
            for m, f in superseded:
                if m == self.forced:
                    f.set_exception(EngineUnavailable(
                        f"the switch of '{self.name}' to '{m}' was called off: " + (
                            f"switched to '{member}' instead" if member else "handed back to the policy")))
            self._waiters = [(m, f) for m, f in self._waiters if not f.done()]
        if member is not None and member not in self.spec.members and member not in self._choice_hosts:
            base = split_choice(member)[0]
            why = self.depths_refused.get(base) or "whether its engine honours a per-request depth is not known yet"
            fut.set_exception(BadRequest(f"'{member}': {base} is not served at a depth per request: {why}",
                                         hint=f"`llamactl switch {self.name} {base}` serves it at its n_max"))
            return
        self.forced = member
        if member is None or ((self.serving == member or self.base_of(self.serving) == member)
                              and self.active in self.upstreams):
            fut.set_result(None)
        else:
            self._waiters.append((member, fut))

    def _unload(self, profile: str, fut: asyncio.Future[bool], why: str = "llamactl down") -> None:
        if self.forced == profile:
            self.forced = None
        self._not_warm.add(profile)  # stopped on purpose: not loaded again in the background
        was = profile in self.upstreams or profile in self._loads
        stopped = EngineUnavailable(f"profile '{profile}' was stopped ({why}) before it served",
                                    extra={"profile": profile})
        if profile == self.active:
            self._fail_waiting(profile, stopped)
            self.state = LaneState.UNLOADED
        else:  # what waits for this member in particular: requests pinned to it, a switch to it
            self._fail_pinned(profile, stopped)
        self._stop(profile, "down", fut, result=was)
        if was:
            self._emit("unloaded", member=profile, reason="down")

    def _evict(self, reason: str, fut: asyncio.Future[bool]) -> None:
        if not self.box_idle() or self.closed:
            fut.set_result(False)
            return
        log.info("lane %s: %s", self.name, reason)
        stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unload_all("evicted", stopped)
        stopped.add_done_callback(lambda _f: None if fut.done() else fut.set_result(True))

    def _engine_down(self, profile: str) -> None:
        self._cancel_load(profile, background_only=True)
        self.upstreams.pop(profile, None)

    def _failed(self, profile: str, error: Exception) -> None:
        self._cancel_load(profile, background_only=True)
        self._not_warm.add(profile)
        self.upstreams.pop(profile, None)
        if self.box is not None:
            self.box.released(profile)  # given up on: nothing of it runs any more
        if profile == self.active or self.forced == profile:
            self._fail_start(profile, error)

    def _loaded(self, profile: str, load: _Load) -> None:
        """A load task ended (loaded, failed or cancelled)."""
        if self._loads.get(profile) is not load:
            return  # superseded (unloaded meanwhile)
        del self._loads[profile]
        if load.task.cancelled():
            return
        outcome = load.task.result()
        foreground = profile == self.active
        if isinstance(outcome, Exception):
            error = outcome
            if not foreground:  # a background warm-up: not fatal, switches go back to stop-then-start
                self._switch_hard_from_now(profile, self.active, error)
            elif not self._pass_over(profile, error):
                self._fail_start(profile, error)
            return
        self._not_warm.discard(profile)
        self._start_failures.pop(profile, None)
        self.upstreams[profile] = outcome
        if not foreground:
            log.info("lane %s: %s loaded beside %s (both warm)", self.name, profile, self.active)
            return
        self._served(profile, load.started, load.switch_from, load.trigger, member=load.member)

    # ------------------------------------------------------------------ loading and stopping
    def _bring_up(self, profile: str, trigger: str, member: str | None = None) -> None:
        old = self.active if self.active in self.upstreams else None
        switching = old is not None and old != profile
        if self.active != profile and self.active in self._loads and not self.keep_both_warm:
            self._stop(self.active, "switch")  # chosen away from while it loaded: do not keep it
        self.active = profile
        if switching and profile in self.upstreams:  # both loaded: a switch is only a drain, done now
            self._served(profile, self.clock(), old, trigger, warm=True, member=member)
            return
        self.state = LaneState.SWITCHING if switching else LaneState.LOADING
        self._emit("loading", member=profile, previous=old, trigger=trigger,
                   reason=self.last_decision.reason if trigger in ("policy", "explore") and self.last_decision else trigger)
        if profile in self._loads:  # a background warm-up of it is under way: it becomes the foreground load
            load = self._loads[profile]
            load.started, load.switch_from, load.trigger, load.member = self.clock(), old, trigger, member
            return
        stop_first = old if switching and not self.keep_both_warm else None
        if stop_first is not None:
            self.upstreams.pop(stop_first, None)
            self.telemetry.unloads.labels(stop_first, "switch").inc()
        self._start_load(profile, switch_from=old, trigger=trigger, stop_first=stop_first,
                         hard_fallback=old if switching and self.keep_both_warm else None, member=member)

    def _start_load(self, profile: str, *, switch_from: str | None = None, trigger: str = "",
                    stop_first: str | None = None, hard_fallback: str | None = None,
                    member: str | None = None) -> None:
        assert self._tasks is not None, "the dispatcher is not running"
        self.telemetry.loads.labels(profile).inc()
        background = profile != self.active
        task = self._tasks.create_task(self._load(profile, stop_first, hard_fallback, background),
                                       name=f"load:{profile}")
        load = self._loads[profile] = _Load(task, self.clock(), switch_from, trigger, member)
        task.add_done_callback(lambda _t: self._post(lambda: self._loaded(profile, load)))

    async def _load(self, profile: str, stop_first: str | None, hard_fallback: str | None,
                    background: bool = False) -> Upstream | Exception:
        """A load task: stop what must make room first, then have the backends make `profile` ready. A failure
        is returned, not raised (a task that raises would end the dispatcher's TaskGroup)."""
        try:
            return await self._load_or_raise(profile, stop_first, hard_fallback, background)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting requests
            return e

    async def _load_or_raise(self, profile: str, stop_first: str | None, hard_fallback: str | None,
                             background: bool = False) -> Upstream:
        if not serving_now(self.backends, profile):
            await fetch_models(self.backends, profile)  # before stopping the other member: it serves meanwhile
        if stop_first is not None:
            await self._stop_engine(stop_first)
        pending_stop = self._stops.get(profile)
        if pending_stop is not None:
            await asyncio.wait([pending_stop])
        try:
            return await self._ready(profile, may_evict=not background)
        except Exception as e:
            if hard_fallback is None:
                raise
            # It did not load beside the other member (memory the plan did not foresee, say): switch the hard
            # way from now on, which frees the other member's memory first.
            # (bound now: Python unbinds `e` when the except block ends, and the event may run after that)
            self._post(lambda error=e: self._switch_hard_from_now(profile, hard_fallback, error, forget=True))
            await self._stop_engine(hard_fallback)
            return await self._ready(profile)

    async def _ready(self, profile: str, *, may_evict: bool = True) -> Upstream:
        """Room from the box (where there is one), then the engine; what the box granted is given back if the
        engine does not come up (a failure or a cancel)."""
        if self.box is not None:
            if serving_now(self.backends, profile):
                self.box.serving(self.name, profile)
            else:
                try:
                    await self.box.admit(self.name, profile, may_evict=may_evict)
                except WorkerError as e:  # before the request hears it: the engine owns "waiting for worker"
                    worker_down(self.backends, profile, e)
                    raise
        try:
            upstream = await self.backends.ensure_ready(profile)
        except BaseException:
            if self.box is not None:
                self.box.released(profile)
            raise
        if self.box is not None:
            self.box.loaded(profile)
        return upstream

    def _stop(self, profile: str, reason: str, fut: asyncio.Future[Any] | None = None, result: Any = None) -> None:
        """Cancel a load of `profile`, forget it, and stop its engine in a task; `fut` gets `result` after."""
        self._cancel_load(profile)
        if self.upstreams.pop(profile, None) is not None:
            self.telemetry.unloads.labels(profile, reason).inc()
        assert self._tasks is not None, "the dispatcher is not running"
        previous = self._stops.get(profile)
        task = self._tasks.create_task(self._stop_after(previous, profile), name=f"stop:{profile}")
        self._stops[profile] = task

        def done(_t: asyncio.Task[None]) -> None:
            if self._stops.get(profile) is task:
                del self._stops[profile]
            if fut is not None and not fut.done():
                fut.set_result(result)
        task.add_done_callback(done)

    async def _stop_after(self, previous: asyncio.Task[None] | None, profile: str) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await self._stop_engine(profile)

    async def _stop_engine(self, profile: str) -> None:
        """Stop `profile` in the backends (idempotent; a start in progress is cancelled there)."""
        try:
            await self.backends.stop(profile)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("lane %s: stopping %s failed: %s", self.name, profile, e)
        finally:
            if self.box is not None:
                self.box.released(profile)

    def _cancel_load(self, profile: str, *, background_only: bool = False) -> None:
        load = self._loads.get(profile)
        if load is None or (background_only and profile == self.active):
            return
        del self._loads[profile]
        load.task.cancel()

    def _shutdown(self, fut: asyncio.Future[None]) -> None:
        self.closed, self.forced = True, None
        self._unload_all("shutdown", fut)

    def _fail_all(self, failure: Exception) -> None:
        for member in self.spec.members:
            self._fail_waiting(member, failure)

    def _unload_all(self, reason: str, fut: asyncio.Future[None] | None) -> None:
        pending = []
        for member in self.spec.members:
            if member in self.upstreams:
                log.info("lane %s: unloading %s (%s)", self.name, member, reason)
                self._emit("unloaded", member=member, reason=reason)
            # Every member, loaded or not: a warm-up cut short may be half-way through a start in the backends.
            stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._stop(member, reason, stopped)
            pending.append(stopped)
        self.state = LaneState.UNLOADED
        if fut is not None:
            gathered = asyncio.gather(*pending)
            gathered.add_done_callback(lambda _g: None if fut.done() else fut.set_result(None))

    def _served(self, profile: str, started: float, old: str | None, trigger: str, *, warm: bool = False,
                member: str | None = None) -> None:
        """`profile` now serves as the active member (as `member`, where that is one of its depth choices):
        record the load or switch, wake its waiters."""
        serving = member if member is not None and member != profile and self.base_of(member) == profile \
            else self._as_choice(profile)
        if self._exploring is not None and self.base_of(self._exploring[1]) != profile:
            self._exploring = None  # switched away from the member being explored: that exploration is over
            self._trial_left = 0
        if self._serving_since is None:
            self._serving_since = self.clock()
        elapsed = self.clock() - started
        self.serving = serving
        self.state = LaneState.READY
        self.last_error = None
        self.last_switch_at = self.clock()
        if old is not None and old != profile:
            if trigger == "explore" and not warm:
                self._explore_spent_s += 2 * elapsed  # there, and most likely back
            if not warm:  # the cost of a restart: what a switch costs when the other member is not loaded
                self.switch_cost_s = elapsed if self.switch_cost_s is None else 0.5 * self.switch_cost_s + 0.5 * elapsed
            self.telemetry.switches.labels(self.name, old, profile, trigger).inc()
            self.telemetry.switch_seconds.labels(self.name).observe(elapsed)
            reason = self.last_decision.reason if trigger in ("policy", "explore") and self.last_decision else trigger
            self.switches.append({"from": old, "to": profile, "trigger": trigger, "seconds": round(elapsed, 3),
                                  "reason": reason, "at_unix": round(time.time(), 3)})
            log.info("lane %s: switched %s -> %s in %.2fs (%s)", self.name, old, profile, elapsed, reason)
            self._emit("switched", member=profile, previous=old, trigger=trigger, reason=reason,
                       seconds=round(elapsed, 3), warm=warm)
        else:
            self._emit("ready", member=profile, seconds=round(elapsed, 3))
            self.load_s[profile] = elapsed
            if self.switch_cost_s is None and self.spec.is_group:
                self.switch_cost_s = elapsed  # a first estimate: a switch costs about one load
        self._resolve_waiters(profile, None)
        self._resolve_waiters(serving, None)
        if self.keep_both_warm:
            self._warm_others()

    def _warm_others(self) -> None:
        """Load the members that are not loaded, in the background: the next switch is then a drain."""
        for member in self.spec.members:
            if self.hosts.get(member) in (*self.upstreams, *self._loads):
                continue  # served per request by an engine that runs: a second copy of the weights buys nothing
            if member not in self.upstreams and member not in self._loads and member not in self._not_warm:
                self._start_load(member)

    def _switch_hard_from_now(self, profile: str, beside: str | None, error: Exception, *,
                              forget: bool = False) -> None:
        self.keep_both_warm = False
        self.warm_reason = f"loading {profile} beside {beside} failed: {getattr(error, 'message', error)}"
        log.warning("lane %s: %s; switching hard from now on", self.name, self.warm_reason)
        self._emit("hard_switching", member=profile, reason=self.warm_reason)
        if forget and beside is not None:
            self.upstreams.pop(beside, None)
            self.telemetry.unloads.labels(beside, "switch").inc()

    def _choosable(self) -> dict[str, bool]:
        """The members the policy may choose (member -> speculative): those not passed over, or every one
        where each is (the next request tries again)."""
        members = {m: role == "spec" for m, role in self.choices().items()}
        choosable = {m: spec for m, spec in members.items()
                     if self._passed_over_until(b := self.base_of(m)) is None or (b == self.active and b in self.upstreams)}
        return choosable or members

    def _passed_over_until(self, member: str) -> float | None:
        """When a group member that failed to start may be chosen again (None: it may now)."""
        failed = self._start_failures.get(member)
        if failed is None:
            return None
        count, at, _ = failed
        until = at + min(self.config.passed_over_max_s, self.config.passed_over_s * 2 ** (count - 1))
        return until if until > self.clock() else None

    def _pass_over(self, profile: str, error: Exception) -> bool:
        """A group member the policy chose failed to start: the other members serve the queue while it is
        passed over (requests pinned to it fail with the reason). False where there is no other member to
        serve: a lane of one, a forced member, or every member failing."""
        if not self.spec.is_group or self.forced == profile:
            return False
        reason = str(getattr(error, "message", error))
        count = self._start_failures.get(profile, (0, 0.0, ""))[0] + 1
        self._start_failures[profile] = (count, self.clock(), reason[:500])
        if not any(self._passed_over_until(m) is None for m in self.spec.members):
            return False
        wait = self._passed_over_until(profile) - self.clock()  # type: ignore[operator]
        self.last_error = f"{profile}: {reason}"
        log.error("lane %s: cannot start %s: %s; the other members serve, %s is passed over for %.0f s",
                  self.name, profile, reason, profile, wait)
        self._emit("failed", member=profile, reason=reason[:500], passed_over_s=round(wait))
        self._not_warm.add(profile)
        if self._exploring is not None and self._exploring[1] == profile:
            self._exploring, self._trial_left = None, 0
        self.state = LaneState.UNLOADED
        self._fail_waiting(profile, self._start_failure(profile, error), pinned_only=True)
        return True

    def _start_failure(self, profile: str, error: Exception) -> EngineUnavailable:
        return EngineUnavailable(
            f"profile '{profile}' (lane '{self.name}') could not be started: {getattr(error, 'message', error)}",
            hint=getattr(error, "hint", None), extra={"profile": profile},
        )

    def _fail_start(self, profile: str, error: Exception) -> None:
        self.state = LaneState.FAILED
        self.last_error = f"{profile}: {error}"
        log.error("lane %s: cannot start %s: %s", self.name, profile, error)
        self._emit("failed", member=profile, reason=str(getattr(error, "message", error))[:500])
        if self.forced == profile:
            self.forced = None  # do not retry a failing forced start in a loop
        self._fail_waiting(profile, self._start_failure(profile, error))

    def _fail_waiting(self, profile: str, failure: Exception, *, pinned_only: bool = False) -> None:
        """Fail the queued requests (but those pinned to another member; with `pinned_only`, all but those
        pinned to this one) and the force() waiters for it."""
        keep: deque[Ticket] = deque()
        while self.queue:
            ticket = self.queue.popleft()
            if not ticket.waiting:
                continue
            if member_of(ticket.pin) not in (None, profile) or (pinned_only and ticket.pin is None):
                keep.append(ticket)
            else:
                ticket.future.set_exception(failure)
        self.queue = keep
        self._resolve_waiters(profile, failure)

    def _fail_pinned_elsewhere(self, forced: str) -> None:
        """Requests naming another member than the one `llamactl switch` forced would wait for nothing: say so."""
        for ticket in self.queue:
            if ticket.waiting and ticket.pin is not None and self.base_of(ticket.pin) != self.base_of(forced):
                ticket.future.set_exception(EngineUnavailable(
                    f"'{ticket.pin}' is not served now: '{self.name}' is switched to '{forced}' (llamactl switch)",
                    hint=f"`llamactl switch {self.name} auto` hands it back to the policy, or ask for '{self.name}'",
                    extra={"profile": ticket.pin}))

    def _fail_pinned(self, profile: str, failure: Exception) -> None:
        for ticket in self.queue:
            if ticket.waiting and member_of(ticket.pin) == profile:
                ticket.future.set_exception(failure)
        self._resolve_waiters(profile, failure)

    def _resolve_waiters(self, profile: str, error: Exception | None) -> None:
        keep = []
        for member, fut in self._waiters:
            if fut.done():
                continue
            if member == profile or (error is not None and self.base_of(member) == profile):
                fut.set_exception(error) if error else fut.set_result(None)
            else:
                keep.append((member, fut))
        self._waiters = keep

    # ------------------------------------------------------------------ gauges
    def _update_gauges(self) -> None:
        t = self.telemetry
        if self._gauges is None:
            self._gauges = (t.queue_depth.labels(self.name), t.in_flight.labels(self.name))
        self._gauges[0].set(self.waiting())
        self._gauges[1].set(self.in_flight)
        shape = (self.serving, self.state, tuple(sorted(self.upstreams)))
        if shape == self._gauge_shape:
            return  # member gauges only change with the lane's state
        self._gauge_shape = shape
        for member in self.spec.members:
            t.active_member.labels(self.name, member).set(1 if member == self.base_of(self.serving) else 0)
            state = "ready" if member in self.upstreams else (
                self.state.value if member == self.active and self.state in (
                    LaneState.LOADING, LaneState.SWITCHING, LaneState.FAILED) else "stopped")
            for s in ("ready", "loading", "switching", "failed", "stopped"):
                t.profile_state.labels(member, s).set(1 if s == state else 0)
