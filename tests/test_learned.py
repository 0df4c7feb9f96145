"""What the router learnt, kept across restarts (llamactl/router/learned.py): a round trip through the file,
what is not restored (a changed profile, a lane not served, evidence older than the memory counting the time
the daemon was down), a damaged or hostile file, and a reload forgetting a changed member's figures."""

from __future__ import annotations

import json
import stat

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from llamactl.router.policy import GroupState, PolicyConfig, decide
from llamactl.router import learned
from llamactl.router.telemetry import Sample, Telemetry
from tests.router_harness import profile

LANES = {"coding": {"coding-spec": "aaaa", "coding-plain": "bbbb"}}


class Clock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def measured(clock: Clock, **changes) -> Telemetry:
    t = Telemetry(clock=clock, memory_s=3600)
    for member, role, speed in (("coding-spec", "spec", 90.0), ("coding-plain", "plain", 40.0)):
        for i in range(3):
            t.record(Sample(lane="coding", profile=member, role=role, cls="code", endpoint="chat", status=200,
                            gen_tok_s=speed + i, completion_tokens=200, draft_n=100 if role == "spec" else None,
                            draft_accepted=80 if role == "spec" else None))
            t.arrival("coding", "code")
    return t


def test_what_was_measured_comes_back_after_a_restart(tmp_path):
    before = measured(Clock())
    path = learned.path_in(tmp_path / "state")
    learned.write(path, learned.snapshot(before, LANES, wall_now=1_000_000.0))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    after = Telemetry(clock=Clock(10.0), memory_s=3600)  # a new process: its clock starts anywhere
    restored, skipped = learned.restore(after, learned.read(path), LANES, wall_now=1_000_060.0)
    assert (restored, skipped) == (6, 0)
    assert after.evidence("coding") == before.evidence("coding")
    assert after.mix("coding")["code"] == pytest.approx(before.mix("coding")["code"])
    # evidence for the policy, not requests: the restored samples are not counted again in /metrics
    assert after.registry.get_sample_value("llamactl_requests_total", {
        "lane": "coding", "profile": "coding-spec", "class": "code", "endpoint": "chat", "status": "200"}) is None


def test_a_changed_profile_an_unserved_lane_and_old_evidence_are_not_restored():
    data = learned.snapshot(measured(Clock()), LANES, wall_now=1_000_000.0)
    changed = {"coding": {"coding-spec": "cccc", "coding-plain": "bbbb"}}
    after = Telemetry(clock=Clock(), memory_s=3600)
    assert learned.restore(after, data, changed, wall_now=1_000_000.0) == (3, 3)
    assert set(after.evidence("coding")["code"].tok_s) == {"coding-plain"}
    assert learned.restore(Telemetry(clock=Clock()), data, {"other": {"coding-spec": "aaaa"}}, 1_000_000.0) == (0, 6)
    # the daemon was down longer than the memory lasts: what it measured then no longer stands
    late = Telemetry(clock=Clock(), memory_s=3600)
    assert learned.restore(late, data, LANES, wall_now=1_000_000.0 + 3601) == (0, 6)
    assert late.evidence("coding") == {} and late.mix("coding") == {}


def test_the_fingerprint_follows_what_the_member_runs_not_its_description():
    base = profile("a", spec=True)
    assert learned.fingerprint(base) == learned.fingerprint(base.model_copy(update={"description": "new words"}))
    assert learned.fingerprint(base) != learned.fingerprint(base.model_copy(update={"ctx_size": 8192}))


def test_a_damaged_file_is_ignored_with_a_warning_that_names_it(tmp_path, caplog):
    path = tmp_path / "learned.json"
    assert learned.read(path) is None  # none yet: nothing to say
    path.write_text('{"version": 1, "samples": [')
    assert learned.read(path) is None
    assert str(path) in caplog.text and "not JSON" in caplog.text
    path.write_bytes(b" " * (learned.MAX_BYTES + 1))
    assert learned.read(path) is None and "over" in caplog.text
    path.write_text(json.dumps({"version": 99, "samples": [{"lane": "coding"}]}))
    assert learned.restore(Telemetry(), learned.read(path), LANES, 0.0) == (0, 0)  # another format: not read


