"""The switching simulator (the real Lane and policy on virtual time) and groups of several members."""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest

from llamactl.router.policy import ClassEvidence, GroupState, PolicyConfig, decide
from llamactl.router.catalog import Catalog
from llamactl.router.runs import Runs
from llamactl.router.sim import Scenario, ScenarioError, compare, generate, hindsight, run
from tests.router_harness import profile

REPO = Path(__file__).resolve().parent.parent

WARM = {"slots": 1, "fit_together": True,
        "members": {"plain": {"spec": False, "load_s": 2}, "fast": {"spec": True, "load_s": 2}},
        "classes": {"code": {"plain": 20, "fast": 60, "acceptance": {"fast": 0.9}},
                    "creative": {"plain": 20, "fast": 12, "acceptance": {"fast": 0.2}}}}


def scenario(requests, **changes) -> Scenario:
    return Scenario.from_json({**WARM, **changes, "requests": requests})


def test_virtual_time_gives_the_exact_makespan():
    """Three 100-token requests at t=0 on a 10 tok/s member that loads in 5 s: done at 35 s, 300 / 35 tok/s.
    An hour of simulated traffic takes no wall-clock time to speak of, so this is exact, not timed."""
    s = scenario([{"t": 0, "class": "code", "tokens": 100}] * 3,
                 members={"plain": {"spec": False, "load_s": 5}}, classes={"code": {"plain": 10}})
    outcome = run(s, "always-plain")
    assert outcome.tok_s == pytest.approx(300 / 35)
    assert outcome.mean_latency_s == pytest.approx((15 + 25 + 35) / 3)  # each waits for the load and those before
    assert outcome.per_member == {"plain": 3} and outcome.switches == 0


def test_auto_follows_phases_where_switches_are_drains():
    s = scenario(generate("phased", ["code", "creative"], n=120, phase=30, gap_s=4.0))
    result = compare(s)
    fixed = max(result["always-plain"]["tok_s"], result["always-fast"]["tok_s"])
    assert result["auto"]["tok_s"] > 1.1 * fixed  # both classes on their own member
    assert result["auto"]["switches"] >= 3
    assert result["clairvoyant"]["tok_s"] >= result["auto"]["tok_s"]  # the bound bounds


def test_a_stationary_mix_with_reloads_does_not_flap():
    s = scenario(generate("mixed", ["code", "creative"], n=200, gap_s=2.0), fit_together=False,
                 members={"plain": {"spec": False, "load_s": 30}, "fast": {"spec": True, "load_s": 30}})
    result = compare(s)
    assert result["auto"]["switches"] <= 4
    fixed = max(result["always-plain"]["tok_s"], result["always-fast"]["tok_s"])
    assert result["auto"]["tok_s"] >= 0.97 * fixed


def test_hindsight_is_the_best_order_preserving_plan_at_real_switch_costs():
    """Four x then four y, 100 tokens each, all at t=0; a and b each load in 10 s. All on one member:
    10 + 4*10 + 4*5 = 70 s. x on b, then a reload, y on a: 10 + 4*5 + 10 + 4*5 = 60 s, one switch."""
    s = scenario([{"t": 0, "class": "x", "tokens": 100}] * 4 + [{"t": 0, "class": "y", "tokens": 100}] * 4,
                 fit_together=False,
                 members={"a": {"spec": False, "load_s": 10}, "b": {"spec": True, "load_s": 10}},
                 classes={"x": {"a": 10, "b": 20}, "y": {"a": 20, "b": 10}})
    bound = hindsight(s)
    assert bound is not None and bound.tok_s == pytest.approx(800 / 60)
    assert bound.switches == 1 and bound.per_member == {"b": 4, "a": 4}
    # loads that cost nothing (both fit): x on b, y on a with no reload in between, 10 + 20 + 20
    warm = hindsight(Scenario.from_json({**s.__dict__, "fit_together": True}))
    assert warm is not None and warm.tok_s == pytest.approx(800 / 50)
    assert hindsight(Scenario.from_json({**s.__dict__, "slots": 2})) is None  # not exact there: not claimed


def test_hindsight_sits_between_the_best_fixed_member_and_clairvoyant():
    s = scenario(generate("drifting", ["code", "creative"], n=120, phase=30, gap_s=2.0), fit_together=False,
                 members={"plain": {"spec": False, "load_s": 30}, "fast": {"spec": True, "load_s": 30}})
    result = compare(s)
    fixed = max(result["always-plain"]["tok_s"], result["always-fast"]["tok_s"])
    assert fixed - 1e-6 <= result["hindsight"]["tok_s"] <= result["clairvoyant"]["tok_s"] + 1e-6
    assert result["auto"]["tok_s"] <= result["hindsight"]["tok_s"] + 1e-6


def test_the_script_sweeps_the_tables_verdicts_over_seeds(tmp_path):
    """`--table FOLDER --seeds N`: the verdicts of every seed, a line per missed cell and what they come to; exit 1
    where a cell missed, 0 where none did."""
    folder = tmp_path / "sim"
    folder.mkdir()
    (folder / "warm.json").write_text(json.dumps({**WARM, "classes": {"code": WARM["classes"]["code"],
                                                                      "creative": WARM["classes"]["creative"]}}))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "sim_switching.py"), "--table", str(folder),
                          "--seeds", "2", "--seed", "3", "--n", "60", "--phase", "20"],
                         capture_output=True, text=True, timeout=300)
    assert "seeds 3-4: " in out.stdout and "of 6 cells missed" in out.stdout, out.stdout + out.stderr
    assert ("MISSED" in out.stdout) == (out.returncode == 1) and out.returncode in (0, 1)
    assert "Per process (6 cells)" in out.stdout


