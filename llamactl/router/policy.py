"""Which member of a switch group should serve: the plain one or one of its speculative ones (different
drafters, depths, n-gram kinds, MTP). Pure, no I/O.

The router hands `decide()` a snapshot of one group (what is queued, what arrived recently, what each
workload class measured on each member, what a switch costs) and gets back a `Decision`. Everything
the decision depends on is in the snapshot, so a trace of snapshots replays exactly (tests/test_policy.py).

Model of the work: a class c has an expected completion length tokens_c and a decode speed on each
member m, speed(c, m), in tokens/s. The expected time of the demand on a member is
    W(member) = sum_c weight_c * tokens_c / speed(c, member) / parallelism(member)
where parallelism is 1 + (k - 1) * slot_gain for the k = min(slots, requests queued) requests the member serves
at once (a multi-slot plain member can beat a faster one-slot drafter on a deep queue, not on a queue of one),
and weight_c is the demand of class c: every queued request, and when fewer than `horizon` requests are
queued, the rest of the horizon filled in the proportions of the recent arrivals (with a sequential client
the queue is nearly always empty, and the recent mix is the best guess of what comes next; with a queued
burst the queue itself is the truth).
A switch happens when the fastest other member saves more than the cost of switching to it (a drain when
it is loaded, its measured restart time otherwise) times `cost_factor` (twice that for a paid switch away from a
member not measured on all the work queued: where the evidence is thin, stay), AND is at least `hysteresis` faster
on that work, AND the current member has served for `min_dwell_s`. A mixed queue whose classes balance out
never clears the hysteresis band, so it does not flap. Where the switch is a reload and the queue holds at
least `horizon` requests (all real work, nothing guessed), the narrower `run_hysteresis` applies: the
reload's own cost is the barrier there.
A cheap switch (both members loaded: a drain, at most `cheap_switch_s`) needs no amortising: the demand is
the queue alone, with no horizon of guessed future work, and no dwell applies, so the first request of a
new phase already goes to the member that suits it. Hysteresis still applies; for a switch that costs nothing
at all (choices one engine serves per request) only the narrow `free_hysteresis`.

With nothing loaded, the first load goes where the demand is expected fastest, except that where nothing is
measured yet it goes to a drafter (`_first_drafter`: it measures itself and, through its speed against
acceptance, the plain member; plain loaded first teaches nothing of any drafter).
Speeds come from measurements when a class has `min_samples` of them on that member (what a member measured
stays known for a while after it stops serving: the telemetry's memory); a drafter not measured on a class
is taken to be what the other drafters measured on it, scaled by how it compared with them elsewhere;
otherwise the speed comes from the plain speed of the class (measured on the plain member, or derived from a measured speculative one:
a depth choice through its depth's shape, `_undrafted`) and
the class's acceptance rate on the member (measured there, or a prior per class) through a linear
speed-up model speedup(a) = intercept + slope * a.
The run at the head of the queue counts, where the whole queue is one class, the arrivals of that class still
expected in its run (the lane's `Runs`: from the runs seen before; with requests one at a time the queue
never shows a run).
Exploration: a reload to find out is paid only for a member measured on nothing yet, or for a run of a class a
drafter was never explored on (a drafter's figure on one class says little of it on another); when a class is due one (the lane keeps its share of that class's requests at most
`explore_share`) and has a member with fewer than `min_samples` measurements, its next `min_samples`
requests go there, if that member is loaded (a switch is a drain) or its reload costs at most
`explore_share` of the work waiting: evidence for every member, and a reload only where finding out could change the choice (a drafter accepting `explore_acceptance_hope`
more than its estimate, or the plain member `explore_optimism` times faster, would win the work queued), or for the long run: were it as fast as hoped, it would win the long-run mix by
the hysteresis and repay the round trip over `explore_horizon_s`, within the lane's exploration budget, not
waiting for the class's share once the member serving is measured on the whole mix (one
load, not a round trip, where the member serving would be left for a measured one anyway; a
member reloaded so serves a short trial of every class; the budget is `explore_share` of the time served, less
what exploring cost, plus the same share of the work already queued). A member measured on nothing is hoped faster
on every class of the mix, not on the head request's alone (a plain member's speed hardly depends on the content;
a drafter never loaded may beat the priors on every class: hoped so on one class, the one at the head, it could
never win a mix whose head happens to be creative), and a plain member, never measured, as fast as its drafters' own
speed-against-acceptance line says at the model's break-even (`fit_min_spread`): the model's figure for it is
the drafters' figure divided by the model's speed-up, which is far off for a drafter that gains or loses more
steeply than the model. Depths (choices MEMBER@DEPTH of one engine, free to switch between) are climbed instead: a class new to them
measures the middle depth, then the neighbour of the fastest measured (deeper where it accepts most of its
drafts, else shallower) until both sides are slower, outside `explore_share` (`_depth_beside`); an untried depth
is taken as no faster than the slowest tried. Evidence ages out of the telemetry's rolling window, so a changed workload is noticed. The default
model is fitted to llama-server's n-gram speculation on a CPU (reference: 79 vs 63 tok/s at acceptance
0.65, 54 vs 68 tok/s at acceptance 0.10), break-even near acceptance 0.35.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

Role = Literal["spec", "plain"]
GOOD_ACCEPTANCE = 0.5  # at or above it, speculation is taken not to be slower than plain decoding
PAIR: Mapping[str, bool] = {"spec": True, "plain": False}  # a group of two named by role (the tests' shorthand)

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
    run_hysteresis: float = 0.05  # for a run of one class at the queue's head, whose round trip is paid too
    # for a switch that costs nothing at all (choices one engine serves per request: a depth, drafting off): a
    # flap costs nothing either, so only a gain beyond measurement noise is asked for
    free_hysteresis: float = 0.03
    # Samples a depth choice (MEMBER@DEPTH) needs on a class: trying one costs a fraction of a request, and every
    # later request served there adds a sample to its rolling mean, so one directs the climb; a second costs as
    # much as the first where the depth is a poor one (at a low acceptance, a deep draft runs under plain)
    depth_min_samples: int = 1
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
    explore_share: float = 0.1  # at most this share of a class's requests go to an under-measured member
    explore_optimism: float = 1.2  # a reload to find out the plain member is paid if this much faster would pay
    explore_acceptance_hope: float = 0.2  # ... and a drafter's if this much more acceptance would
    explore_memory_s: float = 6 * 3600.0  # a (class, member) explored by a reload is not explored so again sooner
    # A reload to find out may also be paid for the long run (a stationary mix has no runs of one class): when
    # the hoped-for saving on the recent mix over explore_horizon_s of work pays the round trip, within the
    # lane's budget (explore_share of the time it has served, less what exploring reloads cost so far).
    explore_horizon_s: float = 1800.0
    # A member with several slots serves up to that many queued requests at once. Assumed: each request served
    # beside others keeps `slot_gain` of its one-at-a-time speed's worth of aggregate throughput (1.0: decoding
    # is memory-bound and a small batch costs next to nothing per sequence, the simulator's model; lower it for
    # compute-bound engines). Only requests actually queued run together: the horizon's guessed future
    # arrivals come one after another.
    slot_gain: float = 1.0
    # An unmeasured plain member's speed, as hoped when finding out about it: where the speed-up model derives it
    # from a drafter's figures, the figures of different classes disagree about it once the drafter gains or
    # loses more steeply than the model (a strong drafter). Its speed against acceptance, a line over classes
    # this far apart in acceptance at least, read where the model breaks even, says what plain may run.
    # 0.2: a fifth of the acceptance range; narrower, the line's slope is mostly noise (0.1-0.3 gave the same
    # unseen results, seeds 0-19).
    fit_min_spread: float = 0.2
    # A drafted token's share of a verification step, assumed where drafting off is derived from a depth choice
    # before the depth model (`_depth_model`) has the two points that measure it: 0.05, under the 27B card's 0.085
    # (a drafted token costing less makes drafting off come out slower, so the depths are tried, not skipped).
    depth_cost_prior: float = 0.05

    def speedup(self, acceptance: float) -> float:
        return max(0.05, self.speedup_intercept + self.speedup_slope * acceptance)


@dataclass(frozen=True)
class ClassEvidence:
    """What one workload class measured in the rolling window, per member."""

    tok_s: Mapping[str, float] = field(default_factory=dict)  # member -> mean decode tokens/s
    n: Mapping[str, int] = field(default_factory=dict)  # member -> samples behind tok_s
    acceptance: Mapping[str, float] = field(default_factory=dict)  # speculative member -> accepted / drafted
    acceptance_n: Mapping[str, int] = field(default_factory=dict)
    mean_tokens: float | None = None  # mean completion tokens


@dataclass(frozen=True)
class GroupState:
    active: str | None  # the member serving; None: no member loaded
    seconds_since_switch: float
    switch_cost_s: float | Mapping[str, float] | None  # to switch to each member; None: not measured yet
    queued: Mapping[str, int]  # class -> requests waiting
    recent: Mapping[str, float] = field(default_factory=dict)  # class -> arrivals in the recent window
    evidence: Mapping[str, ClassEvidence] = field(default_factory=dict)
    members: Mapping[str, bool] = field(default_factory=lambda: dict(PAIR))  # member -> speculative
    head_class: str | None = None  # the class of the request at the head of the queue
    explore_due: Mapping[str, bool] = field(default_factory=dict)  # class -> below its exploration share
    loaded: frozenset[str] = frozenset()  # members running now (a switch to one is a drain, not a reload)
    head_run: tuple[str, int] | None = None  # (class, n): the n requests of one class the queue serves next
    hopeful: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (class, member) -> tok/s to assume
    explored: frozenset[tuple[str, str]] = frozenset()  # (class, member) explored within explore_memory_s
    explore_budget_s: float = 0.0  # seconds of reloads the lane may still spend exploring
    mix: Mapping[str, float] = field(default_factory=dict)  # class -> arrivals, decayed: the long-run mix
    slots: Mapping[str, int] = field(default_factory=dict)  # member -> requests it serves at once (absent: 1)
    # (class, member) -> requests granted there and not yet done: samples on their way (exploring counts them)
    pending: Mapping[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    target: str
    switch: bool
    reason: str
    seconds: Mapping[str, float]  # expected seconds of the demand on each member
    explore: bool = False


def samples_needed(config: PolicyConfig, member: str) -> int:
    """Samples on a class before `member`'s figure for it counts as measured."""
    return config.depth_min_samples if split_depth(member)[1] is not None else config.min_samples