BAD_RECORDS = [
    {"tok_s": -1}, {"tok_s": float("nan")}, {"tok_s": True}, {"age_s": -5}, {"class": "../../etc"},
    {"class": "x" * 65}, {"role": "admin"}, {"tokens": -3}, {"tokens": 1.5}, {"draft_n": 10, "draft_accepted": 11},
    {"draft_n": 10, "draft_accepted": None}, {"lane": ["coding"]}, {"fingerprint": None},
    {"tok_s": 10**400}, {"age_s": 10**400}, {"tokens": 10**400}, {"class": "code\n"},
]


@pytest.mark.parametrize("change", BAD_RECORDS, ids=[next(iter(c)) + "-" + str(i) for i, c in enumerate(BAD_RECORDS)])
def test_a_record_that_does_not_check_out_is_skipped(change):
    good = {"lane": "coding", "member": "coding-spec", "fingerprint": "aaaa", "class": "code", "role": "spec",
            "tok_s": 50.0, "tokens": 100, "draft_n": 10, "draft_accepted": 8, "age_s": 1.0}
    data = {"version": 1, "saved_at_unix": 0.0, "samples": [good, {**good, **change}]}
    after = Telemetry()
    assert learned.restore(after, data, LANES, wall_now=0.0) == (1, 1)
    assert after.evidence("coding")["code"].n == {"coding-spec": 1}


def test_numbers_too_big_for_a_float_anywhere_in_the_file_are_skipped():
    data = {"version": 1, "saved_at_unix": 10**400, "samples": [],
            "mix": {"coding": {"code": 10**400, "chat": 2.0}}, "runs": {"coding": {"code": [10**400, 3]}}}
    from llamactl.router.runs import Runs
    runs, telemetry = Runs(), Telemetry()
    assert learned.restore(telemetry, data, LANES, 0.0, {"coding": runs}) == (0, 0)
    assert telemetry.mix("coding") == {} and runs.export() == {}  # saved when? unknown: nothing is trusted
    data["saved_at_unix"] = 0.0
    learned.restore(telemetry, data, LANES, 0.0, {"coding": runs})
    assert telemetry.mix("coding") == {"chat": pytest.approx(2.0)} and runs.export() == {"code": [3]}


def test_a_file_nested_too_deep_or_not_a_regular_file_is_ignored_at_once(tmp_path, caplog):
    import os
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    assert learned.read(deep) is None and "nested too deep" in caplog.text
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert learned.read(fifo) is None  # no writer: a plain open() would wait for one forever
    assert f"{fifo}: not a regular file" in caplog.text


def test_a_lane_restores_at_most_max_classes_classes():
    good = {"lane": "coding", "member": "coding-spec", "fingerprint": "aaaa", "role": "spec", "tok_s": 50.0,
            "tokens": 100, "draft_n": None, "draft_accepted": None, "age_s": 1.0}
    records = [{**good, "class": f"c{i}"} for i in range(learned.MAX_CLASSES + 40)]
    telemetry = Telemetry()
    restored, skipped = learned.restore(telemetry, {"version": 1, "saved_at_unix": 0.0, "samples": records},
                                        LANES, 0.0)
    assert (restored, skipped) == (learned.MAX_CLASSES, 40) and len(telemetry.windows) == learned.MAX_CLASSES


def test_saving_never_raises_it_warns(tmp_path, caplog, monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from llamactl.router.runs import Runs

    router = SimpleNamespace(telemetry=Telemetry(), profiles={},
                             lanes={"coding": SimpleNamespace(spec=SimpleNamespace(members=[]), runs=Runs())})
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert not asyncio.run(learned.Saver(router, blocked / "learned.json").save())  # its folder is a file
    assert "not saved" in caplog.text

    def unwritable(path, data):
        raise TypeError("Object of type set is not JSON serializable")
    monkeypatch.setattr(learned, "write", unwritable)
    assert not asyncio.run(learned.Saver(router, tmp_path / "learned.json").save())
    assert "not JSON serializable" in caplog.text


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=30)