def test_the_bounds_pay_the_first_load_as_every_mode_does():
    """No request is served before some engine has loaded: the clairvoyant's loads are free after the first, not
    the first (a bound that skips it is out of reach by the load itself, whatever a policy decides)."""
    one = scenario([{"t": 0, "class": "code", "tokens": 120}])  # load 2 s, then 120 tokens at 60 tok/s
    assert run(one, "clairvoyant").last_finish == pytest.approx(4.0)
    assert run(one, "always-fast").last_finish == pytest.approx(4.0)
    assert hindsight(one).last_finish == pytest.approx(4.0)
    two = scenario([{"t": 0, "class": "code", "tokens": 120}, {"t": 0, "class": "creative", "tokens": 100}])
    assert run(two, "clairvoyant").last_finish == pytest.approx(2 + 2 + 5)  # plain's load for creative: free


@pytest.mark.parametrize("change, message", [
    ({"members": {}}, "at least one member"),
    ({"members": {"a": {"spec": False}, "b": {"spec": False}}}, "one plain member at most"),
    ({"classes": {"code": {"plain": 20}}}, "classes.code: no positive tok/s for fast"),
    ({"requests": [{"t": 0, "class": "poetry", "tokens": 10}]}, "not in 'classes': poetry"),
    ({"requests": [{"t": "soon", "class": "code", "tokens": 10}]}, "ValueError"),
    ({"slots": 0}, "slots must be >= 1"),
])
def test_a_bad_scenario_is_a_clear_error(change, message):
    with pytest.raises(ScenarioError, match=message):
        Scenario.from_json({**WARM, "requests": [], **change})


def test_the_script_prints_one_json_object(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**WARM, "requests": generate("phased", ["code", "creative"], n=40, phase=10)}))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "sim_switching.py"), "--scenario", str(path),
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"auto", "always-plain", "always-fast", "clairvoyant", "hindsight"}
    assert all(set(v) == {"tok_s", "switches"} for v in result.values())
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "sim_switching.py"), "--scenario",
                          str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.json" in bad.stderr and "Traceback" not in bad.stderr


def test_a_group_may_have_several_drafters():
    members = [profile("g-plain", group="g"), profile("g-d1b", group="g", spec=True),
               profile("g-d8b", group="g", spec=True)]
    catalog = Catalog.from_profiles(members)
    assert not catalog.problems
    assert catalog.lanes["g"].members == {"g-d1b": "spec", "g-d8b": "spec", "g-plain": "plain"}
    two_plain = Catalog.from_profiles([profile("h-a", group="h"), profile("h-b", group="h")])
    assert any("one plain profile" in p for p in two_plain.problems)


def test_the_policy_picks_the_fastest_of_several_members():
    three = {"plain": False, "d1b": True, "d8b": True}
    ev = {"code": ClassEvidence(tok_s={"plain": 10, "d1b": 23.1, "d8b": 20.8}, n={"plain": 3, "d1b": 3, "d8b": 3},
                                mean_tokens=300)}
    state = GroupState(active="plain", seconds_since_switch=100, switch_cost_s={"d1b": 40, "d8b": 45},
                       queued={"code": 20}, evidence=ev, members=three)
    decision = decide(state, PolicyConfig())
    assert decision.switch and decision.target == "d1b"
    assert set(decision.seconds) == set(three)


def test_exploring_never_reloads_when_finding_out_cannot_change_the_choice():
    """Creative on a drafter already measured slow: the plain member is not loaded, and even 20% faster than
    estimated it would not pay a 60 s round trip for two requests. Loaded, it is tried (a drain)."""
    members = {"plain": False, "fast": True}
    ev = {"creative": ClassEvidence(tok_s={"fast": 12}, n={"fast": 9}, acceptance={"fast": 0.2},
                                    acceptance_n={"fast": 9}, mean_tokens=100)}
    base = dict(active="fast", seconds_since_switch=100, switch_cost_s={"plain": 30}, queued={"creative": 2},
                evidence=ev, members=members, head_class="creative", explore_due={"creative": True},
                head_run=("creative", 2))
    assert not decide(GroupState(**base), PolicyConfig()).explore
    loaded = decide(GroupState(**base, loaded=frozenset({"plain", "fast"})), PolicyConfig())
    assert loaded.explore and loaded.target == "plain"


THREE = {"plain": False, "d1b": True, "d8b": True}


def _measured_on_d1b() -> dict[str, ClassEvidence]:
    return {c: ClassEvidence(tok_s={"d1b": v}, n={"d1b": 3}, acceptance={"d1b": a}, acceptance_n={"d1b": 3},
                             mean_tokens=300)
            for c, v, a in (("code", 23.1, 0.8), ("chat", 12.5, 0.5), ("creative", 8.8, 0.25))}


def test_a_drafter_not_measured_on_a_class_is_estimated_from_its_peers():
    """d8b measured on code only, at 0.9 of d1b there: on chat it is taken to be 0.9 of d1b's chat too."""
    from llamactl.router.policy import speed
    ev = _measured_on_d1b()
    ev["code"] = ClassEvidence(tok_s={"d1b": 23.1, "d8b": 20.79}, n={"d1b": 3, "d8b": 3}, mean_tokens=300)
    assert speed("chat", "d8b", ev, PolicyConfig(), THREE) == pytest.approx(12.5 * 0.9)
    assert speed("code", "d8b", ev, PolicyConfig(), THREE) == pytest.approx(20.79)  # measured: as measured


