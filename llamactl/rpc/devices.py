"""The workers' devices as the engine sees them: `llama-server --rpc A,B --list-devices`.

Each line is "  NAME: DESCRIPTION (TOTAL MiB, FREE MiB free)"; an RPC device's description is its
worker's host:port, and names run RPC0, RPC1, ... in `--rpc` order (a worker may export several).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from llamactl.gpus import RemoteDevice
from llamactl.rpc.errors import WorkerUnreachable
from llamactl.rpc.workers import Worker

_DEVICE_LINE = re.compile(r"^\s+(?P<name>\S+): (?P<desc>.*) \((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$")


def parse_list_devices(output: str, workers: list[Worker]) -> list[RemoteDevice]:
    """The RPC devices in `output`, each tied to the worker whose endpoint is its description."""
    by_endpoint = {w.endpoint: w for w in workers}
    devices = []
    for line in output.splitlines():
        m = _DEVICE_LINE.match(line)
        if not m or not m["name"].startswith("RPC"):
            continue
        worker = by_endpoint.get(m["desc"].strip())
        if worker is None:
            continue
        devices.append(RemoteDevice(name=m["name"], description=m["desc"].strip(), worker=worker.name,
                                    endpoint=worker.endpoint, total_mib=int(m["total"]), free_mib=int(m["free"])))
    return devices


def list_remote_devices(binary: Path, workers: list[Worker], timeout_s: float = 30.0) -> list[RemoteDevice]:
    """Ask the engine for the workers' devices. Every worker must show at least one."""
    argv = [str(binary), "--rpc", ",".join(w.endpoint for w in workers), "--list-devices"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise WorkerUnreachable(
            f"`{' '.join(argv)}` did not finish in {timeout_s:g} s: a worker accepted the connection but does not "
            "answer (rpc-server serves one client at a time)", worker=", ".join(w.name for w in workers),
            hint="stop the other llama-server using the worker, or give this profile a worker of its own") from None
    devices = parse_list_devices(done.stdout, workers)
    for worker in workers:
        if not any(d.endpoint == worker.endpoint for d in devices):
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise WorkerUnreachable(
                f"worker {worker.label}: the engine lists no device for it (exit {done.returncode}): {tail}",
                worker=worker.name,
                hint=f"check that {binary} was built with GGML_RPC (`llamactl engines install llama.cpp`) and "
                     "that the worker runs")
    return devices
