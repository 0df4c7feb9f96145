"""GPU probe: file boxes, NVML through a fake pynvml, no driver as a value, errors as GpuProbeError."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.gpus import FileProbe, GpuProbeError, NvmlProbe, probe_gpus
from llamactl.settings import Settings

FAKES = Path(__file__).parent / "fakes"


@pytest.mark.parametrize("box,count", [("gpus_1x24", 1), ("gpus_2x24", 2), ("gpus_4x80", 4),
                                       ("gpus_24_12", 2), ("gpus_cpu", 0)])
def test_described_boxes(box: str, count: int) -> None:
    inv = FileProbe(FAKES / f"{box}.json").probe()
    assert len(inv.gpus) == count
    assert all(0 <= g.free_mib <= g.total_mib for g in inv.gpus)
    assert (inv.note is not None) == (count == 0)


def test_file_with_missing_keys_names_them(tmp_path: Path) -> None:
    f = tmp_path / "g.json"
    f.write_text(json.dumps([{"index": 0, "name": "x", "total_mib": 10}]))
    with pytest.raises(GpuProbeError, match="missing free_mib"):
        FileProbe(f).probe()


def test_file_with_free_above_total_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "g.json"
    f.write_text(json.dumps([{"index": 0, "name": "x", "total_mib": 10, "free_mib": 11}]))
    with pytest.raises(GpuProbeError, match="outside"):
        FileProbe(f).probe()


def test_file_that_is_not_json(tmp_path: Path) -> None:
    f = tmp_path / "g.json"
    f.write_text("{nope")
    with pytest.raises(GpuProbeError, match="not valid JSON"):
        FileProbe(f).probe()


class _NVMLError(Exception):
    def __init__(self, value: int) -> None:
        self.value = value

    def __str__(self) -> str:
        return f"nvml error {self.value}"


def _fake_pynvml(monkeypatch: pytest.MonkeyPatch, init_error: int | None = None, devices=(), fail_count=False):
    mod = types.ModuleType("pynvml")
    mod.NVMLError = _NVMLError
    mod.NVML_ERROR_LIBRARY_NOT_FOUND = 12
    mod.NVML_ERROR_DRIVER_NOT_LOADED = 9
    mod.NVML_ERROR_UNKNOWN = 999
    mod.NVML_TEMPERATURE_GPU = 0
    ns = types.SimpleNamespace

    def init():
        if init_error is not None:
            raise _NVMLError(init_error)

    def count():
        if fail_count:
            raise _NVMLError(999)
        return len(devices)

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: None
    mod.nvmlSystemGetDriverVersion = lambda: b"560.35"
    mod.nvmlDeviceGetCount = count
    mod.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    mod.nvmlDeviceGetName = lambda h: h["name"].encode()
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-{h['name']}"
    mod.nvmlDeviceGetPciInfo = lambda h: ns(busId=h["bus"].encode())
    mod.nvmlDeviceGetMemoryInfo = lambda h: ns(total=h["total"] * 2**20, free=h["free"] * 2**20,
                                               used=(h["total"] - h["free"]) * 2**20)
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [ns(pid=p, usedGpuMemory=512 * 2**20) for p in h["pids"]]
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    mod.nvmlDeviceGetUtilizationRates = lambda h: ns(gpu=7)

    def temp(h, sensor):
        raise _NVMLError(3)  # not supported on this card: the field stays None

    mod.nvmlDeviceGetTemperature = temp
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monkeypatch.setattr("llamactl.gpus._nvml_library_loads", lambda: True)  # the fake stands for a driver


def test_no_driver_is_a_cpu_plan_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pynvml(monkeypatch, init_error=12)
    inv = NvmlProbe().probe()
    assert inv.gpus == () and "no NVIDIA GPU" in (inv.note or "")


def test_real_machine_probe_never_raises_without_a_driver() -> None:
    inv = NvmlProbe().probe()  # the real pynvml: on a machine without a driver this is the CPU value
    assert inv.source == "nvml"
    assert inv.gpus or inv.note


def test_no_nvml_library_is_a_cpu_plan_without_importing_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    def no_library(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    inv = NvmlProbe().probe()
    assert inv.gpus == () and "no NVIDIA GPU" in (inv.note or "") and inv.source == "nvml"
    assert "pynvml" not in sys.modules


def test_other_nvml_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pynvml(monkeypatch, devices=[], fail_count=True)
    with pytest.raises(GpuProbeError, match="NVML query failed"):
        NvmlProbe().probe()
    _fake_pynvml(monkeypatch, init_error=999)
    with pytest.raises(GpuProbeError, match="failed to initialise"):
        NvmlProbe().probe()


def test_nvml_devices_and_our_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [{"name": "RTX A", "bus": "00000000:01:00.0", "total": 24576, "free": 20000, "pids": [111, 222]},
               {"name": "RTX B", "bus": "00000000:02:00.0", "total": 12288, "free": 12000, "pids": []}]
    _fake_pynvml(monkeypatch, devices=devices)
    inv = NvmlProbe(our_pids=frozenset({222})).probe()
    assert [g.name for g in inv.gpus] == ["RTX A", "RTX B"]
    a = inv.gpus[0]
    assert (a.total_mib, a.free_mib, a.used_mib, a.pci_bus_id) == (24576, 20000, 4576, "00000000:01:00.0")
    assert [(p.pid, p.used_mib, p.ours) for p in a.processes] == [(111, 512, False), (222, 512, True)]
    assert a.utilization_pct == 7 and a.temperature_c is None
    assert inv.driver_version == "560.35"


def test_precedence_file_then_settings_then_nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pynvml(monkeypatch, devices=[])
    one = FAKES / "gpus_1x24.json"
    two = FAKES / "gpus_2x24.json"
    settings = Settings(gpus_file=two)
    assert len(probe_gpus(one, settings).gpus) == 1
    assert len(probe_gpus(None, settings).gpus) == 2
    assert probe_gpus(None, Settings(gpus_file=None)).source == "nvml"


def test_gpus_json_round_trips_as_a_gpus_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMACTL_GPUS_FILE", raising=False)
    runner = CliRunner()
    out = runner.invoke(main, ["gpus", "--json", "--gpus", str(FAKES / "gpus_4x80.json")])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [g["index"] for g in data] == [0, 1, 2, 3]
    assert {"index", "name", "total_mib", "free_mib"} <= set(data[0])
    saved = tmp_path / "box.json"
    saved.write_text(out.output)
    again = runner.invoke(main, ["gpus", "--json"], env={"LLAMACTL_GPUS_FILE": str(saved)})
    assert json.loads(again.output) == data
    table = runner.invoke(main, ["gpus"], env={"LLAMACTL_GPUS_FILE": str(saved)})
    assert "H100" in table.output and "4242:21000MiB" in table.output


def test_servers_started_earlier_by_llamactl_are_ours(monkeypatch: pytest.MonkeyPatch, settings, fake_profile) -> None:
    """A server from a detached `llamactl up` is not a descendant of the probing process, but it is ours."""
    from llamactl.profiles import load_profile
    from llamactl.supervisor import Supervisor

    sup = Supervisor(settings)
    record = sup.start(load_profile(fake_profile("held"), settings))
    try:
        devices = [{"name": "RTX A", "bus": "00000000:01:00.0", "total": 24576, "free": 20000,
                    "pids": [record.pid, 1]}]
        _fake_pynvml(monkeypatch, devices=devices)
        monkeypatch.setattr("llamactl.gpus._descendant_pids", lambda: set())  # as from another shell
        inv = probe_gpus(None, settings)
        assert [(p.pid, p.ours) for p in inv.gpus[0].processes] == [(record.pid, True), (1, False)]
    finally:
        sup.stop("held")