def test_a_member_measured_on_nothing_is_explored_once_for_the_long_run_within_the_budget():
    """A stationary mix (no runs of one class) on d1b; d8b never measured. Were d8b 1.2x d1b on chat, it would
    win the mix by more than the hysteresis and repay the 90 s round trip over explore_horizon_s: one reload
    to find out, if the lane's exploration budget holds it. Not when the budget is short, and not for a member
    measured on anything already (its peers and its own figures estimate the rest)."""
    base = dict(active="d1b", seconds_since_switch=1000, switch_cost_s={"plain": 45, "d8b": 45},
                queued={"chat": 1}, evidence=_measured_on_d1b(), members=THREE, head_class="chat",
                explore_due={"chat": True}, head_run=("chat", 1), mix={"code": 3, "chat": 3, "creative": 3})
    decision = decide(GroupState(**base, explore_budget_s=100), PolicyConfig())
    assert decision.explore and decision.switch and decision.target == "d8b"
    assert not decide(GroupState(**base, explore_budget_s=80), PolicyConfig()).explore
    ev = _measured_on_d1b()
    ev["code"] = ClassEvidence(tok_s={"d1b": 23.1, "d8b": 20.8}, n={"d1b": 3, "d8b": 3}, mean_tokens=300)
    assert not decide(GroupState(**{**base, "evidence": ev}, explore_budget_s=1000), PolicyConfig()).explore
    assert not decide(GroupState(**base, explore_budget_s=1000), PolicyConfig(explore_horizon_s=0)).explore


def test_a_drafter_measured_on_nothing_is_hoped_faster_on_every_class_of_the_mix_not_the_head_one_alone():
    """The 27B card: plain measured at 26 tok/s on every class, the 1.7B drafter never loaded, a stationary mix
    with a creative request at the head. Hoped better only on creative (where drafting gains least), the drafter
    could never win the mix, so it was never loaded; the published drafter runs code at 5.9x. Measured on
    nothing, it may beat the priors on every class: it is found out, within the budget."""
    members = {"plain": False, "d": True}
    ev = {c: ClassEvidence(tok_s={"plain": 26.0}, n={"plain": 5}, mean_tokens=300) for c in ("code", "chat", "creative")}
    base = dict(active="plain", seconds_since_switch=1000, switch_cost_s={"plain": 12, "d": 13}, queued={"creative": 1},
                evidence=ev, members=members, head_class="creative", explore_due={"creative": True},
                head_run=("creative", 1), mix={"code": 3, "chat": 3, "creative": 3})
    decision = decide(GroupState(**base, explore_budget_s=100), PolicyConfig())
    assert decision.explore and decision.target == "d" and "and every class" in decision.reason, decision
    assert not decide(GroupState(**base, explore_budget_s=10), PolicyConfig()).explore  # the budget still holds


def test_a_reload_to_find_out_for_the_long_run_does_not_wait_for_the_class_share_once_the_member_serving_is_measured():
    """The class share of exploring requests (a tenth) made the head class wait for ten requests of its own before
    a reload to find out about a member measured on nothing: 20-25 requests of mixed work on the 27B card's plain
    member at 0.74x. The lane's budget of reload seconds bounds that reload; the share gates trying a member on a
    class. Not before the member serving is measured on every class of the mix: left sooner, it is judged on the
    priors where it was not (a drafter left after one code request, at 5.9x, was never tried again)."""
    members = {"plain": False, "d": True}
    ev = {c: ClassEvidence(tok_s={"plain": 26.0}, n={"plain": 3}, mean_tokens=300) for c in ("code", "chat", "creative")}
    base = dict(active="plain", seconds_since_switch=1000, switch_cost_s={"plain": 12, "d": 13}, queued={"chat": 1},
                evidence=ev, members=members, head_class="chat", explore_due={"chat": False}, head_run=("chat", 1),
                mix={"code": 3, "chat": 3, "creative": 3}, explore_budget_s=100)
    decision = decide(GroupState(**base), PolicyConfig())
    assert decision.explore and decision.target == "d", decision
    thin = {**ev, "creative": ClassEvidence(tok_s={"plain": 26.0}, n={"plain": 1}, mean_tokens=300)}
    assert not decide(GroupState(**{**base, "evidence": thin}), PolicyConfig()).explore
    assert not decide(GroupState(**base, explored=frozenset({("code", "d")})), PolicyConfig()).explore  # known


