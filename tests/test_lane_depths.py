"""A drafting member with `[speculation] depths`: one choice per depth (MEMBER@DEPTH), all served by the member's
own engine, the depth sent per request (`speculative.n_max`), a switch between depths free (no reload, no drain);
the policy keeps evidence per (choice, class). Lane level: a manual clock and a recording fake engine."""

from __future__ import annotations

import asyncio

import pytest

from llamactl.router.catalog import Catalog, LaneSpec
from llamactl.router.choices import DEPTH_FIELD, Choice, choose, entry_depth, middle_out, split_choice
from llamactl.router.errors import BadRequest, EngineUnavailable
from llamactl.router.lane import Lane, LaneConfig
from llamactl.router.policy import PolicyConfig
from llamactl.router.telemetry import Sample, Telemetry
from tests.test_lane import ManualClock, RecordingEngines, request, settle

MEMBERS = {"d1b": "spec", "plain": "plain"}
DEPTHS = (2, 4, 8, 16)


def depth_lane(test, *, depths: dict | None = None, hosts: dict | None = None, refused: dict | None = None):
    """Run `test(lane, engines, clock)` with a lane whose d1b offers DEPTHS and hosts plain (drafting off)."""
    def run() -> None:
        async def main() -> None:
            clock = ManualClock()
            engines = RecordingEngines()
            spec = LaneSpec("g", dict(MEMBERS), {"d1b": 1, "plain": 1}, True, {"d1b": 16},  # type: ignore[arg-type]
                            {"d1b": DEPTHS})
            lane = Lane(spec, engines, Telemetry(clock=clock), LaneConfig(policy=PolicyConfig(min_dwell_s=0)),
                        clock=clock)
            dispatcher = asyncio.create_task(lane.run())
            try:
                lane.set_hosts({"plain": "d1b"} if hosts is None else hosts,
                               {"d1b": DEPTHS} if depths is None else depths, refused)
                await settle()
                await test(lane, engines, clock)
            finally:
                dispatcher.cancel()
                await asyncio.gather(dispatcher, return_exceptions=True)
        asyncio.run(main())
    run.__name__ = test.__name__
    return run


def measured(lane: Lane, clock: ManualClock, cls: str, choice: str, tok_s: float, n: int = 3) -> None:
    """`n` finished requests of `cls` on `choice` (a member or MEMBER@DEPTH), as the router records them."""
    member, depth = split_choice(choice)
    for _ in range(n):
        clock.now += 1
        lane.telemetry.record(Sample(lane="g", profile=member, role=lane.spec.members[member], cls=cls,
                                     endpoint="/completion", status=200, gen_tok_s=tok_s, completion_tokens=100,
                                     choice=choice if depth is not None else None))


def test_choice_names_and_fields():
    assert split_choice("d1b@4") == ("d1b", 4) and split_choice("d1b") == ("d1b", None)
    assert split_choice("a@b") == ("a@b", None) and split_choice("d@04") == ("d@04", None)
    assert entry_depth(DEPTHS) == 8 and entry_depth((2, 4, 8)) == 4  # the middle one: its neighbours come next
    assert middle_out(DEPTHS) == [8, 16, 4, 2]  # the order ties are broken in
    choice = choose("d1b@4", "d1b", MEMBERS, {"d1b": 16}, "policy")  # type: ignore[arg-type]
    assert choice == Choice("d1b", "d1b", True, 4, "policy", "d1b@4") and choice.key == "d1b@4"
    assert choice.request_fields() == {DEPTH_FIELD: 4}
    at_n_max = choose("d1b", "d1b", MEMBERS, {"d1b": 16}, "only")  # type: ignore[arg-type]
    assert (at_n_max.depth, at_n_max.option, at_n_max.request_fields(), at_n_max.key) == (16, None, {}, "d1b")


def test_the_catalog_offers_depths_of_drafting_group_members_only(tmp_path):
    from llamactl.profiles import Profile

    draft = {"type": "draft", "draft_model": str(tmp_path / "d.gguf"), "depths": [4, 2]}
    profiles = [Profile(name="d1b", model="m", group="g", speculation=draft), Profile(name="plain", model="m", group="g"),
                Profile(name="solo", model="m", speculation=draft)]
    catalog = Catalog.from_profiles(profiles)
    assert catalog.lanes["g"].choice_depths == {"d1b": (2, 4)} and catalog.lanes["g"].depths == {"d1b": 4}
    assert catalog.lanes["solo"].choice_depths == {}  # a lane of one has nothing to choose between


