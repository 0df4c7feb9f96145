#!/usr/bin/env python3
"""The box scheduler's eviction rule against llama.cpp's router and llama-swap, on a simulated clock.

    .venv/bin/python scripts/bench_box.py [--hours 3] [--seed 1] [--seeds 5] [--out docs/box-bench.md] [--json]

A described two-GPU box (2 x 24 GiB, 64 GiB host RAM) serves four profiles sized from real models (a 27B
target with a 1.7B drafter on one card, an 8B chat model, an embedding model, a 70B split over both cards).
Seeded traces of a few simulated hours (steady mixed, phased, bursty, a big split model, two models that
cannot share, alternating) are replayed under each policy on the same simulated clock (an event queue:
nothing sleeps, three hours take a fraction of a second):

  llamactl  the real `llamactl.box.evict.choose` over the real `llamactl.box.ledger.Ledger`: a load that does
            not fit stops only idle engines resident at least as long as their load took (the fewest, the
            least worth keeping), else waits in its lane's queue for busy memory; no stream is ever cut.
            A one-card profile may go on either card: each card is planned with `choose` and the bench
            takes a fit first, then the cheapest eviction (the fewest victims, the least worth), then waits.
  lru-N     llama.cpp's router (`llama-server --models-max N`): a request for a model not loaded unloads the
            least recently used model once N are loaded (or loading), whatever memory says and even while
            it streams (its streams are cut); a model that does not fit beside what runs starts as
            mainline's default `--fit on` starts it: what its cards have left, the rest of its layers in host
            RAM, serving slower (HOST_SLOWDOWN per such layer); only where host RAM has no room either does
            the load fail (out of memory) and its requests with it.
  swap      llama-swap's default (one model at a time): requests are taken in arrival order; one for another
            model waits for the running model's requests in flight to finish, stops it and loads its own.

Every policy places a one-card model on a card where it fits (the fullest card that still has room) and the
70B on both cards, loads at the same speed and serves with the same slots; every client gives up after
TIMEOUT_S without a first token (llamactl's default queue timeout). Metrics per policy: loads per hour,
failed (out-of-memory) loads, mean and p95 wait of the requests served (arrival to service start: the
queue for memory, the loads, the slots), mean latency (arrival to last token), requests served from host RAM,
requests failed (out of memory, streams cut, timed out, 429). docs/box-bench.md has the tables and reads them.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import platform
import random
import statistics
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llamactl.box.evict import Choice, Resident, choose  # noqa: E402
from llamactl.box.ledger import Ledger  # noqa: E402

# ------------------------------------------------------------------------------------------ the box

GIB = 1024
CARD_MIB = 24 * GIB  # a 24 GiB card (RTX 3090 / 4090 class)
CARD_OTHERS_MIB = 512  # the driver and the desktop on each card
HOST_MIB = 64 * GIB
HOST_OTHERS_MIB = 8 * GIB  # the OS and the user's own programs
FIXED_START_S = 3.0  # process start, CUDA init, warm-up: what a load costs beyond reading the weights
DISK_GB_S = 1.5  # weights read from NVMe and uploaded to the card (a cold page cache), GB per second
FIT_MARGIN_MIB = 1024  # llama.cpp's --fit leaves this free on each device (--fit-target's default)
HOST_SLOWDOWN = 10.0  # a layer in host RAM (~80 GB/s, two DDR5 channels) serves ~10x slower than on a card (~900 GB/s)
TIMEOUT_S = 300.0  # a client gives up without a first token after this (llamactl's router_queue_timeout_s)
MAX_QUEUE = 64  # llamactl's router_max_queue: the 65th waiting request of a lane gets a 429


def box_capacity() -> dict[str, int]:
    return {"CUDA0": CARD_MIB - CARD_OTHERS_MIB, "CUDA1": CARD_MIB - CARD_OTHERS_MIB,
            "CPU": HOST_MIB - HOST_OTHERS_MIB}


@dataclass(frozen=True)
class Model:
    name: str
    about: str
    file_gb: float  # the GGUF files read at each load (target + drafter)
    gpu_mib: tuple[int, ...]  # one entry: on one card (either); two: split over both cards
    host_mib: int  # host RAM the engine holds (the prompt cache, buffers)
    slots: int  # requests served at once
    service_s: float  # mean service time of one request (prefill + decode)

    @property
    def load_s(self) -> float:
        return FIXED_START_S + self.file_gb / DISK_GB_S

    def placements(self, cards: Sequence[str] = ("CUDA0", "CUDA1")) -> list[dict[str, int]]:
        """Each way the model may be placed on the box, as the ledger's needs (MiB per device)."""
        if len(self.gpu_mib) == 1:
            return [{card: self.gpu_mib[0], "CPU": self.host_mib} for card in cards]
        return [{**dict(zip(cards, self.gpu_mib)), "CPU": self.host_mib}]