def test_a_reload_away_from_a_member_not_measured_on_the_work_queued_must_save_twice_its_cost():
    """mtp3 reloaded to find out, measured on code only, ten creative requests queued: its creative figure is
    the priors', and the reload back to plain saving 16 s against a 15.5 s switch was paid on it (mtp-depths
    mixed, seed 6: never tried again, 0.916x). On figures measured, a saving over the cost pays the switch."""
    members = {"plain": False, "mtp3": True}
    ev = {"code": ClassEvidence(tok_s={"mtp3": 40.5, "plain": 30.0}, n={"mtp3": 2, "plain": 5},
                                acceptance={"mtp3": 0.8}, acceptance_n={"mtp3": 2}, mean_tokens=300),
          "creative": ClassEvidence(tok_s={"plain": 30.0}, n={"plain": 5}, mean_tokens=300)}
    base = dict(active="mtp3", seconds_since_switch=1000, switch_cost_s={"plain": 15.5, "mtp3": 16},
                queued={"creative": 10, "code": 1}, evidence=ev, members=members, head_class="creative",
                head_run=("creative", 1))
    stay = decide(GroupState(**base), PolicyConfig())
    assert not stay.switch and "does not pay the switch" in stay.reason, stay
    measured = {**ev, "creative": ClassEvidence(tok_s={"plain": 30.0, "mtp3": 25.0}, n={"plain": 5, "mtp3": 2},
                                                acceptance={"mtp3": 0.1}, acceptance_n={"mtp3": 2}, mean_tokens=300)}
    leave = decide(GroupState(**{**base, "evidence": measured}), PolicyConfig())
    assert leave.switch and leave.target == "plain", leave


def test_a_strong_drafter_is_found_on_mixed_work_that_starts_with_creative_requests():
    """docs/sim/27b-drafter-24gb.json, mixed work, seed 6: the first request is creative, so plain loads first;
    the drafter (1.34x plain on this mix) was then never loaded: 0.749x the best fixed member."""
    from scripts.sim_switching import scenario_from

    s = scenario_from(REPO / "docs" / "sim" / "27b-drafter-24gb.json", "mixed", 400, 100, 6)
    assert s.requests[0]["class"] == "creative"
    auto, drafter = run(s, "auto"), run(s, "always-d1.7b")
    assert auto.tok_s >= 0.97 * drafter.tok_s and auto.per_member.get("d1.7b", 0) > 300


def test_finding_out_from_a_member_left_anyway_costs_the_budget_one_load_not_a_round_trip():
    """d1b serving, the plain member measured faster on the whole mix (the policy would leave d1b for it), d8b never
    measured: going to d8b first costs one 45 s load more than going to plain (the way back is paid either way),
    so a budget of 50 s pays for it. With d1b the best measured member, the same budget does not: there finding
    out is a 90 s round trip (seed 16 mixed, unseen: 0.920 -> 0.968 the best fixed member)."""
    ev = _measured_on_d1b()
    for c in ev:  # plain 14 tok/s everywhere: 10% faster than d1b on this chat-heavy mix
        ev[c] = replace(ev[c], tok_s={**ev[c].tok_s, "plain": 14.0}, n={**ev[c].n, "plain": 3})
    base = dict(active="d1b", seconds_since_switch=1000, switch_cost_s={"plain": 45, "d8b": 45},
                queued={"chat": 1}, evidence=ev, members=THREE, head_class="chat",
                explore_due={"chat": True}, head_run=("chat", 1), mix={"code": 1, "chat": 9, "creative": 1})
    decision = decide(GroupState(**base, explore_budget_s=50), PolicyConfig())
    assert decision.explore and decision.target == "d8b", decision
    assert "one 45s load (d1b is left anyway)" in decision.reason
    slow_plain = {c: replace(e, tok_s={**e.tok_s, "plain": 5.0}) for c, e in ev.items()}
    kept = decide(GroupState(**{**base, "evidence": slow_plain}, explore_budget_s=50), PolicyConfig())
    assert not kept.explore, kept


def test_a_drafter_measured_elsewhere_is_found_out_for_a_long_run_of_a_class_it_was_never_explored_on():
    """d8b measured on code only (0.9 of d1b there), d1b serving a run of 60 chat requests: d8b's chat figure is
    only d1b's times 0.9, and drafters cross from one class to the next. Were it 1.2x that, it would repay the
    90 s round trip on this run, so it is found out for it; not again once explored on chat, and not for a run
    too short to repay the round trip."""
    ev = _measured_on_d1b()
    ev["code"] = ClassEvidence(tok_s={"d1b": 23.1, "d8b": 20.8, "plain": 11.0}, n={"d1b": 3, "d8b": 3, "plain": 3},
                               mean_tokens=300)
    base = dict(active="d1b", seconds_since_switch=1000, switch_cost_s={"plain": 45, "d8b": 45},
                queued={"chat": 60}, evidence=ev, members=THREE, head_class="chat",
                explore_due={"chat": True}, head_run=("chat", 60), mix={"chat": 9})
    decision = decide(GroupState(**base), PolicyConfig())
    assert decision.explore and decision.switch and decision.target == "d8b", decision
    assert not decide(GroupState(**base, explored=frozenset({("chat", "d8b")})), PolicyConfig()).explore
    short = {**base, "queued": {"chat": 10}, "head_run": ("chat", 10)}
    assert not decide(GroupState(**short), PolicyConfig()).explore


def test_a_run_of_one_class_counts_the_arrivals_so_far_when_requests_come_one_at_a_time():
    """Requests one at a time (the queue never holds two): a phase of creative work after code still moves
    to the plain member, because a run that has lasted n arrivals is expected to last about n more. Counting
    only what is queued, a run is always one request, which never pays a reload."""
    code = [{"t": 20.0 * i, "class": "code", "tokens": 100} for i in range(10)]
    creative = [{"t": 200 + 20.0 * i, "class": "creative", "tokens": 100} for i in range(60)]
    s = scenario(code + creative, fit_together=False,
                 members={"plain": {"spec": False, "load_s": 5}, "fast": {"spec": True, "load_s": 5}})
    outcome = run(s, "auto")
    assert outcome.per_member.get("plain", 0) >= 45 and outcome.switches == 1