def _measured(ev: ClassEvidence, member: str, config: PolicyConfig) -> float | None:
    value = ev.tok_s.get(member)
    return value if value and ev.n.get(member, 0) >= samples_needed(config, member) else None


def acceptance_for(cls: str, ev: ClassEvidence, config: PolicyConfig, member: str | None = None) -> float:
    """Acceptance of class `cls` on a speculative member: measured there, else the class's prior."""
    members = [member] if member is not None else list(ev.acceptance)
    for m in members:
        if m in ev.acceptance and ev.acceptance_n.get(m, 0) >= samples_needed(config, m):
            return ev.acceptance[m]
    return config.prior_acceptance.get(cls, config.unknown_class_acceptance)


def _plain_speed(cls: str, evidence: Mapping[str, ClassEvidence], members: Mapping[str, bool],
                 config: PolicyConfig) -> float | None:
    """The class's speed without speculation: measured on the plain member for this class, else for other
    classes (without speculation, decode speed hardly depends on the content), else derived from measured
    speculative members through the speed-up model, taking the lowest such figure over all classes: the model
    is least wrong where acceptance is low, and a strong drafter's speed-up is far above it."""
    plain = [m for m, is_spec in members.items() if not is_spec]
    ev = evidence.get(cls, ClassEvidence())
    for m in plain:
        if (v := _measured(ev, m, config)) is not None:
            return v
    others = [v for other in evidence.values() for m in plain if (v := _measured(other, m, config)) is not None]
    if others:
        return sum(others) / len(others)
    derived = [_undrafted(v, c, e, m, config)
               for c, e in evidence.items() for m, is_spec in members.items()
               if is_spec and (v := _measured(e, m, config)) is not None]
    return min(derived) if derived else None


