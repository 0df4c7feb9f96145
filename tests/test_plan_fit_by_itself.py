"""Issue 10's boxes: the bundled model (the real Gemma 3 270M) with a profile that sets only `gpus`, so
n_gpu_layers is "auto" and ctx_size the model's own. The plan places it by itself, as llama.cpp's --fit
would, and says what that costs; an explicit setting that does not fit shows the change that works first.

The reasoning, from the model's sizes: its 18 layers are small (about 4 MiB of weights each, KV of 32 MiB
for each of the 3 full-attention layers at 32768 tokens, 2.5 MiB for each sliding-window one), but its
output layer is the tied 262144-token embedding, 170 MiB, and llama.cpp puts the output layer on the GPU
first (layer n_layer is the first offloaded). Every GPU keeps a 512 MiB margin and 512 MiB of overhead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.gpus import Gpu, GpuInventory
from llamactl.plan import DEFAULT_MARGIN_MIB, GPU_OVERHEAD_MIB, ModelSpec, Plan, plan_profile
from llamactl.planning import load_spec
from llamactl.profiles import Profile

MIB = 1024 * 1024
RTX_3060 = "NVIDIA GeForce RTX 3060"
HOST_FREE_MIB = 22 * 1024


def box(*free_mib: int) -> GpuInventory:
    return GpuInventory(gpus=tuple(Gpu(index=i, name=RTX_3060, total_mib=12288, free_mib=f)
                                   for i, f in enumerate(free_mib)),
                        source="described", host_total_mib=32768, host_free_mib=HOST_FREE_MIB)


def room_mib(free_mib: int) -> int:
    return free_mib - DEFAULT_MARGIN_MIB - GPU_OVERHEAD_MIB


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> ModelSpec:
    spec = load_spec(gemma_path)
    assert spec.n_layer == 18 and spec.context_length == 32768
    assert 160 * MIB < spec.output_bytes < 180 * MIB  # the tied embedding as output layer
    assert max(spec.layer_bytes) < 5 * MIB
    return spec


def only_gpus(gemma_path: Path, gpus: list[int], **more) -> Profile:
    return Profile(name="bundled", model=str(gemma_path), gpus=gpus, **more)


def fits_with(plan: Plan, gemma: ModelSpec, free: tuple[int, ...], **update) -> bool:
    return plan_profile(plan.profile.model_copy(update=update), gemma, box(*free), suggest=False).fits


def test_one_card_with_1150_mib_free_runs_on_the_cpu_and_says_so(gemma_path, gemma) -> None:
    assert room_mib(1150) * MIB < gemma.output_bytes  # not even the output layer: no layer can go on the card
    plan = plan_profile(only_gpus(gemma_path, [0]), gemma, box(1150))
    assert plan.fits, plan.text()
    assert plan.gpus == [] and plan.n_gpu_layers == 0
    assert plan.launch_overrides()["gpus"] == [] and plan.launch_overrides()["n_gpu_layers"] == 0
    assert plan.ctx.n_ctx == 32768 and plan.ctx_lowered_from is None  # a shorter context would not help
    all_on_gpu = plan_profile(only_gpus(gemma_path, [0], n_gpu_layers="all"), gemma, box(1150), suggest=False)
    short = -(-all_on_gpu.shortfall(all_on_gpu.uses[0]) // MIB)
    assert plan.cost == f"all 18 layers and the output on the CPU: slower; free {short} MiB on CUDA0 for all"
    assert f"placement: {plan.cost}" in plan.text()


def test_one_card_with_1300_mib_free_gets_the_most_layers_that_fit(gemma_path, gemma) -> None:
    assert room_mib(1300) * MIB > gemma.output_bytes  # the output layer and some layers fit
    plan = plan_profile(only_gpus(gemma_path, [0]), gemma, box(1300))
    assert plan.fits, plan.text()
    assert plan.gpus == [0] and 1 < plan.n_gpu_layers < gemma.n_layer + 1
    # The context was unset: lowered toward the floor first (as --fit does), to the largest that keeps these layers.
    assert 4096 <= plan.ctx.n_ctx < 32768 and plan.ctx_lowered_from == 32768 and plan.ctx.n_ctx % 256 == 0
    assert not fits_with(plan, gemma, (1300,), n_gpu_layers=plan.n_gpu_layers + 1, ctx_size=4096)
    assert not fits_with(plan, gemma, (1300,), n_gpu_layers=plan.n_gpu_layers, ctx_size=plan.ctx.n_ctx + 256)
    on_gpu = plan.n_gpu_layers - 1
    assert plan.cost.startswith(f"{on_gpu} of 18 layers and the output on CUDA0, {18 - on_gpu} on the CPU; "
                                f"context {plan.ctx.n_ctx} tokens, not the model's 32768: slower; free ")
    over = plan.launch_overrides()
    assert over["n_gpu_layers"] == plan.n_gpu_layers and over["ctx_size"] == plan.ctx.n_ctx


def test_two_cards_put_the_output_layer_on_the_one_with_room_for_it(gemma_path, gemma) -> None:
    # 1150 MiB free leaves 126 MiB: less than the output layer; 1250 leaves 226 MiB: the output layer and
    # its logits once the context is short enough that the compute buffer shrinks.
    assert room_mib(1150) * MIB < gemma.output_bytes < room_mib(1250) * MIB
    plan = plan_profile(only_gpus(gemma_path, [0, 1]), gemma, box(1250, 1150))
    assert plan.fits, plan.text()
    assert plan.n_gpu_layers == gemma.n_layer + 1  # everything on the GPUs
    assert plan.gpus == [1, 0]  # CUDA0 last: the engine puts the output layer on its last device
    out = next(u for u in plan.uses if gemma.n_layer in u.layers)
    assert out.device.key == "CUDA0"
    assert plan.tensor_split and all(plan.tensor_split)
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "1,0"
    for u in plan.uses[:2]:
        assert u.total + DEFAULT_MARGIN_MIB * MIB <= u.device.free_mib * MIB
    assert 4096 <= plan.ctx.n_ctx < 32768 and "context" in plan.cost and "slower" not in plan.cost


def test_two_nearly_full_cards_run_on_the_cpu(gemma_path, gemma) -> None:
    assert room_mib(180) < 0 and room_mib(120) < 0  # not even the per-GPU overhead fits
    plan = plan_profile(only_gpus(gemma_path, [0, 1]), gemma, box(180, 120))
    assert plan.fits, plan.text()
    assert plan.gpus == [] and [u.device.key for u in plan.uses] == ["CPU"]
    assert plan.uses[0].total < HOST_FREE_MIB * MIB
    assert plan.cost.startswith("all 18 layers and the output on the CPU: slower; free ")


def test_explicit_all_on_nearly_full_cards_is_refused_and_offers_the_cpu_first(gemma_path, gemma) -> None:
    plan = plan_profile(only_gpus(gemma_path, [0, 1], n_gpu_layers="all"), gemma, box(180, 120))
    assert not plan.fits
    first = plan.suggestions[0]
    assert first.fits and first.change == "gpus = [] (the CPU only)"
    assert fits_with(plan, gemma, (180, 120), **first.update)


def test_explicit_all_on_one_card_offers_the_most_layers_first(gemma_path, gemma) -> None:
    profile = only_gpus(gemma_path, [0], n_gpu_layers="all", ctx_size=32768)
    plan = plan_profile(profile, gemma, box(1300))
    assert not plan.fits
    assert all(s.fits for s in plan.suggestions) and plan.suggestions
    replanned = [plan_profile(profile.model_copy(update=s.update), gemma, box(1300), suggest=False)
                 for s in plan.suggestions]
    assert all(p.fits for p in replanned)
    assert [p.work for p in replanned] == sorted((p.work for p in replanned), reverse=True)
    # Not even 4096 tokens of context make room for every layer (the output layer alone is 170 MiB of the
    # 276 MiB the card has): the most layers that fit lead, exact (one more does not fit), the CPU comes last.
    first, last = plan.suggestions[0], plan.suggestions[-1]
    ngl = first.update["n_gpu_layers"]
    assert first.change == f"n_gpu_layers = {ngl} ({19 - ngl} layers on the CPU, slower)"
    assert not fits_with(plan, gemma, (1300,), n_gpu_layers=ngl + 1)
    assert not fits_with(plan, gemma, (1300,), n_gpu_layers="all", ctx_size=4096)
    assert last.change == "gpus = [] (the CPU only)"


def test_up_starts_it_with_a_word_about_the_cost(settings, gemma_path, tmp_path, caplog) -> None:
    from llamactl.launch import planned_profile

    gpus_file = tmp_path / "box.json"
    gpus_file.write_text(json.dumps({"host": {"total_mib": 32768, "free_mib": HOST_FREE_MIB},
                                     "gpus": [g.to_json() for g in box(1300).gpus]}))
    with caplog.at_level(logging.WARNING, logger="llamactl.launch"):
        placed = planned_profile(only_gpus(gemma_path, [0]), settings, gpus_file=gpus_file)
    assert placed.gpus == [0] and isinstance(placed.n_gpu_layers, int) and 0 < placed.n_gpu_layers < 19
    assert 4096 <= placed.ctx_size < 32768
    assert any("layers and the output on CUDA0" in r.getMessage() for r in caplog.records)


def test_plan_command_prints_the_placement(home, write_profile, gemma_path, tmp_path) -> None:
    gpus_file = tmp_path / "box.json"
    gpus_file.write_text(json.dumps({"host": {"total_mib": 32768, "free_mib": HOST_FREE_MIB},
                                     "gpus": [g.to_json() for g in box(1150).gpus]}))
    write_profile("bundled", f'model = "{gemma_path}"\ngpus = [0]\n')
    out = CliRunner().invoke(main, ["plan", "bundled", "--gpus", str(gpus_file)])
    assert out.exit_code == 0, out.output
    assert "placement: all 18 layers and the output on the CPU: slower; free " in out.output
    data = json.loads(CliRunner().invoke(main, ["plan", "bundled", "--gpus", str(gpus_file), "--json"]).output)
    assert data["fits"] and data["placement_cost"].startswith("all 18 layers") and data["overrides"]["gpus"] == []


def test_status_keeps_what_the_placement_gave_up(home, write_profile, gemma_path, tmp_path, monkeypatch) -> None:
    """`llamactl up` on a busy card: the real engine starts on the CPU, and `status` says why, not only `up`."""
    from llamactl.settings import Settings
    from llamactl.supervisor import Supervisor
    from tests.conftest import require_engine

    monkeypatch.setenv("LLAMACTL_LLAMA_SERVER", str(require_engine("llama.cpp")))
    gpus_file = tmp_path / "box.json"
    gpus_file.write_text(json.dumps({"host": {"total_mib": 32768, "free_mib": HOST_FREE_MIB},
                                     "gpus": [g.to_json() for g in box(1150).gpus]}))
    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(gpus_file))
    write_profile("bundled", f'model = "{gemma_path}"\ngpus = [0]\nctx_size = 2048\n')
    try:
        out = CliRunner().invoke(main, ["up", "bundled"])
        assert out.exit_code == 0, out.output
        status = CliRunner().invoke(main, ["status"])
        assert "placement: all 18 layers and the output on the CPU: slower" in status.output, status.output
        rows = json.loads(CliRunner().invoke(main, ["status", "--json"]).output)["servers"]
        assert rows[0]["placement"].startswith("all 18 layers and the output on the CPU")
    finally:
        Supervisor(Settings()).stop("bundled")
