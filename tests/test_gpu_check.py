"""scripts/gpu_check.py's comparison and reporting, on canned engine lines, a canned plan and canned NVML and
nvidia-smi readings: the logic the GPU machine runs, checked without a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from llamactl.plan.actual import parse_memory_breakdown, parse_memory_log
from tests.test_plan_actual import BREAKDOWN, CUDA_TARGET_AND_DRAFT

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
assert _spec is not None and _spec.loader is not None
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc
_spec.loader.exec_module(gc)


def plan_json(*, gpu_index: int = 0, compute_mib: int = 310, overhead_mib: int = 512) -> dict:
    """What `llamactl plan --json` prints for the target + draft of CUDA_TARGET_AND_DRAFT on one GPU."""
    gpu = {"key": f"CUDA{gpu_index}", "name": "NVIDIA H200", "gpu_index": gpu_index, "weights_mib": 7606,
           "kv_mib": 4096, "compute_mib": compute_mib, "output_mib": 0, "overhead_mib": overhead_mib,
           "draft_mib": 1137 + 512 + 262, "draft_weights_mib": 1138, "draft_kv_mib": 512, "draft_compute_mib": 262}
    gpu["total_mib"] = sum(gpu[k] for k in ("weights_mib", "kv_mib", "compute_mib", "output_mib", "overhead_mib",
                                            "draft_mib"))
    cpu = {"key": "CPU", "name": "host", "gpu_index": None, "weights_mib": 533, "kv_mib": 0, "compute_mib": 41,
           "output_mib": 2, "overhead_mib": 0, "draft_mib": 267 + 21, "total_mib": 533 + 41 + 2 + 288}
    return {"fits": True, "gpus": [gpu_index], "devices": [gpu, cpu], "argv": ["llama-server"], "env": {}}


def engine():
    return parse_memory_log(CUDA_TARGET_AND_DRAFT)


def test_engine_buffers_land_on_the_plan_devices_through_the_visible_gpu_order() -> None:
    by_dev = gc.engine_by_device(engine(), gpus=[3])
    assert set(by_dev) == {"CUDA3", "CPU"}  # the engine's CUDA0 is NVML's GPU 3 under CUDA_VISIBLE_DEVICES=3
    assert by_dev["CUDA3"]["model"] == pytest.approx(7605.33)
    assert by_dev["CUDA3"]["draft_kv"] == pytest.approx(512.0)
    assert by_dev["CPU"]["output"] == pytest.approx(1.96)  # CUDA_Host is host memory
    assert by_dev["CPU"]["compute"] == pytest.approx(40.01)
    assert by_dev["CPU"]["draft_model"] == pytest.approx(266.16)


def test_a_plan_a_little_above_the_engine_is_within_the_target() -> None:
    rows = gc.compare_devices(plan_json(), engine(), [], {})
    gpu = rows[0]
    assert gpu["device"] == "CUDA0"
    assert gpu["engine_buffers_mib"] == pytest.approx(7605.33 + 4096 + 296 + 1137.55 + 512 + 260.5, abs=0.01)
    assert gpu["err_mib"] > 0 and gpu["within_target"] and not gpu["underestimate"]
    assert gpu["engine"]["draft"] == pytest.approx(1137.55 + 512 + 260.5)


def test_a_plan_below_the_engine_on_a_device_is_an_underestimate() -> None:
    gpu = gc.compare_devices(plan_json(compute_mib=100), engine(), [], {})[0]
    assert gpu["underestimate"] and not gpu["within_target"]


def test_a_plan_far_above_the_engine_is_outside_the_target() -> None:
    gpu = gc.compare_devices(plan_json(compute_mib=900), engine(), [], {})[0]
    assert not gpu["underestimate"] and not gpu["within_target"]  # +604 MiB: over 2% of 13.9 GiB


@pytest.mark.parametrize("plan_mib, engine_mib, ok", [
    (1063.9, 1000.0, True),    # +63.9 MiB on a small total: within 64 MiB
    (1064.1, 1000.0, False),
    (10199.0, 10000.0, True),  # +1.99%
    (10201.0, 10000.0, False),
    (999.0, 1000.0, False),    # under
])
def test_the_target_is_two_percent_or_64_mib_and_never_under(plan_mib: float, engine_mib: float, ok: bool) -> None:
    assert gc.within_target(plan_mib, engine_mib)[0] is ok


def test_the_context_overhead_is_nvml_process_memory_less_the_engine_buffers() -> None:
    nvml = gc.nvml_by_device(
        before={"CUDA0": {"device_used_mib": 500, "process_mib": None}},
        loaded={"CUDA0": {"device_used_mib": 14500, "process_mib": 14400}},
        after={"CUDA0": {"device_used_mib": 14700, "process_mib": 14600}})
    assert nvml["CUDA0"]["device_delta_loaded_mib"] == 14000
    gpu = gc.compare_devices(plan_json(), engine(), parse_memory_breakdown(BREAKDOWN), nvml)[0]
    assert gpu["nvml_used_mib"] == 14400
    assert gpu["context_overhead_mib"] == pytest.approx(14400 - gpu["engine_buffers_mib"], abs=0.1)
    assert gpu["nvml_within_plan"] is True
    assert gpu["engine_breakdown"]["unaccounted_mib"] == 802
    small_overhead = gc.compare_devices(plan_json(overhead_mib=100), engine(), [], nvml)[0]
    assert small_overhead["nvml_within_plan"] is False


def test_without_per_process_numbers_the_device_delta_stands_in() -> None:
    nvml = gc.nvml_by_device(before={"CUDA0": {"device_used_mib": 600, "process_mib": None}},
                             loaded={"CUDA0": {"device_used_mib": 15000, "process_mib": None}}, after={})
    gpu = gc.compare_devices(plan_json(), engine(), [], nvml)[0]
    assert gpu["nvml_used_mib"] == 14400


SMI = """0, NVIDIA H200, 143771, 143000, 771, 00000000:19:00.0, GPU-1111
"""


def test_nvidia_smi_rows_are_parsed() -> None:
    assert gc.parse_smi_csv(SMI) == [{"index": 0, "name": "NVIDIA H200", "total_mib": 143771, "free_mib": 143000,
                                      "used_mib": 771, "pci_bus_id": "00000000:19:00.0", "uuid": "GPU-1111"}]


def test_llamactl_gpus_matching_nvidia_smi_passes_every_check() -> None:
    ours = [{"index": 0, "name": "NVIDIA H200", "total_mib": 143771, "free_mib": 142990,
             "pci_bus_id": "00000000:19:00.0", "uuid": "GPU-1111"}]
    assert all(c["ok"] for c in gc.compare_gpus(ours, gc.parse_smi_csv(SMI)))


def test_a_wrong_total_or_free_memory_from_llamactl_gpus_fails_its_check() -> None:
    ours = [{"index": 0, "name": "NVIDIA H200", "total_mib": 143000, "free_mib": 140000,
             "pci_bus_id": "00000000:19:00.0", "uuid": "GPU-1111"}]
    failed = {c["check"] for c in gc.compare_gpus(ours, gc.parse_smi_csv(SMI)) if not c["ok"]}
    assert failed == {"GPU 0 total MiB", "GPU 0 free MiB"}
    assert not gc.compare_gpus([], gc.parse_smi_csv(SMI))[0]["ok"]  # a GPU llamactl does not see


def test_the_markdown_report_has_one_row_per_device_and_the_summary() -> None:
    good = {"label": "dense 32768 f16", "engine": {"loaded": True},
            "devices": gc.compare_devices(plan_json(), engine(), [], {})}
    under = {"label": "dense 131072 q8_0", "engine": {"loaded": True},
             "devices": gc.compare_devices(plan_json(compute_mib=100), engine(), [], {})}
    failed = {"label": "moe 32768 f16", "error": "the engine reported no buffers", "engine": {"loaded": False}}
    report = {"meta": {"command": "scripts/gpu_check.sh OUT", "gpu_overhead_mib": 512}, "cases": [good, under, failed],
              "gpus_check": {"checks": [{"check": "GPU count", "ok": True, "detail": "1 vs 1"}]},
              "lifecycle": {"steps": [{"step": "llamactl up", "ok": True, "detail": "ready\nline two", "seconds": 3.0}]}}
    text = gc.render_markdown(report)
    assert text.count("| dense 32768 f16 | ") == 2 and "| dense 32768 f16 | CUDA0 |" in text
    assert "| dense 131072 q8_0 | CUDA0 |" in text and "UNDER" in text
    assert "| moe 32768 f16 | - | the engine reported no buffers" in text
    good["engine_buffers"] = gc.engine_buffers_by_name(engine())
    text = gc.render_markdown(report)
    assert "| dense 32768 f16 | 13907.4 | 62.5 | 798.5 | - | - |" in text  # CUDA0, CUDA_Host, CPU_Mapped, ...
    summary = gc.summarize(report["cases"])
    assert (summary["cases"], summary["cases_loaded"], summary["underestimates"]) == (3, 2, 1)
    assert "- ok: GPU count: 1 vs 1" in text
    assert "- ok: llamactl up (3.0 s): ready / line two" in text