def _undrafted(tok_s: float, cls: str, ev: ClassEvidence, member: str, config: PolicyConfig) -> float:
    """The speed without drafting that a speculative member's measured speed implies: through the depth model's
    shape for a depth choice with its acceptance measured (tokens a verification yields at that depth, a drafted
    token costing `depth_cost_prior` of a step), else through the speed-up model."""
    depth = split_depth(member)[1]
    measured = member in ev.acceptance and ev.acceptance_n.get(member, 0) >= samples_needed(config, member)
    if depth is not None and measured:
        a = _per_token_acceptance(ev.acceptance[member], depth)
        return tok_s * (1 + config.depth_cost_prior * depth) / _tokens_per_step(a, depth)
    return tok_s / config.speedup(acceptance_for(cls, ev, config, member))


def _base_speed(evidence: Mapping[str, ClassEvidence], members: Mapping[str, bool], config: PolicyConfig) -> float:
    """A plain speed for classes with no measurement at all (mean over the measured ones)."""
    speeds = [v for cls in evidence if (v := _plain_speed(cls, evidence, members, config)) is not None]
    return sum(speeds) / len(speeds) if speeds else config.default_tok_s


def speed(cls: str, member: str, evidence: Mapping[str, ClassEvidence], config: PolicyConfig,
          members: Mapping[str, bool] = PAIR) -> float:
    """Expected decode tokens/s of class `cls` on `member`."""
    ev = evidence.get(cls, ClassEvidence())
    measured = _measured(ev, member, config)
    if measured is not None:
        return measured
    base, depth = split_depth(member)
    siblings = [v for m in members if m != member and split_depth(m)[0] == base and split_depth(m)[1] is not None
                and (v := _measured(ev, m, config)) is not None] if depth is not None else []
    if siblings:
        # A depth not tried on this class where others of its member were: no faster than the slowest of them
        # (how depth compares differs by class, so other classes say little; the climb tries the promising ones)
        return min(siblings)
    if members.get(member, False) and (peer := _peer_speed(cls, member, evidence, members, config)) is not None:
        return peer
    plain = _plain_speed(cls, evidence, members, config)
    if plain is None:
        plain = _base_speed(evidence, members, config)
    if members.get(member, False):
        return plain * config.speedup(acceptance_for(cls, ev, config, member))
    return plain


def _peer_speed(cls: str, member: str, evidence: Mapping[str, ClassEvidence], members: Mapping[str, bool],
                config: PolicyConfig) -> float | None:
    """A drafter not measured on this class yet: what the other speculative members measured on it (their
    mean), times how this one compared with them on the classes where both were measured. Drafters for one
    target land near each other, and one that is slower on one kind of content tends to be slower on the
    rest; the speed-up model is fitted to n-gram drafting on a CPU and underestimates a strong drafter
    several times over."""
    ev = evidence.get(cls, ClassEvidence())
    peers = [m for m, is_spec in members.items()
             if is_spec and m != member and _measured(ev, m, config) is not None]
    if not peers:
        return None
    ratios = []
    for other_cls, other in evidence.items():
        mine = _measured(other, member, config)
        theirs = [v for m in peers if (v := _measured(other, m, config)) is not None]
        if other_cls != cls and mine is not None and theirs:
            ratios.append(mine / (sum(theirs) / len(theirs)))
    base = sum(_measured(ev, m, config) or 0.0 for m in peers) / len(peers)
    return base * (sum(ratios) / len(ratios) if ratios else 1.0)


def switch_cost(state: GroupState, config: PolicyConfig, member: str | None = None) -> float:
    """The cost of switching to `member` (None: the dearest switch in the group)."""
    cost = state.switch_cost_s
    if isinstance(cost, Mapping):
        values = [cost[member]] if member is not None and member in cost else list(cost.values())
        known = [v for v in values if v is not None]
        return max(known) if known else config.default_switch_cost_s
    return cost if cost is not None else config.default_switch_cost_s


def demand(state: GroupState, config: PolicyConfig) -> dict[str, float]:
    """Requests per class to plan for: the queue, topped up to `horizon` with the recent mix (unless every
    switch is cheap: then the queue alone)."""
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


def expected_seconds(state: GroupState, member: str, config: PolicyConfig) -> float:
    return _work_seconds(state, config, demand(state, config), member)