@depth_lane
async def test_a_forced_depth_is_sent_per_request_and_a_switch_between_depths_reloads_nothing(lane, engines, clock):
    forced = asyncio.create_task(lane.force("d1b@4"))
    await settle()
    assert engines.calls == [("load", "d1b")]  # the member's own engine, once
    engines.finish("d1b")
    await settle()
    assert forced.done() and forced.exception() is None and lane.serving == "d1b@4"
    ticket, task = request(lane, "code")
    await settle()
    assert (await task).base_url == "http://d1b"
    c = ticket.choice
    assert (ticket.profile, c.member, c.process, c.drafting, c.depth, c.option, c.why) == (
        "d1b", "d1b", "d1b", True, 4, "d1b@4", "forced")
    assert c.request_fields() == {DEPTH_FIELD: 4}
    lane.release(ticket)
    await lane.force("d1b@16")  # no reload, no drain: answered at the next turn
    ticket, task = request(lane, "code")
    await settle()
    await task
    assert (ticket.choice.depth, ticket.choice.request_fields()) == (16, {DEPTH_FIELD: 16})
    lane.release(ticket)
    await lane.force("plain")  # the plain twin: the same engine, drafting off
    ticket, task = request(lane, "creative")
    await settle()
    await task
    assert (ticket.choice.member, ticket.choice.request_fields()) == ("plain", {DEPTH_FIELD: 0})
    assert engines.calls == [("load", "d1b")]
    status = lane.status()
    assert status["depths"] == {"d1b": [2, 4, 8, 16]} and status["forced"] == "plain"
    assert [s["seconds"] for s in status["recent_switches"]] == [0.0, 0.0]  # @4 -> @16 -> plain, one engine
    from llamactl.cli.serve import router_status_lines
    lines = router_status_lines({"lanes": [status]})
    assert "  per request: d1b drafts at depth 2, 4, 8, 16, chosen per request in its one engine" in lines


@depth_lane
async def test_a_bad_depth_names_the_members_depths(lane, engines, clock):
    with pytest.raises(BadRequest, match=r"'d1b' has no depth 5; its depths: 2, 4, 8, 16"):
        await lane.force("d1b@5")
    with pytest.raises(BadRequest, match=r"'plain' has no depths to choose from"):
        await lane.force("plain@2")
    with pytest.raises(BadRequest, match=r"'x@2' is not a member of 'g'; members: d1b, plain, d1b@2, d1b@4"):
        await lane.force("x@2")
    assert engines.calls == []


def test_where_the_engine_ignores_a_per_request_depth_the_member_is_one_choice_at_its_n_max():
    async def check(lane, engines, clock):
        assert lane.choices() == {"d1b": "spec", "plain": "plain"}
        assert set(lane.policy_state().members) == {"d1b", "plain"}
        with pytest.raises(BadRequest, match="d1b is not served at a depth per request: its engine ignores it"):
            await lane.force("d1b@4")
        forced = asyncio.create_task(lane.force("d1b"))
        await settle()
        engines.finish("d1b")
        await forced
        ticket, task = request(lane, "code")
        await settle()
        await task
        assert (ticket.choice.depth, ticket.choice.option, ticket.choice.request_fields()) == (16, None, {})
        assert lane.status()["depths_refused"] == {"d1b": "its engine ignores it"}

    depth_lane(check, depths={}, hosts={}, refused={"d1b": "its engine ignores it"})()


@depth_lane
async def test_the_policy_sees_each_depth_as_a_choice_free_to_switch_to(lane, engines, clock):
    forced = asyncio.create_task(lane.force("d1b"))
    await settle()
    clock.now += 5.0  # the load took 5 s: what a restart costs
    engines.finish("d1b")
    await forced
    assert lane.serving == "d1b@8"  # the middle depth, until the policy chooses another
    state = lane.policy_state()
    assert list(state.members) == ["d1b@8", "d1b@16", "d1b@4", "d1b@2", "plain"]
    assert state.switch_cost_s == {"d1b@2": 0.0, "d1b@4": 0.0, "d1b@16": 0.0, "plain": 0.0}
    assert state.loaded == frozenset(state.members) and state.slots["d1b@4"] == 1


