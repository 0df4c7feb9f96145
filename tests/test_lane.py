"""The lane on its own: a manual clock, a recording fake engine whose loads finish when the test says, and the
dispatcher's turns drained between steps (no wall-clock waits). Queue order and slots, a `down` during a load,
a failed load, draining before a switch, the idle TTL, an engine that died."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from llamactl.router.policy import PolicyConfig
from llamactl.router.backends import Upstream
from llamactl.router.catalog import LaneSpec
from llamactl.router.errors import EngineUnavailable
from llamactl.router.lane import Lane, LaneConfig, LaneState, Ticket
from llamactl.router.telemetry import Telemetry


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingEngines:
    """Backends whose loads wait for `finish(profile)` (or `fail(profile, error)`); records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.pending: dict[str, asyncio.Future[Upstream]] = {}
        self.running: set[str] = set()

    async def ensure_ready(self, profile: str) -> Upstream:
        self.calls.append(("load", profile))
        if profile in self.running:
            return Upstream(f"http://{profile}")
        fut = self.pending.setdefault(profile, asyncio.get_running_loop().create_future())
        try:
            upstream = await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.calls.append(("load-cancelled", profile))
            raise
        self.running.add(profile)
        return upstream

    async def stop(self, profile: str) -> None:
        self.calls.append(("stop", profile))
        fut = self.pending.pop(profile, None)
        if fut is not None and not fut.done():
            fut.set_exception(RuntimeError("stopped while loading"))
        self.running.discard(profile)

    def finish(self, profile: str) -> None:
        self.pending.pop(profile).set_result(Upstream(f"http://{profile}"))

    def fail(self, profile: str, error: Exception) -> None:
        self.pending.pop(profile).set_exception(error)


async def settle() -> None:
    """Let every ready task run until nothing is left to do (loop turns, not time)."""
    for _ in range(50):
        await asyncio.sleep(0)


def lane_test(members: dict[str, str], *, slots: int = 1, idle_ttl_s: float = 0.0,
              keep_both_warm: bool = False) -> Callable[[Callable[..., Awaitable[None]]], Callable[[], None]]:
    """Run the test coroutine with a running lane (`test(lane, engines, clock)`)."""
    def wrap(test):
        def run() -> None:
            async def main() -> None:
                clock = ManualClock()
                engines = RecordingEngines()
                spec = LaneSpec("lane", dict(members), {m: slots for m in members}, len(members) > 1)  # type: ignore[arg-type]
                config = LaneConfig(idle_ttl_s=idle_ttl_s, keep_both_warm=keep_both_warm,
                                    policy=PolicyConfig(min_dwell_s=0))
                lane = Lane(spec, engines, Telemetry(clock=clock), config, clock=clock)
                dispatcher = asyncio.create_task(lane.run())
                try:
                    await test(lane, engines, clock)
                finally:
                    dispatcher.cancel()
                    await asyncio.gather(dispatcher, return_exceptions=True)
            asyncio.run(main())
        run.__name__ = test.__name__
        return run
    return wrap


def request(lane: Lane, cls: str = "chat", pin: str | None = None) -> tuple[Ticket, asyncio.Task[Upstream]]:
    ticket = Ticket(cls=cls, pin=pin)
    return ticket, asyncio.create_task(lane.acquire(ticket))


@lane_test({"solo": "plain"}, slots=2)
async def test_requests_are_granted_in_order_up_to_the_slots(lane, engines, clock):
    asks = [request(lane) for _ in range(4)]
    await settle()
    assert engines.calls == [("load", "solo")] and lane.state is LaneState.LOADING
    assert not any(task.done() for _, task in asks)
    engines.finish("solo")
    await settle()
    assert [task.done() for _, task in asks] == [True, True, False, False]
    assert lane.in_flight == 2 and lane.waiting() == 2
    lane.release(asks[1][0])
    await settle()
    assert [task.done() for _, task in asks] == [True, True, True, False]  # the third came next, not the fourth
    assert engines.calls == [("load", "solo")]