def _work_seconds(state: GroupState, config: PolicyConfig, weights: Mapping[str, float], member: str) -> float:
    """Expected seconds on `member` of `weights` requests per class: one after another, divided by how many of
    them the member's slots serve at once (`parallelism`)."""
    total = 0.0
    for cls, weight in weights.items():
        if weight <= 0:
            continue
        ev = state.evidence.get(cls, ClassEvidence())
        tokens = ev.mean_tokens if ev.mean_tokens else config.default_tokens
        total += weight * tokens / _speed_in(state, cls, member, config)
    return total / parallelism(state, config, member, sum(w for w in weights.values() if w > 0))


def parallelism(state: GroupState, config: PolicyConfig, member: str, requests: float) -> float:
    """How many requests' worth of decoding `member` does at once on `requests` of work: its slots, at most the
    requests really queued (guessed future arrivals do not overlap), each beyond the first adding `slot_gain`."""
    together = min(float(state.slots.get(member, 1)), float(sum(n for n in state.queued.values() if n > 0)),
                   requests)
    return 1.0 + max(0.0, together - 1.0) * config.slot_gain


def _speed_in(state: GroupState, cls: str, member: str, config: PolicyConfig) -> float:
    hopeful = state.hopeful.get((cls, member))
    return hopeful if hopeful is not None else speed(cls, member, state.evidence, config, state.members)


def _exploration(state: GroupState, config: PolicyConfig, seconds: Mapping[str, float]) -> Decision | None:
    """Send the head request's class to a member with too few samples for it, when the class is due one (the
    lane keeps explorations under `explore_share` of its requests). Where the member is loaded that is only
    a drain; a reload is paid only when finding out could change the choice: if the member were
    `explore_optimism` times faster than estimated for this class (a drafter: `explore_acceptance_hope` more
    acceptance), the policy would switch to it for the run of this class at the queue's head."""
    cls = state.head_class
    if cls is None or config.explore_share <= 0 or state.active is None:
        return None
    ev = state.evidence.get(cls, ClassEvidence())
    beside = _depth_beside(state, config, cls, ev)
    if beside is not None:
        name, explore = beside
        if not explore:
            return Decision(name, True, f"{name} is the fastest depth measured on {cls}; {state.active} is not "
                            "measured there", seconds)
        where = "the depth serving" if name == state.active else "the depth beside the fastest measured"
        return Decision(name, name != state.active, f"explore: {cls} has {ev.n.get(name, 0)} samples on "
                        f"{name}, {where}", seconds, explore=True)
    # The class's share of exploring requests (explore_share) gates trying a member on that class, not a reload to
    # find out about a member measured on nothing for the long run, which the lane's budget of reload seconds bounds
    # (waiting for a tenth of the class's requests kept the 27B card on plain for 20-25 requests of mixed work), once
    # the member serving is measured on every class of the mix (left sooner, it is judged on the priors where it was
    # not measured: a drafter left after one code request, at 5.9x, was never tried again).
    due = bool(state.explore_due.get(cls))
    serving_measured = all(_unmeasured(state, config, state.active, c) == 0 for c, n in state.mix.items() if n > 0)
    run = state.head_run[1] if state.head_run is not None and state.head_run[0] == cls else 0
    budget = _explore_budget_s(state, config)
    for member in state.members:
        if ev.n.get(member, 0) + state.pending.get((cls, member), 0) >= samples_needed(config, member):
            continue
        loaded = member == state.active or member in state.loaded
        # A reload to find out for the long run is paid only for a member measured on nothing yet: what a member
        # measured on some classes says how it compares on the others (the plain member's speed hardly depends on
        # the content, and a drafter slower than its peers on one kind of work tends to be slower on the rest:
        # _peer_speed). For the run at the head, only when its next `min_samples` requests are of this class (the
        # samples come in one visit, not one per reload).
        unknown = all(m != member for _, m in state.explored) and all(
            e.n.get(member, 0) < samples_needed(config, member) for e in state.evidence.values())
        if not due and (loaded or not unknown or not serving_measured):
            continue
        if loaded and not state.members.get(member, False) and not unknown:
            continue  # a plain member's speed hardly depends on the content: measured elsewhere is known here
        if loaded and not state.members.get(member, False) and (_slower_class_elsewhere(state, config, cls) or any(
                ev.acceptance_n.get(m, 0) >= samples_needed(config, m) and ev.acceptance.get(m, 0.0) >= GOOD_ACCEPTANCE
                for m, is_spec in state.members.items() if is_spec)):
            # ... so it is found out on the class where drafting gains least (that costs least to try), not where
            # drafting accepts most of its drafts (it is not slower there than decoding without it)
            continue
        if _depth_family_measured(state, config, member, ev):
            continue  # the depths of a member measured on this class are climbed from there (_depth_beside)
        if loaded and not state.members.get(member, False) and _plain_predicted_slower(state, config, ev):
            continue  # the depth model already says what drafting off runs: slower than a depth measured here
        # A drafter measured on other classes, never explored on this one: what it measured there says little of
        # it here (acceptance is the content's: two drafters cross from one class to the next), so a run of this
        # class at the head that would repay the round trip, were it as hoped, is worth finding out for, once
        # per explore_memory_s.
        fresh_here = state.members.get(member, False) and (cls, member) not in state.explored
        for_run = (unknown or fresh_here) and run >= config.min_samples
        # what finding out costs the budget: a round trip, or one load where the member serving is left anyway
        leaving = unknown and _leaving(state, config, member)
        trip = (1 if leaving else 2) * switch_cost(state, config, member)
        for_long_run = unknown and trip <= budget
        for_this_run = due and not loaded and for_run and _worth_finding_out(state, config, cls, member)
        if loaded or for_this_run or (for_long_run and _pays_in_the_long_run(state, config, cls, member)):
            why = "" if loaded or for_this_run else (
                f"; for the long run: hoped {_hopeful_speed(state, config, cls, member):.1f} tok/s on {cls}"
                " and every class, "
                + (f"one {trip:.0f}s load ({state.active} is left anyway)" if leaving else f"a {trip:.0f}s round trip")
                + f" within a budget of {budget:.0f}s")
            return Decision(member, member != state.active,
                            f"explore: {cls} has {ev.n.get(member, 0)} samples on {member}{why}", seconds,
                            explore=True)
    return None


