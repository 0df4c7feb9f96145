"""Unseen scenarios for the switching simulator: random but plausible per-process groups, seeded, to check the
policy on work unlike the calibrated scenarios (docs/sim/) it was tuned on.

A scenario of seed S is one plain member and one or two drafters, every switch a reload (the members do not fit
together), one slot, loads of 5-45 s, two to four classes. The plain member's speed hardly depends on the
content (+-5% around a base of 8-80 tok/s); a drafter's speed-up per class is drawn from three kinds: a clear
help (1.2-2.6x), a near-tie (0.95-1.06x) or a loss (0.6-0.92x), so a drafter may help on some classes and hurt
on others. The acceptance reported is what the policy's speed-up model would give for that speed-up, with noise
(what the telemetry would measure on a drafter the model fits only roughly). Requests arrive faster than the
plain member serves them (a queue builds up, as in the calibrated scenarios), under each of sim.generate's
workloads.
"""

from __future__ import annotations

import random
from typing import Any

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
    for cls in classes:
        plain = base * rng.uniform(0.95, 1.05)
        speeds: dict[str, Any] = {"plain": round(plain, 2)}
        acceptance: dict[str, float] = {}
        for d in drafters:
            kind = rng.random()
            speedup = (rng.uniform(1.2, 2.6) if kind < 0.4 else rng.uniform(0.95, 1.06) if kind < 0.7
                       else rng.uniform(0.6, 0.92))
            speeds[d] = round(plain * speedup, 2)
            # the policy's default speed-up model, inverted, with noise: what a drafter it fits roughly reports
            acceptance[d] = round(min(0.95, max(0.02, (speedup - 0.71) / 0.84 + rng.uniform(-0.15, 0.15))), 2)
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
