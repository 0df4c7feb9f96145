"""The automatic placement and the suggestions, as properties over random models and random boxes:
whatever fits is found, every suggestion that says it fits does, and the layers chosen are the most
that fit. Models are ModelSpecs built directly (dense, sliding-window, MoE, with a draft)."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamactl.gpus import Gpu, GpuInventory
from llamactl.plan import ModelSpec, plan_profile
from llamactl.profiles import Profile, Speculation

MIB = 1024 * 1024
PLAN_DIR = Path(__file__).resolve().parent.parent / "llamactl" / "plan"


@st.composite
def models(draw, kind: str | None = None) -> ModelSpec:
    kind = kind or draw(st.sampled_from(["dense", "swa", "moe"]))
    n = draw(st.integers(min_value=1, max_value=24))
    layer_mib = draw(st.integers(min_value=1, max_value=1500))
    experts = kind == "moe"
    expert_mib = layer_mib * 3 // 4 if experts else 0
    n_embd = draw(st.sampled_from([512, 2048, 4096]))
    n_head_kv = draw(st.sampled_from([1, 2, 8]))
    swa = tuple(kind == "swa" and il % 4 < 3 for il in range(n))
    return ModelSpec(
        name=f"random {kind}", architecture="llama", n_layer=n, n_embd=n_embd,
        n_vocab=draw(st.sampled_from([32000, 152064, 262144])), n_ff=4 * n_embd,
        context_length=draw(st.sampled_from([4096, 32768, 131072])),
        n_head=(32,) * n, n_head_kv=(n_head_kv,) * n, k_len=(128,) * n, v_len=(128,) * n,
        swa=swa, n_swa=1024 if kind == "swa" else 0, mla=False, recurrent=(False,) * n, n_embd_r=0, n_embd_s=0,
        ssm_d_inner=0, layer_bytes=(layer_mib * MIB,) * n, layer_expert_bytes=(expert_mib * MIB,) * n,
        input_bytes=draw(st.integers(min_value=1, max_value=2000)) * MIB,
        output_bytes=draw(st.integers(min_value=1, max_value=2000)) * MIB,
        file_size_bytes=n * layer_mib * MIB, tensor_bytes=n * layer_mib * MIB,
        n_expert=8 if experts else 0, n_expert_used=2 if experts else 0,
    )


@st.composite
def boxes(draw) -> GpuInventory:
    n = draw(st.integers(min_value=0, max_value=8))
    gpus = []
    for i in range(n):
        total = draw(st.sampled_from([8192, 12288, 24576, 81920]))
        gpus.append(Gpu(index=i, name=f"GPU{i}", total_mib=total, free_mib=draw(st.integers(0, total))))
    host = draw(st.integers(min_value=1024, max_value=262144))
    return GpuInventory(gpus=tuple(gpus), source="hypothesis", host_total_mib=host, host_free_mib=host)


@st.composite
def cases(draw) -> tuple[Profile, ModelSpec, ModelSpec | None, GpuInventory]:
    target = draw(models())
    draft = draw(models("dense")) if draw(st.booleans()) else None
    box = draw(boxes())
    fields: dict = {"name": "p", "model": "m.gguf"}
    if draw(st.booleans()):
        fields["ctx_size"] = draw(st.sampled_from([4096, 16384, 65536]))
    if box.gpus and draw(st.booleans()):
        fields["gpus"] = sorted(draw(st.sets(st.sampled_from([g.index for g in box.gpus]), min_size=1)))
    if draft is not None:
        fields["speculation"] = Speculation(type="draft", draft_model="d.gguf")
    return Profile(**fields), target, draft, box


def _replanned(profile: Profile, update: dict, target: ModelSpec, draft: ModelSpec | None, box: GpuInventory):
    if "speculation" in update:
        update = {**update, "speculation": Speculation(**update["speculation"])}
    changed = profile.model_copy(update=update)
    return plan_profile(changed, target, box, draft if changed.speculation.uses_draft_model else None, suggest=False)


def _is_hardware(change: str) -> bool:
    return change.startswith("one more GPU") or change.endswith("more free host RAM")


def _some_placement_fits(profile: Profile, target: ModelSpec, draft: ModelSpec | None, box: GpuInventory) -> bool:
    """Brute force over the space the planner searches: every layer count, experts all on the GPUs or all
    on the CPU, the draft's layers all on the GPUs or all on the CPU, at the context the profile asks for
    (the model's own when unset)."""
    d_options = [None] if draft is None else ["all", 0]
    moe_options = [[], ["--n-cpu-moe", str(target.n_layer)]] if any(target.layer_expert_bytes) else [[]]
    for ngl in range(target.n_layer + 2):
        for moe in moe_options:
            for dngl in d_options:
                update: dict = {"n_gpu_layers": ngl, "extra_args": moe}
                if dngl is not None:
                    update["speculation"] = {"type": "draft", "draft_model": "d.gguf", "draft_n_gpu_layers": dngl}
                if _replanned(profile, update, target, draft, box).fits:
                    return True
    return False


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_whatever_fits_is_found_and_every_suggestion_that_says_it_fits_does(case) -> None:
    profile, target, draft, box = case
    plan = plan_profile(profile, target, box, draft)
    for s in plan.suggestions:
        if s.fits and not _is_hardware(s.change):
            assert _replanned(profile, s.update, target, draft, box).fits, s.change
    if _some_placement_fits(profile, target, draft, box):
        assert plan.fits or any(s.fits for s in plan.suggestions), plan.text()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_the_chosen_layers_are_the_most_that_fit(case) -> None:
    profile, target, draft, box = case
    plan = plan_profile(profile, target, box, draft, suggest=False)
    if not plan.fits or not plan.gpus or plan.n_gpu_layers == target.n_layer + 1:
        return
    update: dict = {"n_gpu_layers": plan.n_gpu_layers + 1, "ctx_size": plan.ctx.n_ctx, "gpus": plan.gpus}
    if plan.cpu_moe_chosen:
        update["extra_args"] = ["--n-cpu-moe", str(plan.cpu_moe)]
    if draft is not None:
        update["speculation"] = {"type": "draft", "draft_model": "d.gguf",
                                 "draft_n_gpu_layers": plan.draft_n_gpu_layers}
    one_more = _replanned(profile, update, target, draft, box)
    assert not one_more.fits, (plan.text(), one_more.text())
    same = _replanned(profile, {**update, "n_gpu_layers": plan.n_gpu_layers}, target, draft, box)
    assert same.fits and same.n_gpu_layers == plan.n_gpu_layers


@settings(max_examples=60, deadline=None)
@given(models("moe"), st.integers(min_value=1, max_value=8))
def test_moe_experts_go_to_the_cpu_before_layers(target, n_gpus) -> None:
    """The fewest layers' experts on the CPU that keep every layer on the GPUs, when experts alone decide."""
    total = sum(target.layer_bytes) + target.output_bytes
    free_mib = (total - sum(target.layer_expert_bytes) // 2) // MIB // n_gpus + 2048
    box = GpuInventory(gpus=tuple(Gpu(index=i, name="g", total_mib=free_mib, free_mib=free_mib)
                                  for i in range(n_gpus)), source="t", host_total_mib=1 << 20, host_free_mib=1 << 20)
    plan = plan_profile(Profile(name="p", model="m.gguf", ctx_size=4096), target, box)
    assert plan.fits
    if plan.cpu_moe_chosen and plan.cpu_moe and plan.n_gpu_layers == target.n_layer + 1:
        fewer = Profile(name="p", model="m.gguf", ctx_size=4096, n_gpu_layers="all",
                        extra_args=["--n-cpu-moe", str(plan.cpu_moe - 1)])
        assert not plan_profile(fewer, target, box, suggest=False).fits
        assert plan.launch_overrides()["extra_args"][-2:] == ["--n-cpu-moe", str(plan.cpu_moe)]


def test_the_plan_package_does_no_io_and_suggestions_do_not_import_the_planner() -> None:
    io_names = {"read_gguf", "probe_gpus", "ensure_model", "preview_argv", "resolve_model_path", "open"}
    for path in PLAN_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not (imported | called) & io_names, path.name
        assert "llamactl.planning" not in modules and "llamactl.models" not in modules, path.name
        if path.name == "suggestions.py":
            assert "llamactl.plan.core" not in modules