@lane_test({"solo": "plain"})
async def test_down_during_a_load_stops_it_and_fails_what_waited(lane, engines, clock):
    _, waiting = request(lane)
    await settle()
    assert lane.state is LaneState.LOADING
    unloaded = asyncio.create_task(lane.unload("solo"))
    await settle()
    assert unloaded.done() and unloaded.result() is True  # it was loading: that counts
    assert ("stop", "solo") in engines.calls and ("load-cancelled", "solo") in engines.calls
    with pytest.raises(EngineUnavailable, match="stopped"):
        await waiting
    assert lane.state is LaneState.UNLOADED and lane.upstreams == {} and lane.status()["loading"] == []
    await settle()
    assert engines.calls.count(("load", "solo")) == 1  # not loaded again behind the user's back


@lane_test({"solo": "plain"})
async def test_a_failed_load_fails_the_queue_with_the_reason(lane, engines, clock):
    asks = [request(lane) for _ in range(3)]
    await settle()
    engines.fail("solo", RuntimeError("out of memory"))
    await settle()
    for _, task in asks:
        with pytest.raises(EngineUnavailable, match="out of memory"):
            await task
    assert lane.state is LaneState.FAILED and "out of memory" in lane.last_error


@lane_test({"fast": "spec", "plain": "plain"})
async def test_a_forced_switch_drains_then_stops_one_and_loads_the_other(lane, engines, clock):
    ticket, first = request(lane, pin="fast")
    await settle()
    engines.finish("fast")
    await first
    forced = asyncio.create_task(lane.force("plain"))
    await settle()
    assert lane.state is LaneState.DRAINING and ("stop", "fast") not in engines.calls  # one in flight
    clock.now += 3
    lane.release(ticket)
    await settle()
    assert engines.calls[-2:] == [("stop", "fast"), ("load", "plain")] and lane.state is LaneState.SWITCHING
    engines.finish("plain")
    await settle()
    assert forced.done() and lane.active == "plain" and lane.state is LaneState.READY
    assert lane.switches[-1]["from"] == "fast" and lane.switches[-1]["trigger"] == "forced"


@lane_test({"solo": "plain"}, idle_ttl_s=60)
async def test_the_idle_ttl_unloads_by_the_lanes_clock(lane, engines, clock):
    ticket, task = request(lane)
    await settle()
    engines.finish("solo")
    await task
    lane.release(ticket)
    await settle()
    clock.now += 59
    lane._wake.set()  # a turn of the dispatcher at 59 s: too early
    await settle()
    assert ("stop", "solo") not in engines.calls
    clock.now += 2
    lane._wake.set()
    await settle()
    assert ("stop", "solo") in engines.calls and lane.state is LaneState.UNLOADED


@lane_test({"solo": "plain"})
async def test_an_engine_that_died_is_asked_for_again_on_the_next_request(lane, engines, clock):
    ticket, task = request(lane)
    await settle()
    engines.finish("solo")
    await task
    lane.release(ticket)
    engines.running.discard("solo")
    lane.engine_down("solo")
    await settle()
    assert lane.upstreams == {}
    _, again = request(lane)
    await settle()
    assert engines.calls.count(("load", "solo")) == 2
    engines.finish("solo")
    assert (await again).base_url == "http://solo"


@lane_test({"fast": "spec", "plain": "plain"}, keep_both_warm=True)
async def test_with_both_warm_the_other_member_loads_in_the_background_and_a_switch_is_a_drain(lane, engines, clock):
    ticket, first = request(lane, pin="fast")
    await settle()
    engines.finish("fast")
    await first
    await settle()
    assert ("load", "plain") in engines.calls and lane.active == "fast"  # warming in the background
    engines.finish("plain")
    await settle()
    assert sorted(lane.upstreams) == ["fast", "plain"]
    lane.release(ticket)
    await lane.force("plain")
    assert lane.active == "plain" and ("stop", "fast") not in engines.calls


@lane_test({"fast": "spec", "plain": "plain"}, keep_both_warm=True)
async def test_a_warm_switch_grants_the_waiting_request_in_the_same_turn(lane, engines, clock):
    """Found by the simulator: a switch to a member already loaded served nobody until some other event woke
    the dispatcher."""
    ticket, first = request(lane, pin="fast")
    await settle()
    engines.finish("fast")
    await first
    await settle()
    engines.finish("plain")
    await settle()
    lane.release(ticket)
    await settle()
    _, pinned = request(lane, pin="plain")
    await settle()
    assert pinned.done() and lane.active == "plain"


