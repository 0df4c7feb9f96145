"""`llamactl gpus --rpc/--workers`: the workers' devices beside the local GPUs; a worker that does not answer
is listed as such (with why), not an error."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamactl.engines.binaries import find_binary
from llamactl.gpus import RemoteDevice
from llamactl.rpc.devices import list_remote_devices
from llamactl.rpc.errors import WorkerError
from llamactl.rpc.probe import check_versions
from llamactl.rpc.workers import Worker, load_workers, resolve_workers
from llamactl.settings import Settings


@dataclass
class WorkerDevices:
    devices: list[RemoteDevice] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # worker name -> why

    def lines(self) -> list[str]:
        out = ["RPC workers (devices as llama-server names them with these workers in --rpc):"]
        rows = [("device", "worker", "address", "total MiB", "free MiB")]
        rows += [(d.name, d.worker, d.endpoint, str(d.total_mib), str(d.free_mib)) for d in self.devices]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        if self.devices:
            out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        out += [f"  {name}: {why}" for name, why in self.unreachable.items()]
        return out


def worker_devices(settings: Settings, entries: list[str], every_known: bool) -> WorkerDevices:
    known = load_workers(settings.profile_search_path())
    wanted = list(dict.fromkeys([*(known if every_known else []), *entries]))
    workers: list[Worker] = resolve_workers(wanted, known, "llamactl gpus --rpc")
    result = WorkerDevices()
    binary = find_binary("llama.cpp", settings).path
    answering = []
    for worker in workers:
        try:
            check_versions([worker], binary, timeout_s=3.0)
            answering.append(worker)
        except WorkerError as e:
            result.unreachable[worker.name] = e.message
    if answering:
        result.devices = list_remote_devices(binary, answering)
    return result
