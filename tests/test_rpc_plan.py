"""Planning across RPC workers (pure): remote devices take layers like local GPUs, in the engine's order,
and the launch gets --rpc, -dev and -ts to match; what does not fit is said per device, remote ones too."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

from llamactl.engines.capabilities import Capabilities
from llamactl.engines.common import LaunchInputs
from llamactl.engines.mainline import build_argv
from llamactl.gpus import FileProbe, GpuInventory, RemoteDevice
from llamactl.plan import plan_profile
from llamactl.planning import load_spec
from llamactl.profiles import Profile
from tests.synth_gguf import write_header_only

FAKES = Path(__file__).parent / "fakes"


def box(name: str) -> GpuInventory:
    return FileProbe(FAKES / f"gpus_{name}.json").probe()


def worker_device(name: str, free_mib: int, worker: str = "gpu-box", endpoint: str = "10.0.0.2:50052",
                  total_mib: int | None = None) -> RemoteDevice:
    return RemoteDevice(name=name, description=endpoint, worker=worker, endpoint=endpoint,
                        total_mib=total_mib or free_mib, free_mib=free_mib)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("models")
    return load_spec(write_header_only(d / "70b-q4.gguf", qtype=GGMLQuantizationType.Q4_0))  # about 37 GiB


def cpu_box(free_mib: int = 64 * 1024) -> GpuInventory:
    return GpuInventory(gpus=(), source="test", host_total_mib=free_mib, host_free_mib=free_mib)


def test_a_worker_takes_what_the_local_gpu_cannot(big):
    local = box("1x24")
    alone = plan_profile(Profile(name="big", model="m.gguf", ctx_size=8192), big, local)
    assert alone.n_gpu_layers < big.n_layer + 1  # one 24 GiB card cannot hold a 37 GiB model
    inv = replace(local, remote=(worker_device("RPC0", 24 * 1024),))
    plan = plan_profile(Profile(name="big", model="m.gguf", ctx_size=8192, rpc=["gpu-box"]), big, inv)
    assert plan.fits and plan.n_gpu_layers == big.n_layer + 1
    assert plan.remote_devices == ["RPC0"] and plan.gpus == [0]
    assert plan.devices == ["RPC0", "CUDA0"]
    assert plan.tensor_split is not None and len(plan.tensor_split) == 2 and all(plan.tensor_split)
    assert sum(plan.tensor_split) == big.n_layer + 1
    keys = [u.device.key for u in plan.uses]
    assert keys == ["RPC0", "CUDA0", "CPU"]
    remote = plan.uses[0]
    assert remote.device.remote == "gpu-box (10.0.0.2:50052)" and remote.weights > 0 and remote.kv > 0
    assert big.n_layer in plan.uses[1].layers  # the output layer stays on the local card (the last device)
    over = plan.launch_overrides()
    assert over["rpc"] == ["10.0.0.2:50052"] and over["gpus"] == [0]
    assert over["tensor_split"] == [float(c) for c in plan.tensor_split]


def test_two_workers_keep_rpc_order_and_cpu_only_main_box_offloads(big):
    inv = replace(cpu_box(), remote=(worker_device("RPC0", 24 * 1024),
                                     worker_device("RPC1", 24 * 1024, worker="attic", endpoint="10.0.0.3:50052")))
    plan = plan_profile(Profile(name="big", model="m.gguf", ctx_size=4096, gpus=[], rpc=["gpu-box", "attic"]),
                        big, inv)
    assert plan.fits and plan.devices == ["RPC0", "RPC1"] and plan.gpus == []
    assert plan.n_gpu_layers == big.n_layer + 1
    assert plan.launch_overrides()["rpc"] == ["10.0.0.2:50052", "10.0.0.3:50052"]
    assert "RPC0,RPC1" in plan.text() and "on attic (10.0.0.3:50052)" in plan.text()


def test_what_does_not_fit_is_said_for_the_remote_device(big):
    inv = replace(cpu_box(8 * 1024), remote=(worker_device("RPC0", 4 * 1024),))
    plan = plan_profile(Profile(name="big", model="m.gguf", ctx_size=4096, n_gpu_layers="all", rpc=["gpu-box"]),
                        big, inv)
    assert not plan.fits
    text = plan.text()
    assert "RPC0 on gpu-box (10.0.0.2:50052): short by" in text
    short = plan.shortfall(plan.uses[0])
    assert short > 30 * 1024 * 1024 * 1024  # 37 GiB of layers on a 4 GiB device


def test_launch_argv_has_rpc_before_dev_and_ts_to_match(big, tmp_path):
    inv = replace(box("1x24"), remote=(worker_device("RPC0", 24 * 1024),))
    profile = Profile(name="big", model="m.gguf", ctx_size=8192, rpc=["gpu-box"])
    plan = plan_profile(profile, big, inv)
    placed = profile.model_copy(update=plan.launch_overrides())
    caps = Capabilities(binary=Path("llama-server"), version="test",
                        flags=frozenset({"--rpc", "-dev", "-ts", "-ngl", "-m", "-a", "--host", "--port", "-c",
                                         "-ctk", "-ctv", "-fa"}), help_text="")
    argv = build_argv(placed, caps, LaunchInputs(binary=Path("llama-server"), model_path=Path("m.gguf"), port=1))
    assert argv.index("--rpc") < argv.index("-dev") < argv.index("-ts")
    assert argv[argv.index("--rpc") + 1] == "10.0.0.2:50052"
    assert argv[argv.index("-dev") + 1] == "RPC0,CUDA0"
    assert argv[argv.index("-ts") + 1] == ",".join(str(c) for c in plan.tensor_split)
    assert argv[argv.index("-ngl") + 1] == str(big.n_layer + 1)


def test_a_cpu_only_main_box_with_explicit_layers_splits_cpu_and_worker(big):
    inv = replace(cpu_box(), remote=(worker_device("RPC0", 48 * 1024),))
    plan = plan_profile(Profile(name="big", model="m.gguf", ctx_size=4096, gpus=[], n_gpu_layers=40,
                                rpc=["gpu-box"]), big, inv)
    assert plan.fits and plan.n_gpu_layers == 40 and plan.tensor_split == [40]
    rpc, cpu = plan.uses
    assert len([i for i in rpc.layers if i < big.n_layer]) == 39 and big.n_layer in rpc.layers
    assert len(cpu.layers) == big.n_layer + 1 - 40


def test_rpc_needs_mainline_and_argv_refuses_unresolved_worker_names(settings):
    from llamactl.errors import ProfileError
    from llamactl.rpc.probe import profile_workers

    with pytest.raises(ProfileError, match="key rpc: RPC workers are planned for engine llama.cpp only"):
        profile_workers(Profile(name="big", model="m.gguf", engine="ik_llama.cpp", rpc=["10.0.0.2:50052"]), settings)
    caps = Capabilities(binary=Path("llama-server"), version="test", flags=frozenset({"--rpc", "-dev"}), help_text="")
    with pytest.raises(ProfileError, match="rpc worker 'gpu-box' was not resolved to host:port"):
        build_argv(Profile(name="big", model="m.gguf", rpc=["gpu-box"]), caps,
                   LaunchInputs(binary=Path("llama-server"), model_path=Path("m.gguf"), port=1))


def test_remaining_inventory_takes_the_plan_off_the_worker_too(big):
    inv = replace(cpu_box(), remote=(worker_device("RPC0", 48 * 1024),))
    plan = plan_profile(Profile(name="big", model="m.gguf", ctx_size=4096, gpus=[], rpc=["gpu-box"]), big, inv)
    left = plan.remaining()
    assert left.remote[0].free_mib == 48 * 1024 - plan.device_totals_mib()["RPC0"]