def _leaving(state: GroupState, config: PolicyConfig, explored: str) -> bool:
    """Is another member, measured on every class queued, expected faster than the one serving on the long-run
    mix by the run hysteresis (the policy would leave for it)? Then finding out about `explored` from here costs
    one load (the way back is paid either way)."""
    mix = {c: n for c, n in state.mix.items() if n > 0}
    if not mix or state.active is None or state.active == explored:
        return False
    now = {m: _work_seconds(state, config, mix, m) for m in state.members if m != explored}
    others = [v for m, v in now.items() if m != state.active and _unmeasured(state, config, m) == 0]
    return bool(others) and min(others) < (1 - config.run_hysteresis) * now[state.active]


def _explore_budget_s(state: GroupState, config: PolicyConfig) -> float:
    """The lane's exploration budget (a share of the time served, less what exploring cost), plus the same share
    of the work already waiting (its expected seconds where it is served now): queued work is served whatever
    is chosen, and a share of it may go to finding out as a share of the work served may."""
    queued = {c: float(n) for c, n in state.queued.items() if n > 0}
    waiting = _work_seconds(state, config, queued, state.active) if queued and state.active else 0.0
    return state.explore_budget_s + config.explore_share * waiting


def split_depth(name: str) -> tuple[str, int | None]:
    """A depth choice's name, MEMBER@DEPTH, as (MEMBER, DEPTH); any other name as (name, None)."""
    member, sep, depth = name.rpartition("@")
    if sep and member and depth.isdigit() and not depth.startswith("0"):
        return member, int(depth)
    return name, None