@lane_test({"fast": "spec", "plain": "plain"})
async def test_work_that_is_not_generation_is_not_counted_in_the_recent_mix(lane, engines, clock):
    """A tokenize or embedding request pinned to the serving member tells the policy nothing about what work
    is coming: it is not an arrival in the mix the policy plans with."""
    ticket, first = request(lane, cls="code", pin="fast")
    await settle()
    engines.finish("fast")
    await first
    lane.release(ticket)
    utility = Ticket(cls="utility", pin="fast", evidence=False)
    await asyncio.wait_for(lane.acquire(utility), 1)
    lane.release(utility)
    await settle()
    assert lane.telemetry.recent("lane") == {"code": 1}


@lane_test({"fast": "spec", "plain": "plain"})
async def test_a_shut_down_lane_starts_nothing_again_not_even_its_forced_member(lane, engines, clock):
    # Found by scripts/bench_switching.py: at the router's shutdown every lane forced to a member started that
    # member again in the dispatcher's next turn (a new llama-server, then cancelled by the shutdown).
    forced = asyncio.create_task(lane.force("plain"))
    await settle()
    engines.finish("plain")
    await forced
    await asyncio.wait_for(lane.shutdown(), 5)
    await settle()
    assert engines.calls.count(("load", "plain")) == 1 and "plain" not in engines.running
    assert lane.state is LaneState.UNLOADED and lane.status()["loading"] == []
    _, late = request(lane)  # a request that reaches a shut-down lane fails at once, loading nothing
    with pytest.raises(EngineUnavailable, match="shut down"):
        await asyncio.wait_for(late, 5)
    assert [c for c in engines.calls if c[0] == "load"] == [("load", "plain")]


@lane_test({"fast": "spec", "plain": "plain"})
async def test_serve_once_loads_a_member_without_keeping_the_lane_forced(lane, engines, clock):
    """`llamactl up`, a preload and the page's load button: the member serves, then the policy decides again;
    a lane the user had forced stays forced."""
    loading = asyncio.create_task(lane.serve_once("plain", timeout_s=5))
    await settle()
    engines.finish("plain")
    await loading
    assert lane.active == "plain" and lane.forced is None
    await lane.force("plain")
    await lane.serve_once("plain", timeout_s=5)
    assert lane.forced == "plain"


@lane_test({"fast": "spec", "plain": "plain"}, keep_both_warm=True)
async def test_a_member_that_does_not_load_beside_the_other_is_loaded_alone(lane, engines, clock):
    """The hard fallback of a warm switch: the engine refuses `plain` beside `fast`, and takes it at once once
    `fast` is stopped. The lane says why it switches hard from now on (the reason is an event posted while
    the load's except block runs, and applied after it ended)."""
    refused = []
    real_ensure_ready = engines.ensure_ready

    async def ensure_ready(profile: str) -> Upstream:
        if profile == "plain" and "fast" in engines.running:
            refused.append(profile)
            raise RuntimeError("out of memory beside fast")
        if profile == "plain":
            engines.running.add("plain")  # ready at once: the load ends without awaiting
        return await real_ensure_ready(profile)

    engines.ensure_ready = ensure_ready
    ticket, first = request(lane, pin="fast")
    await settle()
    engines.finish("fast")
    await first
    lane.release(ticket)
    await settle()  # the background warm-up of plain was refused: the lane turned to hard switches
    assert refused == ["plain"] and not lane.keep_both_warm
    lane.keep_both_warm = True  # a lane that still believes both fit: the switch itself meets the refusal
    await asyncio.wait_for(lane.force("plain"), 2)
    assert refused == ["plain", "plain"] and lane.active == "plain" and lane.upstreams.keys() == {"plain"}
    assert not lane.keep_both_warm and lane.warm_reason.startswith("loading plain beside fast failed")


