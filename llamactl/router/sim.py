"""A switching simulator that runs the real code: the router's Lane and the policy, on a virtual clock, in
front of simulated engines (each member decodes each class at a given tok/s and loads in a given time).

The scenario format (docs/switching-sim.md documents it; keep it stable):
    {"slots": 1, "fit_together": false,
     "members": {"plain": {"spec": false, "load_s": 12}, "d1b": {"spec": true, "load_s": 13}},
     (a member with "shares": "d1b" is served per request by d1b's engine, drafting off: a switch costs 0;
      a speculative member with "depths": [2, 4, 8] offers one choice per depth, "d1b@2" ..., served by its one
      engine: "classes" then give each choice's tok/s and acceptance instead of the member's)
     "classes": {"code": {"plain": 26, "d1b": 154, "acceptance": {"d1b": 0.85}}, ...},
     "requests": [{"t": 0.0, "class": "code", "tokens": 300}, ...]}

Policies compared: `auto` (the real policy), `always-<choice>` (a lane of that member alone, at that depth),
`clairvoyant` (every request pinned to its fastest member, every member loaded, every load but the
first free: the upper bound) and `hindsight` (the best any policy serving in arrival order could do knowing every speed and every
future request, paying the real switch costs: what is reachable where switches are reloads). Time is
virtual: an event loop whose clock jumps to the next timer instead of sleeping, so an hour of traffic runs in
a second or two.
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llamactl.router.policy import PolicyConfig
from llamactl.router.backends import Upstream
from llamactl.router.catalog import LaneSpec
from llamactl.router.choices import depth_choice, split_choice
from llamactl.router import learned
from llamactl.router.lane import Lane, LaneConfig, Ticket
from llamactl.router.telemetry import Sample, Telemetry


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class Scenario:
    slots: int
    fit_together: bool
    members: dict[str, dict[str, Any]]  # name -> {"spec": bool, "load_s": float}
    classes: dict[str, dict[str, Any]]  # class -> {member: tok/s, "acceptance": {member: a}}
    requests: list[dict[str, Any]]  # {"t", "class", "tokens"}, sorted by t

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "scenario") -> "Scenario":
        try:
            members = {str(m): {"spec": bool(v.get("spec", False)), "load_s": float(v.get("load_s", 0.0)),
                                **({"shares": str(v["shares"])} if v.get("shares") is not None else {}),
                                **({"depths": sorted(int(d) for d in v["depths"])} if v.get("depths") else {})}
                       for m, v in dict(data["members"]).items()}
            classes = {str(c): dict(v) for c, v in dict(data["classes"]).items()}
            requests = sorted(({"t": float(r["t"]), "class": str(r["class"]), "tokens": int(r["tokens"])}
                               for r in data["requests"]), key=lambda r: r["t"])
            slots = int(data.get("slots", 1))
            fit = bool(data.get("fit_together", False))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ScenarioError(f"{where}: {type(e).__name__}: {e} (see docs/switching-sim.md for the format)") from None
        if not members or sum(1 for m in members.values() if not m["spec"]) > 1:
            raise ScenarioError(f"{where}: members: one plain member at most, and at least one member")
        for m, v in members.items():
            depths = v.get("depths", [])
            if depths and (not v["spec"] or len(set(depths)) != len(depths) or len(depths) > 8
                           or not all(1 <= d <= 256 for d in depths)):
                raise ScenarioError(f"{where}: members.{m}.depths: a speculative member's depths, each 1..256, "
                                    "unique, at most 8")
        choices = [depth_choice(m, d) for m, v in members.items() for d in v.get("depths", [])] + [
            m for m, v in members.items() if not v.get("depths")]
        for c, speeds in classes.items():
            missing = [m for m in choices if not isinstance(speeds.get(m), (int, float)) or speeds[m] <= 0]
            if missing:
                raise ScenarioError(f"{where}: classes.{c}: no positive tok/s for {', '.join(missing)}")
        unknown = sorted({r["class"] for r in requests} - set(classes))
        if unknown:
            raise ScenarioError(f"{where}: requests name classes not in 'classes': {', '.join(unknown)}")
        if slots < 1:
            raise ScenarioError(f"{where}: slots must be >= 1")
        for m, v in members.items():
            host = v.get("shares")
            if host is not None and (v["spec"] or host not in members or not members[host]["spec"]):
                raise ScenarioError(f"{where}: members.{m}.shares: a plain member shares a speculative member's "
                                    f"engine; {host!r} is not one")
        return cls(slots, fit, members, classes, requests)

    @property
    def choices(self) -> list[str]:
        """What can serve a request: each member, a member with depths as one choice per depth (MEMBER@DEPTH)."""
        out: list[str] = []
        for m, v in self.members.items():
            out += [depth_choice(m, d) for d in v["depths"]] if v.get("depths") else [m]
        return out

    def base(self, choice: str) -> str:
        """The member a choice is of (a member is its own)."""
        return choice if choice in self.members else split_choice(choice)[0]

    def engine(self, choice: str) -> str:
        """The member whose engine serves `choice`: a depth's member, a sharing member's host, else itself."""
        member = self.base(choice)
        return self.members[member].get("shares", member)

    def is_spec(self, choice: str) -> bool:
        return self.members[self.base(choice)]["spec"]

    def tok_s(self, cls: str, member: str) -> float:
        return float(self.classes[cls][member])

    def acceptance(self, cls: str, member: str) -> float | None:
        value = self.classes[cls].get("acceptance", {}).get(member)
        return float(value) if value is not None else None

    def best_member(self, cls: str) -> str:
        return max(self.choices, key=lambda m: self.tok_s(cls, m))


# ------------------------------------------------------------------------------------------ virtual time


class _VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _JumpingSelector(selectors.SelectSelector):
    """Nothing real is waited on: "wait up to `timeout`" moves the clock forward by `timeout` instead."""

    def __init__(self, clock: _VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None):
        if timeout is None:
            raise RuntimeError("the simulation stalled: nothing scheduled and nothing ready")
        self.clock.now += max(0.0, timeout)
        return []


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: _VirtualClock) -> None:
        super().__init__(_JumpingSelector(clock))
        self._virtual = clock

    def time(self) -> float:
        return self._virtual.now


# ------------------------------------------------------------------------------------------ engines


class SimulatedEngines:
    """The router's Backends: a member loads in its load_s; without fit_together the lane stops one first.
    `free_loads`: every load after the run's first costs nothing (the first is paid whatever the mode: no
    request is served before some engine has loaded)."""

    def __init__(self, scenario: Scenario, *, free_loads: bool = False) -> None:
        self.scenario = scenario
        self.free_loads = free_loads
        self.loaded: set[str] = set()
        self.loads = 0

    async def ensure_ready(self, profile: str) -> Upstream:
        if profile not in self.loaded:
            if not self.scenario.fit_together and not self.free_loads and self.loaded - {profile}:
                raise RuntimeError(f"out of memory: {profile} beside {', '.join(sorted(self.loaded))}")
            self.loads += 1
            if not self.free_loads or self.loads == 1:
                await asyncio.sleep(self.scenario.members[profile]["load_s"])
            self.loaded.add(profile)
        return Upstream(f"sim://{profile}")

    async def stop(self, profile: str) -> None:
        self.loaded.discard(profile)


# ------------------------------------------------------------------------------------------ runs


@dataclass
class Outcome:
    tokens: int = 0
    first_arrival: float | None = None
    last_finish: float = 0.0
    switches: int = 0
    per_member: dict[str, int] = field(default_factory=dict)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> member -> requests served
    waited_s: float | None = 0.0  # the sum over requests of arrival to last token (None: not computed)

    @property
    def mean_latency_s(self) -> float | None:
        served = sum(self.per_member.values())
        return None if self.waited_s is None else self.waited_s / served if served else 0.0

    @property
    def tok_s(self) -> float:
        span = self.last_finish - (self.first_arrival or 0.0)
        return self.tokens / span if span > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"tok_s": round(self.tok_s, 3), "switches": self.switches, "requests_per_member": self.per_member,
                "mean_latency_s": None if self.mean_latency_s is None else round(self.mean_latency_s, 3)}


def run(scenario: Scenario, mode: str, policy: PolicyConfig | None = None,
        learnt: Mapping[str, Any] | None = None, keep: dict[str, Any] | None = None) -> Outcome:
    """Simulate `mode` ("auto", "always-<member>", "clairvoyant") over the scenario's requests. `learnt`: a
    snapshot (`learn`) put back into the telemetry first, as a restarted daemon does with its learned.json;
    `keep`: gets the snapshot at the end, under "learnt", and every switch the lane made, under "switches" (virtual
    time, request count, from, to, trigger and the decision's reason: what each choice was made on)."""
    clock = _VirtualClock()
    loop = _VirtualLoop(clock)
    try:
        return loop.run_until_complete(_run(scenario, mode, policy or PolicyConfig(), clock, learnt, keep))
    finally:
        loop.close()


def learn(scenario: Scenario, policy: PolicyConfig | None = None) -> dict[str, Any]:
    """What auto learnt serving the scenario: the snapshot a daemon saves (llamactl/router/learned.py)."""
    kept: dict[str, Any] = {}
    run(scenario, "auto", policy, keep=kept)
    return kept["learnt"]


def _lanes(scenario: Scenario) -> dict[str, dict[str, str]]:
    # one lane; its members' profiles never change
    return {"sim": {m: "sim" for m in [*scenario.members, *scenario.choices]}}


async def _run(scenario: Scenario, mode: str, policy: PolicyConfig, clock: _VirtualClock,
               learnt: Mapping[str, Any] | None = None, keep: dict[str, Any] | None = None) -> Outcome:
    depths = {m: tuple(v["depths"]) for m, v in scenario.members.items() if v.get("depths")}
    if mode == "auto" or mode == "clairvoyant":
        members = list(scenario.members)
    elif mode.startswith("always-") and mode[len("always-"):] in scenario.choices:
        fixed = mode[len("always-"):]
        member, depth = split_choice(fixed) if fixed not in scenario.members else (fixed, None)
        members = [member]
        depths = {member: (depth,)} if depth is not None else {}
    else:
        raise ScenarioError(f"unknown mode {mode!r}: auto, clairvoyant or always-<choice>")
    clairvoyant = mode == "clairvoyant"
    depths = {m: ds for m, ds in depths.items() if m in members}
    spec = LaneSpec("sim", {m: "spec" if scenario.members[m]["spec"] else "plain" for m in members},
                    {m: scenario.slots for m in members}, len(members) > 1,
                    {m: max(ds) for m, ds in depths.items()}, depths)
    config = LaneConfig(max_queue=10**9, queue_timeout_s=10**6, policy=policy,
                        keep_both_warm=scenario.fit_together or clairvoyant)
    telemetry = Telemetry(clock=clock)
    engines = SimulatedEngines(scenario, free_loads=clairvoyant)
    lane = Lane(spec, engines, telemetry, config, clock=clock)
    lane.hosts = {m: v["shares"] for m, v in scenario.members.items()
                  if "shares" in v and m in members and v["shares"] in members}
    lane.set_depths(depths)
    switches: list[dict[str, Any]] = []
    if keep is not None:
        def on_event(what: str, data: dict[str, Any]) -> None:
            if what == "switched" or (what == "ready" and not switches):
                switches.append({"t": round(clock.now, 1), "served": sum(outcome.per_member.values()),
                                 "from": data.get("previous"), "to": data.get("member"),
                                 "trigger": data.get("trigger", "first load"),
                                 "reason": data.get("reason") or (lane.last_decision and lane.last_decision.reason)})
        lane.on_event = on_event
    if learnt is not None:
        learned.restore(telemetry, learnt, _lanes(scenario), learnt["saved_at_unix"], {"sim": lane.runs})
    outcome = Outcome()
    dispatcher = asyncio.get_running_loop().create_task(lane.run())

    async def one(request: dict[str, Any]) -> None:
        await asyncio.sleep(max(0.0, request["t"] - clock.now))
        cls, tokens = request["class"], request["tokens"]
        if outcome.first_arrival is None:
            outcome.first_arrival = clock.now
        ticket = Ticket(cls=cls, pin=scenario.best_member(cls) if clairvoyant else None)
        await lane.acquire(ticket)
        assert ticket.profile is not None
        option = ticket.choice.option if ticket.choice is not None else None
        member = option or ticket.profile  # the choice served: its speed, its evidence
        tok_s = scenario.tok_s(cls, member)
        await asyncio.sleep(tokens / tok_s)
        acceptance = scenario.acceptance(cls, member)
        drafted = tokens if scenario.is_spec(member) and acceptance is not None else None
        telemetry.record(Sample(lane="sim", profile=ticket.profile, role=ticket.role or "plain", cls=cls,
                                endpoint="sim", status=200, gen_tok_s=tok_s, completion_tokens=tokens, draft_n=drafted,
                                draft_accepted=round(drafted * acceptance) if drafted else None, choice=option,
                                at=clock.now))
        lane.release(ticket)
        outcome.tokens += tokens
        outcome.waited_s += clock.now - request["t"]
        outcome.last_finish = max(outcome.last_finish, clock.now)
        outcome.per_member[member] = outcome.per_member.get(member, 0) + 1
        served = outcome.per_class.setdefault(cls, {})
        served[member] = served.get(member, 0) + 1

    try:
        await asyncio.gather(*(one(r) for r in scenario.requests))
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
    outcome.switches = sum(1 for s in _switch_counts(telemetry))
    if keep is not None:
        keep["learnt"] = learned.snapshot(telemetry, _lanes(scenario), clock.now, {"sim": lane.runs})
        keep["switches"] = switches
    return outcome


def _switch_counts(telemetry: Telemetry):
    for metric in telemetry.switches.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                for _ in range(int(sample.value)):
                    yield sample


def hindsight(scenario: Scenario) -> Outcome | None:
    """The best makespan serving in arrival order with every speed and every request known in advance, paying
    each switch's real cost (a member's load_s, nothing where members fit together), and even starting a
    reload while idle. Exact for one slot (dynamic programming over (request, member serving it): the
    earliest finish of the first i requests ending on member m); None for more slots, where it is not."""
    if scenario.slots != 1 or not scenario.requests:
        return None
    members = scenario.choices
    # member serving the last request -> (earliest finish, switches so far, requests per member)
    best: dict[str | None, tuple[float, int, dict[str, int]]] = {None: (float("-inf"), 0, {})}
    for request in scenario.requests:
        arrival, cls = request["t"], request["class"]
        step: dict[str | None, tuple[float, int, dict[str, int]]] = {}
        for member in members:
            service = request["tokens"] / scenario.tok_s(cls, member)
            options = []
            for previous, (finish, switches, per) in best.items():
                switching = previous is not None and previous != member
                shared = switching and scenario.engine(member) == scenario.engine(previous)
                cost = 0.0 if previous == member or (switching and (scenario.fit_together or shared)) \
                    else scenario.members[scenario.base(member)]["load_s"]
                start = max(arrival, (finish if previous is not None else arrival) + cost)
                options.append((start + service, switches + switching, per))
            finish, switches, per = min(options, key=lambda o: (o[0], o[1]))
            step[member] = (finish, switches, {**per, member: per.get(member, 0) + 1})
        best = step
    finish, switches, per = min(best.values(), key=lambda v: (v[0], v[1]))
    return Outcome(tokens=sum(r["tokens"] for r in scenario.requests), first_arrival=scenario.requests[0]["t"],
                   last_finish=finish, switches=switches, per_member=per, waited_s=None)  # makespan only


def compare(scenario: Scenario, policy: PolicyConfig | None = None,
            before: Scenario | None = None) -> dict[str, dict[str, Any]]:
    """auto, every always-<member>, clairvoyant and (one slot) hindsight: {mode: {"tok_s", "switches", ...}}.
    With `before` (earlier traffic of the same kind), also `auto-restarted`: auto after a restart that kept
    what it learnt serving `before`."""
    modes = ["auto", *(f"always-{m}" for m in scenario.choices), "clairvoyant"]
    result = {mode: run(scenario, mode, policy).to_json() for mode in modes}
    if before is not None:
        result["auto-restarted"] = run(scenario, "auto", policy, learnt=learn(before, policy)).to_json()
    bound = hindsight(scenario)
    if bound is not None:
        result["hindsight"] = bound.to_json()
    return result


# ------------------------------------------------------------------------------------------ workloads


def generate(kind: str, classes: list[str], *, n: int = 400, phase: int = 100, gap_s: float = 2.0,
             tokens: int = 300, seed: int = 1) -> list[dict[str, Any]]:
    """Requests for a workload, one every `gap_s`:
    - `phased`: runs of `phase` requests of one class, cycling through the classes;
    - `mixed`: a stationary random mix, class by class;
    - `drifting`: bursts of random length (mean `phase` / 10) whose class is the first one with a share that
      slides from 90% to 10% and back."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    burst_cls, burst_left = classes[0], 0
    for i in range(n):
        if kind == "phased":
            cls = classes[(i // phase) % len(classes)]
        elif kind == "mixed":
            cls = rng.choice(classes)
        elif kind == "drifting":
            if burst_left == 0:
                share = 0.1 + 0.8 * abs(1 - 2 * i / max(1, n - 1))
                burst_cls = classes[0] if rng.random() < share else rng.choice(classes[1:] or classes)
                burst_left = 1 + int(rng.expovariate(1 / max(1.0, phase / 10)))
            cls, burst_left = burst_cls, burst_left - 1
        else:
            raise ScenarioError(f"unknown workload {kind!r}: phased, mixed or drifting")
        out.append({"t": round(i * gap_s, 3), "class": cls, "tokens": tokens})
    return out
