"""Which member of a switch group should serve: the speculative one or the plain one. Pure, no I/O.

The router hands `decide()` a snapshot of one group (what is queued, what arrived recently, what each
workload class measured on each member, what a switch costs) and gets back a `Decision`. Everything
the decision depends on is in the snapshot, so a trace of snapshots replays exactly (tests/test_policy.py).

Model of the work: a class c has an expected completion length tokens_c and a decode speed on each
member, speed(c, spec) and speed(c, plain), in tokens/s. The expected time of the demand on a member is
    W(member) = sum_c weight_c * tokens_c / speed(c, member)
where weight_c is the demand of class c: every queued request, and when fewer than `horizon` requests are
queued, the rest of the horizon filled in the proportions of the recent arrivals (with a sequential client
the queue is nearly always empty, and the recent mix is the best guess of what comes next; with a queued
burst the queue itself is the truth).
A switch happens when the other member saves more than the switch's measured cost (restart time) times
`cost_factor`, AND is at least `hysteresis` faster on that work, AND the current member has served for
`min_dwell_s`. A mixed queue whose classes balance out never clears the hysteresis band, so it does not
flap.
A cheap switch (both members loaded: a drain, at most `cheap_switch_s`) needs no amortising: the demand is
the queue alone, with no horizon of guessed future work, and no dwell applies, so the first request of a
new phase already goes to the member that suits it. Hysteresis still applies.

Speeds come from measurements when a class has `min_samples` of them on that member; otherwise from the
other member's measured speed and the class's acceptance rate (measured on the speculative member, or
a prior per class) through a linear speed-up model speedup(a) = intercept + slope * a. The default
model is fitted to llama-server's n-gram speculation on a CPU (reference: 79 vs 63 tok/s at acceptance
0.65, 54 vs 68 tok/s at acceptance 0.10), break-even near acceptance 0.35.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["spec", "plain"]
ROLES: tuple[Role, Role] = ("spec", "plain")

DEFAULT_PRIOR_ACCEPTANCE: dict[str, float] = {
    "code": 0.65,
    "deterministic": 0.5,
    "structured": 0.45,
    "short": 0.4,
    "chat": 0.3,
    "creative": 0.1,
}


@dataclass(frozen=True)
class PolicyConfig:
    min_samples: int = 2
    hysteresis: float = 0.12
    min_dwell_s: float = 10.0
    horizon: float = 4.0  # requests of demand to plan for; the recent mix fills what the queue lacks
    cheap_switch_s: float = 0.5  # a switch this cheap (both members warm) plans on the queue alone, no dwell
    cost_factor: float = 1.0
    default_switch_cost_s: float = 5.0
    default_tok_s: float = 50.0
    default_tokens: float = 256.0
    speedup_intercept: float = 0.71
    speedup_slope: float = 0.84
    prior_acceptance: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PRIOR_ACCEPTANCE))
    unknown_class_acceptance: float = 0.3

    def speedup(self, acceptance: float) -> float:
        return max(0.05, self.speedup_intercept + self.speedup_slope * acceptance)


@dataclass(frozen=True)
class ClassEvidence:
    """What one workload class measured in the rolling window."""

    spec_tok_s: float | None = None
    spec_n: int = 0
    plain_tok_s: float | None = None
    plain_n: int = 0
    acceptance: float | None = None  # draft_n_accepted / draft_n on the speculative member
    acceptance_n: int = 0
    mean_tokens: float | None = None  # mean completion tokens


@dataclass(frozen=True)
class GroupState:
    active: Role | None  # None: no member loaded
    seconds_since_switch: float
    switch_cost_s: float | None  # measured restart time; None = not measured yet
    queued: Mapping[str, int]  # class -> requests waiting
    recent: Mapping[str, int] = field(default_factory=dict)  # class -> arrivals in the recent window
    evidence: Mapping[str, ClassEvidence] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    target: Role
    switch: bool
    reason: str
    seconds: Mapping[str, float]  # expected seconds of the demand on each member


def _other(role: Role) -> Role:
    return "plain" if role == "spec" else "spec"


def acceptance_for(cls: str, ev: ClassEvidence, config: PolicyConfig) -> float:
    if ev.acceptance is not None and ev.acceptance_n >= config.min_samples:
        return ev.acceptance
    return config.prior_acceptance.get(cls, config.unknown_class_acceptance)


def _base_speed(evidence: Mapping[str, ClassEvidence], config: PolicyConfig) -> float:
    """A plain-member speed to use for classes with no measurement at all (mean over measured ones)."""
    speeds = []
    for cls, ev in evidence.items():
        if ev.plain_tok_s and ev.plain_n >= config.min_samples:
            speeds.append(ev.plain_tok_s)
        elif ev.spec_tok_s and ev.spec_n >= config.min_samples:
            speeds.append(ev.spec_tok_s / config.speedup(acceptance_for(cls, ev, config)))
    return sum(speeds) / len(speeds) if speeds else config.default_tok_s


def speed(cls: str, role: Role, evidence: Mapping[str, ClassEvidence], config: PolicyConfig) -> float:
    """Expected decode tokens/s of class `cls` on member `role`."""
    ev = evidence.get(cls, ClassEvidence())
    spec_known = ev.spec_tok_s is not None and ev.spec_n >= config.min_samples and ev.spec_tok_s > 0
    plain_known = ev.plain_tok_s is not None and ev.plain_n >= config.min_samples and ev.plain_tok_s > 0
    factor = config.speedup(acceptance_for(cls, ev, config))
    if role == "spec":
        if spec_known:
            return ev.spec_tok_s  # type: ignore[return-value]
        plain = ev.plain_tok_s if plain_known else _base_speed(evidence, config)
        return plain * factor  # type: ignore[operator]
    if plain_known:
        return ev.plain_tok_s  # type: ignore[return-value]
    if spec_known:
        return ev.spec_tok_s / factor  # type: ignore[operator]
    return _base_speed(evidence, config)


def switch_cost(state: GroupState, config: PolicyConfig) -> float:
    return state.switch_cost_s if state.switch_cost_s is not None else config.default_switch_cost_s


def demand(state: GroupState, config: PolicyConfig) -> dict[str, float]:
    """Requests per class to plan for: the queue, topped up to `horizon` with the recent mix (unless a switch
    is cheap: then the queue alone)."""
    weights = {cls: float(n) for cls, n in state.queued.items() if n > 0}
    if switch_cost(state, config) <= config.cheap_switch_s:
        return weights
    missing = config.horizon - sum(weights.values())
    recent_total = sum(n for n in state.recent.values() if n > 0)
    if missing > 0 and recent_total:
        for cls, n in state.recent.items():
            if n > 0:
                weights[cls] = weights.get(cls, 0.0) + missing * n / recent_total
    return weights


def expected_seconds(state: GroupState, role: Role, config: PolicyConfig) -> float:
    total = 0.0
    for cls, weight in demand(state, config).items():
        if weight <= 0:
            continue
        ev = state.evidence.get(cls, ClassEvidence())
        tokens = ev.mean_tokens if ev.mean_tokens else config.default_tokens
        total += weight * tokens / speed(cls, role, state.evidence, config)
    return total


def decide(state: GroupState, config: PolicyConfig = PolicyConfig()) -> Decision:
    seconds = {role: expected_seconds(state, role, config) for role in ROLES}
    mix = ", ".join(f"{c}={n}" for c, n in sorted(state.queued.items()) if n) or "empty"
    if state.active is None:
        target: Role = "plain" if seconds["plain"] < seconds["spec"] else "spec"
        return Decision(target, True, f"nothing loaded; queue [{mix}] is expected faster on {target}", seconds)
    current, other = state.active, _other(state.active)
    if not any(state.queued.values()):
        return Decision(current, False, "queue empty; stay", seconds)
    cost = switch_cost(state, config)
    saving = seconds[current] - seconds[other]
    detail = (
        f"queue [{mix}]: {current} {seconds[current]:.1f}s vs {other} {seconds[other]:.1f}s expected, "
        f"switch cost {cost:.1f}s"
    )
    if saving <= 0:
        return Decision(current, False, f"{current} is faster; {detail}", seconds)
    if seconds[other] > (1 - config.hysteresis) * seconds[current]:
        return Decision(current, False, f"gain under hysteresis {config.hysteresis:.0%}; {detail}", seconds)
    if saving <= config.cost_factor * cost:
        return Decision(current, False, f"gain {saving:.1f}s does not pay the switch; {detail}", seconds)
    if state.seconds_since_switch < config.min_dwell_s and cost > config.cheap_switch_s:
        return Decision(
            current, False,
            f"min dwell {config.min_dwell_s:.0f}s not reached ({state.seconds_since_switch:.1f}s); {detail}",
            seconds,
        )
    return Decision(other, True, f"switch to {other}, saves {saving:.1f}s; {detail}", seconds)
