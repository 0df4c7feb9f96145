"""The box benchmark's simulator (scripts/bench_box.py): traces, the three policies on small hand-computed
cases, and the command. Fast: simulated time, no engines."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_box", REPO / "scripts" / "bench_box.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_box"] = bench
_spec.loader.exec_module(bench)

CODER, CHAT, EMBED, BIG = (bench.MODELS[m] for m in ("coder", "chat", "embed", "big"))


def trace(*requests: tuple[float, str, float], hours: float = 1.0) -> "bench.Trace":
    return bench.Trace("t", "a test", hours, tuple(bench.Request(i, t, m, s) for i, (t, m, s) in enumerate(requests)))


def test_traces_are_seeded_sorted_and_of_the_models_they_name():
    for name in bench.TRACES:
        a, b = bench.make_trace(name, hours=1, seed=3), bench.make_trace(name, hours=1, seed=3)
        assert a == b
        assert a != bench.make_trace(name, hours=1, seed=4)
        times = [r.t for r in a.requests]
        assert times == sorted(times) and 0 <= times[0] and times[-1] < 3600
        assert all(r.service_s > 0 for r in a.requests)
    assert {r.model for r in bench.make_trace("steady-mixed").requests} == {"coder", "chat", "embed"}
    assert {r.model for r in bench.make_trace("big-split").requests} == {"coder", "chat", "embed", "big"}
    alternating = [r.model for r in bench.make_trace("alternating", hours=0.5).requests]
    assert all(x != y for x, y in zip(alternating, alternating[1:]))
    with pytest.raises(ValueError, match="unknown trace 'nope'"):
        bench.make_trace("nope")


def test_the_described_box_cannot_hold_the_70b_beside_the_27b_or_the_8b():
    ledger = bench.Ledger(capacity=bench.box_capacity())
    ledger.hold("coder", "coder", CODER.placements()[0], "running")
    assert not ledger.fits(BIG.placements()[0])
    assert ledger.fits(EMBED.placements()[0]) and ledger.fits(CHAT.placements()[1])
    assert not ledger.fits(CHAT.placements()[0])  # not on the 27B's card
    assert CODER.load_s == pytest.approx(3 + 17.6 / 1.5) and BIG.load_s == pytest.approx(3 + 42.5 / 1.5)


def test_llamactl_puts_a_one_card_model_on_the_other_card_rather_than_evict():
    out = bench.Llamactl().run(trace((0, "coder", 1), (0, "chat", 1), (0, "embed", 1)))
    assert out.evictions == 0 and out.loads == 3
    assert sorted(out.waits) == pytest.approx(sorted([CODER.load_s, CHAT.load_s, EMBED.load_s]))


def test_llamactl_waits_for_a_busy_engine_and_never_cuts_its_stream():
    """The 70B asks at t=20 while the 27B streams until its load (14.7 s) + 100 s: it waits for that end,
    then the idle 27B is stopped and the 70B loads."""
    out = bench.Llamactl().run(trace((0, "coder", 100), (20, "big", 5)))
    assert out.cut == 0 and out.evictions == 1 and out.loads == 2
    assert out.waits == pytest.approx([CODER.load_s, CODER.load_s + 100 - 20 + BIG.load_s])


def test_llamactl_does_not_ping_pong_two_models_that_cannot_share():
    """Every eviction comes at least as long after the victim's load as that load took."""
    out = bench.Llamactl().run(bench.make_trace("alternating", hours=1))
    loaded: dict[str, float] = {}
    stops = 0
    for t, what, model in out.log:
        if what == "loaded":
            loaded[model] = t
        elif what == "stopped":
            stops += 1
            assert t - loaded[model] >= bench.MODELS[model].load_s - 1e-9
    assert stops >= 3 and out.cut == 0


def test_a_retry_a_hair_away_moves_the_clock():
    """On big-split the 8B was idle and 2e-13 s short of its load time: a retry at now + 2e-13 is now itself at
    t = 8566 s, and the simulation spun there for ever. It now retries at the next representable instant."""
    out = bench.Llamactl().run(bench.make_trace("big-split", hours=3, seed=1))
    assert out.served + out.failed == out.requests


def test_the_clock_says_when_it_stalls():
    clock = bench.Clock()

    def again() -> None:
        clock.at(clock.now, again)

    clock.at(1.0, again)
    with pytest.raises(RuntimeError, match="stalled at t=1.000"):
        clock.run(max_at_one_instant=1000)


def test_lru_by_count_stops_the_least_recently_used_even_while_it_streams_and_memory_has_room():
    requests = ((0, "coder", 1000), (1, "chat", 1), (100, "embed", 1))
    lru = bench.LruByCount(2).run(trace(*requests))
    assert lru.evictions == 1 and lru.cut == 1 and lru.served == 3 and len(lru.latencies) == 2
    ours = bench.Llamactl().run(trace(*requests))
    assert ours.evictions == 0 and ours.cut == 0 and len(ours.latencies) == 3


def test_lru_spills_what_does_not_fit_to_host_ram_and_serves_slower():
    """--fit: the 70B beside the 27B gets 3072 MiB on the 27B's card (its 4096 free less the 1024 margin),
    21504 on the other, and 18432 of its 43008 MiB in host RAM."""
    out = bench.LruByCount(4).run(trace((0, "coder", 1), (100, "big", 10)))
    slowdown = 1 + (bench.HOST_SLOWDOWN - 1) * 18432 / 43008
    assert out.slowed == 1 and out.oom == 0 and out.evictions == 0
    assert out.latencies[-1] == pytest.approx(BIG.load_s + 10 * slowdown)


def test_lru_fails_a_load_that_has_no_room_even_in_host_ram():
    small = {"CUDA0": 24064, "CUDA1": 24064, "CPU": 4096}
    out = bench.LruByCount(4, capacity=small).run(trace((0, "coder", 1), (100, "big", 10)))
    assert out.failed_loads == 1 and out.oom == 1 and out.served == 1


def test_swap_waits_for_the_request_in_flight_then_swaps():
    out = bench.OneAtATime().run(trace((0, "coder", 50), (1, "chat", 1)))
    assert out.cut == 0 and out.loads == 2
    assert out.waits == pytest.approx([CODER.load_s, CODER.load_s + 50 + CHAT.load_s - 1])


def test_a_client_gives_up_after_the_timeout():
    requests = [(0, "coder", 1)] + [(i * 20.0, "big" if i % 2 else "coder", 400) for i in range(1, 12)]
    out = bench.OneAtATime().run(trace(*requests))
    assert out.timed_out > 0
    assert out.served + out.failed == len(requests)
    assert max(out.waits) <= bench.TIMEOUT_S


def test_the_verdict_names_what_llamactl_loses_on():
    results = bench.compare(bench.make_trace("steady-mixed", hours=0.5))
    met, misses = bench.verdict(results)
    assert met, misses
    results["swap"].waits = [0.0]
    met, misses = bench.verdict(results)
    assert not met and any(m.startswith("swap: mean wait") for m in misses)


def test_the_command_writes_the_tables(tmp_path):
    out = tmp_path / "box.md"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_box.py"), "--hours", "0.25", "--seeds", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "simulated clock" in text
    for name in bench.TRACES:
        assert f"### {name}" in text
    assert text.count("| llamactl |") == len(bench.TRACES)
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_box.py"), "--hours", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--hours" in bad.stderr