MODELS: dict[str, Model] = {m.name: m for m in (
    Model("coder", "27B Q4_K_M target (16.5 GB) + 1.7B Q4 drafter (1.1 GB), 32k context, on one card",
          file_gb=17.6, gpu_mib=(19968,), host_mib=3072, slots=2, service_s=14.0),
    Model("chat", "8B Q4_K_M (4.9 GB), 16k context, on one card",
          file_gb=4.9, gpu_mib=(6656,), host_mib=2048, slots=4, service_s=5.0),
    Model("embed", "0.6B embedding model Q8_0 (0.6 GB), on one card",
          file_gb=0.6, gpu_mib=(1024,), host_mib=256, slots=4, service_s=0.4),
    Model("big", "70B Q4_K_M (42.5 GB), 8k context, layers split over both cards",
          file_gb=42.5, gpu_mib=(21504, 21504), host_mib=4096, slots=1, service_s=30.0),
)}

# ------------------------------------------------------------------------------------------ traces


@dataclass(frozen=True)
class Request:
    id: int
    t: float  # arrival, simulated seconds
    model: str
    service_s: float


@dataclass(frozen=True)
class Trace:
    name: str
    about: str
    hours: float
    requests: tuple[Request, ...]


def _service(rng: random.Random, model: str) -> float:
    """Lognormal around the model's mean (sigma 0.5): most requests near it, a few several times longer."""
    sigma = 0.5
    return rng.lognormvariate(math.log(MODELS[model].service_s) - sigma * sigma / 2, sigma)


def _poisson(rng: random.Random, start: float, end: float, every_s: float) -> list[float]:
    times, t = [], start
    while True:
        t += rng.expovariate(1.0 / every_s)
        if t >= end:
            return times
        times.append(t)


def _sessions(rng: random.Random, end: float, start_every_s: float, length_s: float, every_s: float) -> list[float]:
    """On/off traffic: sessions start as a Poisson process, last an exponential time, and send requests as a
    Poisson process while they last."""
    times: list[float] = []
    for start in _poisson(rng, 0.0, end, start_every_s):
        times += _poisson(rng, start, min(end, start + rng.expovariate(1.0 / length_s)), every_s)
    return times


def _steady(rng: random.Random, end: float) -> dict[str, list[float]]:
    return {"coder": _poisson(rng, 0, end, 45), "chat": _poisson(rng, 0, end, 30), "embed": _poisson(rng, 0, end, 8)}


def _phased(rng: random.Random, end: float) -> dict[str, list[float]]:
    phases = [{"coder": 30, "embed": 6}, {"chat": 15, "embed": 10}, {"big": 90, "embed": 20}]
    out: dict[str, list[float]] = {}
    phase_s = 30 * 60
    for i, start in enumerate(range(0, int(end), phase_s)):
        for model, every in phases[i % len(phases)].items():
            out.setdefault(model, []).extend(_poisson(rng, start, min(end, start + phase_s), every))
    return out


def _bursty(rng: random.Random, end: float) -> dict[str, list[float]]:
    return {"coder": _sessions(rng, end, 20 * 60, 8 * 60, 20), "chat": _sessions(rng, end, 15 * 60, 6 * 60, 10),
            "embed": _sessions(rng, end, 10 * 60, 4 * 60, 3), "big": _sessions(rng, end, 45 * 60, 5 * 60, 60)}