def test_a_run_lasts_what_runs_of_that_length_lasted_before():
    runs = Runs()
    assert runs.next_of("code", 1) == 1  # nothing arrived: the queue alone
    for cls, n in (("code", 100), ("chat", 100), ("creative", 3)):
        for _ in range(n):
            runs.arrived(cls)
    # creative has one past run: too few, so every class's runs of at least 3 (100, 100) say 97 more
    assert runs.expected_more("creative", 3) == 97
    assert runs.next_of("creative", 2) == 2 + 97
    assert runs.next_of("code", 2) == 2  # the run going on is creative's: only what is queued
    for cls in ("code",) * 2 + ("creative",) * 2 + ("code",) * 4 + ("creative",):
        runs.arrived(cls)  # creative has ended runs of 3 and 2 now: its own history decides
    assert runs.expected_more("creative", 1) == pytest.approx((2 + 1) / 2)
    # none of creative's runs lasted 4: every class's runs of at least 4 (code 100 and 4, chat 100) decide
    assert runs.expected_more("creative", 4) == pytest.approx((96 + 0 + 96) / 3)
    fresh = Runs()
    for _ in range(5):
        fresh.arrived("code")
    assert fresh.next_of("code", 1) == 5  # no history: as many more as so far


def test_once_phases_have_been_seen_a_new_phase_moves_at_its_first_request(monkeypatch):
    """Requests one at a time, phases of 12. Without history a run must last a few arrivals before a reload
    pays (about three requests on the wrong member every phase); with the phases seen so far, the next
    phase is known to be long from its first request."""
    import llamactl.router.lane as lane_module
    reqs = generate("phased", ["code", "creative"], n=120, phase=12, gap_s=20.0, tokens=100)
    s = scenario(reqs, fit_together=False,
                 members={"plain": {"spec": False, "load_s": 5}, "fast": {"spec": True, "load_s": 5}})

    def misplaced(outcome) -> int:
        return outcome.per_class["code"].get("plain", 0) + outcome.per_class["creative"].get("fast", 0)

    learned = misplaced(run(s, "auto"))
    monkeypatch.setattr(lane_module, "Runs", lambda: Runs(min_history=10**9))
    without_history = misplaced(run(s, "auto"))
    assert without_history >= 20 and learned <= without_history / 2, (learned, without_history)


def test_auto_stays_within_two_percent_of_the_best_fixed_member_on_the_documented_scenarios():
    """The issue's first target, on the reload scenarios where it was missed before (a tie between two
    drafters on priors, settled by one exploration). A regression test of the documented tables."""
    sys.path.insert(0, str(REPO / "scripts"))
    from sim_switching import scenario_from
    for name in ("70b-three-members", "mtp-depths"):
        for workload in ("mixed", "drifting"):
            result = compare(scenario_from(REPO / "docs" / "sim" / f"{name}.json", workload, 400, 100, 1))
            fixed = max(v["tok_s"] for k, v in result.items() if k.startswith("always-"))
            assert result["auto"]["tok_s"] >= 0.98 * fixed, (name, workload, result)


def test_restarted_with_what_it_learnt_auto_pays_no_exploring_reload_on_a_stationary_mix():
    """The same kind of work the day before, kept through the learned.json snapshot and restore: on a stationary
    mix auto serves the best fixed member from the first request, where cold it paid reloads to find out."""
    sys.path.insert(0, str(REPO / "scripts"))
    from sim_switching import scenario_from
    for name in ("70b-three-members", "mtp-depths"):
        path = REPO / "docs" / "sim" / f"{name}.json"
        result = compare(scenario_from(path, "mixed", 400, 100, 1), before=scenario_from(path, "mixed", 400, 100, 2))
        best = max((v for k, v in result.items() if k.startswith("always-")), key=lambda v: v["tok_s"])
        cold, restarted = result["auto"], result["auto-restarted"]
        assert cold["switches"] >= 1 and restarted["switches"] == 0, (name, cold, restarted)
        assert restarted["tok_s"] == pytest.approx(best["tok_s"]) and restarted["mean_latency_s"] < cold["mean_latency_s"]


def test_the_daemon_passes_the_exploration_share_through(monkeypatch):
    from llamactl.daemon.wiring import router_config
    from llamactl.errors import ConfigError
    from llamactl.settings import Settings
    monkeypatch.setenv("LLAMACTL_ROUTER_EXPLORE_SHARE", "0")
    assert router_config(Settings()).lane.policy.explore_share == 0
    monkeypatch.setenv("LLAMACTL_ROUTER_EXPLORE_SHARE", "1.5")
    with pytest.raises((ConfigError, ValueError), match="(?i)explore_share"):
        router_config(Settings())


