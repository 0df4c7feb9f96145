#!/usr/bin/env python3
"""Resident memory of `llamactl serve` under N concurrent large request bodies, this tree beside an older one.

Each tree's daemon runs as a real process (`python -m llamactl serve`, the real llama-server and Gemma 3 270M
behind it, the bundled `demo` profile preloaded). After one small warm-up request its resident set is the
baseline; the peak (VmHWM, reset through /proc/PID/clear_refs) while N clients each POST one body of
--body-mib to /v1/chat/completions (a one-token chat with the bulk in a field the engine ignores) is the
cost. Reported per body, as a multiple of the body's size, and the answers' statuses (503: past
LLAMACTL_MAX_BODY_BYTES_IN_FLIGHT). The trees run one after the other in the same run, on the same machine.

    .venv/bin/python scripts/bench_bodies.py --before REV [--n 8 --n 16] [--body-mib 15.9]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_trees import llamactl_file, tree_of  # noqa: E402
from llamactl.settings import Settings  # noqa: E402

MIB = 1024 * 1024


def status_kib(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


class Daemon:
    def __init__(self, tree: Path, home: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "LLAMACTL_HOME": str(home), "LLAMACTL_PRELOAD": "demo",
               "LLAMACTL_ENGINES_DIR": str(Settings().engine_cache_dir)}
        self.proc = subprocess.Popen([sys.executable, "-m", "llamactl", "serve", "--port", "0"], env=env, cwd=tree,  # -m puts the working directory first
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(300) or self.url is None:
            self.stop()
            raise SystemExit("the daemon did not start serving in 300 s")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            found = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def chat(url: str, pad: str = "") -> int:
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                       "pad": pad}).encode()
    response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=600,
                          headers={"content-type": "application/json"})
    return response.status_code


def measure(tree: Path, n: int, body_bytes: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="llamactl-bench-home-"))
    daemon = Daemon(tree, home)
    try:
        assert daemon.url is not None
        pid = daemon.proc.pid
        assert chat(daemon.url) == 200, "the warm-up request failed"
        print(f"  {tree}: llamactl from", llamactl_file(tree), flush=True)
        baseline = status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        pad = "x" * (body_bytes - 120)
        with ThreadPoolExecutor(n) as pool:
            statuses = Counter(pool.map(lambda _i: chat(daemon.url, pad), range(n)))
        peak = status_kib(pid, "VmHWM")
    finally:
        daemon.stop()
    cost = (peak - baseline) * 1024
    return {"n": n, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024, "cost_mib": cost / MIB,
            "per_body": cost / (n * body_bytes), "statuses": dict(statuses)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git revision to compare with (e.g. main)")
    parser.add_argument("--n", type=int, action="append", help="concurrent bodies (repeatable; default 8, 16)")
    parser.add_argument("--body-mib", type=float, default=15.9, help="each body's size (default under 16 MiB)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bodies-bench.md")
    args = parser.parse_args()
    counts = args.n or [8, 16]
    body_bytes = int(args.body_mib * MIB)
    trees = {f"before ({args.before})": tree_of(args.before), "this tree": ROOT}
    rows = []
    for n in counts:
        for name, tree in trees.items():
            result = measure(tree, n, body_bytes)
            print(name, result, flush=True)
            rows.append((name, result))
    lines = [
        "# Memory under many large request bodies",
        "",
        f"Command: `.venv/bin/python scripts/bench_bodies.py --before {args.before}"
        + "".join(f" --n {n}" for n in counts) + f" --body-mib {args.body_mib:g}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work, Linux {platform.release()}, "
        "CPU-only llama-server built from the llama-cpp-python 0.3.36 sdist, Gemma 3 270M Q4_K_M, the `demo` "
        "profile (one slot: the bodies queue in its lane), default settings (LLAMACTL_MAX_BODY_BYTES 16 MiB, "
        "LLAMACTL_MAX_BODY_BYTES_IN_FLIGHT 128 MiB where the tree has it).",
        "",
        "The daemon's peak resident set over its resident set before the burst (VmHWM after a reset, minus VmRSS),",
        f"while N clients each send one {args.body_mib:g} MiB chat body at once; per body as a multiple of its size.",
        "",
        "| tree | N | before the burst MiB | peak MiB | cost MiB | per body (x body) | answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        answers = ", ".join(f"{count} x {status}" for status, count in sorted(r["statuses"].items()))
        lines.append(f"| {name} | {r['n']} | {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | {r['cost_mib']:.0f} | "
                     f"{r['per_body']:.2f} | {answers} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
