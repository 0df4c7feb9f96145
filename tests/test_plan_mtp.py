"""The plan counts a model's NextN/MTP layers only when it drafts with them (speculation.type = 'mtp'), and checks
against the pinned mainline's own buffers that it counts them right (weights, the MTP context's KV at the draft
cache types, its compute)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.gpus import Gpu, GpuInventory
from llamactl.plan import plan_profile
from llamactl.plan.estimate import row_bytes
from llamactl.planning import load_spec
from llamactl.profiles import Profile, Speculation
from tests.conftest import require_engine
from tests.mtp_gguf import MTP_BENCH_SHAPE, write_glm4moe_mtp
from tests.test_plan_engine import _bench, _check

MIB = 1 << 20
CPU_BOX = GpuInventory(gpus=(), source="test", host_total_mib=1 << 20, host_free_mib=1 << 20)


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glm4moe_mtp(tmp_path_factory.mktemp("mtp") / "glm4moe-mtp.gguf", **MTP_BENCH_SHAPE)


@pytest.fixture(scope="module")
def trunk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glm4moe_mtp(tmp_path_factory.mktemp("trunk") / "glm4moe.gguf", n_nextn=0, **MTP_BENCH_SHAPE)


def profile(model: Path, engine: str = "llama.cpp", **spec) -> Profile:
    return Profile(name="glm", engine=engine, model=str(model), ctx_size=32768, parallel=1, gpus=[],
                   speculation=Speculation(**spec))


def kv_layer(n_ctx: int, kv_type: str) -> int:
    """One layer of the synthetic model's KV: 1 KV head of 64, K and V."""
    return n_ctx * 2 * row_bytes(kv_type, 64)


def test_the_nextn_layer_weighs_nothing_without_mtp_and_its_weights_and_kv_count_with_it(glm: Path) -> None:
    spec = load_spec(glm)
    assert spec.n_layer == 3 and spec.n_nextn == 1
    off = plan_profile(profile(glm), spec, CPU_BOX).uses[-1]
    assert off.weights == spec.tensor_bytes - spec.layer_bytes[2]  # the engine skips the NextN block's tensors
    assert off.kv == 2 * kv_layer(32768, "f16") and off.draft_kv == off.draft_compute == 0
    on_plan = plan_profile(profile(glm, type="mtp", draft_cache_type_k="q8_0", draft_cache_type_v="q8_0"),
                           spec, CPU_BOX)
    on = on_plan.uses[-1]
    assert on.weights == spec.tensor_bytes
    assert on.kv == off.kv  # mainline's target context caches the trunk only
    assert on.draft_kv == kv_layer(32768, "q8_0")  # the MTP context: the NextN layer, at the draft cache types
    assert on.draft_compute > 0 and on.draft_weights == 0
    text = on_plan.text()
    assert "MTP: the model's 1 NextN layer draft" in text and "KV q8_0/q8_0" in text
    assert on_plan.to_json()["mtp"] == {"n_nextn": 1, "type_k": "q8_0", "type_v": "q8_0"}
    assert "MTP: off; the engine skips the model's 1 NextN layer" in plan_profile(profile(glm), spec, CPU_BOX).text()


def test_ik_caches_the_nextn_layer_in_both_contexts_at_the_targets_cache_types(glm: Path) -> None:
    spec = load_spec(glm)
    p = profile(glm, "ik_llama.cpp", type="mtp", draft_cache_type_k="q4_0").model_copy(
        update={"cache_type_k": "q8_0", "cache_type_v": "q8_0"})
    plan = plan_profile(p, spec, CPU_BOX)
    use = plan.uses[-1]
    assert use.kv == 3 * kv_layer(32768, "q8_0")
    assert use.draft_kv == kv_layer(32768, "q8_0")  # -ctkd does not reach ik's MTP context
    assert any(n.startswith("speculation.draft_cache_type_k: ik_llama.cpp's MTP context takes the target's")
               for n in plan.notes), plan.notes


