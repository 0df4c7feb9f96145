#!/usr/bin/env python3
"""Start-up cost of the CLI: `llamactl up demo` over a bare llama-server start, and `llamactl --help`, this tree
beside an older one, in one run.

The bare start and `llamactl up` start the same argv (the real llama-server, the real Gemma 3 270M, CPU) and
count until /health answers 200; `llamactl up` is timed as a whole command (Python start, profile load, GGUF
read, plan, capability probe from cache, spawn, wait, state write). `--help` is timed to its exit. Each tree's
commands run with that tree as the working directory and on PYTHONPATH (`python -m` puts the working directory
first: run from this checkout, an older tree's command would import this one). Runs alternate (bare, then each
tree's `up`, then each tree's `--help`) so that all see the same machine load. Besides the wall time, the CPU
seconds of the command's own process (user + system, from wait4: the engine's are not in it).

    .venv/bin/python scripts/bench_startup.py --before REV [--runs 7]
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

from bench_trees import llamactl_file, tree_env, tree_of  # noqa: E402
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
                time.sleep(0.02)  # polling the engine under test, as a client would; not synchronisation
    finally:
        stop_group(proc.pid, 10, reap=proc)


def timed(args: list[str], tree: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command's process) of `python -m llamactl ARGS` run in `tree`."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llamactl", *args], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"`llamactl {' '.join(args)}` in {tree} exited with {proc.returncode}: "
                         f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return wall, usage.ru_utime + usage.ru_stime


def up(tree: Path, env: dict[str, str]) -> tuple[float, float]:
    result = timed(["up", "demo"], tree, env)
    timed(["down", "demo"], tree, env)
    return result


def _over(managed: list[float], bare: list[float]) -> float:
    """The median of each run's difference: load that slows one run slows both of its starts."""
    return statistics.median(u - x for u, x in zip(managed, bare))


def row(name: str, values: list[float]) -> str:
    return f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "startup-overhead.md")
    args = parser.parse_args()

    real = Settings()
    home = Path(tempfile.mkdtemp(prefix="llamactl-bench-"))
    base_env = {"LLAMACTL_HOME": str(home), "LLAMACTL_ENGINES_DIR": str(real.engine_cache_dir)}
    os.environ.update(base_env)
    settings = Settings()
    argv = preview_argv(planned_profile(load_profile("demo", settings), settings), settings)
    trees = {f"before ({args.before})": tree_of(args.before), "this tree": ROOT}
    # Byte-code written and used, as an installed package has it (this machine's shells set
    # PYTHONDONTWRITEBYTECODE, which would make every command compile llamactl from source).
    envs = {name: {k: v for k, v in tree_env(tree, **base_env).items() if k != "PYTHONDONTWRITEBYTECODE"}
            for name, tree in trees.items()}
    for name, tree in trees.items():
        print(f"{name}: llamactl from {llamactl_file(tree)}", flush=True)
        up(tree, envs[name])  # warm-up: assembles the model, caches the capability probe

    bare: list[float] = []
    walls: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    for i in range(args.runs):
        bare.append(bare_start(argv))
        for command in ("up", "--help"):
            for name, tree in (trees.items() if i % 2 == 0 else reversed(trees.items())):
                wall, cpu = up(tree, envs[name]) if command == "up" else timed(["--help"], tree, envs[name])
                walls.setdefault((name, command), []).append(wall)
                cpus.setdefault((name, command), []).append(cpu)
        print(f"run {i + 1}/{args.runs} done", flush=True)

    b = statistics.median(bare)
    lines = [
        "# Start-up cost of the CLI: `llamactl up demo` over a bare llama-server start, and `llamactl --help`",
        "",
        f"Command: `.venv/bin/python scripts/bench_startup.py --before {args.before} --runs {args.runs}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work, Linux {platform.release()}, "
        "CPU-only llama-server built from the llama-cpp-python 0.3.36 sdist, Gemma 3 270M Q4_K_M.",
        "",
        "The bare start and `llamactl up` start the same argv; wall time until /health answers 200 (bare) or until",
        "`llamactl up` exits (the whole command: Python start-up, profile load, GGUF header, plan, spawn, readiness,",
        "state). CPU: user + system seconds of the command's own process (the engine's are not in it). Runs",
        "alternate (bare, each tree's `up`, each tree's `--help`, the trees' order swapped every run) so that all",
        "see the same load. Medians of the runs. Byte-code is written and used (PYTHONDONTWRITEBYTECODE unset for",
        "the commands), as in an installed package.",
        "",
        "| wall s | median | min | max |",
        "|---|---|---|---|",
        row("bare llama-server", bare),
        *(row(f"{name}: `{'llamactl up demo' if command == 'up' else 'llamactl --help'}`", values)
          for (name, command), values in sorted(walls.items(), key=lambda kv: (kv[0][1] != "up", kv[0][0]))),
        "",
        "| CPU s of the command | median | min | max |",
        "|---|---|---|---|",
        *(row(f"{name}: `{'llamactl up demo' if command == 'up' else 'llamactl --help'}`", values)
          for (name, command), values in sorted(cpus.items(), key=lambda kv: (kv[0][1] != "up", kv[0][0]))),
        "",
        *(f"- {name}: `up` over the bare start of the same run: median {_over(walls[(name, 'up')], bare):+.2f} s, "
          f"least {min(u - x for u, x in zip(walls[(name, 'up')], bare)):+.2f} s (medians apart: "
          f"{statistics.median(walls[(name, 'up')]) - b:+.2f} s); `--help` {statistics.median(walls[(name, '--help')]):.2f} s."
          for name in trees),
        "",
    ]
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
