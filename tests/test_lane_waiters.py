"""Every future a lane hands out is answered, on every path: random sequences of requests, forced switches,
serve_once, unloads, engine deaths, failed loads and a shutdown, on the manual clock with the recording engines.
After the sequence, loads finishing and slots coming back for a bounded number of turns leave nothing pending,
and the lane in a state that makes progress (never draining or loading with nothing to wait for)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamactl.router.catalog import LaneSpec
from llamactl.router.lane import Lane, LaneConfig, LaneState, Ticket
from llamactl.router.policy import PolicyConfig
from llamactl.router.telemetry import Telemetry
from tests.test_lane import ManualClock, RecordingEngines, lane_test, request, settle

MEMBERS = ("spec", "plain")
member = st.sampled_from(MEMBERS)
actions = st.lists(st.one_of(
    st.tuples(st.just("request"), st.sampled_from(["code", "chat"]), st.sampled_from([None, *MEMBERS])),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("force"), st.sampled_from([None, *MEMBERS])),
    st.tuples(st.just("serve_once"), member),
    st.tuples(st.just("unload"), member),
    st.tuples(st.just("engine_down"), member),
    st.tuples(st.just("mark_failed"), member),
    st.tuples(st.just("finish"), member),
    st.tuples(st.just("fail"), member),
    st.tuples(st.just("tick"), st.floats(0, 30)),
), max_size=25)


async def run_sequence(steps, keep_both_warm: bool) -> None:
    clock = ManualClock()
    engines = RecordingEngines()
    spec = LaneSpec("g", {"spec": "spec", "plain": "plain"}, {"spec": 1, "plain": 2}, True)
    lane = Lane(spec, engines, Telemetry(clock=clock),
                LaneConfig(keep_both_warm=keep_both_warm, policy=PolicyConfig(min_dwell_s=0)), clock=clock)
    dispatcher = asyncio.create_task(lane.run())
    tickets: list[tuple[Ticket, asyncio.Task]] = []
    controls: list[asyncio.Task] = []
    try:
        for step in steps:
            what = step[0]
            if what == "request":
                ticket = Ticket(cls=step[1], pin=step[2])
                tickets.append((ticket, asyncio.create_task(lane.acquire(ticket))))
            elif what == "release":
                granted = [t for t, task in tickets if task.done() and not task.cancelled()
                           and task.exception() is None and not t.released]
                if granted:
                    lane.release(granted[step[1] % len(granted)])
            elif what == "force":
                controls.append(asyncio.create_task(lane.force(step[1], timeout_s=3600)))
            elif what == "serve_once":
                controls.append(asyncio.create_task(lane.serve_once(step[1], timeout_s=3600)))
            elif what == "unload":
                controls.append(asyncio.create_task(lane.unload(step[1])))
            elif what == "engine_down":
                engines.running.discard(step[1])
                lane.engine_down(step[1])
            elif what == "mark_failed":
                lane.mark_failed(step[1], RuntimeError("crash loop"))
            elif what in ("finish", "fail") and step[1] in engines.pending:
                engines.finish(step[1]) if what == "finish" else engines.fail(step[1], RuntimeError("no"))
            elif what == "tick":
                clock.now += step[1]
            await settle()
        # Bounded progress: loads finish, every granted slot comes back.
        for _ in range(12):
            for profile in list(engines.pending):
                engines.finish(profile)
            for ticket, task in tickets:
                if task.done() and not task.cancelled() and task.exception() is None and not ticket.released:
                    lane.release(ticket)
            await settle()
        pending = [t for _, t in tickets if not t.done()] + [c for c in controls if not c.done()]
        assert not pending, f"unanswered: {pending}; lane {lane.status()}"
        assert lane.in_flight == 0
        assert lane.state not in (LaneState.DRAINING, LaneState.SWITCHING), lane.status()
        assert lane.state is not LaneState.LOADING or lane.status()["loading"], lane.status()
        await asyncio.wait_for(lane.shutdown(), 5)
        late = Ticket(cls="chat")
        with pytest.raises(Exception):
            await asyncio.wait_for(lane.acquire(late), 5)
    finally:
        for _, task in tickets:
            task.cancel()
        for task in controls:
            task.cancel()
        dispatcher.cancel()
        await asyncio.gather(dispatcher, *(t for _, t in tickets), *controls, return_exceptions=True)
    assert await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(_after_stop(lane))), 5) is True


async def _after_stop(lane: Lane) -> bool:
    """A question asked of a lane whose dispatcher has ended is answered at once (an error), never left pending."""
    try:
        await lane.unload("spec")
    except Exception:  # noqa: BLE001 - any answer will do; a hang would not
        return True
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=actions, keep_both_warm=st.booleans())
def test_property_every_waiter_is_answered(steps, keep_both_warm):
    asyncio.run(run_sequence(steps, keep_both_warm))


@lane_test({"spec": "spec", "plain": "plain"})
async def test_unloading_the_member_a_switch_waits_for_answers_the_switch(lane, engines, clock):
    """`llamactl switch g plain` while spec drains its stream, then `down plain`: the switch is answered (it was
    stopped), and the lane does not stay draining once the stream ends."""
    ticket, task = request(lane, pin="spec")
    await settle()
    engines.finish("spec")
    await settle()
    await task
    switch = asyncio.create_task(lane.force("plain", timeout_s=3600))
    await settle()
    assert lane.state is LaneState.DRAINING
    unloaded = asyncio.create_task(lane.unload("plain"))
    await settle()
    assert switch.done(), "the switch still waits for a member that was stopped"
    with pytest.raises(Exception, match="stopped"):
        switch.result()
    assert unloaded.done()
    lane.release(ticket)
    await settle()
    assert lane.state is LaneState.READY and lane.active == "spec"
