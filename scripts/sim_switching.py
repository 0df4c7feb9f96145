#!/usr/bin/env python3
"""Simulate a switch group's policy on a scenario: the real Lane and policy (llamactl/router/sim.py), virtual time.

    .venv/bin/python scripts/sim_switching.py --scenario FILE.json [--json]
        FILE holds "requests", or give --workload phased|mixed|drifting (with --n, --phase, --seed) to make
        them (the file's "gap_s" spaces them); --write OUT.json saves the scenario with its requests.
    .venv/bin/python scripts/sim_switching.py --table docs/sim --out docs/switching-sim.md
        every scenario in the folder under every workload, as Markdown tables, with the targets checked.
    .venv/bin/python scripts/sim_switching.py --table docs/sim --seeds 10 [--seed S]
        no tables: the targets checked over seeds S .. S+9 (one seed's table hides what another shows), every
        cell missed and what the cells come to.
    .venv/bin/python scripts/sim_switching.py --unseen N [--seed S] [--why]
        N random per-process groups (llamactl/router/unseen.py: seeds S..S+N-1) under every workload: auto / best
        fixed and the share of hindsight's gain captured, what finding out costs (one load of every member over the
        best fixed run), the worst cases; exit 1 if any is under 0.98x. With --why, every switch auto made in each
        run under 0.98x: when, after how many requests, and the reason.

Prints total tok/s and switches for auto, each always-<member>, clairvoyant (every request on its fastest
member, every load after the first free: the upper bound) and, with one slot, hindsight (every future request known, switches
at their real cost: the best reachable in arrival order). The format is documented in docs/switching-sim.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llamactl.router.sim import Scenario, ScenarioError, compare, generate, run  # noqa: E402
from llamactl.router.unseen import unseen_scenario  # noqa: E402

WORKLOADS = ("phased", "mixed", "drifting")
TOLERANCE = 0.02  # issue 25: a per-process group's auto stays at least 0.98x the best fixed member
PER_REQUEST_TOLERANCE = 0.01  # ... and a group switched per request in one engine within 1% of it
CAPTURE = 0.90  # per request: on phased and mixed work, auto's share of the clairvoyant's gain at least this


def scenario_from(path: Path, workload: str | None, n: int, phase: int, seed: int) -> Scenario:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ScenarioError(f"{path}: {e}") from None
    if workload is not None or "requests" not in data:
        classes = list(data.get("classes", {}))
        data["requests"] = generate(workload or "phased", classes, n=n, phase=phase,
                                    gap_s=float(data.get("gap_s", 2.0)), seed=seed)
    return Scenario.from_json(data, str(path))


def _share(value: float, fixed: float, bound: float) -> float | None:
    return (value - fixed) / (bound - fixed) if bound - fixed > 1e-9 else None


def per_request(scenario: Scenario) -> bool:
    """Switched per request in one engine (a member `shares` another's): switches cost nothing."""
    return any("shares" in m for m in scenario.members.values())


def verdict(result: dict, workload: str, shared: bool) -> tuple[float, float | None, float | None, str]:
    """(auto / best fixed, share of the clairvoyant's gain captured, share of hindsight's, "met" or "MISSED"),
    on issue 25's targets: per process, auto >= 1 - TOLERANCE times the best fixed member; per request
    (`shared`), within PER_REQUEST_TOLERANCE of it and at least CAPTURE of the clairvoyant's gain on phased and
    mixed work."""
    fixed = max(v["tok_s"] for k, v in result.items() if k.startswith("always-"))
    auto = result["auto"]["tok_s"]
    ratio = auto / fixed
    clairvoyant, hindsight = result["clairvoyant"]["tok_s"], result.get("hindsight", {}).get("tok_s")
    capture = _share(auto, fixed, clairvoyant)
    reachable = _share(auto, fixed, hindsight) if hindsight is not None else None
    if ratio < 1 - (PER_REQUEST_TOLERANCE if shared else TOLERANCE):
        return ratio, capture, reachable, "MISSED"
    if shared and workload in ("phased", "mixed") and capture is not None and capture < CAPTURE:
        return ratio, capture, reachable, "MISSED"
    return ratio, capture, reachable, "met"


def _latencies(result: dict) -> str:
    """Arrival to last token, the mean over requests: what a user waits (queueing, switches, decoding)."""
    fixed = min(v["mean_latency_s"] for k, v in result.items() if k.startswith("always-"))
    return ", ".join(f"{v:.0f}" for v in (result["auto"]["mean_latency_s"], result["auto-restarted"]["mean_latency_s"],
                                          fixed, result["clairvoyant"]["mean_latency_s"]))


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def table(folder: Path, n: int, phase: int, seed: int) -> tuple[str, bool]:
    lines, all_ok = [], True
    for path in sorted(folder.glob("*.json")):
        about = json.loads(path.read_text()).get("about", "")
        lines += [f"### {path.stem}", "", about, "",
                  "| workload | auto tok/s (switches) | fixed members | clairvoyant | hindsight | auto / best fixed | "
                  "gain captured: of clairvoyant's | of hindsight's | targets | restarted: tok/s, / best fixed, "
                  "of hindsight's, targets | mean latency s: auto, restarted, best fixed, clairvoyant |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for workload in WORKLOADS:
            scenario = scenario_from(path, workload, n, phase, seed)
            result = compare(scenario, before=scenario_from(path, workload, n, phase, seed + 1))
            shared = per_request(scenario)
            ratio, capture, reachable, said = verdict(result, workload, shared)
            restarted = verdict({**result, "auto": result["auto-restarted"]}, workload, shared)
            all_ok &= said != "MISSED"
            fixed = ", ".join(f"{k[7:]} {v['tok_s']:.1f}" for k, v in result.items() if k.startswith("always-"))
            hind = result.get("hindsight")
            lines.append(f"| {workload} | {result['auto']['tok_s']:.1f} ({result['auto']['switches']}) | {fixed} | "
                         f"{result['clairvoyant']['tok_s']:.1f} ({result['clairvoyant']['switches']}) | "
                         f"{'-' if hind is None else '%.1f (%d)' % (hind['tok_s'], hind['switches'])} | "
                         f"{ratio:.3f} | {_pct(capture)} | {_pct(reachable)} | {said} | "
                         f"{result['auto-restarted']['tok_s']:.1f}, {restarted[0]:.3f}, {_pct(restarted[2])}: "
                         f"{restarted[3]} | "
                         f"{_latencies(result)} |")
        lines.append("")
    return "\n".join(lines), all_ok


class Cell(NamedTuple):
    """One scenario under one workload at one seed, as the sweep judges it."""

    seed: int
    scenario: str
    workload: str
    per_request: bool
    ratio: float  # auto / best fixed
    capture: float | None  # share of the clairvoyant's gain
    missed: bool


def _sweep_seed(folder: Path, n: int, phase: int, seed: int) -> list[Cell]:
    """Every scenario of `folder` under every workload at one seed."""
    cells = []
    for path in sorted(folder.glob("*.json")):
        for workload in WORKLOADS:
            scenario = scenario_from(path, workload, n, phase, seed)
            shared = per_request(scenario)
            ratio, capture, _, said = verdict(compare(scenario), workload, shared)
            cells.append(Cell(seed, path.stem, workload, shared, ratio, capture, said == "MISSED"))
    return cells


def sweep(folder: Path, n: int, phase: int, seed: int, count: int) -> tuple[str, bool]:
    """The table's verdicts over seeds seed .. seed + count - 1 (one seed's table hides what another seed shows:
    a strong drafter never tried at seed 6), each seed in its own process: every cell missed, then per process
    and per request what the cells come to. No restarted runs (they double the time)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor() as pool:
        cells = [c for seed_cells in pool.map(_sweep_seed, *zip(*[(folder, n, phase, s) for s in
                                                                     range(seed, seed + count)])) for c in seed_cells]
    lines = [f"seed {c.seed:>3} {c.scenario:<32} {c.workload:<8} auto / best fixed {c.ratio:.3f}  of the "
             f"clairvoyant's gain {_pct(c.capture):>5}  MISSED" for c in cells if c.missed]
    process = [c for c in cells if not c.per_request]
    ratios = [c.ratio for c in process]
    mixed = [c.ratio for c in process if c.workload == "mixed"]
    worst = min(process, key=lambda c: (c.ratio, c.seed, c.scenario, c.workload))
    lines += ["", f"seeds {seed}-{seed + count - 1}: {sum(c.missed for c in cells)} of {len(cells)} "
                  f"cells missed. Per process ({len(process)} cells): {sum(r < 1 - TOLERANCE for r in ratios)} under "
                  f"{1 - TOLERANCE:.2f}x the best fixed member, mean {sum(ratios) / len(ratios):.3f} (mixed work "
                  f"{sum(mixed) / len(mixed):.3f}), worst {worst.ratio:.3f} ({worst.scenario} {worst.workload}, "
                  f"seed {worst.seed})."]
    shared = [c for c in cells if c.per_request]
    if shared:
        captures = [c.capture for c in shared if c.capture is not None and c.workload in ("phased", "mixed")]
        lines.append(f"Per request ({len(shared)} cells): auto / best fixed at least {min(c.ratio for c in shared):.3f}"
                     + (f", of the clairvoyant's gain on phased and mixed work at least {min(captures):.0%}."
                        if captures else "."))
    return "\n".join(lines), not any(c.missed for c in cells)


def switches(scenario: Scenario) -> list[str]:
    """Auto's switches on `scenario`, one line each: virtual time, requests served so far, from -> to, the reason."""
    kept: dict = {}
    run(scenario, "auto", keep=kept)
    return [f"    {s['t']:>7.1f}s after {s['served']:>3}: {s['from']} -> {s['to']} ({s['trigger']}): {s['reason']}"
            for s in kept["switches"]]


def finding_out(scenario: Scenario, fixed_tok_s: float) -> float:
    """One load of every member over the best fixed member's makespan: what finding out about every member costs
    at least (the way there and back included), so what no policy that does not know the members' speeds can be
    sure to save (docs/switching-sim.md, "What no policy can promise")."""
    return sum(m["load_s"] for m in scenario.members.values()) / (sum(r["tokens"] for r in scenario.requests)
                                                                   / fixed_tok_s)


def unseen(count: int, seed: int, n: int, phase: int, why: bool = False) -> tuple[str, bool]:
    """Scenarios seed .. seed + count - 1 of llamactl/router/unseen.py under every workload: auto / best fixed and
    the share of hindsight's gain captured, each, then the worst; ok when auto >= 1 - TOLERANCE everywhere.
    Each row also says what finding out costs (`finding_out`) and, where auto is under 1 - TOLERANCE less that
    too, BEYOND; the summary adds auto over a member picked blind (the fixed members' mean makespan).
    `why`: under each run below 1 - TOLERANCE, auto's switches and their reasons."""
    rows, worst, blind, beyond = [], [], [], 0
    for s in range(seed, seed + count):
        for workload in WORKLOADS:
            scenario = unseen_scenario(s, workload, n=n, phase=phase)
            result = compare(scenario)
            fixed_runs = [v["tok_s"] for k, v in result.items() if k.startswith("always-")]
            fixed = max(fixed_runs)
            auto, bound = result["auto"]["tok_s"], result["hindsight"]["tok_s"]
            ratio, reachable = auto / fixed, _share(auto, fixed, bound)
            worst.append((ratio, s, workload))
            blind.append(auto * sum(1 / v for v in fixed_runs) / len(fixed_runs))
            share = finding_out(scenario, fixed)
            under, past = ratio < 1 - TOLERANCE, ratio < 1 - TOLERANCE - share
            beyond += past
            rows.append(f"seed {s:>4} {workload:<8} auto {auto:7.2f} ({result['auto']['switches']:>3} switches)  "
                        f"best fixed {fixed:7.2f}  hindsight {bound:7.2f}  auto / best fixed {ratio:.3f}  "
                        f"of hindsight's gain {_pct(reachable):>5}  finding out {share:5.1%}"
                        + ("  BELOW" if under else "") + ("  BEYOND" if past else ""))
            if why and under:
                rows += switches(scenario)
    worst.sort()
    below = [w for w in worst if w[0] < 1 - TOLERANCE]
    rows += ["", f"{len(worst)} runs ({count} scenarios, seeds {seed}-{seed + count - 1}, x {len(WORKLOADS)} "
                 f"workloads): {len(below)} under {1 - TOLERANCE:.2f}x the best fixed member, {beyond} under it "
                 f"less what finding out costs (BEYOND); auto / best fixed: mean {sum(r for r, _, _ in worst) / len(worst):.3f}; "
                 f"auto / a member picked blind: mean {sum(blind) / len(blind):.3f}, lowest {min(blind):.3f}; "
                 "the worst:"]
    rows += [f"  {r:.3f}  seed {s} {w}" for r, s, w in worst[:5]]
    return "\n".join(rows), not below


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", type=Path)
    ap.add_argument("--table", type=Path, help="a folder of scenarios: write every one under every workload")
    ap.add_argument("--out", type=Path, help="with --table: the Markdown file to write")
    ap.add_argument("--workload", choices=WORKLOADS)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--phase", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--unseen", type=int, metavar="N",
                    help="N random per-process groups (llamactl/router/unseen.py), seeds --seed.., every workload")
    ap.add_argument("--why", action="store_true", help="with --unseen: auto's switches in each run under 0.98x")
    ap.add_argument("--seeds", type=int, metavar="N",
                    help="with --table: no table, the verdicts over seeds --seed .. --seed + N - 1, and what they come to")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--write", type=Path, help="save the scenario with its requests")
    args = ap.parse_args()
    try:
        if args.unseen:
            text, ok = unseen(args.unseen, args.seed, args.n, args.phase, args.why)
            print(text)
            return 0 if ok else 1
        if args.table and args.seeds:
            text, ok = sweep(args.table, args.n, args.phase, args.seed, args.seeds)
            print(text)
            return 0 if ok else 1
        if args.table:
            text, ok = table(args.table, args.n, args.phase, args.seed)
            command = (f".venv/bin/python scripts/sim_switching.py --table {args.table} --out {args.out} "
                       f"--n {args.n} --phase {args.phase} --seed {args.seed}")
            doc = (f"Command: `{command}` (virtual time; {platform.machine()}, Python "
                   f"{platform.python_version()}). Targets (issue 25): per process, auto at least "
                   f"{1 - TOLERANCE:.2f}x the best fixed member on every workload; per request in one engine, "
                   f"within {PER_REQUEST_TOLERANCE:.0%} of it and at least {CAPTURE:.0%} of the clairvoyant's "
                   f"gain on phased and mixed work. "
                   f"'restarted': auto after a restart that kept what it learnt serving the same kind of work the "
                   f"day before (seed {args.seed + 1}), as a daemon does with its learned.json.\n\n"
                   + text)
            if args.out:
                args.out.write_text(doc)
            print(doc)
            return 0 if ok else 1
        if args.scenario is None:
            ap.error("give --scenario FILE or --table FOLDER")
        scenario = scenario_from(args.scenario, args.workload, args.n, args.phase, args.seed)
        if args.write:
            args.write.write_text(json.dumps({"slots": scenario.slots, "fit_together": scenario.fit_together,
                                              "members": scenario.members, "classes": scenario.classes,
                                              "requests": scenario.requests}, indent=1))
        result = compare(scenario)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: {"tok_s": v["tok_s"], "switches": v["switches"]} for k, v in result.items()}))
    else:
        for mode, r in result.items():
            print(f"{mode:<20} {r['tok_s']:>9.2f} tok/s  {r['switches']:>4} switches  {r['requests_per_member']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
