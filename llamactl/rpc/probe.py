"""Before planning a profile with `rpc`: find its workers, check each speaks our RPC protocol, list their
devices. Any failure is a WorkerError naming the worker; nothing is started."""

from __future__ import annotations

import json
from pathlib import Path

from llamactl.errors import ProfileError
from llamactl.gpus import RemoteDevice
from llamactl.profiles import Profile
from llamactl.rpc.devices import list_remote_devices
from llamactl.rpc.errors import WorkerVersionMismatch
from llamactl.rpc.hello import compatible, worker_version
from llamactl.rpc.workers import Worker, load_workers, resolve_workers
from llamactl.settings import Settings


def profile_workers(profile: Profile, settings: Settings) -> list[Worker]:
    where = f"profile '{profile.name}'" + (f" ({profile.source})" if profile.source else "")
    if profile.rpc and profile.engine != "llama.cpp":
        raise ProfileError(f"{where}, key rpc: RPC workers are planned for engine llama.cpp only "
                           f"(this profile runs {profile.engine}, whose llama-server cannot list remote devices)",
                           hint='set engine = "llama.cpp", or remove rpc')
    return resolve_workers(profile.rpc, load_workers(settings.profile_search_path()), where)


def engine_rpc_protocol(binary: Path) -> str | None:
    """The RPC protocol version llamactl's installer recorded for this build (build.json beside bin/)."""
    try:
        stamp = json.loads((binary.resolve().parent.parent / "build.json").read_text())
    except (OSError, ValueError):
        return None
    version = stamp.get("rpc_protocol") if isinstance(stamp, dict) else None
    return version if isinstance(version, str) else None


def check_versions(workers: list[Worker], binary: Path, timeout_s: float = 5.0) -> dict[str, str]:
    """Each worker's protocol version; WorkerVersionMismatch when one cannot talk to this llama-server."""
    ours = engine_rpc_protocol(binary)
    versions = {}
    for worker in workers:
        theirs = worker_version(worker, timeout_s)
        versions[worker.name] = theirs
        if ours is not None and not compatible(ours, theirs):
            raise WorkerVersionMismatch(
                f"worker {worker.label} speaks RPC protocol {theirs}, but {binary} speaks {ours}: their ggml "
                "differs, and llama-server would abort at the handshake", worker=worker.name,
                hint="build both from the same llama.cpp: `llamactl engines install llama.cpp` on each host "
                     "(the pinned version), then restart `llamactl worker` there")
    return versions


def probe_remote_devices(profile: Profile, settings: Settings, binary: Path) -> tuple[RemoteDevice, ...]:
    """The devices of the profile's workers, in the engine's RPC order; () without `rpc`."""
    workers = profile_workers(profile, settings)
    if not workers:
        return ()
    check_versions(workers, binary)
    return tuple(list_remote_devices(binary, workers))
