"""Unseen scenarios for the switching simulator: random but plausible per-process groups, seeded, to check the
policy on work unlike the calibrated scenarios (docs/sim/) it was tuned on.

A scenario of seed S is one plain member and one or two drafters, every switch a reload (the members do not fit
together), one slot, loads of 5-45 s, two to four classes. The plain member's speed hardly depends on the
content (+-5% around a base of 8-80 tok/s). A drafter's acceptance on a class is the policy's prior for the
class +-0.3 (code drafts well, creative writing badly, but not always), and its speed-up is the policy's
speed-up model at that acceptance with the gain (or loss) scaled by the drafter's strength (0.6-2.5x: a strong
drafter is several times the n-gram model's gain), +-10%: a drafter helps on some classes and hurts on others,
with near-ties between. Requests arrive faster than the
plain member serves them (a queue builds up, as in the calibrated scenarios), under each of sim.generate's
workloads.
"""

from __future__ import annotations

import random
from typing import Any

from llamactl.router.policy import DEFAULT_PRIOR_ACCEPTANCE, PolicyConfig
from llamactl.router.sim import Scenario, generate

CLASSES = ("code", "chat", "creative", "structured")
WORKLOADS = ("phased", "mixed", "drifting")
TOKENS = 300


def unseen_group(seed: int) -> dict[str, Any]:
    """The members and classes of scenario `seed` (no requests): the scenario format of docs/switching-sim.md."""
    rng = random.Random(seed)
    drafters = [f"d{i + 1}" for i in range(rng.choice((1, 2)))]
    members: dict[str, dict[str, Any]] = {"plain": {"spec": False, "load_s": round(rng.uniform(5, 45), 1)}}
    for d in drafters:
        members[d] = {"spec": True, "load_s": round(rng.uniform(5, 45), 1)}
    classes = list(CLASSES[:rng.choice((2, 3, 4))])
    base = rng.uniform(8, 80)
    table: dict[str, dict[str, Any]] = {}
    strength = {d: rng.uniform(0.6, 2.5) for d in drafters}
    for cls in classes:
        plain = base * rng.uniform(0.95, 1.05)
        speeds: dict[str, Any] = {"plain": round(plain, 2)}
        acceptance: dict[str, float] = {}
        for d in drafters:
            accepted = min(0.95, max(0.02, DEFAULT_PRIOR_ACCEPTANCE[cls] + rng.uniform(-0.3, 0.3)))
            model = PolicyConfig().speedup(accepted)
            speedup = max(0.5, 1 + (model - 1) * strength[d]) * rng.uniform(0.9, 1.1)
            speeds[d] = round(plain * speedup, 2)
            acceptance[d] = round(accepted, 2)
        speeds["acceptance"] = acceptance
        table[cls] = speeds
    service_s = TOKENS / base
    return {"slots": 1, "fit_together": False, "gap_s": round(service_s * rng.uniform(0.3, 0.9), 2),
            "members": members, "classes": table}


def unseen_scenario(seed: int, workload: str, *, n: int = 400, phase: int = 100) -> Scenario:
    """Scenario `seed` under `workload` (phased, mixed or drifting), its requests seeded by `seed` too."""
    group = unseen_group(seed)
    requests = generate(workload, list(group["classes"]), n=n, phase=phase, gap_s=group["gap_s"],
                        tokens=TOKENS, seed=seed)
    return Scenario.from_json({**group, "requests": requests}, f"unseen scenario {seed}")