def test_a_plain_member_sharing_its_twins_engine_switches_for_nothing_and_auto_nears_the_clairvoyant():
    """The per-request scenario (a 27B and its drafter on one card, the plain member served by the drafter's
    engine with drafting off): no reload, so auto follows each request's class; the issue's targets: within 1%
    of the best fixed choice, and 90% of the clairvoyant's gain on phased and on mixed work."""
    sys.path.insert(0, str(REPO / "scripts"))
    from sim_switching import scenario_from
    path = REPO / "docs" / "sim" / "27b-drafter-24gb-per-request.json"
    for workload in ("phased", "mixed"):
        s = scenario_from(path, workload, 400, 100, 1)
        result = compare(s)
        fixed = max(v["tok_s"] for k, v in result.items() if k.startswith("always-"))
        assert result["auto"]["tok_s"] >= 0.99 * fixed, (workload, result)
        gain = (result["auto"]["tok_s"] - fixed) / (result["clairvoyant"]["tok_s"] - fixed)
        assert gain >= 0.90, (workload, gain, result)
    # the same work per process (the plain member its own engine, each switch a reload) gains far less
    per_process = json.loads(path.read_text())
    del per_process["members"]["plain"]["shares"]
    per_process["requests"] = generate("mixed", list(per_process["classes"]), n=400, gap_s=3.0, seed=1)
    assert compare(Scenario.from_json(per_process))["auto"]["tok_s"] < 0.95 * result["auto"]["tok_s"]


def test_a_member_shares_only_a_speculative_members_engine():
    with pytest.raises(ScenarioError, match="shares"):
        scenario([], members={"plain": {"spec": False, "load_s": 2, "shares": "nobody"},
                              "fast": {"spec": True, "load_s": 2}})


def test_a_plain_member_measured_on_one_class_is_not_explored_on_another_when_loaded():
    """Its speed hardly depends on the content: a cheap trip to find out buys nothing (and costs a request
    served slower), so the drafter keeps a code request when plain was measured on creative work."""
    ev = {"creative": ClassEvidence(tok_s={"plain": 26.0, "spec": 21.0}, n={"plain": 3, "spec": 3},
                                    acceptance={"spec": 0.3}, acceptance_n={"spec": 3}),
          "code": ClassEvidence(tok_s={"spec": 154.0}, n={"spec": 3}, acceptance={"spec": 0.85},
                                acceptance_n={"spec": 3})}
    state = GroupState(active="spec", seconds_since_switch=100.0, switch_cost_s={"plain": 0.0},
                       queued={"code": 1}, evidence=ev, members={"spec": True, "plain": False},
                       head_class="code", explore_due={"code": True}, loaded=frozenset({"spec", "plain"}))
    decision = decide(state, PolicyConfig())
    assert decision.target == "spec" and not decision.explore, decision


def test_unseen_scenarios_are_reproducible_per_process_groups_of_two_or_three():
    from llamactl.router.unseen import unseen_group, unseen_scenario

    assert unseen_group(7) == unseen_group(7) and unseen_group(7) != unseen_group(8)
    assert unseen_scenario(7, "mixed").requests == unseen_scenario(7, "mixed").requests
    helps_and_hurts = False
    for seed in range(1, 31):
        group = unseen_group(seed)
        members = group["members"]
        assert 2 <= len(members) <= 3 and [m for m, v in members.items() if not v["spec"]] == ["plain"]
        assert all(5 <= v["load_s"] <= 45 for v in members.values())
        assert group["slots"] == 1 and group["fit_together"] is False  # every switch a reload
        for d in (m for m, v in members.items() if v["spec"]):
            ratios = [speeds[d] / speeds["plain"] for speeds in group["classes"].values()]
            helps_and_hurts |= max(ratios) > 1.1 and min(ratios) < 0.9
    assert helps_and_hurts  # some drafter helps on one class and hurts on another


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sim_switching", REPO / "scripts" / "sim_switching.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_checks_issue_25s_targets():
    """Per process: auto >= 0.98x the best fixed member. Per request: within 1% of it, and 90% of the
    clairvoyant's gain on phased and mixed work (not on drifting)."""
    verdict = _script().verdict

    def result(auto, clairvoyant=120.0):
        return {"auto": {"tok_s": auto}, "always-a": {"tok_s": 100.0}, "always-b": {"tok_s": 90.0},
                "clairvoyant": {"tok_s": clairvoyant}}

    assert verdict(result(98.5), "mixed", False)[3] == "met"  # no gain captured, but not 2% behind
    assert verdict(result(97.5), "phased", False)[3] == "MISSED"
    assert verdict(result(98.5), "mixed", True)[3] == "MISSED"  # per request: 1% at most
    assert verdict(result(117.0), "phased", True)[3] == "MISSED"  # 85% of the clairvoyant's gain
    assert verdict(result(117.0), "drifting", True)[3] == "met"
    assert verdict(result(119.0), "mixed", True)[3] == "met"


def test_unseen_option_reports_every_scenario_and_workload():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "sim_switching.py"), "--unseen", "1", "--seed", "3",
                          "--n", "60", "--phase", "15"], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    assert all(f"seed    3 {w}" in out.stdout for w in ("phased", "mixed", "drifting"))
    assert "3 runs (1 scenarios, seeds 3-3" in out.stdout


def _drafter_only(budget_s: float = 100.0, queued: dict[str, int] | None = None) -> GroupState:
    """A strong drafter measured on code (96.5 tok/s at 0.71) and chat (36.8 at 0.10), the plain member never
    loaded: the speed-up model derives plain from chat as 46 tok/s (the lowest figure), from code as 74; the
    drafter's own line through the two, at the model's break-even acceptance, says 61 (unseen seed 2: it runs 61)."""
    ev = {"code": ClassEvidence(tok_s={"d1": 96.5}, n={"d1": 4}, acceptance={"d1": 0.71}, acceptance_n={"d1": 4},
                                mean_tokens=300),
          "chat": ClassEvidence(tok_s={"d1": 36.8}, n={"d1": 3}, acceptance={"d1": 0.10}, acceptance_n={"d1": 3},
                                mean_tokens=300)}
    return GroupState(active="d1", seconds_since_switch=1000, switch_cost_s={"plain": 9.0}, queued=queued or {"code": 1},
                      evidence=ev, members={"plain": False, "d1": True}, head_class="code",
                      explore_due={"code": True}, head_run=("code", 1), mix={"code": 9, "chat": 11},
                      explore_budget_s=budget_s)