def _big_split(rng: random.Random, end: float) -> dict[str, list[float]]:
    out = {"coder": _poisson(rng, 0, end, 60), "chat": _poisson(rng, 0, end, 40), "embed": _poisson(rng, 0, end, 10)}
    big: list[float] = []
    for start in _poisson(rng, 0, end, 15 * 60):
        big += [start + 20 * k for k in range(rng.randint(1, 4)) if start + 20 * k < end]
    out["big"] = big
    return out


def _cannot_share(rng: random.Random, end: float) -> dict[str, list[float]]:
    """The 27B and the 70B (which cannot share the box) in turns of a few minutes each."""
    out: dict[str, list[float]] = {"coder": [], "big": []}
    t, turn = 0.0, 0
    while t < end:
        length = rng.uniform(2, 6) * 60
        model, every = ("coder", 25) if turn % 2 == 0 else ("big", 40)
        out[model] += _poisson(rng, t, min(end, t + length), every)
        t, turn = t + length, turn + 1
    return out


def _alternating(rng: random.Random, end: float) -> dict[str, list[float]]:
    """The adversary: one request to the 27B, then one to the 70B, every 20 s (a little jitter), all along."""
    out: dict[str, list[float]] = {"coder": [], "big": []}
    for i in range(int(end // 20)):
        out["coder" if i % 2 == 0 else "big"].append(i * 20 + rng.uniform(0, 2))
    return out


TRACES: dict[str, tuple[str, Callable[[random.Random, float], dict[str, list[float]]]]] = {
    "steady-mixed": ("coder every 45 s, chat every 30 s, embed every 8 s (Poisson): they fit together", _steady),
    "phased": ("30-minute phases in turn: coder + embed, chat + embed, big + embed", _phased),
    "bursty": ("on/off sessions of all four (coder, chat, embed, big), overlapping at random", _bursty),
    "big-split": ("steady coder, chat and embed; every ~15 min a burst of 1-4 requests for the 70B split over "
                  "both cards (which needs the 27B and the 8B stopped)", _big_split),
    "cannot-share": ("turns of 2-6 minutes between the 27B (a request every 25 s) and the 70B (every 40 s), "
                     "which cannot share the box", _cannot_share),
    "alternating": ("adversarial: a request every 20 s alternating between the 27B and the 70B, which cannot "
                    "share the box", _alternating),
}


def make_trace(name: str, *, hours: float = 3.0, seed: int = 1) -> Trace:
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}: {', '.join(TRACES)}")
    about, arrivals = TRACES[name]
    rng = random.Random(f"{name}:{seed}")
    times = arrivals(rng, hours * 3600.0)
    flat = sorted((t, model) for model, ts in times.items() for t in ts)
    requests = tuple(Request(i, round(t, 3), model, round(_service(rng, model), 3)) for i, (t, model) in enumerate(flat))
    return Trace(name, about, hours, requests)


# ------------------------------------------------------------------------------------------ simulated clock


class Clock:
    """An event queue on simulated seconds: `at` schedules, `run` jumps from event to event."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (max(t, self.now), self._seq, fn))

    def run(self, max_at_one_instant: int = 100_000) -> None:
        """Raises where the events keep coming at one instant (a retry that does not move the clock): stalled."""
        same = 0
        while self._events:
            t, _, fn = heapq.heappop(self._events)
            same = same + 1 if t == self.now else 0
            if same > max_at_one_instant:
                raise RuntimeError(f"the simulation stalled at t={t:.3f} s: events keep coming at one instant")
            self.now = t
            fn()


# ------------------------------------------------------------------------------------------ engines and metrics


@dataclass
class Engine:
    """One model's server on the simulated box."""

    model: Model
    state: str = "down"  # down, loading, up
    doomed: bool = False  # loading, but it will fail (out of memory)
    in_flight: set[int] = field(default_factory=set)
    queue: deque[Request] = field(default_factory=deque)  # routed to it, waiting for the load or a slot
    ready_at: float = 0.0
    idle_since: float = 0.0
    last_used: float = 0.0
    generation: int = 0  # bumped at each stop: finishes of a stopped engine's requests are void
    slowdown: float = 1.0  # service time factor: > 1 where layers were put in host RAM (llama.cpp's --fit)


@dataclass
class Outcome:
    policy: str
    hours: float
    requests: int = 0
    waits: list[float] = field(default_factory=list)  # served requests: arrival to service start
    latencies: list[float] = field(default_factory=list)  # requests served to the end: arrival to last token
    slowed: int = 0  # requests served by an engine with layers in host RAM
    loads: int = 0
    failed_loads: int = 0
    load_s: float = 0.0
    evictions: int = 0
    oom: int = 0  # requests failed with their model's out-of-memory load
    cut: int = 0  # streams cut (or queued requests dropped) by a stop
    timed_out: int = 0
    rejected: int = 0  # 429: the lane's queue was full
    log: list[tuple[float, str, str]] = field(default_factory=list)  # (t, what, model): loaded, stopped, failed

    @property
    def served(self) -> int:
        return len(self.waits)

    @property
    def failed(self) -> int:
        return self.oom + self.cut + self.timed_out + self.rejected

    @property
    def loads_per_hour(self) -> float:
        return self.loads / self.hours

    @property
    def mean_wait_s(self) -> float:
        return statistics.fmean(self.waits) if self.waits else 0.0

    @property
    def p95_wait_s(self) -> float:
        if not self.waits:
            return 0.0
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]

    @property
    def mean_latency_s(self) -> float:
        return statistics.fmean(self.latencies) if self.latencies else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"loads_per_hour": round(self.loads_per_hour, 2), "loads": self.loads,
                "failed_loads": self.failed_loads, "mean_wait_s": round(self.mean_wait_s, 2),
                "p95_wait_s": round(self.p95_wait_s, 2), "mean_latency_s": round(self.mean_latency_s, 2),
                "served": self.served, "slowed": self.slowed, "requests": self.requests,
                "oom": self.oom, "cut": self.cut, "timed_out": self.timed_out, "rejected": self.rejected,
                "evictions": self.evictions, "load_s_per_hour": round(self.load_s / self.hours, 1)}