def test_mtp_on_a_model_without_nextn_layers_is_a_plan_problem_that_says_what_to_do(trunk: Path) -> None:
    plan = plan_profile(profile(trunk, type="mtp"), load_spec(trunk), CPU_BOX)
    assert not plan.fits
    [problem] = plan.problems
    assert "speculation.type = 'mtp'" in problem and "no NextN/MTP layers" in problem
    assert "glm4moe.nextn_predict_layers" in problem and "speculation.type = 'draft'" in problem
    assert "problem: speculation.type = 'mtp'" in plan.text()
    assert [s.change for s in plan.suggestions if s.fits] == ["no MTP (speculation.type = 'none')"]


def test_mtp_on_a_file_that_declares_a_nextn_layer_without_its_head_is_a_plan_problem(tmp_path: Path,
                                                                                        glm: Path) -> None:
    """nextn_predict_layers = 1 and a last block with a decoder layer's tensors, but none of the head's (no
    blk.2.nextn.*): converted trunk-only while the metadata still counts the head (published DeepSeek V4 files
    were so). The pinned mainline aborts on it with MTP on (GGML_ASSERT "MTP block missing nextn.eh_proj") and
    serves it without; so the plan refuses MTP with what to do, and without MTP plans the file as before."""
    headless = write_glm4moe_mtp(tmp_path / "glm4moe-headless.gguf", heads=False, **MTP_BENCH_SHAPE)
    spec = load_spec(headless)
    assert spec.n_nextn == 1 and spec.nextn_head_tensors == 0 and load_spec(glm).nextn_head_tensors == 4
    plan = plan_profile(profile(headless, type="mtp"), spec, CPU_BOX)
    assert not plan.fits
    [problem] = plan.problems
    assert "declares 1 NextN/MTP layer (glm4moe.nextn_predict_layers = 1: block 2)" in problem
    assert "holds no tensor of one (blk.N.nextn.*, mtp.*)" in problem and "speculation.type = 'draft'" in problem
    assert [s.change for s in plan.suggestions if s.fits] == ["no MTP (speculation.type = 'none')"]
    assert plan_profile(profile(headless), spec, CPU_BOX).fits


def test_on_gpus_the_mtp_context_goes_where_the_nextn_and_output_layers_are_and_a_shortfall_is_told(glm) -> None:
    spec = load_spec(glm)
    box = GpuInventory(gpus=(Gpu(index=0, name="card 0", total_mib=2048, free_mib=2000),
                             Gpu(index=1, name="card 1", total_mib=2048, free_mib=2000)), source="test",
                       host_total_mib=1 << 20, host_free_mib=1 << 20)
    p = profile(glm, type="mtp").model_copy(update={"gpus": [0, 1], "tensor_split": [1.0, 3.0],
                                                     "n_gpu_layers": "all"})
    plan = plan_profile(p, spec, box)
    cuda0, cuda1, cpu = plan.uses
    assert 2 in cuda1.layers and 3 in cuda1.layers  # the NextN block and the output
    assert cuda1.draft_kv == kv_layer(32768, "f16") and cuda0.draft_kv == 0
    assert cuda1.draft_compute > 0 and cuda0.draft_compute == 0
    assert cpu.draft_compute > 0  # the host builds the MTP graph's inputs
    # A context too long for the second card: the text's shortfall lines (the first card is not short: the text
    # once read a name only set for a device that is)
    long = plan_profile(p.model_copy(update={"ctx_size": 524288}), spec, box)
    assert [long.shortfall(u) > 0 for u in long.uses] == [False, True, False]
    text = long.text()
    assert "fits: NO" in text and "CUDA1: short by" in text
    assert "CUDA0: short" not in text and "CPU: short" not in text
    no_mtp = next(s for s in long.suggestions if s.change.startswith("no MTP"))
    assert sum(no_mtp.needs_mib.values()) < sum(long.device_totals_mib().values())  # it frees the MTP context


