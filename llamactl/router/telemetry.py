"""Per-request measurements, rolling windows per (lane, traffic class, member), Prometheus metrics.

Acceptance comes from the engine's `timings` (draft_n_accepted / draft_n). Builds that report it only
in their log (the pinned ik_llama.cpp: "draft acceptance rate = 0.62500 (   10 accepted /    16
generated)") are read from the engine's log: `acceptance_from_log`, called by `Router.finish`. Mean
accepted length needs the verification step count, which only /metrics has: `mean_accepted_length(before,
after)` over two scrapes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llamactl.engines.logs import Acceptance, parse_acceptance
from llamactl.router.choices import split_choice
from llamactl.router.policy import ClassEvidence, Role


@dataclass
class Sample:
    """One finished request."""

    lane: str
    profile: str
    role: Role
    cls: str
    endpoint: str
    status: int
    queue_wait_s: float = 0.0
    ttft_s: float | None = None
    total_s: float = 0.0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    gen_tok_s: float | None = None  # engine decode speed (timings.predicted_per_second), else wall clock
    prompt_tok_s: float | None = None
    draft_n: int | None = None
    draft_accepted: int | None = None
    cache_n: int | None = None  # prompt tokens the engine reused from its cache (timings.cache_n)
    # What it was given (the lane's Choice): the engine that served it, drafting on/off, depth, why
    process: str | None = None
    drafting: bool | None = None
    depth: int | None = None
    why: str | None = None
    choice: str | None = None  # the depth choice it was given (MEMBER@DEPTH): its evidence is that choice's
    at: float = field(default_factory=time.monotonic)
    _timed: frozenset[str] = field(default=frozenset(), repr=False)  # counts that came from the timings

    @property
    def member_key(self) -> str:
        """Whose evidence it is: the depth choice it was given, else its member."""
        return self.choice or self.profile

    @property
    def acceptance(self) -> float | None:
        if self.draft_n:
            return (self.draft_accepted or 0) / self.draft_n
        return None

    def apply_timings(self, timings: Mapping[str, Any]) -> None:
        def num(key: str) -> float | None:
            value = timings.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        if (n := num("predicted_n")) is not None:
            self.completion_tokens = int(n)
            self._timed |= {"completion"}
        if (n := num("prompt_n")) is not None:
            self.prompt_tokens = int(n)
            self._timed |= {"prompt"}
        if (n := num("cache_n")) is not None:
            self.cache_n = int(n)
        if (v := num("predicted_per_second")) is not None and v > 0:
            self.gen_tok_s = v
        if (v := num("prompt_per_second")) is not None and v > 0:
            self.prompt_tok_s = v
        if (v := num("draft_n")) is not None:
            self.draft_n = int(v)
            self.draft_accepted = int(num("draft_n_accepted") or 0)

    @property
    def timed_prompt_n(self) -> int | None:
        """The prompt tokens the engine processed, only as its timings said (usage counts cached ones too)."""
        return self.prompt_tokens if "prompt" in self._timed else None

    def apply_usage(self, usage: Mapping[str, Any]) -> None:
        """Token counts from a `usage` object in any API's shape (OpenAI prompt/completion_tokens, Anthropic
        and Responses input/output_tokens). Counts from `timings` win; among usages the last one seen wins
        (an Anthropic stream says output_tokens 0 at its start and the real count at its end)."""
        def count(*keys: str) -> int | None:
            values = [usage.get(k) for k in keys]
            ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
            return sum(ints) if ints else None

        completion = count("completion_tokens") if "completion_tokens" in usage else count("output_tokens")
        prompt = count("prompt_tokens") if "prompt_tokens" in usage else count("input_tokens", "cache_read_input_tokens")
        if completion is not None and "completion" not in self._timed:
            self.completion_tokens = completion
        if prompt is not None and "prompt" not in self._timed:
            self.prompt_tokens = prompt

    def finish_wall_clock(self) -> None:
        """Fallback decode speed when the engine sent no timings."""
        if self.gen_tok_s is None and self.completion_tokens and self.total_s > self.queue_wait_s:
            start = self.ttft_s if self.ttft_s is not None else self.queue_wait_s
            span = self.total_s - start
            if span > 0:
                self.gen_tok_s = self.completion_tokens / span


def apply_response(sample: Sample, payload: Any) -> None:
    """Pull timings / usage out of a (non-streamed) response body or one streamed event."""
    if not isinstance(payload, dict):
        return
    if isinstance(payload.get("timings"), dict):
        sample.apply_timings(payload["timings"])
    if isinstance(payload.get("usage"), dict):
        sample.apply_usage(payload["usage"])
    inner = payload.get("response")  # a Responses API event: response.completed carries the response
    if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
        sample.apply_usage(inner["usage"])
    if sample.completion_tokens is None and isinstance(payload.get("tokens_predicted"), int):
        sample.completion_tokens = payload["tokens_predicted"]


_DECODER = json.JSONDecoder()


def _last_object(raw: bytes, key: bytes) -> Any:
    """The JSON value of the last `"key":` in a JSON document, decoded alone (None if absent or broken).
    llama-server writes keys in sorted order, so `timings` and `usage` come after the generated text; an
    occurrence inside a string is escaped (\\") and skipped."""
    at = raw.rfind(key)
    while at > 0 and raw[at - 1:at] == b"\\":
        at = raw.rfind(key, 0, at)
    if at < 0:
        return None
    colon = raw.find(b":", at + len(key))
    if colon < 0:
        return None
    try:
        text = raw[colon + 1:colon + 1 + 65536].decode("utf-8", "replace").lstrip()
        return _DECODER.raw_decode(text)[0]
    except ValueError:
        return None


def scan_body(sample: "Sample", raw: bytes) -> None:
    """Timings and usage of a non-streamed answer without parsing the whole body (an embeddings answer is
    megabytes of floats; a chat answer is mostly text): only the objects after their keys are decoded."""
    timings = _last_object(raw, b'"timings"') if b'"timings"' in raw else None
    usage = _last_object(raw, b'"usage"') if b'"usage"' in raw else None
    payload: dict[str, Any] = {}
    if isinstance(timings, dict):
        payload["timings"] = timings
    if isinstance(usage, dict):
        payload["usage"] = usage
    if b'"tokens_predicted"' in raw:
        predicted = _last_object(raw, b'"tokens_predicted"')
        if isinstance(predicted, int):
            payload["tokens_predicted"] = predicted
    if payload:
        apply_response(sample, payload)


class SSEScanner:
    """Watches a relayed SSE stream without holding it: notes the first data event and parses only the
    events that carry timings or usage (normally the last one or two)."""

    __slots__ = ("sample", "_rest", "first_data_at", "saw_done", "events")

    def __init__(self, sample: Sample) -> None:
        self.sample = sample
        self._rest = b""
        self.first_data_at: float | None = None
        self.saw_done = False
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        if self.first_data_at is None and b"data:" in chunk:
            self.first_data_at = time.perf_counter()
        data = self._rest + chunk if self._rest else chunk
        if b"\n" not in data:
            self._rest = data[-65536:]
            return
        head, _, self._rest = data.rpartition(b"\n")
        if b'"timings"' not in head and b'"usage"' not in head and b"[DONE]" not in head:
            self.events += head.count(b"data:")
            return
        for line in head.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            self.events += 1
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.saw_done = True
            elif b'"timings"' in payload or b'"usage"' in payload:
                try:
                    apply_response(self.sample, json.loads(payload))
                except ValueError:
                    pass


def log_size(path: str | None) -> int | None:
    """Where an engine's log ends now (None: no log); a request's acceptance line comes after it."""
    if not path:
        return None
    try:
        return os.stat(path).st_size
    except OSError:
        return None


async def acceptance_from_log(path: str, offset: int, wait_s: float,
                              poll_s: float = 0.02) -> tuple[Acceptance, int] | None:
    """The first acceptance line written to `path` after `offset` and where it ends, waiting up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    pending = b""
    while True:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:  # rotated since: the line is in the new file
                    offset, pending = 0, b""
                f.seek(offset)
                data = f.read(1 << 20)
        except OSError:
            return None
        start = offset - len(pending)
        offset += len(data)
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            start += len(line) + 1
            found = parse_acceptance(line.decode("utf-8", "replace"))
            if found is not None:
                return found, start
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(poll_s)


_METRIC_LINE = re.compile(r'^llamacpp:([a-z_]+)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)\s*$')


def parse_engine_metrics(text: str) -> dict[str, float]:
    """llama-server's /metrics text -> {"name" or "name{labels}": value} without the llamacpp: prefix."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line.strip())
        if match:
            try:
                values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
            except ValueError:
                continue
    return values


def mean_accepted_length(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """1 + d(accepted) / d(verification steps) between two /metrics scrapes (exact with one request in between)."""
    steps = after.get("spec_decode_num_drafts_total", 0.0) - before.get("spec_decode_num_drafts_total", 0.0)
    accepted = after.get("spec_decode_num_accepted_tokens_total", 0.0) - before.get(
        "spec_decode_num_accepted_tokens_total", 0.0)
    if steps <= 0:
        return None
    return 1.0 + accepted / steps


class Window:
    """The last `max_n` samples no older than `max_age_s`; and, for a member that has stopped serving (so
    nothing newer comes), its newest `memory_n` samples for up to `memory_s`: what was last measured there,
    until as many new ones replace it."""

    def __init__(self, max_n: int, max_age_s: float, memory_n: int = 0, memory_s: float = 0.0) -> None:
        self.samples: deque[Sample] = deque(maxlen=max_n)
        self.max_age_s = max_age_s
        self.memory_n, self.memory_s = memory_n, max(memory_s, max_age_s)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def current(self, now: float | None = None) -> list[Sample]:
        """The samples of the window proper (no memory): the rolling figures of /metrics."""
        now = time.monotonic() if now is None else now
        while self.samples and now - self.samples[0].at > self.memory_s:
            self.samples.popleft()
        return [s for s in self.samples if now - s.at <= self.max_age_s]

    def remembered(self, now: float | None = None) -> list[Sample]:
        """The window, topped up to `memory_n` with the newest older samples younger than `memory_s` (a member
        serving again after a while has its first new sample judged beside what it measured before)."""
        current = self.current(now)
        if len(current) >= self.memory_n:
            return current
        return list(self.samples)[-self.memory_n:]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BUCKETS_TOK_S = (1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 100, 150, 200, 300, 500, 1000)


class Telemetry:
    """Rolling windows and Prometheus metrics. One per router; its own CollectorRegistry."""

    def __init__(self, *, window_n: int = 50, window_s: float = 900.0, recent_n: int = 6, recent_s: float = 120.0,
                 memory_n: int = 4, memory_s: float = 6 * 3600.0, mix_half_life_s: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_n, self.window_s, self.recent_n, self.recent_s = window_n, window_s, recent_n, recent_s
        # What a member measured stays known for memory_s after it stopped serving (its newest memory_n samples):
        # evidence ages out where it is renewed, not merely because another member serves now.
        self.memory_n, self.memory_s = memory_n, memory_s
        self.clock = clock
        self.windows: dict[tuple[str, str, str], Window] = {}  # (lane, class, member profile or depth choice)
        self.arrivals: dict[str, deque[tuple[float, str]]] = {}
        self.mix_half_life_s = mix_half_life_s
        self._mix: dict[str, tuple[float, dict[str, float]]] = {}  # lane -> (when, class -> decayed arrivals)
        self._child_cache: dict[tuple[str, str, str], tuple] = {}
        self._request_children: dict[tuple[str, str, str, str, int], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llamactl_requests", "Finished requests", ["lane", "profile", "class", "endpoint", "status"], registry=r)
        self.rejected = Counter("llamactl_rejected_requests", "Requests refused before reaching an engine", ["lane", "reason"], registry=r)
        self.queue_depth = Gauge("llamactl_queue_depth", "Requests waiting in the lane's queue", ["lane"], registry=r)
        self.in_flight = Gauge("llamactl_in_flight", "Requests being served", ["lane"], registry=r)
        self.queue_wait = Histogram("llamactl_queue_wait_seconds", "Time in the queue", ["lane", "class"], buckets=BUCKETS_S, registry=r)
        self.ttft = Histogram("llamactl_time_to_first_token_seconds", "Arrival to first streamed event", ["lane", "class"], buckets=BUCKETS_S, registry=r)
        self.tok_s = Histogram("llamactl_generation_tokens_per_second", "Decode speed per request", ["lane", "class", "profile"], buckets=BUCKETS_TOK_S, registry=r)
        self.prompt_tok_s = Histogram("llamactl_prompt_tokens_per_second", "Prompt speed per request", ["lane", "class", "profile"], buckets=BUCKETS_TOK_S + (2000, 5000), registry=r)
        self.completion_tokens = Counter("llamactl_completion_tokens", "Generated tokens", ["lane", "class", "profile"], registry=r)
        self.draft_tokens = Counter("llamactl_draft_tokens", "Drafted tokens", ["lane", "class", "profile"], registry=r)
        self.draft_accepted = Counter("llamactl_draft_accepted_tokens", "Accepted drafted tokens", ["lane", "class", "profile"], registry=r)
        self.acceptance = Gauge("llamactl_draft_acceptance_ratio", "Rolling acceptance per class on the speculative member", ["lane", "class", "profile"], registry=r)
        self.rolling_tok_s = Gauge("llamactl_rolling_tokens_per_second", "Rolling mean decode speed per class and member", ["lane", "class", "profile"], registry=r)
        self.mean_len = Gauge("llamactl_mean_accepted_length", "1 + accepted / verification steps, from engine /metrics deltas", ["lane", "profile"], registry=r)
        self.choices = Counter("llamactl_request_choices", "Requests by what they were given: the member, the engine serving it, drafting on/off, depth (0: off; default: the engine's own) and why", ["lane", "profile", "process", "drafting", "depth", "why"], registry=r)
        self.switches = Counter("llamactl_switches", "Member switches", ["lane", "from_profile", "to_profile", "trigger"], registry=r)
        self.switch_seconds = Histogram("llamactl_switch_seconds", "Drain + stop + start time of a switch", ["lane"], buckets=BUCKETS_S, registry=r)
        self.loads = Counter("llamactl_profile_loads", "Profile starts requested by the router", ["profile"], registry=r)
        self.unloads = Counter("llamactl_profile_unloads", "Profile stops requested by the router", ["profile", "reason"], registry=r)
        self.profile_state = Gauge("llamactl_profile_state", "1 for the state each profile is in", ["profile", "state"], registry=r)
        self.active_member = Gauge("llamactl_active_member", "1 for the member serving each lane", ["lane", "profile"], registry=r)

    # -- recording
    def arrival(self, lane: str, cls: str) -> None:
        self.arrivals.setdefault(lane, deque(maxlen=1000)).append((self.clock(), cls))
        counts = self.mix(lane)
        counts[cls] = counts.get(cls, 0.0) + 1.0
        self._mix[lane] = (self.clock(), counts)

    def _children(self, lane: str, cls: str, profile: str) -> tuple:
        """The labelled metric children of one (lane, class, profile), looked up once."""
        key = (lane, cls, profile)
        children = self._child_cache.get(key)
        if children is None:
            children = (self.queue_wait.labels(lane, cls), self.ttft.labels(lane, cls),
                        self.tok_s.labels(*key), self.prompt_tok_s.labels(*key),
                        self.completion_tokens.labels(*key), self.draft_tokens.labels(*key),
                        self.draft_accepted.labels(*key))
            self._child_cache[key] = children
        return children

    def record(self, sample: Sample, *, evidence: bool = True) -> None:
        """Count a finished request in the metrics and, with `evidence`, add it to its window for the policy."""
        sample.finish_wall_clock()
        labels = (sample.lane, sample.cls, sample.profile)
        wait, ttft, tok_s, prompt_tok_s, completion, drafted, accepted = self._children(*labels)
        key = (sample.lane, sample.profile, sample.cls, sample.endpoint, sample.status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(*key[:4], str(sample.status))
        counter.inc()
        if sample.drafting is not None:
            self.choices.labels(sample.lane, sample.profile, sample.process or sample.profile,
                                "on" if sample.drafting else "off",
                                "default" if sample.depth is None else str(sample.depth), sample.why or "").inc()
        wait.observe(sample.queue_wait_s)
        if sample.status >= 400:
            return
        if sample.ttft_s is not None:
            ttft.observe(sample.ttft_s)
        if sample.gen_tok_s:
            tok_s.observe(sample.gen_tok_s)
        if sample.prompt_tok_s:
            prompt_tok_s.observe(sample.prompt_tok_s)
        # Counts come from the engine's answer: a broken or hostile one must not break the request (a
        # Prometheus counter raises on a negative increment).
        if sample.completion_tokens and sample.completion_tokens > 0:
            completion.inc(sample.completion_tokens)
        if sample.draft_n and sample.draft_n > 0:
            drafted.inc(sample.draft_n)
            accepted.inc(max(0, sample.draft_accepted or 0))
        sample.at = self.clock()
        if evidence:
            self.add_evidence(sample)

    def add_evidence(self, sample: Sample) -> None:
        """Add a sample to its window: evidence for the policy (alone, not counted in the metrics: one measured
        before a restart, `learned.restore`). Its `at` is on this telemetry's clock."""
        self.windows.setdefault((sample.lane, sample.cls, sample.member_key),
                                Window(self.window_n, self.window_s, self.memory_n, self.memory_s)).add(sample)

    def restore_mix(self, lane: str, counts: Mapping[str, float]) -> None:
        """A lane's long-run mix as it was saved, under what arrived since."""
        mix = dict(counts)
        for cls, n in self.mix(lane).items():
            mix[cls] = mix.get(cls, 0.0) + n
        self._mix[lane] = (self.clock(), mix)

    def forget(self, profile: str) -> None:
        """Drop what `profile` measured (its configuration changed: the figures were for another one)."""
        for key in [k for k in self.windows if split_choice(k[2])[0] == profile]:  # its depth choices too
            del self.windows[key]

    def remembered_samples(self, lane: str | None = None):
        """((lane, class, member), samples) for every window (of `lane`): what `evidence()` reads."""
        now = self.clock()
        for key, window in list(self.windows.items()):
            if lane is not None and key[0] != lane:
                continue
            samples = window.remembered(now)
            if samples:
                yield key, samples

    def refresh_gauges(self) -> None:
        """The rolling gauges (mean decode speed, acceptance) from the windows as they are now: computed when
        /metrics is scraped rather than on every request (the windows are what the policy reads)."""
        now = self.clock()
        for (lane, cls, member), window in self.windows.items():
            current = window.current(now)
            if not current:
                continue
            labels = (lane, cls, member)
            speeds = [s.gen_tok_s for s in current if s.gen_tok_s]
            if speeds:
                self.rolling_tok_s.labels(*labels).set(sum(speeds) / len(speeds))
            drafted = sum(s.draft_n or 0 for s in current)
            if drafted:
                self.acceptance.labels(*labels).set(sum(s.draft_accepted or 0 for s in current) / drafted)

    # -- reading
    def recent(self, lane: str) -> dict[str, int]:
        """Classes of the last `recent_n` arrivals no older than `recent_s`."""
        arrivals = self.arrivals.get(lane)
        counts: dict[str, int] = {}
        if not arrivals:
            return counts
        horizon = self.clock() - self.recent_s
        while arrivals and arrivals[0][0] < horizon:
            arrivals.popleft()
        for _, cls in list(arrivals)[-self.recent_n:]:
            counts[cls] = counts.get(cls, 0) + 1
        return counts

    def mix(self, lane: str) -> dict[str, float]:
        """Arrivals per class, each weighing half as much every `mix_half_life_s`: the long-run mix."""
        when, counts = self._mix.get(lane, (self.clock(), {}))
        decay = 0.5 ** (max(0.0, self.clock() - when) / self.mix_half_life_s)
        return {cls: n * decay for cls, n in counts.items() if n * decay > 1e-3}

    def evidence(self, lane: str) -> dict[str, ClassEvidence]:
        """Per class of `lane`: each member's rolling decode speed and, where it drafts, its acceptance (for a
        member that no longer serves the class, what it last measured, up to `memory_s`)."""
        per_class: dict[str, dict[str, Any]] = {}
        for (_, cls, member), samples in self.remembered_samples(lane):
            entry = per_class.setdefault(cls, {"tokens": [], "tok_s": {}, "n": {}, "acc": {}, "acc_n": {}})
            speeds = [s.gen_tok_s for s in samples if s.gen_tok_s]
            if speeds:
                entry["tok_s"][member] = _mean(speeds)
                entry["n"][member] = len(speeds)
            entry["tokens"] += [s.completion_tokens for s in samples if s.completion_tokens]
            drafted = [s for s in samples if s.draft_n]
            if drafted:
                entry["acc"][member] = sum(s.draft_accepted or 0 for s in drafted) / sum(s.draft_n or 0 for s in drafted)
                entry["acc_n"][member] = len(drafted)
        return {
            cls: ClassEvidence(tok_s=e["tok_s"], n=e["n"], acceptance=e["acc"], acceptance_n=e["acc_n"],
                               mean_tokens=_mean([float(t) for t in e["tokens"]]))
            for cls, e in per_class.items()
        }
