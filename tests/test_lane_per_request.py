"""A group whose plain member is served per request by its drafting twin's engine (drafting off): one process,
switches without a reload or a drain, a choice per request (member, drafting, depth, why)."""

from __future__ import annotations

import asyncio

from llamactl.router.catalog import LaneSpec
from llamactl.router.choices import DEPTH_FIELD
from llamactl.router.lane import Lane, LaneConfig
from llamactl.router.policy import PolicyConfig
from llamactl.router.telemetry import Telemetry
from tests.test_lane import ManualClock, RecordingEngines, request, settle

PAIR = {"spec": "spec", "plain": "plain"}


def hosted_lane(test, *, hosts: dict[str, str] | None = None, plain_slots: int = 1, keep_both_warm: bool = False):
    def run() -> None:
        async def main() -> None:
            clock = ManualClock()
            engines = RecordingEngines()
            spec = LaneSpec("g", dict(PAIR), {"spec": 1, "plain": plain_slots}, True, {"spec": 8})  # type: ignore[arg-type]
            lane = Lane(spec, engines, Telemetry(clock=clock), LaneConfig(policy=PolicyConfig(min_dwell_s=0), keep_both_warm=keep_both_warm),
                        clock=clock)
            dispatcher = asyncio.create_task(lane.run())
            try:
                lane.set_hosts({"plain": "spec"} if hosts is None else hosts)
                await settle()
                await test(lane, engines, clock)
            finally:
                dispatcher.cancel()
                await asyncio.gather(dispatcher, return_exceptions=True)
        asyncio.run(main())
    run.__name__ = test.__name__
    return run


@hosted_lane
async def test_a_forced_plain_member_is_served_by_the_drafting_engine_with_drafting_off(lane, engines, clock):
    forced = asyncio.create_task(lane.force("plain"))
    await settle()
    assert engines.calls == [("load", "spec")]  # its twin's engine, not a process of its own
    engines.finish("spec")
    await settle()
    assert forced.done() and forced.exception() is None
    ticket, task = request(lane, "creative")
    await settle()
    assert (await task).base_url == "http://spec"
    choice = ticket.choice
    assert (ticket.profile, choice.member, choice.process, choice.drafting, choice.depth, choice.why) == (
        "plain", "plain", "spec", False, 0, "forced")
    assert choice.request_fields() == {DEPTH_FIELD: 0}
    lane.release(ticket)
    await lane.force("spec")  # no reload, no drain: answered at the next turn
    ticket, task = request(lane, "code")
    await settle()
    await task
    assert (ticket.choice.member, ticket.choice.drafting, ticket.choice.depth) == ("spec", True, 8)
    assert ticket.choice.request_fields() == {}
    assert engines.calls == [("load", "spec")]
    status = lane.status()
    assert status["active"] == "spec" and status["process"] == "spec" and status["per_request"] == {"plain": "spec"}
    assert [s["seconds"] for s in status["recent_switches"]] == [0.0, 0.0]  # spec -> plain -> spec, in one engine
    assert status["last_choice"] == {"member": "spec", "process": "spec", "drafting": True, "depth": 8, "why": "forced",
                                     "option": None}
    from llamactl.cli.serve import router_status_lines
    lines = router_status_lines({"lanes": [status]})
    assert "  per request: plain is served by spec's engine with drafting off (one process)" in lines
    assert "  last request: spec, drafting on (depth 8), forced" in lines


@hosted_lane
async def test_requests_pinned_to_either_member_alternate_on_one_engine_one_at_a_time(lane, engines, clock):
    asks = [request(lane, "chat", pin) for pin in ("plain", "spec", "plain", "spec")]
    await settle()
    engines.finish("spec")
    for i, (ticket, task) in enumerate(asks):
        await settle()
        assert [t.done() for _, t in asks] == [j <= i for j in range(4)]  # one slot: one at a time, in order
        assert ticket.choice.member == ticket.pin and ticket.choice.process == "spec"
        assert ticket.choice.drafting is (ticket.pin == "spec") and ticket.choice.why == "pinned"
        lane.release(ticket)
    assert engines.calls == [("load", "spec")]


@hosted_lane
async def test_the_policy_sees_a_switch_to_the_hosted_member_as_free(lane, engines, clock):
    forced = asyncio.create_task(lane.force("spec"))
    await settle()
    clock.now += 5.0  # the load took 5 s: what a restart costs
    engines.finish("spec")
    await forced
    await lane.force(None)
    state = lane.policy_state()
    assert state.active == "spec" and state.switch_cost_s == {"plain": 0.0}
    assert state.loaded == frozenset({"spec", "plain"})
    lane.set_hosts({})
    await settle()
    assert lane.policy_state().switch_cost_s == {"plain": 5.0}  # its own engine: a restart


def test_without_a_host_the_plain_member_runs_its_own_engine():
    async def check(lane, engines, clock):
        forced = asyncio.create_task(lane.force("plain"))
        await settle()
        assert engines.calls == [("load", "plain")]
        engines.finish("plain")
        await forced
        ticket, task = request(lane)
        await settle()
        await task
        assert ticket.choice.process == "plain" and ticket.choice.request_fields() == {}

    hosted_lane(check, hosts={})()


def test_a_plain_member_whose_own_engine_runs_is_served_there():
    async def check(lane, engines, clock):
        lane.set_hosts({})
        forced = asyncio.create_task(lane.force("plain"))
        await settle()
        engines.finish("plain")
        await forced
        lane.set_hosts({"plain": "spec"})  # learnt later (the self-test finished): its own engine still serves
        ticket, task = request(lane)
        await settle()
        assert (await task).base_url == "http://plain" and ticket.choice.process == "plain"
        assert engines.calls == [("load", "plain")]

    hosted_lane(check, plain_slots=4)()


def test_kept_warm_the_hosted_member_gets_no_engine_of_its_own_and_one_warmed_before_is_stopped():
    async def check(lane, engines, clock):
        lane.set_hosts({})
        forced = asyncio.create_task(lane.force("spec"))
        await settle()
        engines.finish("spec")
        await forced
        await settle()
        assert ("load", "plain") in engines.calls  # warmed in the background: per process, for now
        engines.finish("plain")
        await settle()
        assert sorted(lane.upstreams) == ["plain", "spec"]
        lane.set_hosts({"plain": "spec"})  # the self-test said so: the second engine goes
        await settle()
        assert ("stop", "plain") in engines.calls and sorted(lane.upstreams) == ["spec"]
        await lane.force("plain")
        ticket, task = request(lane)
        await settle()
        assert (await task).base_url == "http://spec" and not ticket.choice.drafting
        assert engines.calls.count(("load", "plain")) == 1  # not warmed again

    hosted_lane(check, keep_both_warm=True)()