class Policy:
    """What every policy shares: engines that load, serve with slots and stop; the books; client timeouts.
    A policy decides in `arrive` and the hooks which engine loads, where, and which stops."""

    name = "policy"

    def __init__(self, models: Mapping[str, Model] | None = None, capacity: Mapping[str, int] | None = None) -> None:
        self.models = dict(models or MODELS)
        self.clock = Clock()
        self.ledger = Ledger(capacity=dict(capacity or box_capacity()))
        self.engines = {name: Engine(m) for name, m in self.models.items()}
        self.outcome = Outcome(self.name, 1.0)
        self._done: set[int] = set()  # requests started, failed or given up

    def run(self, trace: Trace) -> Outcome:
        self.outcome = Outcome(self.name, trace.hours, requests=len(trace.requests))
        for request in trace.requests:
            self.clock.at(request.t, lambda r=request: self.arrive(r))
            self.clock.at(request.t + TIMEOUT_S, lambda r=request: self._give_up(r))
        self.clock.run()
        return self.outcome

    # -- what policies decide
    def arrive(self, request: Request) -> None:
        raise NotImplementedError

    def on_idle(self, engine: Engine) -> None:
        """`engine` has nothing in flight or queued any more."""

    def on_released(self) -> None:
        """Memory was given back."""

    def on_gave_up(self, request: Request) -> None:
        """A client gave up on `request` (it was waiting)."""

    # -- mechanics
    def live(self, engine: Engine) -> list[Request]:
        return [r for r in engine.queue if r.id not in self._done]

    def busy(self, engine: Engine) -> bool:
        return bool(engine.in_flight or self.live(engine) or engine.state == "loading")

    def place(self, model: Model) -> dict[str, int] | None:
        """A placement that fits beside what runs (the fullest card with room: big holes stay whole), or None."""
        free = self.ledger.free()
        fitting = [p for p in model.placements() if self.ledger.fits(p)]
        return min(fitting, key=lambda p: sum(free[d] - n for d, n in p.items() if d != "CPU"), default=None)

    def load(self, engine: Engine, needs: Mapping[str, int] | None, slowdown: float = 1.0) -> None:
        """Start loading `engine` with `needs` held; None: it does not fit and fails once the engine finds out."""
        engine.state, engine.doomed, engine.slowdown = "loading", needs is None, slowdown
        engine.generation += 1
        generation = engine.generation
        if needs is None:
            self.clock.at(self.clock.now + FIXED_START_S, lambda: self._load_failed(engine, generation))
            return
        self.ledger.hold(engine.model.name, engine.model.name, needs, "loading")
        self.clock.at(self.clock.now + engine.model.load_s, lambda: self._loaded(engine, generation))

    def stop(self, engine: Engine) -> None:
        """Stop `engine` now: what it streams is cut, what is queued on it fails."""
        self.outcome.cut += len(engine.in_flight)
        for request in self.live(engine):
            self._done.add(request.id)
            self.outcome.cut += 1
        engine.in_flight.clear()
        engine.queue.clear()
        engine.state, engine.doomed = "down", False
        engine.generation += 1
        if self.ledger.release(engine.model.name) is not None:
            self.outcome.log.append((self.clock.now, "stopped", engine.model.name))
            self.on_released()

    def route(self, engine: Engine, request: Request) -> None:
        engine.queue.append(request)
        engine.last_used = self.clock.now
        self.dispatch(engine)

    def dispatch(self, engine: Engine) -> None:
        while engine.state == "up" and len(engine.in_flight) < engine.model.slots and engine.queue:
            request = engine.queue.popleft()
            if request.id in self._done:
                continue
            self._done.add(request.id)
            self.outcome.waits.append(self.clock.now - request.t)
            engine.in_flight.add(request.id)
            self.outcome.slowed += engine.slowdown > 1.0
            generation = engine.generation
            self.clock.at(self.clock.now + request.service_s * engine.slowdown,
                          lambda r=request: self._finished(engine, r, generation))

    def fail(self, request: Request, why: str) -> None:
        if request.id not in self._done:
            self._done.add(request.id)
            setattr(self.outcome, why, getattr(self.outcome, why) + 1)

    def _loaded(self, engine: Engine, generation: int) -> None:
        if engine.generation != generation:
            return
        engine.state, engine.ready_at = "up", self.clock.now
        self.ledger.hold(engine.model.name, engine.model.name, self.ledger.holdings[engine.model.name].mib, "running")
        self.outcome.loads += 1
        self.outcome.load_s += engine.model.load_s
        self.outcome.log.append((self.clock.now, "loaded", engine.model.name))
        self.dispatch(engine)
        if not self.busy(engine):
            engine.idle_since = self.clock.now
            self.on_idle(engine)

    def _load_failed(self, engine: Engine, generation: int) -> None:
        if engine.generation != generation:
            return
        self.outcome.failed_loads += 1
        self.outcome.log.append((self.clock.now, "failed", engine.model.name))
        for request in self.live(engine):
            self.fail(request, "oom")
        engine.queue.clear()
        engine.state, engine.doomed = "down", False
        engine.generation += 1
        self.on_idle(engine)

    def _finished(self, engine: Engine, request: Request, generation: int) -> None:
        if engine.generation != generation:
            return  # cut when its engine stopped
        engine.in_flight.discard(request.id)
        self.outcome.latencies.append(self.clock.now - request.t)
        if not engine.in_flight:
            engine.idle_since = self.clock.now
        self.dispatch(engine)
        if not self.busy(engine):
            self.on_idle(engine)

    def _give_up(self, request: Request) -> None:
        if request.id not in self._done:
            self.fail(request, "timed_out")
            self.on_gave_up(request)


