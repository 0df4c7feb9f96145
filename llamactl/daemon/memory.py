"""Device memory as the dashboard and `llamactl top` show it: for each GPU and the host's RAM, what our
engines use, what other processes use, and what is free. Sampled by the daemon every `memory_sample_s`
(off the event loop) and published on the event stream as a "memory" event."""

from __future__ import annotations

import logging
from typing import Any

import psutil

from llamactl.errors import LlamactlError
from llamactl.gpus import probe_gpus
from llamactl.settings import Settings

log = logging.getLogger("llamactl.daemon")
MIB = 1024 * 1024


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (0 if it is gone)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def sample_memory(settings: Settings, engine_pids: dict[str, int]) -> dict[str, Any]:
    """One sample: {"devices": [{"name", "kind", "total_mib", "ours_mib", "others_mib", "free_mib",
    "engines": {profile: mib}}], "error": str | None}. Blocking: call it in a thread."""
    devices: list[dict[str, Any]] = []
    error = None
    ours_pids = set(engine_pids.values())
    try:
        inventory = probe_gpus(None, settings)
        for gpu in inventory.gpus:
            ours = sum(p.used_mib or 0 for p in gpu.processes if p.ours or p.pid in ours_pids)
            used = gpu.used_mib if gpu.used_mib is not None else gpu.total_mib - gpu.free_mib
            devices.append({"name": f"CUDA{gpu.index} {gpu.name}", "kind": "gpu", "total_mib": gpu.total_mib,
                            "ours_mib": ours, "others_mib": max(0, used - ours), "free_mib": gpu.free_mib,
                            "engines": {name: next((p.used_mib or 0 for p in gpu.processes if p.pid == pid), 0)
                                        for name, pid in engine_pids.items()}})
    except LlamactlError as e:
        error = e.message
    vm = psutil.virtual_memory()
    per_engine = {name: _tree_rss(pid) // MIB for name, pid in engine_pids.items()}
    ours = sum(per_engine.values())
    total, free = vm.total // MIB, vm.available // MIB
    devices.append({"name": "host RAM", "kind": "host", "total_mib": total, "ours_mib": ours,
                    "others_mib": max(0, total - free - ours), "free_mib": free, "engines": per_engine})
    return {"devices": devices, "error": error}