@lane_test({"fast": "spec", "plain": "plain"})
async def test_a_member_that_fails_to_start_is_passed_over_and_the_others_serve(lane, engines, clock):
    """The policy chose the drafter and it cannot start (a broken draft model, out of memory): the queue is
    served by the plain member instead of failing, the drafter is not chosen again for passed_over_s (doubled
    at each failure in a row), and a request pinned to it gets the reason."""
    ticket, first = request(lane, "code")
    await settle()
    assert engines.calls == [("load", "fast")]
    engines.fail("fast", RuntimeError("draft model not found"))
    await settle()
    assert engines.calls[-1] == ("load", "plain") and not first.done()  # still waiting, now for plain
    engines.finish("plain")
    assert await first == Upstream("http://plain")
    assert lane.status()["passed_over"] == {"fast": {"for_s": 600.0, "reason": "draft model not found"}}
    lane.release(ticket)
    _, pinned = request(lane, "code", pin="fast")
    await settle()
    engines.fail("fast", RuntimeError("draft model not found"))  # asked for by name: tried, and fails again
    with pytest.raises(EngineUnavailable, match="draft model not found"):
        await pinned
    await settle()
    assert lane.status()["passed_over"]["fast"]["for_s"] == 1200.0  # two failures in a row
    loads = len(engines.calls)
    clock.now += 1199
    ticket, later = request(lane, "code")
    await settle()
    assert engines.calls[-1] == ("load", "plain")  # stopped for the pinned attempt: back, and fast not chosen
    engines.finish("plain")
    assert await later == Upstream("http://plain")
    assert ("load", "fast") not in engines.calls[loads:]
    lane.release(ticket)
    clock.now += 2
    assert lane.status()["passed_over"] == {}  # may be chosen again: the policy sends code to it
    _, again = request(lane, "code")
    await settle()
    assert engines.calls[-1] == ("load", "fast")


@lane_test({"fast": "spec", "plain": "plain"})
async def test_when_every_member_fails_to_start_the_queue_fails_and_the_next_request_tries_again(lane, engines, clock):
    _, first = request(lane, "code")
    await settle()
    engines.fail("fast", RuntimeError("draft model not found"))
    await settle()
    engines.fail("plain", RuntimeError("out of memory"))
    with pytest.raises(EngineUnavailable, match="out of memory"):
        await first
    assert lane.state is LaneState.FAILED
    loads = len(engines.calls)
    _, second = request(lane, "code")
    await settle()
    assert len(engines.calls) == loads + 1 and engines.calls[-1][0] == "load"  # not stuck: tried again
    engines.finish(engines.calls[-1][1])
    await second


@lane_test({"solo": "plain"})
async def test_a_turn_that_raises_answers_the_waiting_and_the_dispatcher_goes_on(lane, engines, clock):
    """A bug in one turn of the dispatcher used to end it, and with it the router's task group: the whole daemon.
    Now what waited is answered 503 naming the error, at once (not at its queue timeout), the fault is logged with
    its traceback once a minute at most, and the next request is served."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("llamactl.router").addHandler(handler)
    real = lane._decide
    lane._decide = lambda: (_ for _ in ()).throw(KeyError("a dispatcher bug at 100%s"))
    try:
        _, first = request(lane)
        await settle()
        with pytest.raises(EngineUnavailable, match="failed to dispatch this request .KeyError: .a dispatcher bug"):
            await first
        for _ in range(3):  # the same fault on every turn: one traceback, the repeats counted
            _, again = request(lane)
            await settle()
            with pytest.raises(EngineUnavailable):
                await again
    finally:
        lane._decide = real
        logging.getLogger("llamactl.router").removeHandler(handler)
    faults = [r for r in records if "the dispatcher failed" in r.getMessage()]
    assert len(faults) == 1 and faults[0].exc_info is not None
    assert "a dispatcher bug at 100%s" in faults[0].getMessage()  # what the error says is an argument, not a format
    assert "dispatcher: KeyError" in lane.last_error and lane._faults_unlogged >= 3
    _, served = request(lane)
    await settle()
    engines.finish("solo")
    await settle()
    assert served.done() and served.exception() is None  # the dispatcher is still there
