"""GPU probe: NVML through pynvml behind a small Protocol, or a JSON file describing a box.

Indices are NVML indices, which equal CUDA indices when the child runs with
CUDA_DEVICE_ORDER=PCI_BUS_ID (llamactl sets it for every child). "No NVIDIA driver" is a value
(an empty inventory with a note), not a crash; any other NVML failure is a GpuProbeError.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llamactl.errors import LlamactlError
from llamactl.units import MIB


class GpuProbeError(LlamactlError):
    """NVML is present but failed, or a --gpus file is invalid."""

    exit_code = 2


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: int | None
    ours: bool = False


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_mib: int
    free_mib: int
    used_mib: int | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    processes: tuple[GpuProcess, ...] = ()
    utilization_pct: int | None = None
    temperature_c: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["processes"] = [asdict(p) for p in self.processes]
        if data["used_mib"] is None:
            data["used_mib"] = self.total_mib - self.free_mib
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Gpu":
        if not isinstance(data, dict):
            raise GpuProbeError(f"{where}: each GPU must be an object with index, name, total_mib, free_mib")
        missing = [k for k in ("index", "name", "total_mib", "free_mib") if k not in data]
        if missing:
            raise GpuProbeError(f"{where}: missing {', '.join(missing)}",
                                hint="write the file with `llamactl gpus --json > FILE` and edit it")
        processes = data.get("processes") or []
        if not isinstance(processes, list) or not all(isinstance(p, dict) for p in processes):
            raise GpuProbeError(f"{where}: processes must be a list of objects with pid, used_mib")
        procs = tuple(
            GpuProcess(pid=_count(p.get("pid"), f"{where}: processes[{i}].pid"),
                       used_mib=_count(p.get("used_mib"), f"{where}: processes[{i}].used_mib", optional=True),
                       ours=bool(p.get("ours", False)))
            for i, p in enumerate(processes)
        )
        gpu = cls(
            index=_count(data["index"], f"{where}: index"), name=_short_text(data["name"], f"{where}: name"),
            total_mib=_count(data["total_mib"], f"{where}: total_mib"),
            free_mib=_count(data["free_mib"], f"{where}: free_mib"),
            used_mib=_count(data.get("used_mib"), f"{where}: used_mib", optional=True),
            uuid=_short_text(data.get("uuid"), f"{where}: uuid", optional=True),
            pci_bus_id=_short_text(data.get("pci_bus_id"), f"{where}: pci_bus_id", optional=True), processes=procs,
            utilization_pct=_count(data.get("utilization_pct"), f"{where}: utilization_pct", optional=True),
            temperature_c=_count(data.get("temperature_c"), f"{where}: temperature_c", optional=True),
        )
        if gpu.free_mib > gpu.total_mib or gpu.free_mib < 0:
            raise GpuProbeError(f"{where}: free_mib {gpu.free_mib} is outside 0..total_mib {gpu.total_mib}")
        return gpu


MAX_MIB = 1 << 40  # a petabyte per device: anything larger is a typo, not a GPU
MAX_GPU_FILE_BYTES = 1 << 20


def _count(value: Any, where: str, *, optional: bool = False) -> int | None:
    """A whole, non-negative, bounded number from a GPU file: 1e400, 2.5, "8" or true are refused by name."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise GpuProbeError(f"{where}: expected a whole number, got {value!r:.60}")
    if isinstance(value, float) and not value.is_integer():
        raise GpuProbeError(f"{where}: expected a whole number, got {value!r:.60}")
    if not 0 <= value <= MAX_MIB:
        raise GpuProbeError(f"{where}: {value!r:.60} is outside 0..{MAX_MIB}")
    return int(value)