def test_the_member_forced_alone_gets_the_depth_its_evidence_favours():
    async def check(lane, engines, clock):
        for depth, tok_s in ((2, 60.0), (4, 95.0), (8, 70.0), (16, 40.0)):
            measured(lane, clock, "code", f"d1b@{depth}", tok_s)
        measured(lane, clock, "code", "plain", 200.0)  # faster, but not the member forced
        forced = asyncio.create_task(lane.force("d1b"))
        await settle()
        engines.finish("d1b")
        await forced
        got = []
        for _ in range(3):
            ticket, task = request(lane, "code")
            await settle()
            await task
            got.append((ticket.choice.option, ticket.choice.why, ticket.choice.request_fields()))
            lane.release(ticket)
        assert got[-1] == ("d1b@4", "forced", {DEPTH_FIELD: 4})
        evidence = lane.telemetry.evidence("g")["code"]
        assert evidence.tok_s["d1b@4"] == 95.0 and "d1b" not in evidence.tok_s  # kept per (choice, class)

    depth_lane(check)()


def test_the_policy_picks_the_fastest_depth_per_class_and_switches_between_them_for_free():
    async def check(lane, engines, clock):
        for cls, speeds in (("code", {2: 60.0, 4: 95.0, 8: 120.0, 16: 80.0}),
                            ("creative", {2: 35.0, 4: 28.0, 8: 20.0, 16: 12.0})):
            for depth, tok_s in speeds.items():
                measured(lane, clock, cls, f"d1b@{depth}", tok_s)
            measured(lane, clock, cls, "plain", 30.0)
        got = []
        for cls in ("code", "creative", "code"):
            ticket, task = request(lane, cls)
            await settle()
            if ("load", "d1b") in engines.calls and "d1b" in engines.pending:
                engines.finish("d1b")
                await settle()
            await task
            got.append((cls, ticket.choice.option or ticket.choice.member, ticket.choice.request_fields()))
            lane.release(ticket)
            await settle()
        assert got == [("code", "d1b@8", {DEPTH_FIELD: 8}), ("creative", "d1b@2", {DEPTH_FIELD: 2}),
                       ("code", "d1b@8", {DEPTH_FIELD: 8})]
        assert engines.calls == [("load", "d1b")]

    depth_lane(check)()


@depth_lane
async def test_a_failed_upstream_releases_the_engine_that_served_not_the_member(lane, engines, clock):
    forced = asyncio.create_task(lane.force("plain"))  # served by d1b's engine, drafting off
    await settle()
    engines.finish("d1b")
    await forced
    ticket, task = request(lane, "chat")
    await settle()
    await task
    assert (ticket.profile, ticket.choice.process) == ("plain", "d1b")
    engines.running.discard("d1b")  # it died under the request
    lane.release(ticket, upstream_failed=True)
    await settle()
    assert "d1b" not in lane.upstreams  # the engine that served, asked for again at the next grant
    _, again = request(lane, "chat")
    await settle()
    assert engines.calls == [("load", "d1b"), ("load", "d1b")]
    engines.finish("d1b")
    assert (await again).base_url == "http://d1b"


@depth_lane
async def test_a_request_pinned_to_the_member_is_served_at_the_depth_serving_now(lane, engines, clock):
    forced = asyncio.create_task(lane.force("d1b@8"))
    await settle()
    engines.finish("d1b")
    await forced
    ticket, task = request(lane, "code", "d1b")  # pinned to the member (its own name as `model`)
    await settle()
    await task
    assert (ticket.choice.option, ticket.choice.why, ticket.choice.request_fields()) == (
        "d1b@8", "pinned", {DEPTH_FIELD: 8})


def test_a_client_names_member_at_depth_to_pin_that_depth_and_nothing_else_resolves_so(tmp_path):
    """`model: "d1b@4"` pins d1b drafting at depth 4; a depth the member does not offer, a member without
    depths, or a lane of one stay unknown models. Not listed among the names (one per depth would crowd a
    model picker)."""
    from llamactl.profiles import Profile
    from llamactl.router.errors import ModelNotFound

    draft = {"type": "draft", "draft_model": str(tmp_path / "d.gguf"), "depths": [4, 2]}
    profiles = [Profile(name="d1b", model="m", group="g", speculation=draft), Profile(name="plain", model="m", group="g"),
                Profile(name="solo", model="m", speculation=draft)]
    catalog = Catalog.from_profiles(profiles)
    route = catalog.resolve("d1b@4")
    assert (route.lane, route.pin) == ("g", "d1b@4")
    for name in ("d1b@8", "plain@2", "solo@4", "g@4", "d1b@04"):
        with pytest.raises(ModelNotFound):
            catalog.resolve(name)
    assert "d1b@4" not in catalog.valid_names()


