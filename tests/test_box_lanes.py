"""Lanes sharing one box: the scheduler with a sizer of plain numbers, recording engines whose loads finish when
the test says, a manual clock, the dispatchers' turns drained between steps."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from llamactl.box.scheduler import BoxScheduler, Capacity, Placement, Sizing
from llamactl.router.backends import Upstream
from llamactl.router.catalog import LaneSpec
from llamactl.router.errors import EngineUnavailable
from llamactl.router.lane import Lane, LaneConfig, LaneState, Ticket
from llamactl.router.policy import PolicyConfig
from llamactl.router.telemetry import Telemetry
from llamactl.rpc.errors import WorkerUnreachable
from tests.test_lane import ManualClock, RecordingEngines, settle


class Sizes:
    """Each profile needs a fixed MiB per device; the box has `capacity`."""

    def __init__(self, capacity: dict[str, int], needs: dict[str, dict[str, int]],
                 elsewhere: dict[str, list[dict[str, int]]] | None = None) -> None:
        self.cap = capacity
        self.needs = needs
        self.elsewhere = elsewhere or {}  # profile -> its other placements (a one-card model on another card)
        self.sized: list[str] = []
        self.workers_down: dict[str, str] = {}  # profile -> the worker its planning finds down

    def capacity(self) -> Capacity:
        return Capacity(self.cap, dict(self.cap))

    def size(self, profile: str, free: Mapping[str, int], empty: Mapping[str, int]) -> Sizing:
        self.sized.append(profile)
        if profile in self.workers_down:  # planning asks the profile's RPC workers, and one does not answer
            raise WorkerUnreachable(f"worker '{self.workers_down[profile]}' is unreachable",
                                    worker=self.workers_down[profile])
        need = self.needs[profile]
        if any(need.get(d, 0) > empty.get(d, 0) for d in need):
            return Sizing(alone=need, never="does not fit even on an empty box")
        return Sizing(alone=need, launch_alone=("alone", profile),
                      elsewhere=tuple(Placement(mib, ("elsewhere", profile, i), f" on {'+'.join(mib)}")
                                      for i, mib in enumerate(self.elsewhere.get(profile, []))))


async def inline(fn, *args):
    return fn(*args)


class SupervisedEngines(RecordingEngines):
    """Engines that can say what serves already (an engine restarts itself after a crash, as the daemon's do)."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple[str, str]] = []  # (profile, message) of each worker_down

    def serving(self, profile: str) -> bool:
        return profile in self.running

    def worker_down(self, profile: str, error: Exception) -> None:
        self.told.append((profile, str(getattr(error, "message", error))))


class Box:
    def __init__(self, capacity, needs, *, min_residence_s=0.0, reserve=None, elsewhere=None):
        self.clock = ManualClock()
        self.engines = SupervisedEngines()
        self.sizes = Sizes(capacity, needs, elsewhere)
        self.events: list[tuple[str, dict]] = []
        self.scheduler = BoxScheduler(self.sizes, clock=self.clock, min_residence_s=min_residence_s, reserve=reserve,
                                      run_io=inline, on_event=lambda what, data: self.events.append((what, data)))
        self.lanes: dict[str, Lane] = {}
        self.tasks: list[asyncio.Task] = []

    def lane(self, name: str, members: dict[str, str] | None = None, *, keep=False, keep_both_warm=False) -> Lane:
        members = members or {name: "plain"}
        spec = LaneSpec(name, dict(members), {m: 1 for m in members}, len(members) > 1)  # type: ignore[arg-type]
        lane = Lane(spec, self.engines, Telemetry(clock=self.clock),
                    LaneConfig(policy=PolicyConfig(min_dwell_s=0), keep_both_warm=keep_both_warm), clock=self.clock)
        lane.box, lane.keep = self.scheduler, keep
        self.scheduler.register(lane)
        self.lanes[name] = lane
        self.tasks.append(asyncio.create_task(lane.run()))
        return lane

    async def close(self):
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def box_test(capacity, needs, **kw):
    def wrap(test):
        def run():
            async def main():
                box = Box(capacity, needs, **kw)
                try:
                    await test(box)
                finally:
                    await box.close()
            asyncio.run(main())
        run.__name__ = test.__name__
        return run
    return wrap


def ask(lane: Lane, pin: str | None = None) -> tuple[Ticket, asyncio.Task[Upstream]]:
    ticket = Ticket(cls="chat", pin=pin)
    return ticket, asyncio.create_task(lane.acquire(ticket))


async def serve_one(box: Box, lane: Lane) -> None:
    """A request on `lane` that loads (if needed) and completes."""
    ticket, task = ask(lane)
    await settle()
    if lane.active in box.engines.pending:
        box.engines.finish(lane.active)
    await settle()
    await task
    lane.release(ticket)
    await settle()


TWO_ON_ONE = dict(capacity={"CPU": 520}, needs={"a": {"CPU": 320}, "b": {"CPU": 320}, "c": {"CPU": 150}})


@box_test(**TWO_ON_ONE)
async def test_a_request_for_b_stops_idle_a_first_instead_of_starting_beside_it(box):
    a, b = box.lane("a"), box.lane("b")
    await serve_one(box, a)
    assert box.scheduler.ledger.free() == {"CPU": 200}
    await serve_one(box, b)
    calls = box.engines.calls
    assert calls.index(("stop", "a")) < calls.index(("load", "b"))
    assert a.state is LaneState.UNLOADED and "b" in b.upstreams and box.engines.running == {"b"}
    assert box.scheduler.ledger.free() == {"CPU": 200}
    assert [e for e in box.events if e[0] == "evicted"][0][1]["lane"] == "a"
    assert box.scheduler.counters["evictions"] == 1


@box_test(**TWO_ON_ONE)
async def test_what_fits_beside_loads_beside(box):
    a, c = box.lane("a"), box.lane("c")
    await serve_one(box, a)
    await serve_one(box, c)
    assert box.engines.running == {"a", "c"} and ("stop", "a") not in box.engines.calls
    assert box.scheduler.ledger.free() == {"CPU": 50}


@box_test(**TWO_ON_ONE)
async def test_a_busy_engine_is_never_stopped_the_request_waits_for_it(box):
    a, b = box.lane("a"), box.lane("b")
    a_ticket, a_task = ask(a)
    await settle()
    box.engines.finish("a")
    await settle()
    await a_task  # a's request holds its slot: a is busy
    b_ticket, b_task = ask(b)
    await settle()
    assert ("stop", "a") not in box.engines.calls and ("load", "b") not in box.engines.calls
    assert not b_task.done() and b.state is LaneState.LOADING
    assert box.scheduler.status()["waiting"]["b"]["waits_for"] == ["a"]
    a.release(a_ticket)  # a's stream ends: now a is idle, b's wait goes on by itself
    await settle()
    box.engines.finish("b")
    await settle()
    assert b_task.done() and ("stop", "a") in box.engines.calls
    assert box.scheduler.status()["waiting"] == {}


@box_test(capacity={"CPU": 520}, needs={"a": {"CPU": 320}, "huge": {"CPU": 900}})
async def test_what_never_fits_is_refused_at_once_without_eviction(box):
    a, huge = box.lane("a"), box.lane("huge")
    await serve_one(box, a)
    _, task = ask(huge)
    await settle()
    with pytest.raises(EngineUnavailable, match="does not fit even on an empty box"):
        await task
    assert ("stop", "a") not in box.engines.calls and box.engines.running == {"a"}


@box_test(**TWO_ON_ONE)
async def test_a_kept_profile_is_never_evicted(box):
    a, b = box.lane("a", keep=True), box.lane("b")
    await serve_one(box, a)
    _, task = ask(b)
    await settle()
    with pytest.raises(EngineUnavailable, match="kept loaded"):
        await task
    assert box.engines.running == {"a"}


@box_test(**TWO_ON_ONE, reserve={"CPU": 300})
async def test_the_reserve_counts(box):
    a = box.lane("a")
    _, task = ask(a)
    await settle()
    with pytest.raises(EngineUnavailable, match="empty box"):
        await task


@box_test(**TWO_ON_ONE)
async def test_a_load_that_fails_after_eviction_gives_its_memory_back(box):
    a, b = box.lane("a"), box.lane("b")
    await serve_one(box, a)
    _, task = ask(b)
    await settle()
    box.engines.fail("b", RuntimeError("bad model file"))
    await settle()
    with pytest.raises(EngineUnavailable, match="bad model file"):
        await task
    assert box.scheduler.ledger.holdings == {} and box.scheduler.ledger.free() == {"CPU": 520}
    await serve_one(box, a)  # a comes back without evicting anything
    assert box.engines.running == {"a"}


@box_test(**TWO_ON_ONE)
async def test_a_down_while_waiting_for_memory_leaves_nothing_held(box):
    a, b = box.lane("a"), box.lane("b")
    a_ticket, a_task = ask(a)
    await settle()
    box.engines.finish("a")
    await settle()
    await a_task
    _, b_task = ask(b)
    await settle()
    assert "b" in box.scheduler.status()["waiting"]
    assert await b.unload("b") is True
    await settle()
    with pytest.raises(EngineUnavailable):
        await b_task
    assert box.scheduler.status()["waiting"] == {} and set(box.scheduler.ledger.holdings) == {"a"}
    a.release(a_ticket)
    await settle()
    assert box.engines.running == {"a"}  # nothing was evicted for a load nobody waits for


@box_test(**TWO_ON_ONE, min_residence_s=30.0)
async def test_no_ping_pong_two_lanes_take_turns_no_faster_than_the_residence(box):
    a, b = box.lane("a"), box.lane("b")
    await serve_one(box, a)
    loads_before = box.engines.calls.count(("load", "a")) + box.engines.calls.count(("load", "b"))
    _, b_task = ask(b)
    await settle()
    assert not b_task.done() and ("stop", "a") not in box.engines.calls  # a has not stayed 30 s yet
    assert box.scheduler.status()["waiting"]["b"]["waits_for"] == ["a"]
    box.clock.now += 31
    box.scheduler.poke()
    await settle()
    box.engines.finish("b")
    await settle()
    assert b_task.done() and ("stop", "a") in box.engines.calls
    assert box.engines.calls.count(("load", "a")) + box.engines.calls.count(("load", "b")) == loads_before + 1


@box_test(capacity={"CUDA0": 24000}, needs={"g-spec": {"CUDA0": 9000}, "g-plain": {"CUDA0": 8000},
                                            "chat": {"CUDA0": 12000}})
async def test_a_group_is_evicted_whole(box):
    g = box.lane("g", {"g-spec": "spec", "g-plain": "plain"}, keep_both_warm=True)
    chat = box.lane("chat")
    ticket, task = ask(g)
    await settle()
    first = next(iter(box.engines.pending))
    box.engines.finish(first)
    await settle()
    await task
    box.engines.finish(next(iter(box.engines.pending)))  # the twin warms in the background
    await settle()
    assert set(g.upstreams) == {"g-spec", "g-plain"}
    g.release(ticket)
    await settle()
    await serve_one(box, chat)
    assert ("stop", "g-spec") in box.engines.calls and ("stop", "g-plain") in box.engines.calls
    assert box.engines.running == {"chat"}


@box_test(capacity={"CUDA0": 24000}, needs={"g-spec": {"CUDA0": 13000}, "g-plain": {"CUDA0": 12000}})
async def test_a_background_warm_up_that_does_not_fit_evicts_nothing_and_switches_hard(box):
    g = box.lane("g", {"g-spec": "spec", "g-plain": "plain"}, keep_both_warm=True)
    await serve_one(box, g)
    await settle()
    assert not g.keep_both_warm and "does not fit beside" in g.warm_reason
    assert box.engines.running == {g.active} and box.engines.calls.count(("stop", g.active)) == 0


@box_test(**TWO_ON_ONE)
async def test_an_engine_that_restarted_itself_is_held_at_its_grant_without_planning_it_again(box):
    # Planning again would ask an RPC profile's workers, who serve one client and have the engine already.
    a = box.lane("a")
    await serve_one(box, a)
    assert box.sizes.sized == ["a"]
    a.engine_down("a")  # it crashed, and its engine restarted it on its own
    await settle()
    await serve_one(box, a)
    assert box.sizes.sized == ["a"], "sized again"
    assert box.scheduler.ledger.free() == {"CPU": 200}
    assert box.scheduler.ledger.holdings["a"].state == "running"


@box_test(**TWO_ON_ONE)
async def test_an_engine_given_up_on_gives_its_memory_back(box):
    a = box.lane("a")
    await serve_one(box, a)
    box.engines.running.discard("a")
    a.mark_failed("a", RuntimeError("crash loop"))
    await settle()
    assert box.scheduler.ledger.free() == {"CPU": 520}


TWO_CARDS = dict(capacity={"CUDA0": 24064, "CUDA1": 24064},
                 needs={"coder": {"CUDA0": 19456}, "coder2": {"CUDA1": 19456}, "chat": {"CUDA0": 7168}},
                 elsewhere={"chat": [{"CUDA1": 7168}]})


@box_test(**TWO_CARDS)
async def test_a_one_card_model_goes_on_the_card_whose_engine_is_idle_not_where_its_plan_alone_put_it(box):
    coder, coder2, chat = box.lane("coder"), box.lane("coder2"), box.lane("chat")
    await serve_one(box, coder2)
    busy, task = ask(coder)  # coder serves on CUDA0 and stays busy
    await settle()
    box.engines.finish("coder")
    await task
    _, chat_task = ask(chat)
    await settle()
    assert coder2.state is LaneState.UNLOADED and "coder" in coder.upstreams, "the idle card was not freed"
    assert box.scheduler.launch_probe("chat") == ("elsewhere", "chat", 0)
    box.engines.finish("chat")
    await chat_task
    assert box.scheduler.ledger.holdings["chat"].mib == {"CUDA1": 7168}
    coder.release(busy)


@box_test(**TWO_ON_ONE)
async def test_a_worker_the_box_finds_down_is_told_to_the_engines_before_the_request_hears_it(box):
    a = box.lane("a")
    box.sizes.workers_down["a"] = "gpu-box"
    told_when_failed: list[list] = []
    _, task = ask(a)
    task.add_done_callback(lambda _t: told_when_failed.append(list(box.engines.told)))
    await settle()
    with pytest.raises(EngineUnavailable, match="worker 'gpu-box' is unreachable"):
        await task
    assert told_when_failed == [[("a", "worker 'gpu-box' is unreachable")]]  # the engine knew first
    assert ("load", "a") not in box.engines.calls and box.scheduler.ledger.free() == {"CPU": 520}