@hsettings(max_examples=300, deadline=None)
@given(data=JSON, records=st.lists(st.dictionaries(st.sampled_from(
    ["lane", "member", "fingerprint", "class", "role", "tok_s", "tokens", "draft_n", "draft_accepted", "age_s"]),
    JSON, max_size=10), max_size=5))
def test_any_file_content_restores_or_is_skipped_never_raises(data, records):
    from llamactl.router.runs import Runs
    telemetry, runs = Telemetry(), {"coding": Runs()}
    learned.restore(telemetry, data, LANES, wall_now=0.0, runs=runs)
    learned.restore(telemetry, {"version": 1, "saved_at_unix": 0.0, "samples": records, "mix": data,
                                "runs": {"coding": data}}, LANES, 0.0, runs)
    telemetry.evidence("coding")  # and what was restored reads back


VALID = {"lane": "coding", "member": "coding-spec", "fingerprint": "aaaa", "class": "code", "role": "spec",
         "tok_s": 50.0, "tokens": 100, "draft_n": 10, "draft_accepted": 8, "age_s": 1.0}


@hsettings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(VALID)), value=JSON, per_class=JSON)
def test_a_valid_record_with_one_field_changed_to_anything_restores_or_is_skipped(field, value, per_class):
    """Past the lane and fingerprint checks, so each field's own check is what is fuzzed."""
    from llamactl.router.runs import Runs
    telemetry, runs = Telemetry(), {"coding": Runs()}
    data = {"version": 1, "saved_at_unix": 0.0, "samples": [{**VALID, field: value}],
            "mix": {"coding": {"code": value, "chat": per_class}}, "runs": {"coding": {"code": value, "x": per_class}}}
    restored, skipped = learned.restore(telemetry, data, LANES, 0.0, runs)
    assert restored + skipped == 1
    telemetry.evidence("coding")
    runs["coding"].expected_more("code", 1)


def test_after_a_restart_the_first_load_suits_the_long_run_mix_not_the_first_request():
    """The first load costs the same whichever member it is. With the mix learnt before a restart (mostly
    creative work), a code request arriving first does not decide it."""
    from llamactl.router.policy import ClassEvidence
    evidence = {"code": ClassEvidence(tok_s={"spec": 90, "plain": 40}, n={"spec": 4, "plain": 4}),
                "creative": ClassEvidence(tok_s={"spec": 30, "plain": 40}, n={"spec": 4, "plain": 4})}
    state = GroupState(active=None, seconds_since_switch=0, switch_cost_s=30, queued={"code": 1},
                       recent={"code": 1}, evidence=evidence)
    assert decide(state, PolicyConfig()).target == "spec"
    learnt = GroupState(**{**state.__dict__, "mix": {"code": 3.0, "creative": 20.0}})
    assert decide(learnt, PolicyConfig()).target == "plain"


def test_a_reload_forgets_what_a_changed_member_measured_and_keeps_the_rest():
    import asyncio

    from llamactl.router import Router, RouterConfig
    from tests.router_harness import fake_backends, group_profiles

    profiles = group_profiles("coding")
    router = Router(profiles, fake_backends(profiles), RouterConfig())
    for p, speed in zip(profiles, (90.0, 40.0)):
        for _ in range(2):
            router.telemetry.record(Sample(lane="coding", profile=p.name, role="spec" if "spec" in p.name else "plain",
                                           cls="code", endpoint="chat", status=200, gen_tok_s=speed))
    edited = [profiles[0].model_copy(update={"ctx_size": 4096}), profiles[1].model_copy(update={"description": "x"})]
    asyncio.run(router.reconfigure(edited, drain_timeout_s=1))
    # the drafter's figures were for another context size; the plain member's description does not change its speed
    assert router.telemetry.evidence("coding")["code"].tok_s == {"coding-plain": 40.0}