@depth_lane
async def test_a_request_pinned_to_member_at_depth_is_served_at_that_depth(lane, engines, clock):
    ticket, task = request(lane, "code", "d1b@4")
    await settle()
    engines.finish("d1b")
    await task
    assert (ticket.choice.option, ticket.choice.why, ticket.choice.request_fields()) == (
        "d1b@4", "pinned", {DEPTH_FIELD: 4})


async def _pinned_to_a_depth_not_served_per_request(lane, engines, clock):
    ticket, task = request(lane, "code", "d1b@4")
    with pytest.raises(BadRequest, match=r"'d1b@4': d1b does not draft at a depth chosen per request "
                                         r"\(speculative.n_max ignored\)") as e:
        await task
    assert "name 'd1b'" in (e.value.hint or "") and engines.calls == []


test_a_depth_pinned_where_the_engine_ignores_depths_per_request_says_why = depth_lane(
    _pinned_to_a_depth_not_served_per_request, depths={}, refused={"d1b": "speculative.n_max ignored"})


@depth_lane
async def test_a_request_pinned_to_a_depth_fails_with_its_member(lane, engines, clock):
    """d1b cannot start: a request pinned to d1b@4 gets the reason, as one pinned to d1b does (it matched the
    member's name exactly, so it was kept queued for a member that never came, and d1b was reloaded for it)."""
    by_depth, depth_task = request(lane, "code", "d1b@4")
    by_member, member_task = request(lane, "code", "d1b")
    await settle()
    engines.fail("d1b", RuntimeError("draft model not found"))
    await settle()
    for task in (depth_task, member_task):
        with pytest.raises(EngineUnavailable, match="draft model not found"):
            await task
    assert engines.calls.count(("load", "d1b")) == 1


# ------------------------------------------------------------------ the policy's climb over depths (pure)

def _state(evidence: dict, active: str = "d1b@8", pending: dict | None = None):
    from llamactl.router.policy import ClassEvidence, GroupState

    members = {"d1b@8": True, "d1b@16": True, "d1b@4": True, "d1b@2": True, "plain": False}
    return GroupState(active=active, seconds_since_switch=100.0, switch_cost_s={m: 0.0 for m in members if m != active},
                      queued={"code": 3}, evidence={"code": ClassEvidence(**evidence)}, members=members,
                      head_class="code", explore_due={"code": False}, loaded=frozenset(members),
                      pending=pending or {})


def test_the_climb_tries_deeper_where_drafts_are_accepted_and_shallower_where_not():
    from llamactl.router.policy import PolicyConfig, decide

    config = PolicyConfig()
    accepted = _state({"tok_s": {"d1b@8": 100.0}, "n": {"d1b@8": 2}, "acceptance": {"d1b@8": 0.7},
                       "acceptance_n": {"d1b@8": 2}})
    decision = decide(accepted, config)
    assert (decision.target, decision.explore) == ("d1b@16", True)  # not counted against explore_share (due: False)
    rejected = _state({"tok_s": {"d1b@8": 30.0}, "n": {"d1b@8": 2}, "acceptance": {"d1b@8": 0.2},
                       "acceptance_n": {"d1b@8": 2}})
    assert decide(rejected, config).target == "d1b@4"
    in_flight = _state({"tok_s": {"d1b@8": 30.0}, "n": {"d1b@8": 2}, "acceptance": {"d1b@8": 0.2},
                        "acceptance_n": {"d1b@8": 2}}, active="d1b@4", pending={("code", "d1b@4"): 2})
    assert not decide(in_flight, config).explore  # its samples are on their way: not explored twice


