"""The box scheduler: the one owner of the box's memory for `llamactl serve`.

A lane about to load a member asks `admit` for room and awaits it. The scheduler sizes the profile (the
daemon's `Sizer`: the memory plan on the box as it is now, and on the empty box), then grants at once where it
fits beside what runs, else has the owning lanes stop the idle engines `evict.choose` picks (each lane stops its
own engine, never another's), else waits until the memory it needs is idle, else refuses (it never fits).
The grant is a holding in the ledger; the lane tells `loaded` when the engine serves and `released` when it
stopped. Every decision is synchronous between awaits, so two admits never grant the same MiB twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from llamactl.box.evict import Choice, Resident, choose
from llamactl.box.ledger import Ledger
from llamactl.errors import DoesNotFit

log = logging.getLogger("llamactl.box")


@dataclass(frozen=True)
class Capacity:
    """What the box offers our engines with none of them running, per device (MiB, less the plan's margin), and
    each device's size."""

    mib: Mapping[str, int]
    total: Mapping[str, int | None] = field(default_factory=dict)
    measured: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # profile -> device -> MiB (NVML)


@dataclass(frozen=True)
class Placement:
    """Another way to place a profile on the empty box, as good as its plan alone (a one-card model on another
    card): eviction weighs each, so a load frees the card that costs least to free."""

    needs: Mapping[str, int]
    launch: Any = None
    where: str = ""


@dataclass(frozen=True)
class Sizing:
    """A profile's memory per device (MiB): planned alone on the empty box, and planned beside what runs where
    that keeps it as good as alone (then no eviction is needed); `launch_*` is what the engine's start plans
    with for each (opaque here)."""

    alone: Mapping[str, int]
    beside: Mapping[str, int] | None = None
    launch_alone: Any = None
    launch_beside: Any = None
    never: str | None = None  # the plan's words where it does not fit even on the empty box
    elsewhere: tuple[Placement, ...] = ()


class Sizer(Protocol):
    def capacity(self) -> Capacity: ...

    def size(self, profile: str, free: Mapping[str, int], empty: Mapping[str, int]) -> Sizing:
        """`free`: MiB per device left beside what runs; `empty`: MiB per device with nothing of ours running
        (both less the reserve)."""
        ...


class LaneView(Protocol):
    """What the scheduler reads of a lane (synchronously) and asks of it."""

    name: str

    def box_idle(self) -> bool: ...

    def box_idle_s(self) -> float: ...

    def box_keep(self) -> bool: ...

    async def evict(self, reason: str) -> bool: ...


class NoRoom(DoesNotFit):
    """A load that may not evict (a background warm-up) does not fit beside what runs."""


class BoxScheduler:
    def __init__(self, sizer: Sizer, *, reserve: Mapping[str, int] | None = None, min_residence_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 run_io: Callable[..., Awaitable[Any]] = asyncio.to_thread) -> None:
        self.sizer = sizer
        self.run_io = run_io  # where the sizer's probes and plans run (a thread: they read files and NVML)
        self.reserve = dict(reserve or {})
        self.min_residence_s = min_residence_s
        self.clock = clock
        self.on_event = on_event
        self.lanes: dict[str, LaneView] = {}
        self.ledger = Ledger(capacity={}, reserve=self.reserve)
        self._launch: dict[str, Any] = {}  # profile -> what its engine's start plans with
        self._granted_at: dict[str, float] = {}
        self._ready_at: dict[str, float] = {}
        self.load_s: dict[str, float] = {}  # profile -> its last load's seconds (grant to ready)
        self._last_grant: dict[str, dict[str, int]] = {}  # profile -> what its last grant was sized at
        self._waiting: dict[str, dict[str, Any]] = {}  # profile -> what it waits for (status)
        self._wakers: list[asyncio.Future[None]] = []
        self._deciding = asyncio.Lock()
        self.evictions: list[dict[str, Any]] = []  # the last few, newest last (status)
        self.counters: dict[str, float] = {"evictions": 0, "wait_s": 0.0, "refused": 0}

    # -- what lanes call ------------------------------------------------------------------------------

    def register(self, lane: LaneView) -> None:
        self.lanes[lane.name] = lane

    def unregister(self, lane: LaneView) -> None:
        if self.lanes.get(lane.name) is lane:
            del self.lanes[lane.name]

    async def admit(self, lane: str, profile: str, *, may_evict: bool = True) -> None:
        """Return once `profile` (a member of `lane`) holds the memory it needs; raises DoesNotFit where it never
        will (or NoRoom, where `may_evict` is false and it does not fit now). Cancelling it leaves nothing held."""
        started = self.clock()
        self.ledger.release(profile)  # a start after a crash or a stop: what it held is planned again
        try:
            while True:
                async with self._deciding:
                    capacity = await self.run_io(self.sizer.capacity)
                    self.ledger.capacity = dict(capacity.mib)
                    self.ledger.total = dict(capacity.total)
                    self.ledger.measured = {p: dict(m) for p, m in capacity.measured.items()}
                    sizing = await self.run_io(self.sizer.size, profile, self.ledger.free(),
                                               {d: self.ledger.usable(d) for d in self.ledger.capacity})
                    if sizing.never is not None:
                        raise self._refuse(profile, sizing.never)
                    if sizing.beside is not None and self.ledger.fits(sizing.beside):
                        return self._grant(lane, profile, sizing.beside, sizing.launch_beside, started, "beside what runs")
                    choice, placement = self._choose(lane, sizing)
                    if choice.verdict == "fits":
                        made = "as planned alone" if not self.ledger.holdings else "in the room made"
                        return self._grant(lane, profile, placement.needs, placement.launch, started,
                                           f"{made}{placement.where}")
                    if choice.verdict == "never":
                        raise self._refuse(profile, choice.why)
                    if not may_evict:
                        raise NoRoom(f"'{profile}' does not fit beside what runs: {choice.why}")
                    if choice.verdict == "evict":
                        stopped = await self._evict(choice, profile, lane)
                        if stopped:
                            continue
                    woken = self._waker()
                self._note_wait(profile, lane, choice)
                try:
                    async with asyncio.timeout(choice.retry_in_s if choice.verdict == "wait" else 1.0):
                        await woken
                except TimeoutError:
                    pass
        finally:
            self._waiting.pop(profile, None)

    def serving(self, lane: str, profile: str) -> None:
        """`profile`'s engine serves without having asked (it restarted itself after a crash, or when its RPC
        worker came back): hold it at its last grant (NVML's measure corrects that where there is one) rather
        than plan it again, which would ask its workers, who serve one client at a time and have it already."""
        if profile in self.ledger.holdings:
            self.loaded(profile)
            return
        self.ledger.hold(profile, lane, self._last_grant.get(profile, {}), "running")
        self._ready_at[profile] = self.clock()
        log.info("box: %s serves again on its own (held at its last grant)", profile)

    def loaded(self, profile: str) -> None:
        """The engine of `profile` serves: its reservation becomes a holding."""
        holding = self.ledger.holdings.get(profile)
        if holding is not None:
            self.ledger.hold(profile, holding.lane, holding.mib, "running")
            self._ready_at[profile] = self.clock()
            if profile in self._granted_at:
                self.load_s[profile] = self.clock() - self._granted_at.pop(profile)

    def released(self, profile: str) -> None:
        """The engine of `profile` stopped (or its load failed): its memory is free again."""
        if self.ledger.release(profile) is not None:
            self._ready_at.pop(profile, None)
            self._granted_at.pop(profile, None)
            self.poke()

    def poke(self) -> None:
        """Something changed that may let a waiting load go on (a release, a lane gone idle)."""
        wakers, self._wakers = self._wakers, []
        for fut in wakers:
            if not fut.done():
                fut.set_result(None)

    def launch_probe(self, profile: str) -> Any:
        """What the engine's start of `profile` plans with (the inventory its grant was sized on), or None."""
        return self._launch.get(profile)

    def status(self) -> dict[str, Any]:
        return {"devices": self.ledger.view(), "waiting": dict(self._waiting), "evictions": list(self.evictions),
                "min_residence_s": self.min_residence_s, "counters": dict(self.counters)}

    # -- inside --------------------------------------------------------------------------------------

    def _grant(self, lane: str, profile: str, needs: Mapping[str, int], launch: Any, started: float,
               placed: str) -> None:
        self.ledger.hold(profile, lane, needs, "loading")
        self._last_grant[profile] = dict(needs)
        log.info("box: %s gets %s (%s)", profile, ", ".join(f"{m} MiB on {d}" for d, m in sorted(needs.items()))
                 or "no memory we count", placed)
        self._launch[profile] = launch
        self._granted_at[profile] = self.clock()
        waited = self.clock() - started
        self.counters["wait_s"] += waited
        if waited > 0.5:
            log.info("box: %s got its memory after waiting %.1f s", profile, waited)

    def _refuse(self, profile: str, why: str) -> DoesNotFit:
        self.counters["refused"] += 1
        return DoesNotFit(f"profile '{profile}' {why}",
                          hint="`llamactl plan` shows the plan; lower ctx_size, use fewer layers or a smaller quant, "
                               "or lower LLAMACTL_RESERVE_MIB")

    def _residents(self) -> list[Resident]:
        now = self.clock()
        by_lane: dict[str, list[str]] = {}
        for h in self.ledger.holdings.values():
            by_lane.setdefault(h.lane, []).append(h.profile)
        residents = []
        for name, profiles in by_lane.items():
            view = self.lanes.get(name)
            loading = any(self.ledger.holdings[p].state == "loading" for p in profiles)
            ready = [self._ready_at.get(p, now) for p in profiles]
            residents.append(Resident(
                lane=name, profiles=tuple(sorted(profiles)),
                idle=view is not None and not loading and view.box_idle(),
                idle_s=view.box_idle_s() if view is not None else 0.0,
                resident_s=now - max(ready), reload_s=max(self.load_s.get(p, 0.0) for p in profiles),
                keep=view is not None and view.box_keep()))
        return residents

    def _choose(self, lane: str, sizing: Sizing) -> tuple[Choice, Placement]:
        """The best of the profile's placements on the empty box: one that fits now, else the cheapest eviction
        (fewest lanes, then least worth), else the soonest wait; `never` only where every placement is never."""
        residents = self._residents()
        worth = {r.lane: r.worth for r in residents}
        options = [Placement(sizing.alone, sizing.launch_alone), *sizing.elsewhere]
        rank = {"fits": 0, "evict": 1, "wait": 2, "never": 3}

        def cost(choice: Choice) -> tuple[float, ...]:
            if choice.verdict == "evict":
                return (rank["evict"], len(choice.victims), sum(worth.get(v, 0.0) for v in choice.victims))
            if choice.verdict == "wait":
                return (rank["wait"], choice.retry_in_s if choice.retry_in_s is not None else float("inf"))
            return (rank[choice.verdict],)

        best: tuple[Choice, Placement] | None = None
        for placement in options:
            choice = choose(placement.needs, self.ledger, residents, requester=lane,
                            min_residence_s=self.min_residence_s)
            if best is None or cost(choice) < cost(best[0]):
                best = (choice, placement)
        assert best is not None
        return best

    async def _evict(self, choice: Choice, profile: str, lane: str) -> bool:
        """Have each victim lane stop its engines; True if all did (a lane busy again by now says no)."""
        reason = f"evicted for {profile} ({lane}): {choice.why}"
        all_stopped = True
        for victim in choice.victims:
            view = self.lanes.get(victim)
            stopped = view is not None and await view.evict(reason)
            if stopped:
                self.counters["evictions"] += 1
                record = {"lane": victim, "for": profile, "why": choice.why, "at_unix": round(time.time(), 3)}
                self.evictions = [*self.evictions[-19:], record]
                log.warning("box: stopped idle %s to make room for %s (%s)", victim, profile, choice.why)
                self._emit("evicted", lane=victim, profile=profile, why=choice.why)
            all_stopped = all_stopped and stopped
        return all_stopped

    def _note_wait(self, profile: str, lane: str, choice: Choice) -> None:
        if profile not in self._waiting:
            log.info("box: %s waits for memory: %s", profile, choice.why)
            self._emit("waiting", lane=lane, profile=profile, why=choice.why)
        self._waiting[profile] = {"lane": lane, "why": choice.why, "waits_for": list(choice.waits_for)}

    def _waker(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wakers.append(fut)
        return fut

    def _emit(self, what: str, **data: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(what, data)
            except Exception as e:  # noqa: BLE001 - a listener must never stop a load
                log.warning("box: event listener failed: %s", e)


class BoxCollector:
    """The box's figures for /metrics, read at each scrape: evictions, seconds loads waited for memory, loads
    refused, and per device the MiB ours hold and the MiB free."""

    def __init__(self, box: BoxScheduler) -> None:
        self.box = box

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = self.box.counters
        yield CounterMetricFamily("llamactl_box_evictions", "Idle lanes stopped to make room for another profile",
                                  value=counters["evictions"])
        yield CounterMetricFamily("llamactl_box_wait_seconds", "Seconds loads waited for memory",
                                  value=counters["wait_s"])
        yield CounterMetricFamily("llamactl_box_refused", "Loads refused: they do not fit even on the empty box",
                                  value=counters["refused"])
        held = GaugeMetricFamily("llamactl_box_held_mib", "MiB our engines hold (or loads have reserved) per device",
                                 labels=["device", "profile"])
        free = GaugeMetricFamily("llamactl_box_free_mib", "MiB left per device, after the reserve",
                                 labels=["device"])
        for row in self.box.ledger.view():
            for profile, mib in {**row["ours_mib"], **row["loading_mib"]}.items():
                held.add_metric([row["device"], profile], mib)
            free.add_metric([row["device"]], row["free_mib"])
        yield held
        yield free
