"""The box's ledger and eviction choice, over plain data."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamactl.box.evict import Resident, choose
from llamactl.box.ledger import Ledger, parse_reserve


def ledger(capacity: dict[str, int], held: dict[str, tuple[str, dict[str, int]]], reserve=None) -> Ledger:
    book = Ledger(capacity=dict(capacity), reserve=dict(reserve or {}))
    for profile, (lane, mib) in held.items():
        book.hold(profile, lane, mib, "running")
    return book


def resident(lane, *, idle=True, idle_s=10.0, resident_s=100.0, reload_s=5.0, keep=False, profiles=None):
    return Resident(lane=lane, profiles=tuple(profiles or [lane]), idle=idle, idle_s=idle_s, resident_s=resident_s,
                    reload_s=reload_s, keep=keep)


def test_fits_beside_what_runs_needs_no_eviction():
    book = ledger({"CUDA0": 24000}, {"a": ("a", {"CUDA0": 10000})})
    assert choose({"CUDA0": 12000}, book, [resident("a")], requester="b").verdict == "fits"


def test_the_reserve_is_left_free():
    book = ledger({"CUDA0": 24000}, {}, reserve={"CUDA0": 4000})
    assert book.free() == {"CUDA0": 20000}
    assert choose({"CUDA0": 21000}, book, [], requester="b").verdict == "never"


def test_evicts_the_least_worth_keeping_idle_lane():
    book = ledger({"CUDA0": 24000}, {"a": ("a", {"CUDA0": 10000}), "c": ("c", {"CUDA0": 10000})})
    # both idle; c was used more recently and costs more to reload: a goes
    residents = [resident("a", idle_s=600, reload_s=5), resident("c", idle_s=5, reload_s=30)]
    choice = choose({"CUDA0": 12000}, book, residents, requester="b")
    assert choice.verdict == "evict" and choice.victims == ("a",)


def test_the_fewest_lanes_that_make_room():
    book = ledger({"CUDA0": 24000}, {"big": ("big", {"CUDA0": 16000}), "s1": ("s1", {"CUDA0": 3000}),
                                     "s2": ("s2", {"CUDA0": 3000})})
    # the small ones are worth less, but two of them do not make room for 12000 (2000 + 6000 < 12000)
    residents = [resident("big", reload_s=60), resident("s1", reload_s=1), resident("s2", reload_s=1)]
    choice = choose({"CUDA0": 12000}, book, residents, requester="b")
    assert choice.victims == ("big",)


def test_a_busy_lane_is_waited_for_never_stopped():
    book = ledger({"CUDA0": 24000}, {"a": ("a", {"CUDA0": 20000})})
    choice = choose({"CUDA0": 12000}, book, [resident("a", idle=False)], requester="b")
    assert choice.verdict == "wait" and choice.waits_for == ("a",) and not choice.victims


def test_a_lane_stays_at_least_as_long_as_its_load_took():
    book = ledger({"CUDA0": 24000}, {"a": ("a", {"CUDA0": 20000})})
    young = resident("a", resident_s=3, reload_s=10)
    choice = choose({"CUDA0": 12000}, book, [young], requester="b")
    assert choice.verdict == "wait" and choice.retry_in_s == pytest.approx(7)
    assert choose({"CUDA0": 12000}, book, [young], requester="b", min_residence_s=20).retry_in_s == pytest.approx(17)
    old = resident("a", resident_s=10.5, reload_s=10)
    assert choose({"CUDA0": 12000}, book, [old], requester="b").verdict == "evict"


def test_a_wait_looks_again_when_an_idle_lane_comes_of_age_even_if_the_cheapest_pick_is_busy():
    book = ledger({"CUDA0": 16000}, {"a": ("a", {"CUDA0": 6000}), "b": ("b", {"CUDA0": 6000})})
    residents = [resident("a", idle_s=5, resident_s=5, reload_s=30), resident("b", idle=False, resident_s=1000,
                                                                               reload_s=10)]
    choice = choose({"CUDA0": 8000}, book, residents, requester="c")
    assert choice.verdict == "wait" and choice.retry_in_s == pytest.approx(25)


def test_kept_lanes_and_never_fits_are_refused_at_once():
    book = ledger({"CUDA0": 24000}, {"a": ("a", {"CUDA0": 20000})})
    kept = choose({"CUDA0": 12000}, book, [resident("a", keep=True)], requester="b")
    assert kept.verdict == "never" and "beside a" in kept.why
    huge = choose({"CUDA0": 30000}, book, [resident("a")], requester="b")
    assert huge.verdict == "never" and "empty box" in huge.why and "6000 MiB on CUDA0" in huge.why


def test_per_device_only_the_card_that_is_short_is_freed():
    book = ledger({"CUDA0": 24000, "CUDA1": 24000},
                  {"a": ("a", {"CUDA0": 20000}), "c": ("c", {"CUDA1": 20000})})
    residents = [resident("a", idle_s=1, reload_s=100), resident("c", idle_s=1000, reload_s=1)]
    # c is worth less, but only CUDA0 is short
    choice = choose({"CUDA0": 10000}, book, residents, requester="b")
    assert choice.victims == ("a",)


def test_a_group_is_stopped_together():
    book = ledger({"CUDA0": 24000}, {"g-spec": ("g", {"CUDA0": 9000}), "g-plain": ("g", {"CUDA0": 8000})})
    choice = choose({"CUDA0": 12000}, book, [resident("g", profiles=["g-plain", "g-spec"])], requester="b")
    assert choice.victims == ("g",)


def test_the_requesters_own_members_are_not_evicted_by_the_box():
    book = ledger({"CUDA0": 24000}, {"g-plain": ("g", {"CUDA0": 20000})})
    choice = choose({"CUDA0": 12000}, book, [resident("g", profiles=["g-plain"])], requester="g")
    assert choice.verdict == "never" and "beside g" in choice.why


def test_reserve_is_parsed_with_clear_errors():
    assert parse_reserve("CUDA0=2048, host=8192,rpc1=10") == {"CUDA0": 2048, "CPU": 8192, "RPC1": 10}
    assert parse_reserve("") == {}
    for bad in ("CUDA0", "GPU0=1", "CUDA0=lots", "host=-1", "../x=1"):
        with pytest.raises(ValueError, match="LLAMACTL_RESERVE_MIB"):
            parse_reserve(bad)


sizes = st.integers(min_value=0, max_value=30000)


@settings(max_examples=300, deadline=None)
@given(held=st.lists(st.tuples(sizes, sizes, st.booleans(), st.floats(0, 1000), st.floats(0, 100), st.booleans()),
                     max_size=7),
       need=st.tuples(sizes, sizes))
def test_property_an_eviction_makes_room_and_stops_only_idle_movable_lanes(held, need):
    book = Ledger(capacity={"CUDA0": 24000, "CUDA1": 24000})
    residents = []
    for i, (m0, m1, idle, idle_s, reload_s, keep) in enumerate(held):
        book.hold(f"p{i}", f"l{i}", {"CUDA0": m0 // 4, "CUDA1": m1 // 4}, "running")
        residents.append(Resident(f"l{i}", (f"p{i}",), idle, idle_s, 1000.0, reload_s, keep))
    needs = {"CUDA0": need[0], "CUDA1": need[1]}
    choice = choose(needs, book, residents, requester="new")
    by_lane = {r.lane: r for r in residents}
    if choice.verdict == "fits":
        assert book.fits(needs)
    elif choice.verdict == "evict":
        assert all(by_lane[v].idle and not by_lane[v].keep for v in choice.victims)
        freed = frozenset(p for v in choice.victims for p in by_lane[v].profiles)
        assert book.fits(needs, without=freed)
        # fewest: no smaller set of idle movable lanes makes room
        for v in choice.victims:
            assert not book.fits(needs, without=freed - set(by_lane[v].profiles)) or len(choice.victims) == 1
    elif choice.verdict == "wait":
        assert choice.waits_for and all(not by_lane[w].idle for w in choice.waits_for)
    else:
        movable = frozenset(p for r in residents if not r.keep for p in r.profiles)
        assert not book.fits(needs, without=movable)