def _depth_beside(state: GroupState, config: PolicyConfig, cls: str,
                  ev: ClassEvidence) -> tuple[str, bool] | None:
    """Depths of the member serving, one engine's free choices: the depth beside the fastest one measured on
    `cls`, where it is not measured yet (a hill climb: speed rises with depth while drafts are accepted and falls
    once the rejected drafting costs more, so the best depth is found without trying every one on every class).
    Costs no switch and at most `min_samples` requests per depth tried; not counted against `explore_share`.
    (choice, True) to explore it; (the fastest measured, False) where the depth serving is not measured on `cls`
    and there is nothing left to try; None: nothing to do here."""
    member, depth = split_depth(state.active or "")
    if depth is None:
        return None
    family = sorted((d, m) for m in state.members if (b := split_depth(m))[0] == member and (d := b[1]) is not None)
    names = [m for _, m in family]
    timed = {m: v for m in names if (v := _measured(ev, m, config)) is not None}
    coming = {m for m in names if m not in timed
              and ev.n.get(m, 0) + state.pending.get((cls, m), 0) >= samples_needed(config, m)}
    if coming:
        return None  # a depth is being measured: wait for its samples
    if not timed:  # a class new to these depths: measure the middle one first (no guess moves it away)
        middle = names[len(names) // 2]
        return (middle, True) if middle == state.active or switch_cost(state, config, middle) <= 0.0 else None
    best_name = max(timed, key=lambda m: timed[m])
    best = names.index(best_name)
    untried = [m for m in names if m not in timed and switch_cost(state, config, m) <= 0.0]
    predicted = _depth_predictions(state, config, ev, member, untried)
    if untried and len(predicted) == len(untried):
        # The depth model (fitted to every depth measured, on every class) tells where the class's speed peaks:
        # try the depth it predicts fastest, unless it predicts every untried one slower than the best measured
        # beyond measurement noise (trying a poor depth costs as much as a poor depth serves).
        hope = max(predicted, key=lambda m: predicted[m])
        if predicted[hope] >= (1 - config.free_hysteresis) * timed[best_name]:
            return hope, True
    else:
        # Deeper first where most drafts are accepted there, else shallower: the way speed is likely to rise.
        deeper = acceptance_for(cls, ev, config, best_name) >= GOOD_ACCEPTANCE
        for i in ((best + 1, best - 1) if deeper else (best - 1, best + 1)):
            if 0 <= i < len(names) and names[i] not in timed and switch_cost(state, config, names[i]) <= 0.0:
                return names[i], True
    if state.active not in timed and switch_cost(state, config, best_name) <= 0.0:
        return best_name, False
    return None


def _per_token_acceptance(rate: float, depth: int) -> float:
    """The chance a drafted token is accepted, given the share of a depth-`depth` draft accepted (accepted /
    drafted): drafts are accepted up to the first miss, so with a chance `a` per token (a - a^(k+1)) / ((1 - a) k)
    of a k-token draft is accepted. Solved by bisection (the share rises with `a`)."""
    low, high = 0.0, 0.9999
    for _ in range(40):
        mid = (low + high) / 2
        if (mid - mid ** (depth + 1)) / ((1 - mid) * depth) < rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _tokens_per_step(a: float, depth: int) -> float:
    """Tokens one verification of a depth-`depth` draft yields: the accepted prefix and the target's own token."""
    return (1 - a ** (depth + 1)) / (1 - a)


def _depth_model(state: GroupState, config: PolicyConfig, member: str) -> tuple[float, float] | None:
    """The speed model of `member`'s depths, fitted to what they measured: a depth-k draft runs
    plain x tokens_per_step / (1 + cost x k), `plain` the engine's speed without drafting and `cost` a drafted
    token's share of a step (the draft's and the verification's growth); both are the engine's, not the
    content's, so every (class, depth) measured, and a plain member measured, is a point of one fit (least
    squares, linear in the two). None: fewer than two points, or a fit that makes no sense."""
    rows = []
    for ev in state.evidence.values():
        for m, is_spec in state.members.items():
            base, depth = split_depth(m)
            v = _measured(ev, m, config)
            if v is None:
                continue
            if not is_spec:
                rows.append((1.0, 0.0, v))  # drafting off: one token a step at the plain speed
            elif base == member and depth is not None and m in ev.acceptance:
                a = _per_token_acceptance(ev.acceptance[m], depth)
                rows.append((_tokens_per_step(a, depth), -depth * v, v))  # v = plain E - cost k v
    if len(rows) < 2:
        return None
    sxx = sum(x * x for x, _, _ in rows)
    sxy = sum(x * y for x, y, _ in rows)
    syy = sum(y * y for _, y, _ in rows)
    det = sxx * syy - sxy * sxy
    if abs(det) < 1e-9 * max(1.0, sxx * syy):
        return None
    bx = sum(x * v for x, _, v in rows)
    by = sum(y * v for _, y, v in rows)
    plain, cost = (bx * syy - by * sxy) / det, (sxx * by - sxy * bx) / det
    return (plain, cost) if plain > 0 and cost >= 0 else None


def _depth_predictions(state: GroupState, config: PolicyConfig, ev: ClassEvidence, member: str,
                       names: list[str]) -> dict[str, float]:
    """The speeds the depth model of `member` predicts on this class for its depth choices `names`, from the
    class's acceptance measured at another of its depths; empty without a model or a measured acceptance."""
    model = _depth_model(state, config, member)
    measured = [(m, d) for m in state.members if (b := split_depth(m))[0] == member and (d := b[1]) is not None
                and m in ev.acceptance and ev.acceptance_n.get(m, 0) >= samples_needed(config, m)]
    if model is None or not measured:
        return {}
    m, d = max(measured, key=lambda md: ev.acceptance_n.get(md[0], 0))
    a = _per_token_acceptance(ev.acceptance[m], d)
    plain, cost = model
    return {name: plain * _tokens_per_step(a, depth) / (1 + cost * depth)
            for name in names if (depth := split_depth(name)[1]) is not None}


def _plain_predicted_slower(state: GroupState, config: PolicyConfig, ev: ClassEvidence) -> bool:
    """Does a depth model (`_depth_model`: its speed without drafting, the engine's, whatever the content) put the
    plain speed beyond measurement noise under a depth measured on this class?"""
    best = max((v for m in state.members if split_depth(m)[1] is not None
                and (v := _measured(ev, m, config)) is not None), default=None)
    if best is None:
        return False
    bases = {base for base, depth in map(split_depth, state.members) if depth is not None}
    return any(model[0] < (1 - config.free_hysteresis) * best
               for base in bases if (model := _depth_model(state, config, base)) is not None)


def _slower_class_elsewhere(state: GroupState, config: PolicyConfig, cls: str) -> bool:
    """Is there a class in the recent mix whose fastest measured speed is below this one's?"""
    def fastest(c: str) -> float | None:
        e = state.evidence.get(c, ClassEvidence())
        values = [v for m in state.members if (v := _measured(e, m, config)) is not None]
        return max(values) if values else None

    here = fastest(cls)
    if here is None:
        return False
    return any(c != cls and (v := fastest(c)) is not None and v < here for c in {*state.mix, *state.recent})


def _depth_family_measured(state: GroupState, config: PolicyConfig, member: str, ev: ClassEvidence) -> bool:
    base, depth = split_depth(member)
    return depth is not None and any(split_depth(m)[0] == base and _measured(ev, m, config) is not None
                                     for m in state.members)


def _worth_finding_out(state: GroupState, config: PolicyConfig, cls: str, member: str) -> bool:
    hopeful_state = replace(state, hopeful={(cls, member): _hopeful_speed(state, config, cls, member)},
                            explore_due={}, seconds_since_switch=float("inf"))
    # Judged on the run of this class at the queue's head only: what the finding would be used for next.
    seconds = {m: expected_seconds(hopeful_state, m, config) for m in state.members}
    decision = _head_run_decision(hopeful_state, config, seconds)
    return decision is not None and decision.switch and decision.target == member


def _pays_in_the_long_run(state: GroupState, config: PolicyConfig, cls: str, member: str) -> bool:
    """Would finding out change the member chosen for the long-run mix? Not the best for it as estimated, but the
    best by the hysteresis margin were it as fast as hoped on every class of the mix (it is measured on nothing:
    `_exploration`), saving more than the round trip over `explore_horizon_s` of that work."""
    mix = {c: n for c, n in state.mix.items() if n > 0}
    if not mix.get(cls):
        return False
    # Hoped on every class: a plain member's speed hardly depends on the content, and a drafter never loaded says
    # nothing of itself on any class (the 27B card's 1.7B drafter runs code 5.9x, far beyond the priors' 1.26x).
    hoping = replace(state, hopeful={(c, member): _hopeful_speed(state, config, c, member) for c in mix})

    now = {m: _work_seconds(state, config, mix, m) for m in state.members}
    best_now = min(v for m, v in now.items() if m != member)
    if now[member] <= (1 - config.run_hysteresis) * best_now:
        return False  # chosen without finding out
    hoped = _work_seconds(hoping, config, mix, member)
    if hoped > (1 - config.run_hysteresis) * best_now:
        return False
    saving = (1 - hoped / best_now) * config.explore_horizon_s
    return saving > config.cost_factor * 2 * switch_cost(state, config, member)


def _hopeful_speed(state: GroupState, config: PolicyConfig, cls: str, member: str) -> float:
    """The speed of `cls` on `member` that would be worth finding out: a drafter accepting
    `explore_acceptance_hope` more than estimated, or beating the drafters measured on the class by
    `explore_optimism`; the plain member `explore_optimism` times faster than estimated."""
    ev = state.evidence.get(cls, ClassEvidence())
    if state.members.get(member, False):  # a drafter's acceptance on this class may beat its estimate
        plain = _plain_speed(cls, state.evidence, state.members, config) or _base_speed(state.evidence, state.members,
                                                                                        config)
        acceptance = min(1.0, acceptance_for(cls, ev, config, member) + config.explore_acceptance_hope)
        hopeful = plain * config.speedup(acceptance)
        peer = _peer_speed(cls, member, state.evidence, state.members, config)
        if peer is not None:  # ... or beat the drafters measured on this class by explore_optimism
            hopeful = max(hopeful, peer * config.explore_optimism)
    else:
        hopeful = speed(cls, member, state.evidence, config, state.members) * config.explore_optimism
        fitted = _plain_from_drafters_fit(state.evidence, state.members, config)
        if fitted is not None and not _plain_measured(state.evidence, state.members, config):
            hopeful = max(hopeful, fitted)
        # Speculation that accepts most of its drafts is not slower than decoding without it: the plain
        # member is no hope for a class a speculative member serves well.
        good = [v for m, v in ev.tok_s.items() if state.members.get(m) and ev.n.get(m, 0) >= samples_needed(config, m)
                and acceptance_for(cls, ev, config, m) >= GOOD_ACCEPTANCE]
        if good:
            hopeful = min(hopeful, max(good))
    return hopeful


def _plain_measured(evidence: Mapping[str, ClassEvidence], members: Mapping[str, bool], config: PolicyConfig) -> bool:
    return any(_measured(ev, m, config) is not None for ev in evidence.values()
               for m, is_spec in members.items() if not is_spec)


def _plain_from_drafters_fit(evidence: Mapping[str, ClassEvidence], members: Mapping[str, bool],
                             config: PolicyConfig) -> float | None:
    """The plain speed a drafter's own figures imply, not the speed-up model's: its speed against its measured
    acceptance over the classes it served (a line, least squares), read at the acceptance where the model says
    drafting neither helps nor hurts. The model fixes where speculation breaks even; how steeply a drafter gains
    or loses about that point is its own (a strong drafter gains and loses several times the model's). The
    highest over the drafters measured on classes at least `fit_min_spread` apart in acceptance; None without."""
    if config.speedup_slope <= 0:
        return None
    even = (1.0 - config.speedup_intercept) / config.speedup_slope
    best = None
    for m, is_spec in members.items():
        if not is_spec:
            continue
        points = [(ev.acceptance[m], v) for ev in evidence.values()
                  if (v := _measured(ev, m, config)) is not None and m in ev.acceptance
                  and ev.acceptance_n.get(m, 0) >= samples_needed(config, m)]
        if len(points) < 2:
            continue
        xs = [a for a, _ in points]
        if max(xs) - min(xs) < config.fit_min_spread:
            continue
        mean_a, mean_v = sum(xs) / len(xs), sum(v for _, v in points) / len(points)
        slope = (sum((a - mean_a) * (v - mean_v) for a, v in points) /
                 sum((a - mean_a) ** 2 for a in xs))
        value = mean_v + slope * (even - mean_a)
        if value > 0:
            best = value if best is None else max(best, value)
    return best


def decide(state: GroupState, config: PolicyConfig = PolicyConfig()) -> Decision:
    members = list(state.members)
    seconds = {m: expected_seconds(state, m, config) for m in members}
    mix = ", ".join(f"{c}={n}" for c, n in sorted(state.queued.items()) if n) or "empty"
    if state.active is None:
        # The first load costs the same whichever member it is: choose for the long run, on the lane's long-run
        # mix (decayed arrivals, the queued ones among them; after a restart, what was learnt before), where it
        # knows more than the last few arrivals.
        what = f"queue [{mix}]"
        if sum(state.mix.values()) > sum(state.recent.values()):
            seconds = {m: _work_seconds(state, config, state.mix, m) for m in members}
            what = "the long-run mix [" + ", ".join(f"{c}={n:.1f}" for c, n in sorted(state.mix.items())) + "]"
        target = min(members, key=lambda m: (seconds[m], _unmeasured(state, config, m), members.index(m)))
        drafter = _first_drafter(state, seconds, target)
        if drafter is not None:
            return Decision(drafter, True, f"nothing loaded, nothing measured: {drafter} first ({what} is "
                            f"expected faster on {target}), to measure its drafts and what decoding without "
                            "them runs", seconds)
        return Decision(target, True, f"nothing loaded; {what} is expected faster on {target}", seconds)
    current = state.active
    if not any(state.queued.values()):
        return Decision(current, False, "queue empty; stay", seconds)
    explore = _exploration(state, config, seconds)
    if explore is not None:
        return explore
    others = [m for m in members if m != current]
    if not others:
        return Decision(current, False, "the only member", seconds)
    by_run = _head_run_decision(state, config, seconds)
    if by_run is not None:
        return by_run
    best = min(others, key=lambda m: (seconds[m] + config.cost_factor * switch_cost(state, config, m),
                                      _unmeasured(state, config, m), members.index(m)))
    return _judge(state, config, seconds, current, best, seconds, f"queue [{mix}]")


def _first_drafter(state: GroupState, seconds: Mapping[str, float], target: str) -> str | None:
    """The drafter to load first in place of a plain `target`, where nothing is measured yet (no restart's
    learning either). The first load costs the same whichever member it is, so it is the one visit that costs
    nothing extra, and the members do not teach alike: a drafter loaded first measures its own speed and
    acceptance on each class it serves, and through its speed against acceptance what the plain member runs
    (`_plain_from_drafters_fit`); the plain member loaded first teaches nothing of any drafter, whose gain is
    what is uncertain (the priors put the 27B card's drafter at 1.26x on code; it runs 5.9x), and finding that
    out later is a round trip that waits for the exploration budget. The priors' verdict on the first
    request's class alone is no reason to give that up: on mixed work it is a coin toss of the first class."""
    if state.members.get(target, False) or any(n > 0 for ev in state.evidence.values() for n in ev.n.values()):
        return None
    drafters = [m for m, is_spec in state.members.items() if is_spec]
    return min(drafters, key=lambda m: (seconds[m], drafters.index(m))) if drafters else None


def _unmeasured(state: GroupState, config: PolicyConfig, member: str, cls: str | None = None) -> int:
    """For ties in expected time: how many of the classes at stake (`cls`, else the queued ones) `member` has
    too few samples on. A figure measured beats one estimated (from peers or priors): exploring is done on
    purpose, within its budget, not by the order of the members' names."""
    classes = [cls] if cls is not None else [c for c, n in state.queued.items() if n > 0]
    return sum(state.evidence.get(c, ClassEvidence()).n.get(member, 0) < samples_needed(config, member)
               for c in classes)


def _judge(state: GroupState, config: PolicyConfig, seconds: Mapping[str, float], current: str, best: str,
           work: Mapping[str, float], what: str, round_trip: bool = False) -> Decision:
    """Switch from `current` to `best` if it saves more than its cost, clears the hysteresis and the dwell.
    `work` is the expected seconds on each member of the work that decides; `round_trip`: pay the way back."""
    cost = switch_cost(state, config, best) + (switch_cost(state, config, current) if round_trip else 0.0)
    saving = work[current] - work[best]
    detail = f"{what}: {current} {work[current]:.1f}s vs {best} {work[best]:.1f}s expected, switch cost {cost:.1f}s"
    if saving <= 0:
        return Decision(current, False, f"{current} is faster; {detail}", seconds)
    # The lower band where the switch's own cost is the barrier to flapping: a round trip paid for a run, or
    # a reload judged on a queue long enough to be all real work (no guessed horizon).
    real_queue = sum(state.queued.values()) >= config.horizon and cost > config.cheap_switch_s
    measured = _unmeasured(state, config, current) == 0 and _unmeasured(state, config, best) == 0
    hysteresis = config.free_hysteresis if cost <= 0.0 and measured else (
        config.run_hysteresis if round_trip or real_queue else config.hysteresis)
    if work[best] > (1 - hysteresis) * work[current]:
        return Decision(current, False, f"gain under hysteresis {hysteresis:.0%}; {detail}", seconds)
    # Where the evidence is thin, stay: a paid switch away from a member not measured on all the work queued (its
    # figures there are its peers' or the priors') must save twice its cost. Left on a short queue its estimate
    # happened to lose, a member reloaded to find out was judged for good on one class.
    thin = cost > config.cheap_switch_s and _unmeasured(state, config, current) > 0
    if saving <= config.cost_factor * cost * (2.0 if thin else 1.0):
        twice = f" twice ({current} is not measured on all of the work queued)" if thin else ""
        return Decision(current, False, f"gain {saving:.1f}s does not pay the switch{twice}; {detail}", seconds)
    if state.seconds_since_switch < config.min_dwell_s and cost > config.cheap_switch_s:
        return Decision(
            current, False,
            f"min dwell {config.min_dwell_s:.0f}s not reached ({state.seconds_since_switch:.1f}s); {detail}",
            seconds,
        )
    return Decision(best, True, f"switch to {best}, saves {saving:.1f}s; {detail}", seconds)


def _head_run_decision(state: GroupState, config: PolicyConfig, seconds: Mapping[str, float]) -> Decision | None:
    """The queue is served in order: a run of one class at its head is served before anything behind it. When
    that run is faster elsewhere by more than the round trip, switch for it (phases of work); when it is
    fastest where it is, stay for it. Otherwise (a short run not worth a round trip) the whole queue decides."""
    if state.head_run is None or state.active is None:
        return None
    cls, n = state.head_run
    run = {m: _work_seconds(state, config, {cls: n}, m) for m in state.members}
    current = state.active
    best = min(run, key=lambda m: (run[m], m != current, _unmeasured(state, config, m, cls),
                                   list(state.members).index(m)))
    if best == current:
        return Decision(current, False, f"the next {n} {cls} requests are fastest on {current}; stay", seconds)
    decision = _judge(state, config, seconds, current, best, run, f"next {n} {cls}", round_trip=True)
    return decision if decision.switch else None