def test_an_unmeasured_plain_member_is_hoped_as_fast_as_its_drafters_line_says_on_every_class():
    """On a stationary code/chat mix, finding out about the plain member pays only if it may win the whole mix:
    hoped 1.2x the model's 46 tok/s on code alone it cannot; hoped 61 tok/s (the drafter's line at break-even) on
    every class, it wins by 9%, and one 18 s round trip is paid for it (the reason says why)."""
    from llamactl.router.policy import _plain_from_drafters_fit

    state = _drafter_only()
    assert _plain_from_drafters_fit(state.evidence, state.members, PolicyConfig()) == pytest.approx(60.8, abs=0.1)
    decision = decide(state, PolicyConfig())
    assert decision.explore and decision.switch and decision.target == "plain", decision
    assert "hoped 60.8 tok/s on code and every class" in decision.reason
    # The drafter measured on classes too close in acceptance: no line, and no reload to find out.
    close = {c: replace(e, acceptance={"d1": a}) for (c, e), a in zip(state.evidence.items(), (0.40, 0.35))}
    assert not decide(replace(state, evidence=close), PolicyConfig()).explore
    # Plain measured once: its speed is known on every class, nothing to find out by a reload.
    measured = {**state.evidence, "chat": replace(state.evidence["chat"], tok_s={"d1": 36.8, "plain": 61.0},
                                                  n={"d1": 3, "plain": 2})}
    assert not decide(replace(state, evidence=measured, head_class="code"), PolicyConfig()).explore


def test_the_exploring_budget_counts_a_share_of_the_work_already_queued():
    """Nothing served long enough to have earned an 18 s round trip (budget 0), but 60 requests queued, some
    340 s of work on the drafter: a tenth of it pays the reload to find out. One request queued does not."""
    assert decide(_drafter_only(0.0, {"code": 30, "chat": 30}), PolicyConfig()).target == "plain"
    assert not decide(_drafter_only(0.0, {"code": 1}), PolicyConfig()).explore


@pytest.mark.parametrize("seed", [0, 2])
def test_unseen_mixed_work_finds_the_plain_member_its_drafter_hides(seed):
    """Unseen seeds 0 and 2, mixed: the plain member is the best fixed one, but derived from the drafter through
    the speed-up model it looked too slow to be worth a reload (0.78x and 0.87x the best fixed member before)."""
    from llamactl.router.unseen import unseen_scenario

    result = compare(unseen_scenario(seed, "mixed"))
    fixed = max(v["tok_s"] for k, v in result.items() if k.startswith("always-"))
    assert result["auto"]["tok_s"] >= 0.95 * fixed, result


def test_a_member_with_depths_is_one_choice_per_depth_served_by_one_engine():
    from llamactl.router.sim import Scenario, ScenarioError, compare, generate

    data = {"slots": 1, "members": {"plain": {"spec": False, "load_s": 12, "shares": "d"},
                                    "d": {"spec": True, "load_s": 13, "depths": [8, 2]}},
            "classes": {"code": {"plain": 26, "d@2": 60, "d@8": 100, "acceptance": {"d@2": 0.9, "d@8": 0.7}},
                        "creative": {"plain": 26, "d@2": 36, "d@8": 28, "acceptance": {"d@2": 0.3, "d@8": 0.1}}}}
    data["requests"] = generate("phased", ["code", "creative"], n=120, phase=30, gap_s=3.0)
    scenario = Scenario.from_json(data)
    assert scenario.choices == ["plain", "d@2", "d@8"] and scenario.engine("d@2") == scenario.engine("plain") == "d"
    result = compare(scenario)
    assert set(result) == {"auto", "always-plain", "always-d@2", "always-d@8", "clairvoyant", "hindsight"}
    assert result["auto"]["tok_s"] > max(result["always-d@2"]["tok_s"], result["always-d@8"]["tok_s"])
    assert result["hindsight"]["switches"] == 3  # free switches between one engine's choices: every phase's best
    assert set(result["auto"]["requests_per_member"]) <= {"plain", "d@2", "d@8"}
    bad = {**data, "classes": {"code": {"plain": 26, "d": 90}, "creative": data["classes"]["creative"]}}
    with pytest.raises(ScenarioError, match="no positive tok/s for d@2, d@8"):
        Scenario.from_json(bad)
    with pytest.raises(ScenarioError, match="depths"):
        Scenario.from_json({**data, "members": {**data["members"], "plain": {"spec": False, "depths": [2]}}})


def test_exploring_a_depth_on_one_class_leaves_the_other_classes_at_their_own():
    """Depths per request, a deep queue of interleaved classes: a depth tried on one class is no reload, so it
    serves no trial of every class (the other classes' requests keep their own depth), and a depth explored is
    asked for only the samples it still misses. Before: code at depth 2 three times, creative at 16 twice, chat
    at 8 six times."""
    from llamactl.router.sim import run

    data = json.loads((REPO / "docs/sim/27b-drafter-depths-per-request.json").read_text())
    data["requests"] = generate("mixed", list(data["classes"]), n=200, gap_s=data["gap_s"], seed=1)
    outcome = run(Scenario.from_json(data), "auto")
    min_samples = PolicyConfig().min_samples
    for cls, served in outcome.per_class.items():
        chosen = max(served, key=lambda m: served[m])
        assert chosen == Scenario.from_json(data).best_member(cls), (cls, served)
        assert all(n <= min_samples for m, n in served.items() if m != chosen), (cls, served)