def test_the_automatic_placement_keeps_room_for_the_mtp_context(glm: Path) -> None:
    """One card that holds everything without MTP but not the MTP context beside it: the search keeps the output
    layer (and the context's compute and logits with it) on the CPU instead of planning a card over its memory."""
    spec = load_spec(glm)
    box = GpuInventory(gpus=(Gpu(index=0, name="card", total_mib=4096, free_mib=1700),), source="test",
                       host_total_mib=1 << 20, host_free_mib=1 << 20)
    off = plan_profile(profile(glm).model_copy(update={"gpus": None, "ctx_size": 262144}), spec, box)
    on = plan_profile(profile(glm, type="mtp").model_copy(update={"gpus": None, "ctx_size": 262144}), spec, box)
    assert off.fits and off.n_gpu_layers == spec.n_layer + 1
    assert on.fits and on.n_gpu_layers == spec.n_layer  # every block on the card, the output on the CPU
    cuda0 = on.uses[0]
    assert cuda0.draft_kv > 0 and cuda0.draft_compute > 0  # the NextN block's KV and its share of the graph


@pytest.mark.engine
@pytest.mark.parametrize("ctx,kv,parallel,mtp,draft_kv", [
    (32768, "f16", 1, False, None), (32768, "f16", 1, True, None), (65536, "q8_0", 2, True, "q4_0"),
    (16384, "f16", None, True, None)])
def test_the_plan_matches_mainlines_buffers_with_and_without_mtp(glm: Path, ctx, kv, parallel, mtp, draft_kv):
    binary = require_engine("llama.cpp")
    bench = _bench()
    _check(bench, binary, bench.Case("glm4moe-mtp", glm, ctx, kv, parallel=parallel, mtp=mtp, draft_kv=draft_kv))


def ik_buffers(binary: Path, model: Path, log: Path, *args: str) -> list:
    """Start the pinned ik_llama.cpp on `model` (CPU), read its memory lines once its slots are up, stop it."""
    import socket
    import subprocess

    from llamactl.plan.actual import parse_memory_log
    from tests.router_harness import wait_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(binary), "-m", str(model), "-ngl", "0", "-t", "1", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)
    try:
        wait_for(lambda: "all slots are idle" in log.read_text(errors="replace") or proc.poll() is not None,
                 timeout_s=120, what="ik's slots")
    finally:
        proc.kill()
        proc.wait()
    return parse_memory_log(log.read_text(errors="replace").splitlines())


@pytest.mark.engine
@pytest.mark.parametrize("mtp,kv", [(False, "f16"), (True, "f16"), (True, "q8_0")])
def test_the_plan_matches_iks_buffers_with_and_without_mtp(glm: Path, tmp_path: Path, mtp: bool, kv: str) -> None:
    binary = require_engine("ik_llama.cpp")
    p = profile(glm, "ik_llama.cpp", type="mtp" if mtp else "none").model_copy(
        update={"cache_type_k": kv, "cache_type_v": kv})
    use = plan_profile(p, load_spec(glm), CPU_BOX, suggest=False).uses[-1]
    args = ["-c", "32768", "-np", "1", "-ctk", kv, "-ctv", kv, *(["-mtp"] if mtp else [])]
    contexts = ik_buffers(binary, glm, tmp_path / "ik.log", *args)
    assert len(contexts) == (2 if mtp else 1), contexts
    target = contexts[0]
    assert abs(target.total("model") - use.weights / MIB) < 0.02, (target, use)
    assert abs(target.total("kv") - use.kv / MIB) < 0.02, (target, use)  # ik caches the NextN layer here too
    planned = {"target": (use.weights + use.kv + use.compute) / MIB,
               "mtp": (use.draft_kv + use.draft_compute) / MIB}
    actual = {"target": target.total("model") + target.total("kv") + target.total("compute"),
              "mtp": sum(c.total("kv") + c.total("compute") for c in contexts[1:])}
    if mtp:
        assert abs(contexts[1].total("kv") - use.draft_kv / MIB) < 0.02, (contexts[1], use)
    for role in planned:
        assert planned[role] >= actual[role] - 0.01, f"{role} underestimated: {planned} vs {actual}"
        assert planned[role] - actual[role] <= max(64, 0.03 * actual[role]), f"{role}: {planned} vs {actual}"