def test_the_climb_stops_where_both_sides_are_slower_and_untried_depths_count_as_the_slowest_tried():
    from llamactl.router.policy import PolicyConfig, decide, speed

    config = PolicyConfig()
    done = _state({"tok_s": {"d1b@8": 100.0, "d1b@16": 104.0}, "n": {"d1b@8": 2, "d1b@16": 2},
                   "acceptance": {"d1b@8": 0.7, "d1b@16": 0.5}, "acceptance_n": {"d1b@8": 2, "d1b@16": 2}},
                  active="d1b@16")
    decision = decide(done, config)
    assert (decision.target, decision.explore) == ("d1b@16", False)  # d1b@4, d1b@2 are beyond a slower depth
    assert speed("code", "d1b@2", done.evidence, config, done.members) == 100.0  # the slowest tried, not a hope
    untried = _state({"tok_s": {"d1b@8": 100.0, "d1b@16": 104.0}, "n": {"d1b@8": 2, "d1b@16": 2}}, active="d1b@2")
    decision = decide(untried, config)
    assert (decision.target, decision.switch) == ("d1b@16", True)  # back to the fastest measured depth


def _share(a: float, k: int) -> float:
    """What an engine reports as acceptance (accepted / drafted) for a depth-k draft at a per-token chance a."""
    return (a - a ** (k + 1)) / ((1 - a) * k)


def _modelled(a: float, k: int, plain: float = 26.0, cost: float = 0.085) -> float:
    return plain * (1 - a ** (k + 1)) / (1 - a) / (1 + cost * k)


def test_the_depth_model_fitted_to_depths_measured_on_one_class_predicts_the_depths_of_another():
    from llamactl.router.policy import (
        ClassEvidence, GroupState, PolicyConfig, _depth_model, _per_token_acceptance, decide)

    assert abs(_per_token_acceptance(_share(0.45, 8), 8) - 0.45) < 1e-6
    members = {"d1b@2": True, "d1b@4": True, "d1b@8": True, "d1b@16": True, "plain": False}
    code = ClassEvidence(tok_s={m: _modelled(0.92, k) for m, k in (("d1b@8", 8), ("d1b@16", 16))},
                         n={"d1b@8": 2, "d1b@16": 2},
                         acceptance={"d1b@8": _share(0.92, 8), "d1b@16": _share(0.92, 16)},
                         acceptance_n={"d1b@8": 2, "d1b@16": 2})
    creative = ClassEvidence(tok_s={"d1b@8": _modelled(0.45, 8)}, n={"d1b@8": 2},
                             acceptance={"d1b@8": _share(0.45, 8)}, acceptance_n={"d1b@8": 2})
    state = GroupState(active="d1b@8", seconds_since_switch=100.0,
                       switch_cost_s={m: 0.0 for m in members if m != "d1b@8"}, queued={"creative": 3},
                       evidence={"code": code, "creative": creative}, members=members, head_class="creative",
                       explore_due={"creative": False}, loaded=frozenset(members))
    config = PolicyConfig()
    plain, cost = _depth_model(state, config, "d1b")
    assert abs(plain - 26.0) < 0.01 and abs(cost - 0.085) < 1e-4  # the engine's figures, from code's points
    decision = decide(state, config)
    # creative at 45% per token peaks at depth 2 (36.7 tok/s; depth 4 34.6): tried first, not the neighbour
    assert (decision.target, decision.explore) == ("d1b@2", True)


def test_a_depth_the_model_predicts_slower_than_the_best_measured_is_not_tried():
    """At 85% per token depth 8 (79 tok/s) beats 4 (72), and its drafts are half accepted, so the old climb went
    deeper; the model fitted to 4 and 8 predicts 16 at 69 tok/s, so it is not tried."""
    from llamactl.router.policy import ClassEvidence, GroupState, PolicyConfig, decide

    members = {"d1b@2": True, "d1b@4": True, "d1b@8": True, "d1b@16": True, "plain": False}
    depths = (("d1b@4", 4), ("d1b@8", 8))
    code = ClassEvidence(tok_s={m: _modelled(0.85, k) for m, k in depths}, n={m: 2 for m, _ in depths},
                         acceptance={m: _share(0.85, k) for m, k in depths}, acceptance_n={m: 2 for m, _ in depths})
    state = GroupState(active="d1b@8", seconds_since_switch=100.0,
                       switch_cost_s={m: 0.0 for m in members if m != "d1b@8"}, queued={"code": 3},
                       evidence={"code": code}, members=members, head_class="code",
                       explore_due={"code": False}, loaded=frozenset(members))
    decision = decide(state, PolicyConfig())
    assert (decision.target, decision.explore) == ("d1b@8", False)