def test_no_policy_can_promise_the_best_fixed_member_on_groups_it_knows_nothing_of():
    """Two groups alike in everything but the member the policy does not load first: 0.6x the first member in one,
    1.6x it in the other. Until that member's first load the runs are the same to the request (nothing of a
    member not loaded reaches the policy), so whatever the policy does then, it does in both. A visit and the
    way back cost 4% of the run: going there costs the slow twin that much, staying costs the fast twin its gain,
    and going later costs it the gain of the time before. No policy is within 2% of the best fixed member in
    both (docs/switching-sim.md, "What no policy can promise"). The first load is found by a run, so the pair
    holds whichever member a policy starts on."""
    requests = generate("mixed", ["chat", "structured"], n=200, gap_s=2.5, tokens=300, seed=4)
    members = {"plain": {"spec": False, "load_s": 30}, "d": {"spec": True, "load_s": 30}}

    def scenario(speeds: dict[str, float], acceptance: float) -> Scenario:
        return Scenario.from_json({"slots": 1, "fit_together": False, "requests": requests, "members": members,
                                   "classes": {c: {**speeds, "acceptance": {"d": acceptance}}
                                               for c in ("chat", "structured")}})

    probe: dict = {}
    run(scenario({"plain": 40, "d": 40}, 0.4), "auto", keep=probe)
    first = probe["switches"][0]["to"]
    other = next(m for m in members if m != first)

    def twin(factor: float, acceptance: float) -> tuple[list[dict], float, float]:
        s = scenario({first: 40, other: 40 * factor}, acceptance)
        kept: dict = {}
        auto = run(s, "auto", keep=kept).tok_s
        fixed = {m: run(s, f"always-{m}").tok_s for m in members}
        return kept["switches"], auto / max(fixed.values()), sum(r["tokens"] for r in requests) / fixed[first]

    # the drafter's acceptance goes with its speed where it is the member varied; else it is the same in both
    slow, slow_ratio, makespan = twin(0.6, 0.1 if other == "d" else 0.4)
    fast, fast_ratio, _ = twin(1.6, 0.8 if other == "d" else 0.4)
    assert slow[0]["to"] == fast[0]["to"] == first

    def until_visit(switches: list[dict]) -> list[dict]:
        visit = next((i for i, s in enumerate(switches) if s["to"] == other), len(switches))
        return switches[:visit + 1]

    assert until_visit(slow) == until_visit(fast)  # same times, same requests served, same reasons
    assert 2 * 30 / makespan > 0.02
    assert min(slow_ratio, fast_ratio) < 0.98, (slow_ratio, fast_ratio)
    if any(s["to"] == other for s in slow):  # it went: the slow twin paid the way there at least
        assert slow_ratio <= 1 - 30 / makespan
    else:  # it stayed: the fast twin lost the other member's gain
        assert fast_ratio <= 1 / 1.6 + 0.01


def test_mixed_work_that_starts_where_the_priors_favour_plain_still_loads_a_drafter_first():
    """70B and MTP groups, mixed work whose first request is chat or creative (the priors: drafting slower
    there): plain loaded first, the drafters waited for a round trip's exploration budget, about 800 s of
    serving on the 70B card, and auto ran 0.975-0.977x the best fixed member (a drafter). A drafter loaded
    first is measured from the first request."""
    sys.path.insert(0, str(REPO / "scripts"))
    from sim_switching import scenario_from
    for name, seed in (("70b-three-members", 7), ("mtp-depths", 10), ("mtp-depths", 23)):
        s = scenario_from(REPO / "docs" / "sim" / f"{name}.json", "mixed", 400, 100, seed)
        assert s.requests[0]["class"] in ("chat", "creative")
        kept: dict = {}
        result = compare(s)
        run(s, "auto", keep=kept)
        fixed = max(v["tok_s"] for k, v in result.items() if k.startswith("always-"))
        assert kept["switches"][0]["to"] != "plain", (name, seed, kept["switches"][0])
        assert result["auto"]["tok_s"] >= 0.98 * fixed, (name, seed, result["auto"]["tok_s"] / fixed)


def test_a_fault_in_the_policy_keeps_the_lane_serving_on_its_member(monkeypatch, caplog):
    """decide() raising (a bug in the pure policy) used to end the lane's dispatcher: every request waiting, and
    every later one, failed with "shut down". Now the decision is to stay, the fault logged with its traceback."""
    import llamactl.router.lane as lane_module

    real, calls = lane_module.decide, []

    def faulty(state, config):
        calls.append(state.active)
        if len(calls) > 3:
            raise ZeroDivisionError("a policy bug")
        return real(state, config)

    monkeypatch.setattr(lane_module, "decide", faulty)
    s = scenario(generate("phased", ["code", "creative"], n=40, phase=10, gap_s=1.0))
    with caplog.at_level("ERROR", logger="llamactl.router"):
        outcome = run(s, "auto")
    assert sum(outcome.per_member.values()) == 40  # every request served
    assert any("the switching policy failed" in r.getMessage() and r.exc_info for r in caplog.records)
