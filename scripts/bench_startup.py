#!/usr/bin/env python3
"""Startup overhead of `llamactl up` over a bare llama-server start, measured side by side.

Both start the same argv (the real llama-server, the real Gemma 3 270M, CPU) and count until
/health answers 200; `llamactl up` is timed as a whole command (Python start, profile load,
GGUF read, plan, capability probe from cache, spawn, wait, state write). Runs alternate so both
see the same machine load. Writes docs/startup-overhead.md.

    .venv/bin/python scripts/bench_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llamactl.engines import preview_argv  # noqa: E402
from llamactl.launch import planned_profile  # noqa: E402
from llamactl.profiles import load_profile  # noqa: E402
from llamactl.settings import Settings  # noqa: E402
from llamactl.supervisor import free_port  # noqa: E402
from llamactl.supervisor.process import stop_group  # noqa: E402


def bare_start(argv: list[str]) -> float:
    port = free_port()
    argv = [str(port) if a == "<port>" else a for a in argv]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with httpx.Client(timeout=2) as client:
            while True:
                try:
                    if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit(f"bare llama-server exited with {proc.returncode}")
                time.sleep(0.02)
    finally:
        stop_group(proc.pid, 10, reap=proc)


def llamactl_up(env: dict[str, str]) -> float:
    cli = [sys.executable, "-m", "llamactl"]
    started = time.perf_counter()
    subprocess.run([*cli, "up", "demo"], env=env, check=True, capture_output=True)
    elapsed = time.perf_counter() - started
    subprocess.run([*cli, "down", "demo"], env=env, check=True, capture_output=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "startup-overhead.md")
    args = parser.parse_args()

    real = Settings()
    home = Path(tempfile.mkdtemp(prefix="llamactl-bench-"))
    env = {**os.environ, "LLAMACTL_HOME": str(home), "LLAMACTL_ENGINES_DIR": str(real.engine_cache_dir)}
    os.environ.update(env)
    settings = Settings()
    profile = planned_profile(load_profile("demo", settings), settings)
    argv = preview_argv(profile, settings)
    llamactl_up(env)  # warm-up: assembles the model, caches the capability probe

    bare, managed = [], []
    for _ in range(args.runs):
        bare.append(bare_start(argv))
        managed.append(llamactl_up(env))
    b, m = statistics.median(bare), statistics.median(managed)
    lines = [
        "# Startup overhead: `llamactl up demo` vs a bare llama-server start",
        "",
        f"Command: `.venv/bin/python scripts/bench_startup.py --runs {args.runs}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, CPU-only "
        "llama-server built from the llama-cpp-python 0.3.36 sdist, Gemma 3 270M Q4_K_M.",
        "",
        "Both start the same argv; time until /health answers 200 (bare) or until `llamactl up` exits",
        "(whole command: Python start-up, profile load, GGUF header, plan, spawn, readiness, state).",
        "Runs alternate so both see the same load.",
        "",
        "| | median s | min s | max s |",
        "|---|---|---|---|",
        f"| bare llama-server | {b:.2f} | {min(bare):.2f} | {max(bare):.2f} |",
        f"| llamactl up | {m:.2f} | {min(managed):.2f} | {max(managed):.2f} |",
        "",
        f"Overhead: {m - b:+.2f} s median ({m / b:.2f}x).",
        "",
    ]
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