def _short_text(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise GpuProbeError(f"{where}: expected a short string, got {value!r:.60}")
    return value


@dataclass(frozen=True)
class RemoteDevice:
    """A device on an RPC worker (llama.cpp `rpc-server`), as the main llama-server sees it."""

    name: str  # the engine's device name: RPC0, RPC1, ... in `--rpc` order
    description: str  # what the worker's backend calls it ("CPU", "NVIDIA GeForce RTX 3090")
    worker: str  # the worker's name in workers.toml, or its host:port when given inline
    endpoint: str  # host:port
    total_mib: int
    free_mib: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.description} on {self.worker}" + (
            f" ({self.endpoint})" if self.worker != self.endpoint else "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuInventory:
    """The GPUs of one box. `gpus == ()` means no NVIDIA GPU: plan for the CPU."""

    gpus: tuple[Gpu, ...]
    source: str  # "nvml" or the file path
    note: str | None = None  # why there are no GPUs, when there are none
    driver_version: str | None = None
    host_total_mib: int | None = None  # host RAM; None = unknown (a described box without "host")
    host_free_mib: int | None = None
    remote: tuple[RemoteDevice, ...] = ()  # RPC workers' devices (a profile with `rpc`), in engine order

    def by_index(self, index: int) -> Gpu | None:
        for g in self.gpus:
            if g.index == index:
                return g
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [g.to_json() for g in self.gpus]


class GpuProbe(Protocol):
    def probe(self) -> GpuInventory: ...


@dataclass
class FileProbe:
    """A box described by a JSON file: a list of GPUs (what `llamactl gpus --json` prints), or
    an object {"gpus": [...]}. An empty list describes a CPU-only box."""

    path: Path

    def probe(self) -> GpuInventory:
        from llamactl.inputs import parse_json

        try:
            # O_NONBLOCK: a FIFO must not block the open; only a regular file is read, and only so much of it.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise GpuProbeError(f"{self.path}: not a regular file", hint="check --gpus / LLAMACTL_GPUS_FILE")
                raw = f.read(MAX_GPU_FILE_BYTES + 1)
        except OSError as e:
            raise GpuProbeError(f"{self.path}: cannot read GPU file: {e.strerror}",
                                hint="check --gpus / LLAMACTL_GPUS_FILE") from e
        if len(raw) > MAX_GPU_FILE_BYTES:
            raise GpuProbeError(f"{self.path}: larger than {MAX_GPU_FILE_BYTES // 1024} KiB; not a GPU description")
        try:
            data = parse_json(raw, f"{self.path}")
        except ValueError as e:
            raise GpuProbeError(str(e), hint="write it with `llamactl gpus --json > FILE`") from None
        host_total = host_free = None
        if isinstance(data, dict):
            host = data.get("host") or {}
            if not isinstance(host, dict):
                raise GpuProbeError(f"{self.path}: host must be an object with total_mib, free_mib")
            host_total = _count(host.get("total_mib"), f"{self.path}: host.total_mib", optional=True)
            host_free = _count(host.get("free_mib", host_total), f"{self.path}: host.free_mib", optional=True)
            data = data.get("gpus")
        if not isinstance(data, list):
            raise GpuProbeError(f"{self.path}: expected a list of GPUs (or {{\"gpus\": [...]}})")
        gpus = tuple(Gpu.from_json(item, f"{self.path}: GPU #{i}") for i, item in enumerate(data))
        if len({g.index for g in gpus}) != len(gpus):
            raise GpuProbeError(f"{self.path}: two GPUs share an index")
        note = None if gpus else "the GPU file lists no GPU: CPU plan"
        return GpuInventory(gpus=tuple(sorted(gpus, key=lambda g: g.index)), source=str(self.path), note=note,
                            host_total_mib=None if host_total is None else int(host_total),
                            host_free_mib=None if host_free is None else int(host_free))


