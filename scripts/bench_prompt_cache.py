#!/usr/bin/env python3
"""The prompt cache that outlives its engine, measured on the real engine: a coding-agent trace (a fixed prefix of
about 8k tokens, then turns that grow) through `llamactl serve`, the time to first token of the next turn

  warm     the engine has run all along (llama-server's own prefix reuse),
  unload   after POST /llamactl/profiles/P/unload and a load again (the slot restored from disk),
  switch   after a switch that reloads (the group's other member, same model and KV layout, gets the slot),
  restart  after a restart of `llamactl serve` (its clean stop saved the slot),
  cold     a prefix of the same length the engine has never seen (what each of the three costs without the cache),

all side by side in each run (the runs interleave, so every case sees the same machine load); medians over the
runs. Loads are timed apart from the TTFT (a load includes the restore). Writes docs/prompt-cache.md.

    .venv/bin/python scripts/bench_prompt_cache.py [--runs 5] [--prefix-lines 230]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llamactl.settings import Settings  # noqa: E402

PROFILE = """
model = "builtin:gemma3-270m"
ctx_size = 12288
gpus = []
parallel = 1
load_timeout_s = 300
group = "agent"
[cache]
persist = true
"""
CASES = ("warm", "unload", "switch", "restart", "cold")


def prefix(lines: int, session: int = 0) -> str:
    """A coding agent's fixed prefix: a system prompt and a tool list, as code (about 35 tokens a line). Another
    session differs from its first line on, with the same token count: nothing of it is in any cache."""
    rows = [f"def tool_{i}(args):\n    return run('tool {i}', args, retries={i % 5})  # tool {i} of the agent\n"
            for i in range(lines)]
    return f"# session {session % 10}\n# You are a coding agent. The tools you may call:\n" + "".join(rows)


class Serve:
    """`llamactl serve` as a process; its URL from its log."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "llamactl", "serve", "--port", "0", "--profile",
                                      "agent-plain"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        self.url: str | None = None
        found = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                match = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", line)
                if match and self.url is None:
                    self.url = match.group(1)
                    found.set()
        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120):
            self.proc.kill()
            raise SystemExit("llamactl serve did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(300)


def ttft(url: str, prompt: str) -> tuple[float, dict]:
    """Seconds to the first streamed token, and the request's timings (prompt_n, cache_n)."""
    body = {"model": "agent", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    started, first, timings = time.perf_counter(), None, {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - started
            if '"timings"' in line:
                timings = json.loads(line[6:]).get("timings", timings)
    return first or float("nan"), timings


def post(url: str, path: str, **kw) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}{path}", timeout=600, **kw)
    response.raise_for_status()
    return time.perf_counter() - started


def active(url: str) -> str:
    lanes = httpx.get(f"{url}/llamactl/status", timeout=10).json()["lanes"]
    return next(lane for lane in lanes if lane["lane"] == "agent")["active"]


def one_run(env: dict[str, str], lines: int, run: int, results: dict[str, list], loads: dict[str, list]) -> None:
    base = prefix(lines)
    turns = ""
    serve = Serve(env)
    try:
        url = serve.url
        ttft(url, base + turns)  # the first turn: the prefix prefilled once
        for case in CASES:
            turns += f"\n# turn {run}.{case}: edit tool {len(turns) % 97}\n"
            if case == "unload":
                member = active(url)
                post(url, f"/llamactl/profiles/{member}/unload")
                loads["unload"].append(post(url, f"/llamactl/profiles/{member}/load"))
            elif case == "switch":
                other = "agent-spec" if active(url) == "agent-plain" else "agent-plain"
                loads["switch"].append(post(url, "/llamactl/switch", json={"group": "agent", "member": other}))
            elif case == "restart":
                member = active(url)
                serve.stop()
                serve = Serve(env)
                url = serve.url
                loads["restart"].append(post(url, "/llamactl/switch", json={"group": "agent", "member": member}))
            prompt = prefix(lines, session=run + 1) + turns if case == "cold" else base + turns
            seconds, timings = ttft(url, prompt)
            results[case].append((seconds, timings.get("prompt_n"), timings.get("cache_n")))
            print(f"run {run} {case:<8} ttft {seconds:6.2f} s  prompt_n {timings.get('prompt_n')}  "
                  f"cache_n {timings.get('cache_n')}", flush=True)
    finally:
        serve.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prefix-lines", type=int, default=230, help="about 35 tokens a line")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "prompt-cache.md")
    args = parser.parse_args()

    real = Settings()
    home = Path(tempfile.mkdtemp(prefix="llamactl-bench-"))
    (home / "profiles").mkdir()
    (home / "profiles" / "agent-plain.toml").write_text(PROFILE)
    (home / "profiles" / "agent-spec.toml").write_text(PROFILE + '[speculation]\ntype = "ngram-mod"\n')
    env = {**os.environ, "LLAMACTL_HOME": str(home), "LLAMACTL_ENGINES_DIR": str(real.engine_cache_dir),
           "LLAMACTL_PROFILES_DIRS": str(home / "profiles"), "LLAMACTL_ROUTER_KEEP_BOTH_WARM": "false",
           "LLAMACTL_ETC_PROFILES_DIR": str(home / "no-etc")}
    models = real.models_dir
    if models.exists():  # the bundled model assembled already: no second copy
        (home / "cache").mkdir()
        (home / "cache" / "models").symlink_to(models)
    results: dict[str, list] = {c: [] for c in CASES}
    loads: dict[str, list] = {c: [] for c in ("unload", "switch", "restart")}
    for run in range(args.runs):
        one_run(env, args.prefix_lines, run, results, loads)

    med = {c: statistics.median(s for s, _, _ in results[c]) for c in CASES}
    tokens = statistics.median((p or 0) + (c or 0) for p, c in (r[1:] for r in results["warm"]))
    lines = [
        "# The prompt cache that outlives its engine: time to first token after unload, switch and restart",
        "",
        f"Command: `.venv/bin/python scripts/bench_prompt_cache.py --runs {args.runs} "
        f"--prefix-lines {args.prefix_lines}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs, Linux {platform.release()}, "
        "CPU-only llama-server built from the llama-cpp-python 0.3.36 sdist, Gemma 3 270M Q4_K_M, `parallel = 1`, "
        "`ctx_size = 12288`, `[cache] persist = true` (so `--swa-full`).",
        "",
        f"A coding-agent trace: a fixed prefix of about {tokens:.0f} tokens, then a short new turn each time; the "
        "time to first token (streamed, through `llamactl serve`) of the next turn in each case. `cold` is a prefix "
        "of the same size the engine has never seen: what unload, switch and restart cost without the cache. Loads "
        "(which include the restore) are timed apart. Every run does every case in turn; medians over "
        f"{args.runs} runs.",
        "",
        "| case | median TTFT s | vs warm | cold / this | prompt_n (median) | cache_n (median) | load s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        rows = results[case]
        prompt_n = statistics.median(r[1] or 0 for r in rows)
        cache_n = statistics.median(r[2] or 0 for r in rows)
        load = f"{statistics.median(loads[case]):.2f}" if case in loads else "-"
        lines.append(f"| {case} | {med[case]:.3f} | {med[case] / med['warm']:.2f}x | "
                     f"{med['cold'] / med[case]:.1f}x | {prompt_n:.0f} | {cache_n:.0f} | {load} |")
    lines += ["", "Every sample (TTFT s, prompt_n, cache_n):", ""]
    for case in CASES:
        lines.append(f"- {case}: " + ", ".join(f"{s:.2f} ({p}, {c})" for s, p, c in results[case]))
    lines.append("")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