def test_run_lengths_come_back_too_so_a_phase_is_recognised_at_once_after_a_restart():
    from llamactl.router.runs import Runs
    before = Runs()
    for cls in ["code"] * 100 + ["creative"] * 100 + ["code"]:
        before.arrived(cls)
    data = learned.snapshot(Telemetry(), LANES, 0.0, {"coding": before, "gone": before})
    assert set(data["runs"]) == {"coding"}  # only served lanes
    after = Runs()
    learned.restore(Telemetry(), data, LANES, 0.0, {"coding": after})
    assert after.expected_more("creative", 2) == before.expected_more("creative", 2) == 98
    hostile = {"version": 1, "saved_at_unix": 0.0,
               "runs": {"coding": {"code": [5, -1, True, "x", 10**9, 7], "../x": [3], "chat": "long"}}}
    fresh = Runs()
    learned.restore(Telemetry(), hostile, LANES, 0.0, {"coding": fresh})
    assert fresh.export() == {"code": [5, 7]}


def test_the_stop_save_lands_after_a_periodic_write_still_in_flight(tmp_path):
    """The periodic save is cancelled at the stop while its write runs in a thread; the stop's save waits for
    it, so the newer snapshot is the one left on disk."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from llamactl.router.runs import Runs

    telemetry = Telemetry()
    lane = SimpleNamespace(spec=SimpleNamespace(members=["coding-spec"]), runs=Runs())
    router = SimpleNamespace(telemetry=telemetry, profiles={}, lanes={"coding": lane})
    path = tmp_path / "learned.json"
    started, release, second = threading.Event(), threading.Event(), threading.Event()

    class SlowFirstWrite(learned.Saver):
        def _write(self, data):
            if started.is_set():
                second.set()
            else:
                started.set()
                release.wait(10)
            super()._write(data)

    async def main():
        saver = SlowFirstWrite(router, path)
        periodic = asyncio.ensure_future(saver.save())
        await asyncio.to_thread(started.wait, 10)
        periodic.cancel()
        telemetry.arrival("coding", "code")  # newer than what the periodic write holds
        final = asyncio.ensure_future(saver.save())
        # the stop's write must not start while the older one is in flight (a bounded wait for what must not come)
        overlapped = await asyncio.to_thread(second.wait, 0.5)
        release.set()
        await final
        assert not overlapped

    asyncio.run(main())
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    assert json.loads(path.read_text())["mix"] == {"coding": {"code": pytest.approx(1.0, rel=0.01)}}


def test_a_request_that_finishes_on_a_lane_a_reload_retired_is_counted_but_is_no_evidence():
    import asyncio

    from llamactl.router import Router, RouterConfig
    from tests.router_harness import fake_backends, group_profiles

    profiles = group_profiles("coding")
    router = Router(profiles, fake_backends(profiles), RouterConfig())
    retired = router.lanes["coding"]
    asyncio.run(router.reconfigure([profiles[0].model_copy(update={"ctx_size": 4096}), profiles[1]],
                                   drain_timeout_s=1))
    assert router.lanes["coding"] is not retired
    late = Sample(lane="coding", profile="coding-spec", role="spec", cls="code", endpoint="chat", status=200,
                  gen_tok_s=90.0)
    router.record(late, retired)  # it ran the old configuration
    assert router.telemetry.evidence("coding") == {}
    assert router.telemetry.registry.get_sample_value("llamactl_requests_total", {
        "lane": "coding", "profile": "coding-spec", "class": "code", "endpoint": "chat", "status": "200"}) == 1
    router.record(late, router.lanes["coding"])
    assert router.telemetry.evidence("coding")["code"].n == {"coding-spec": 1}


def test_learned_json_that_is_a_directory_is_a_sentence_naming_it(tmp_path, caplog):
    import asyncio
    import re
    from types import SimpleNamespace

    from llamactl.router.runs import Runs

    path = tmp_path / "learned.json"
    path.mkdir()
    assert learned.read(path) is None  # before: IsADirectoryError "Is a directory: 13" (an fd number) escaped
    assert f"{path}: not a regular file" in caplog.text
    router = SimpleNamespace(telemetry=Telemetry(), profiles={},
                             lanes={"coding": SimpleNamespace(spec=SimpleNamespace(members=[]), runs=Runs())})
    assert not asyncio.run(learned.Saver(router, path).save())
    assert f"{path}: not saved (Is a directory)" in caplog.text
    assert not re.search(r"directory: \d+", caplog.text)