@dataclass
class NvmlProbe:
    """The real GPUs, through NVML. `our_pids` marks processes llamactl started (besides its own
    descendants, which are always ours)."""

    our_pids: frozenset[int] = field(default_factory=frozenset)

    def probe(self) -> GpuInventory:
        if not _nvml_library_loads():
            return _with_host(GpuInventory(gpus=(), source="nvml",
                                           note="no NVIDIA GPU (NVML Shared Library Not Found): CPU plan"))
        try:
            import pynvml
        except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
            return _with_host(GpuInventory(gpus=(), source="nvml", note="nvidia-ml-py is not installed: CPU plan"))
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            if _is_no_driver(pynvml, e):
                return _with_host(GpuInventory(gpus=(), source="nvml",
                                               note=f"no NVIDIA GPU ({_nvml_text(e)}): CPU plan"))
            raise GpuProbeError(f"NVML failed to initialise: {_nvml_text(e)}",
                                hint="check `nvidia-smi`; or describe the box with --gpus FILE") from e
        try:
            return _with_host(self._probe(pynvml))
        except pynvml.NVMLError as e:
            raise GpuProbeError(f"NVML query failed: {_nvml_text(e)}",
                                hint="check `nvidia-smi`; or describe the box with --gpus FILE") from e
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    def _probe(self, nv: Any) -> GpuInventory:
        ours = set(self.our_pids) | _descendant_pids()
        driver = _text(nv.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            procs = []
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    for p in getattr(nv, getter)(h):
                        used = getattr(p, "usedGpuMemory", None)
                        procs.append(GpuProcess(pid=int(p.pid), used_mib=None if used is None else int(used) // MIB,
                                                ours=int(p.pid) in ours))
                except nv.NVMLError:
                    pass
            gpus.append(Gpu(
                index=i,
                name=_text(nv.nvmlDeviceGetName(h)),
                uuid=_optional(nv, lambda: _text(nv.nvmlDeviceGetUUID(h))),
                pci_bus_id=_optional(nv, lambda: _text(nv.nvmlDeviceGetPciInfo(h).busId)),
                total_mib=int(mem.total) // MIB,
                free_mib=int(mem.free) // MIB,
                used_mib=int(mem.used) // MIB,
                processes=tuple({p.pid: p for p in procs}.values()),
                utilization_pct=_optional(nv, lambda: int(nv.nvmlDeviceGetUtilizationRates(h).gpu)),
                temperature_c=_optional(nv, lambda: int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
            ))
        return GpuInventory(gpus=tuple(gpus), source="nvml", driver_version=driver,
                            note=None if gpus else "NVML reports no GPU: CPU plan")


def probe_gpus(gpus_file: Path | None = None, settings: Any = None, probe: GpuProbe | None = None) -> GpuInventory:
    """The inventory to plan with: an explicit probe, else --gpus FILE, else LLAMACTL_GPUS_FILE
    (settings.gpus_file), else NVML."""
    if probe is not None:
        return probe.probe()
    path = gpus_file or (getattr(settings, "gpus_file", None) if settings is not None else None)
    if path is None and settings is None and os.environ.get("LLAMACTL_GPUS_FILE"):
        path = Path(os.environ["LLAMACTL_GPUS_FILE"])
    if path is not None:
        return FileProbe(Path(path)).probe()
    return NvmlProbe(our_pids=_recorded_server_pids(settings)).probe()


def _recorded_server_pids(settings: Any) -> frozenset[int]:
    """The llama-servers llamactl started and still run (e.g. by a detached `llamactl up`): they are ours
    on the GPUs too, though not this process's descendants."""
    if settings is None or not hasattr(settings, "state_dir"):
        return frozenset()
    from llamactl.supervisor.state import StateStore, process_matches

    store = StateStore(settings.state_dir)
    records = (store.read(name) for name in store.names())
    return frozenset(r.pid for r in records if r is not None and process_matches(r) is not None)


def _with_host(inv: GpuInventory) -> GpuInventory:
    """Add this machine's RAM (the probe describes the machine it runs on)."""
    try:
        import psutil

        vm = psutil.virtual_memory()
    except Exception:  # psutil missing: host RAM stays unknown
        return inv
    from dataclasses import replace

    return replace(inv, host_total_mib=int(vm.total) // MIB, host_free_mib=int(vm.available) // MIB)


def _nvml_library_loads() -> bool:
    """Whether the driver's NVML library loads, as pynvml would load it on Linux: where it does not, importing
    pynvml (a tenth of every `llamactl up` on a box without NVIDIA's driver) would only say so."""
    if not sys.platform.startswith("linux"):
        return True  # pynvml's own search (Windows paths) decides
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def _is_no_driver(nv: Any, e: Exception) -> bool:
    codes = {getattr(nv, n, None) for n in ("NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED",
                                            "NVML_ERROR_NOT_FOUND", "NVML_ERROR_FUNCTION_NOT_FOUND")}
    return getattr(e, "value", None) in codes


def _nvml_text(e: Exception) -> str:
    try:
        return str(e)
    except Exception:  # pynvml's __str__ can itself call into a missing library
        return f"NVML error {getattr(e, 'value', '?')}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(nv: Any, fn: Any) -> Any:
    try:
        return fn()
    except nv.NVMLError:
        return None


def _descendant_pids() -> set[int]:
    try:
        import psutil

        return {p.pid for p in psutil.Process().children(recursive=True)}
    except Exception:  # psutil missing or a race with exiting children: nothing is "ours"
        return set()