# ------------------------------------------------------------------------------------------ policies


class Llamactl(Policy):
    """llamactl's box: each profile a lane; the real `choose` over the real ledger decides every load."""

    name = "llamactl"

    def __init__(self, *args: Any, min_residence_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_residence_s = min_residence_s
        self.waiting: dict[str, None] = {}  # lanes waiting for memory, in the order they asked
        self.load_s: dict[str, float] = {}  # each profile's last load, as the scheduler measures it
        self._retry_at: float | None = None

    def arrive(self, request: Request) -> None:
        engine = self.engines[request.model]
        if len(self.live(engine)) >= MAX_QUEUE:
            self.fail(request, "rejected")
            return
        self.route(engine, request)
        if engine.state == "down" and request.model not in self.waiting:
            self.admit(engine)

    def residents(self) -> list[Resident]:
        now = self.clock.now
        out = []
        for holding in self.ledger.holdings.values():
            engine = self.engines[holding.profile]
            idle = engine.state == "up" and not self.busy(engine)
            out.append(Resident(lane=holding.profile, profiles=(holding.profile,), idle=idle,
                                idle_s=max(0.0, now - engine.idle_since) if idle else 0.0,
                                resident_s=now - engine.ready_at if engine.state == "up" else 0.0,
                                reload_s=self.load_s.get(holding.profile, 0.0)))
        return out

    def decide(self, model: Model) -> tuple[dict[str, int], Choice] | list[Choice]:
        """Plan each placement with `choose`: a fit first (the fullest card with room), then the cheapest eviction
        (the fewest victims, then the least worth keeping); else every placement's choice (wait or never)."""
        residents = self.residents()
        worth = {r.lane: r.worth for r in residents}
        free = self.ledger.free()
        options = [(needs, choose(needs, self.ledger, residents, requester=model.name,
                                  min_residence_s=self.min_residence_s)) for needs in model.placements()]
        fits = [o for o in options if o[1].verdict == "fits"]
        if fits:
            return min(fits, key=lambda o: sum(free[d] - n for d, n in o[0].items() if d != "CPU"))
        evicts = [o for o in options if o[1].verdict == "evict"]
        if evicts:
            return min(evicts, key=lambda o: (len(o[1].victims), sum(worth[v] for v in o[1].victims)))
        return [choice for _, choice in options]

    def admit(self, engine: Engine) -> None:
        model = engine.model
        decided = self.decide(model)
        if isinstance(decided, tuple):
            needs, choice = decided
            self.waiting.pop(model.name, None)
            for victim in choice.victims:
                self.outcome.evictions += 1
                self.stop(self.engines[victim])  # idle: nothing is cut
            self.load(engine, needs)
            return
        if all(c.verdict == "never" for c in decided):
            self.waiting.pop(model.name, None)
            for request in self.live(engine):
                self.fail(request, "oom")
            engine.queue.clear()
            return
        self.waiting[model.name] = None
        soon = [c.retry_in_s for c in decided if c.verdict == "wait" and c.retry_in_s is not None]
        if soon:  # (at least the next representable instant: a wait of 1e-13 s must move the clock)
            self._retry(max(self.clock.now + min(soon), math.nextafter(self.clock.now, math.inf)))

    def _retry(self, t: float) -> None:
        self.clock.at(t, self.retry_waiting)

    def retry_waiting(self) -> None:
        for name in list(self.waiting):
            engine = self.engines[name]
            if name in self.waiting and engine.state == "down":
                if self.live(engine):
                    self.admit(engine)
                else:
                    self.waiting.pop(name)  # every client gave up: the lane stops asking

    def _loaded(self, engine: Engine, generation: int) -> None:
        if engine.generation == generation:
            self.load_s[engine.model.name] = engine.model.load_s
        super()._loaded(engine, generation)

    def on_idle(self, engine: Engine) -> None:
        if self.waiting:
            self._retry(self.clock.now)  # the lane pokes the box: a load waiting for its memory may go on

    def on_released(self) -> None:
        if self.waiting:
            self._retry(self.clock.now)

    def on_gave_up(self, request: Request) -> None:
        engine = self.engines[request.model]
        if engine.state == "up" and not self.busy(engine):
            self.on_idle(engine)
        if request.model in self.waiting and not self.live(engine):
            self.waiting.pop(request.model)


class LruByCount(Policy):
    """llama.cpp's router with `--models-max N`: the least recently used model goes once N are loaded. Its
    children start with mainline's default `--fit on`: a model that does not fit beside what runs gets what the
    cards have left (less FIT_MARGIN_MIB each) and the rest of its layers in host RAM, and serves slower."""

    def __init__(self, n: int, *args: Any, **kwargs: Any) -> None:
        self.n = n
        self.name = f"lru-{n}"
        super().__init__(*args, **kwargs)

    def arrive(self, request: Request) -> None:
        engine = self.engines[request.model]
        if engine.state == "down":
            running = [e for e in self.engines.values() if e.state != "down"]
            if len(running) >= self.n:
                victim = min(running, key=lambda e: e.last_used)
                self.outcome.evictions += 1
                self.stop(victim)  # whether it streams or not
            needs = self.place(engine.model)
            if needs is not None:
                self.load(engine, needs)
            else:
                self.load(engine, *self.spill(engine.model))
        self.route(engine, request)

    def spill(self, model: Model) -> tuple[dict[str, int] | None, float]:
        """What `--fit` does where the model does not fit: on its cards what they have left, the rest of the
        layers in host RAM (the placement spilling least); (None, 1) where host RAM has no room either."""
        free = self.ledger.free()
        best: tuple[dict[str, int], float] | None = None
        for placement in model.placements():
            cards = {d: n for d, n in placement.items() if d != "CPU"}
            taken = {d: max(0, min(n, free[d] - FIT_MARGIN_MIB)) for d, n in cards.items()}
            spilled = sum(cards.values()) - sum(taken.values())
            needs = {**taken, "CPU": placement.get("CPU", 0) + spilled}
            if self.ledger.fits(needs) and (best is None or spilled < best[1]):
                best = (needs, spilled)
        if best is None:
            return None, 1.0
        needs, spilled = best
        return needs, 1.0 + (HOST_SLOWDOWN - 1.0) * spilled / sum(model.gpu_mib)


class OneAtATime(Policy):
    """llama-swap's default: one model runs; a request for another waits for what is in flight, then swaps."""

    name = "swap"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fifo: deque[Request] = deque()
        self.current: Engine | None = None
        self.draining = False

    def arrive(self, request: Request) -> None:
        self.fifo.append(request)
        self.pump()

    def pump(self) -> None:
        while self.fifo:
            head = self.fifo[0]
            if head.id in self._done:
                self.fifo.popleft()
                continue
            engine = self.engines[head.model]
            if self.current is engine:
                self.fifo.popleft()
                self.route(engine, head)
                continue
            if self.current is not None:
                if self.busy(self.current):
                    self.draining = True  # the swap waits for the requests in flight (no stream is cut)
                    return
                self.stop(self.current)
                self.current, self.draining = None, False
                continue  # the head may have given up meanwhile: the next one decides
            self.load(engine, self.place(engine.model))
            self.current = engine

    def on_idle(self, engine: Engine) -> None:
        if engine is self.current and self.draining:
            self.pump()

    def on_gave_up(self, request: Request) -> None:
        if self.current is not None and not self.busy(self.current):
            self.pump()


def policies(min_residence_s: float = 0.0) -> dict[str, Callable[[], Policy]]:
    return {"llamactl": lambda: Llamactl(min_residence_s=min_residence_s),
            **{f"lru-{n}": (lambda n=n: LruByCount(n)) for n in (2, 3, 4)},
            "swap": OneAtATime}


def compare(trace: Trace, min_residence_s: float = 0.0) -> dict[str, Outcome]:
    return {name: make().run(trace) for name, make in policies(min_residence_s).items()}


# ------------------------------------------------------------------------------------------ the verdict


def verdict(results: Mapping[str, Outcome]) -> tuple[bool, list[str]]:
    """Whether llamactl has no more loads, no longer mean and p95 waits and no more failed requests than every
    other policy; and, for each where it does not, what it loses on."""
    ours = results["llamactl"]
    misses = []
    for name, other in results.items():
        if name == "llamactl":
            continue
        lost = []
        if ours.loads > other.loads:
            lost.append(f"loads {ours.loads} > {other.loads}")
        if ours.mean_wait_s > other.mean_wait_s + 1e-9:
            lost.append(f"mean wait {ours.mean_wait_s:.1f} s > {other.mean_wait_s:.1f} s")
        if ours.p95_wait_s > other.p95_wait_s + 1e-9:
            lost.append(f"p95 wait {ours.p95_wait_s:.1f} s > {other.p95_wait_s:.1f} s")
        if ours.failed > other.failed:
            lost.append(f"failed {ours.failed} > {other.failed}")
        if lost:
            misses.append(f"{name}: {', '.join(lost)}" + (f" (it failed {other.failed} requests)" if other.failed else ""))
    return not misses, misses


def _row(o: Outcome) -> str:
    kinds = (("oom", o.oom), ("cut", o.cut), ("timed out", o.timed_out), ("429", o.rejected))
    failed = f"{o.failed}" + (f" ({', '.join(f'{k} {v}' for k, v in kinds if v)})" if o.failed else "")
    return (f"| {o.policy} | {o.loads_per_hour:.1f} | {o.failed_loads} | {o.mean_wait_s:.1f} | {o.p95_wait_s:.1f} | "
            f"{o.mean_latency_s:.1f} | {o.served} | {o.slowed} | {failed} | {o.evictions} |")


def table(hours: float, seed: int, seeds: int, min_residence_s: float = 0.0) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    data: dict[str, Any] = {}
    for name in TRACES:
        trace = make_trace(name, hours=hours, seed=seed)
        results = compare(trace, min_residence_s)
        met, misses = verdict(results)
        held = sum(verdict(compare(make_trace(name, hours=hours, seed=s), min_residence_s))[0]
                   for s in range(seed, seed + seeds))
        data[name] = {"requests": len(trace.requests), "met": met, "met_seeds": held, "seeds": seeds,
                      "policies": {k: v.to_json() for k, v in results.items()}, "misses": misses}
        lines += [f"### {name}", "", f"{trace.about}; {len(trace.requests)} requests over {hours:g} h.", "",
                  "| policy | loads/h | failed loads | mean wait s | p95 wait s | mean latency s | served | "
                  "served from host RAM | failed | evictions |",
                  "|---|---|---|---|---|---|---|---|---|---|", *(_row(o) for o in results.values()), "",
                  f"Goal (llamactl no more loads, waits or failures than any other): "
                  f"{'met' if met else 'NOT met: ' + '; '.join(misses)}. Seeds {seed}..{seed + seeds - 1}: met on "
                  f"{held} of {seeds}.", ""]
    return "\n".join(lines), data


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=3.0, help="simulated hours per trace (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="the seed of the traces in the tables")
    ap.add_argument("--seeds", type=int, default=5, help="how many seeds (from --seed) the goal is checked on")
    ap.add_argument("--min-residence-s", type=float, default=0.0, help="llamactl's min_residence_s (default 0)")
    ap.add_argument("--out", type=Path, help="write the tables (Markdown) there")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = ap.parse_args(argv)
    if not 0 < args.hours <= 48:
        ap.error("--hours: give a number of simulated hours in (0, 48]")
    if not 1 <= args.seeds <= 100:
        ap.error("--seeds: give 1..100")
    text, data = table(args.hours, args.seed, args.seeds, args.min_residence_s)
    command = (f".venv/bin/python scripts/bench_box.py --hours {args.hours:g} --seed {args.seed} --seeds {args.seeds}"
               + (f" --min-residence-s {args.min_residence_s:g}" if args.min_residence_s else ""))
    header = (f"Command: `{command}` (simulated clock; {platform.machine()}, Python {platform.python_version()}).\n\n")
    if args.out:
        args.out.write_text(header + text)
    print(json.dumps(data, indent=1) if args.json else header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
