"""Telemetry: timings from streams split anywhere, log-line and /metrics acceptance, rolling evidence."""

from __future__ import annotations

import json

from llamactl.router.telemetry import (
    Sample, SSEScanner, Telemetry, mean_accepted_length, parse_engine_metrics,
)


def sample(**kw) -> Sample:
    base = dict(lane="g", profile="g-spec", role="spec", cls="code", endpoint="/v1/completions", status=200)
    return Sample(**{**base, **kw})


def test_scanner_finds_timings_split_across_chunks():
    timings = {"predicted_n": 40, "predicted_per_second": 71.5, "prompt_per_second": 900.0, "draft_n": 30,
               "draft_n_accepted": 21}
    stream = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
              + b"data: " + json.dumps({"choices": [], "timings": timings}).encode() + b"\n\ndata: [DONE]\n\n")
    for cut in range(1, len(stream), 7):
        s = sample()
        scanner = SSEScanner(s)
        scanner.feed(stream[:cut])
        scanner.feed(stream[cut:])
        assert (s.completion_tokens, s.gen_tok_s, s.draft_n, s.draft_accepted) == (40, 71.5, 30, 21)
        assert s.acceptance == 0.7
        assert scanner.saw_done and scanner.first_data_at is not None


def test_mean_accepted_length_from_metrics_deltas():
    before = parse_engine_metrics("llamacpp:spec_decode_num_drafts_total 10\n"
                                  "llamacpp:spec_decode_num_accepted_tokens_total 15\n# HELP x\n")
    after = parse_engine_metrics("llamacpp:spec_decode_num_drafts_total 30\n"
                                 "llamacpp:spec_decode_num_accepted_tokens_total 45\n"
                                 'llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 3\n')
    assert after['spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] == 3
    assert mean_accepted_length(before, after) == 2.5
    assert mean_accepted_length(after, after) is None


def test_evidence_is_a_rolling_window_per_class_and_member():
    now = [1000.0]
    t = Telemetry(window_n=3, window_s=60, memory_n=0, clock=lambda: now[0])
    for speed in (10, 20, 30, 40):
        t.record(sample(gen_tok_s=speed, completion_tokens=100, draft_n=10, draft_accepted=5))
    t.record(sample(role="plain", profile="g-plain", gen_tok_s=50, completion_tokens=50))
    ev = t.evidence("g")["code"]
    assert ev.tok_s["g-spec"] == 30 and ev.n["g-spec"] == 3  # the oldest of four fell out of the window
    assert ev.tok_s["g-plain"] == 50 and ev.acceptance == {"g-spec": 0.5}
    assert ev.n["g-plain"] == 1 and ev.mean_tokens == (3 * 100 + 50) / 4
    now[0] += 61
    assert t.evidence("g") == {}  # aged out (no memory asked for)
    t.record(sample(status=500, gen_tok_s=99))
    assert t.evidence("g") == {}  # failures are counted, not used as evidence


def test_a_member_that_stopped_serving_keeps_what_it_measured_until_memory_s():
    """Evidence ages out where it is renewed: the member serving now gets a fresh window, while the one that
    stopped serving keeps its newest `memory_n` samples (what it last measured) for `memory_s`, until as many
    new samples replace them."""
    now = [1000.0]
    t = Telemetry(window_n=5, window_s=60, memory_n=2, memory_s=600, clock=lambda: now[0])
    for speed in (10, 20, 30):
        t.record(sample(gen_tok_s=speed, completion_tokens=100))
    t.record(sample(role="plain", profile="g-plain", gen_tok_s=50, completion_tokens=100))
    now[0] += 61
    remembered = t.evidence("g")["code"]
    assert remembered.tok_s == {"g-spec": 25, "g-plain": 50} and remembered.n == {"g-spec": 2, "g-plain": 1}
    t.record(sample(role="plain", profile="g-plain", gen_tok_s=70, completion_tokens=100))
    renewed = t.evidence("g")["code"]
    # the first new sample is judged beside what was measured before, not alone; enough new ones replace it
    assert renewed.tok_s == {"g-spec": 25, "g-plain": 60} and renewed.n["g-plain"] == 2
    t.record(sample(role="plain", profile="g-plain", gen_tok_s=90, completion_tokens=100))
    assert t.evidence("g")["code"].tok_s["g-plain"] == 80
    now[0] += 601
    assert t.evidence("g") == {}  # remembered no longer than memory_s


def test_recent_is_the_last_arrivals():
    now = [0.0]
    t = Telemetry(recent_n=3, recent_s=10, clock=lambda: now[0])
    for cls in ("code", "code", "creative", "creative", "creative"):
        t.arrival("g", cls)
    assert t.recent("g") == {"creative": 3}
    now[0] = 11
    assert t.recent("g") == {}


def test_negative_counts_from_an_engine_do_not_break_recording():
    """A fuzzed request once made the fake engine report negative usage: recording must not raise."""
    t = Telemetry()
    s = sample(completion_tokens=-5, draft_n=-3, draft_accepted=-1)
    t.record(s)
    assert t.registry.get_sample_value("llamactl_requests_total", {
        "lane": s.lane, "profile": s.profile, "class": s.cls, "endpoint": s.endpoint, "status": str(s.status)}) == 1
