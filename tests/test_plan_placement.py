"""Placement: llama.cpp's layer -> device rule, whole-layer splits, boxes, draft, explicit choices, suggestions."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from llamactl.gpus import FileProbe, Gpu, GpuInventory
from llamactl.plan import plan_profile
from llamactl.planning import load_spec
from llamactl.plan.placement import counts_to_assign, layer_devices
from llamactl.profiles import Profile, Speculation
from tests.synth_gguf import write_header_only, write_llama

FAKES = Path(__file__).parent / "fakes"
MIB = 1024 * 1024


def box(name: str) -> GpuInventory:
    return FileProbe(FAKES / f"gpus_{name}.json").probe()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "70b_q8": write_header_only(d / "70b-q8.gguf"),  # about 70 GiB
        "70b_q4": write_header_only(d / "70b-q4.gguf", qtype=GGMLQuantizationType.Q4_0),  # about 37 GiB
        "30b_q4": write_header_only(d / "30b-q4.gguf", n_layer=48, n_embd=6144, n_head=48, n_ff=16384,
                                    qtype=GGMLQuantizationType.Q4_0),  # about 14 GiB
        "moe": write_header_only(d / "moe.gguf", n_layer=24, n_embd=4096, n_head=32, n_ff=2048, n_expert=64,
                                 n_expert_used=8, qtype=GGMLQuantizationType.Q4_0),
        "small": write_llama(d / "small.gguf"),
    }


def prof(model: Path, **kw) -> Profile:
    kw.setdefault("ctx_size", 32768)
    kw.setdefault("name", "t")
    return Profile(model=str(model), **kw)


def check_consistent(plan) -> None:
    """Every layer placed exactly once; GPU devices within free minus margin when the plan fits."""
    n = plan.target.n_layer
    placed = sorted(il for u in plan.uses for il in u.layers)
    assert placed == list(range(n + 1))
    if plan.fits:
        for u in plan.uses:
            if u.device.is_gpu:
                assert u.total + plan.margin_mib * MIB <= u.device.free_mib * MIB
    gpu_layers = sum(len(u.layers) for u in plan.uses if u.device.is_gpu)
    assert gpu_layers == plan.n_gpu_layers
    if plan.tensor_split:
        assert sum(plan.tensor_split) == plan.n_gpu_layers
        assert plan.tensor_split == [len(u.layers) for u in plan.uses if u.device.is_gpu]


# --- llama.cpp's rule -------------------------------------------------------------------------

def test_layer_devices_follows_llama_cpp() -> None:
    # 4 layers + output, ngl 5, even split: cumsplit [0.5, 1.0]; il/5 < 0.5 -> device 0
    assert layer_devices(4, 5, [1, 1]) == [0, 0, 0, 1, 1]
    # ngl 3: layers 0,1 on the CPU; 2 layers + output over two devices
    assert layer_devices(4, 3, [1, 1]) == [None, None, 0, 0, 1]
    # ngl 4 = n_layer: the output layer stays on the CPU... no: i_gpu_start = 1, output is the last of 4
    assert layer_devices(4, 4, [1]) == [None, 0, 0, 0, 0]
    assert layer_devices(4, 0, [1]) == [None] * 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8))
def test_tensor_split_as_layer_counts_lands_exactly(counts: list[int]) -> None:
    total = sum(counts)
    if total == 0:
        return
    n_layer = total - 1
    assign = counts_to_assign(n_layer, counts, total)
    assert [assign.count(d) for d in range(len(counts))] == counts
    assert assign == sorted(assign)  # contiguous, in device order


# --- boxes ------------------------------------------------------------------------------------

def test_70b_q8_does_not_fit_one_24g_card_and_says_what_would(models) -> None:
    target = load_spec(models["70b_q8"])
    plan = plan_profile(prof(models["70b_q8"], n_gpu_layers="all"), target, box("1x24"))
    check_consistent(plan)
    assert not plan.fits
    gpu = plan.uses[0]
    assert plan.shortfall(gpu) > 40 * 1024 * MIB
    assert "short by" in plan.text() and "CUDA0" in plan.text()
    changes = [s.change for s in plan.suggestions]
    assert any(c.startswith("n_gpu_layers = ") for c in changes), changes
    for s in plan.suggestions:  # every suggestion that claims to fit does fit when applied
        assert s.needs_mib
        if s.fits:
            again = plan_profile(prof(models["70b_q8"], n_gpu_layers="all").model_copy(update=_update(s.update)),
                                 target, box("1x24"))
            assert again.fits, s.change


def _update(update: dict) -> dict:
    if "speculation" in update:
        update = {**update, "speculation": Speculation(**update["speculation"])}
    return update


def test_70b_q8_fits_4x80_and_avoids_the_busy_card(models) -> None:
    plan = plan_profile(prof(models["70b_q8"]), load_spec(models["70b_q8"]), box("4x80"))
    check_consistent(plan)
    assert plan.fits
    assert plan.n_gpu_layers == plan.target.n_layer + 1
    assert len(plan.gpus) >= 1
    over = plan.launch_overrides()
    assert over["n_gpu_layers"] == plan.target.n_layer + 1 and over["gpus"] == plan.gpus


def test_70b_q4_splits_over_2x24_in_whole_layers(models) -> None:
    plan = plan_profile(prof(models["70b_q4"], ctx_size=8192), load_spec(models["70b_q4"]), box("2x24"))
    check_consistent(plan)
    assert plan.fits, plan.text()
    assert plan.gpus == [0, 1] and len(plan.tensor_split) == 2 and min(plan.tensor_split) > 0
    assert plan.launch_overrides()["tensor_split"] == [float(c) for c in plan.tensor_split]
    out_dev = [u for u in plan.uses if plan.target.n_layer in u.layers][0]
    assert out_dev.device.key == "CUDA1"  # the output layer lives on the last device


def test_mixed_24_12_gives_the_bigger_card_more_layers(models) -> None:
    plan = plan_profile(prof(models["70b_q4"], ctx_size=4096, gpus=[0, 1], n_gpu_layers="auto"),
                        load_spec(models["70b_q4"]), box("24_12"))
    check_consistent(plan)
    assert plan.fits
    layers_on = dict(zip(plan.gpus, plan.tensor_split))
    big, small = layers_on[0], layers_on[1]
    assert big > small > 0
    assert plan.n_gpu_layers < plan.target.n_layer + 1  # 37 GiB on 36 GiB of cards: some layers stay on the CPU
    cpu = plan.uses[-1]
    assert cpu.weights > 0 and any(il < plan.target.n_layer for il in cpu.layers)


def test_small_model_goes_on_one_gpu(models) -> None:
    plan = plan_profile(prof(models["30b_q4"], ctx_size=16384), load_spec(models["30b_q4"]), box("2x24"))
    check_consistent(plan)
    assert plan.fits and len(plan.gpus) == 1 and plan.tensor_split is None


def test_cpu_only_box(models) -> None:
    for ngl in (None, "auto", "all", 20):
        plan = plan_profile(prof(models["small"], n_gpu_layers=ngl), load_spec(models["small"]), box("cpu"))
        check_consistent(plan)
        over = plan.launch_overrides()
        assert over["gpus"] == [] and over["n_gpu_layers"] == 0
        assert plan.fits
        assert [u.device.key for u in plan.uses] == ["CPU"]


def test_cpu_only_box_too_small_is_refused_with_the_missing_ram(models) -> None:
    tiny_host = GpuInventory(gpus=(), source="test", host_total_mib=8192, host_free_mib=4096)
    plan = plan_profile(prof(models["30b_q4"]), load_spec(models["30b_q4"]), tiny_host)
    assert not plan.fits
    assert plan.shortfall(plan.uses[0]) > 0
    assert "CPU: short by" in plan.text()


def test_profile_with_gpus_empty_stays_on_cpu_on_a_gpu_box(models) -> None:
    plan = plan_profile(prof(models["small"], gpus=[]), load_spec(models["small"]), box("4x80"))
    assert plan.gpus == [] and plan.n_gpu_layers == 0


# --- explicit choices are checked, not replaced ------------------------------------------------

def test_explicit_tensor_split_is_respected_and_checked(models) -> None:
    target = load_spec(models["70b_q4"])
    plan = plan_profile(prof(models["70b_q4"], ctx_size=4096, gpus=[0, 1], tensor_split=[1, 3]), target,
                        box("2x24"))
    check_consistent(plan)
    a, b = plan.tensor_split
    assert b > 2.5 * a
    assert not plan.fits  # 3/4 of 37 GiB on one 24 GiB card
    assert plan.shortfall(plan.uses[1]) > 0 and plan.shortfall(plan.uses[0]) == 0


def test_explicit_gpu_that_does_not_exist(models) -> None:
    plan = plan_profile(prof(models["small"], gpus=[3]), load_spec(models["small"]), box("2x24"))
    assert not plan.fits and "does not exist" in plan.problems[0]
    [s] = [s for s in plan.suggestions if s.change.startswith("gpus")]
    assert s.change == "gpus = [0, 1] (this box has no GPU 3)" and s.fits
    plan = plan_profile(prof(models["70b_q4"], ctx_size=8192, gpus=[0, 1], tensor_split=[1, 1]),
                        load_spec(models["70b_q4"]), box("1x24"))
    assert not plan.fits
    assert plan.suggestions[0].change == "gpus = [0] (this box has no GPU 1)"
    assert plan.suggestions[0].update == {"gpus": [0], "tensor_split": "auto"}


def test_explicit_layer_count(models) -> None:
    plan = plan_profile(prof(models["70b_q8"], n_gpu_layers=20), load_spec(models["70b_q8"]), box("1x24"))
    check_consistent(plan)
    assert plan.n_gpu_layers == 20 and plan.fits


# --- the draft ----------------------------------------------------------------------------------

def test_draft_goes_to_the_gpu_with_most_room(models) -> None:
    p = prof(models["70b_q8"], speculation=Speculation(type="draft", draft_model=str(models["small"])))
    plan = plan_profile(p, load_spec(models["70b_q8"]), box("4x80"), load_spec(models["small"]))
    check_consistent(plan)
    assert plan.fits
    assert plan.draft_gpus and plan.draft_gpus[0] != 3  # GPU 3 has 21 GiB taken by someone else
    assert plan.draft_gpus[0] in plan.gpus
    dev = [u for u in plan.uses if u.device.gpu_index == plan.draft_gpus[0]][0]
    assert dev.draft_weights > 0 and dev.draft_kv > 0 and dev.draft_compute > 0
    sp = plan.launch_overrides()["speculation"]
    assert sp.draft_gpus == plan.draft_gpus and sp.draft_n_gpu_layers == plan.draft.n_layer + 1


def test_explicit_draft_gpu_outside_gpus_is_a_problem(models) -> None:
    p = prof(models["small"], gpus=[0], speculation=Speculation(type="draft", draft_model=str(models["small"]),
                                                                draft_gpus=[1]))
    plan = plan_profile(p, load_spec(models["small"]), box("2x24"), load_spec(models["small"]))
    assert not plan.fits and "draft_gpus" in plan.problems[0]


def test_draft_counts_against_the_fit(models) -> None:
    target, draft = load_spec(models["30b_q4"]), load_spec(models["30b_q4"])
    alone = plan_profile(prof(models["30b_q4"], ctx_size=65536), target, box("1x24"))
    both = plan_profile(prof(models["30b_q4"], ctx_size=65536, n_gpu_layers="all",
                             speculation=Speculation(type="draft", draft_model=str(models["30b_q4"]),
                                                     draft_n_gpu_layers="all")),
                        target, box("1x24"), draft)
    assert alone.fits and not both.fits
    assert any("no draft model" in s.change for s in both.suggestions)


# --- suggestions --------------------------------------------------------------------------------

def test_long_context_suggestions_name_ctx_and_kv_type(models) -> None:
    target = load_spec(models["30b_q4"])
    plan = plan_profile(prof(models["30b_q4"], ctx_size=131072, n_gpu_layers="all"), target, box("1x24"))
    assert not plan.fits
    changes = " | ".join(s.change for s in plan.suggestions)
    assert "ctx_size = " in changes and "cache_type_k = cache_type_v = " in changes
    assert all(s.fits for s in plan.suggestions)
    as_json = plan.to_json()
    assert as_json["fits"] is False and as_json["suggestions"]
    assert all({"change", "needs_mib", "fits"} <= set(s) for s in as_json["suggestions"])


def test_moe_expert_offload_is_suggested(models) -> None:
    target = load_spec(models["moe"])
    assert target.n_expert == 64 and sum(target.layer_expert_bytes) > 0
    small_box = GpuInventory(gpus=(Gpu(index=0, name="8G card", total_mib=8192, free_mib=8000),), source="t",
                             host_total_mib=65536, host_free_mib=60000)
    plan = plan_profile(prof(models["moe"], ctx_size=8192, n_gpu_layers="all"), target, small_box)
    assert not plan.fits
    moe = [s for s in plan.suggestions if "--n-cpu-moe" in s.change]
    assert moe and moe[0].fits
    n = int(moe[0].update["extra_args"][-1])
    applied = plan_profile(prof(models["moe"], ctx_size=8192, extra_args=["--n-cpu-moe", str(n)]), target, small_box)
    assert applied.fits and applied.n_gpu_layers == target.n_layer + 1
    assert applied.uses[-1].weights > sum(target.layer_expert_bytes[:n])


def test_json_has_the_contract_fields(models) -> None:
    plan = plan_profile(prof(models["70b_q4"], ctx_size=8192), load_spec(models["70b_q4"]), box("2x24"))
    data = plan.to_json()
    assert isinstance(data["fits"], bool)
    for dev in data["devices"]:
        assert {"name", "weights_mib", "kv_mib", "compute_mib", "total_mib", "free_mib"} <= set(dev)
        assert dev["total_mib"] >= dev["weights_mib"] + dev["kv_mib"] + dev["compute_mib"]
    assert "argv" in data and "suggestions" in data
    assert data["overrides"]["n_gpu_layers"] != "auto"


def test_when_no_single_change_fits_a_combination_is_offered(models) -> None:
    target = load_spec(models["70b_q8"])
    base = prof(models["70b_q8"], ctx_size=131072, n_gpu_layers="all")
    plan = plan_profile(base, target, box("24_12"))
    assert not plan.fits
    assert len(plan.suggestions) == 1 and plan.suggestions[0].fits
    s = plan.suggestions[0]
    assert " and " in s.change and "n_gpu_layers" in s.update
    assert plan_profile(base.model_copy(update=s.update), target, box("24_12")).fits


def test_remaining_takes_each_device_use_out_of_its_free_memory(models) -> None:
    inventory = box("2x24")
    plan = plan_profile(prof(models["70b_q4"], ctx_size=8192), load_spec(models["70b_q4"]), inventory)
    assert plan.fits and len(plan.gpus) == 2
    left = plan.remaining()
    for use in plan.uses:
        if use.device.is_gpu:
            before = inventory.by_index(use.device.gpu_index).free_mib
            assert left.by_index(use.device.gpu_index).free_mib == before - -(-use.total // MIB)
    assert left.host_free_mib == inventory.host_free_mib - -(-sum(u.total for u in plan.uses if not u.device.is_gpu) // MIB)
    assert inventory.gpus[0].free_mib > left.gpus[0].free_mib  # the input inventory is not changed


def test_two_members_fit_together_only_where_there_is_room_for_both(models, settings) -> None:
    from llamactl.planning import fit_together

    spec = prof(models["30b_q4"], name="m-spec", group="m", speculation=Speculation(type="ngram-mod"),
                n_gpu_layers="all")
    plain = prof(models["30b_q4"], name="m-plain", group="m", n_gpu_layers="all")
    fits, why, left = fit_together([spec, plain], settings, probe=FileProbe(FAKES / "gpus_2x24.json"))
    assert fits, why
    assert sum(g.free_mib for g in left.gpus) < sum(g.free_mib for g in box("2x24").gpus) - 2 * 14 * 1024
    assert why.startswith("m-spec + m-plain fit together (") and "MiB on CUDA1 left)" in why
    fits, why, _ = fit_together([spec, plain], settings, probe=FileProbe(FAKES / "gpus_1x24.json"))
    assert not fits
    assert why.startswith("'m-plain' does not fit beside m-spec (CUDA0 short by ")
    alone, _, _ = fit_together([plain], settings, probe=FileProbe(FAKES / "gpus_1x24.json"))
    assert alone  # each fits on its own: it is the pair that does not


@pytest.mark.parametrize("name, gpus", [("2x24", None), ("4x80", [0, 1]), ("4x80", [0, 1, 2, 3])])
def test_auto_split_balances_the_free_memory_left_on_each_card(models, name, gpus) -> None:
    """No card is packed while another stays nearly empty: the fullest card is at most one layer
    fuller (as a share of its capacity) than the emptiest."""
    plan = plan_profile(prof(models["70b_q4"], ctx_size=8192, gpus=gpus), load_spec(models["70b_q4"]), box(name))
    check_consistent(plan)
    assert plan.fits, plan.text()
    used = [u for u in plan.uses if u.device.is_gpu and u.layers]
    assert len(used) >= 2 and all(u.layers for u in used)
    ratios = [u.total / (u.device.free_mib * MIB) for u in used]
    one_layer = max(u.weights / max(1, len([i for i in u.layers if i < plan.target.n_layer])) for u in used)
    slack = max(one_layer / (u.device.free_mib * MIB) for u in used)
    assert max(ratios) - min(ratios) <= 2 * slack, (ratios, plan.tensor_split)


def test_a_member_that_would_spill_layers_to_the_cpu_beside_the_other_does_not_fit_together(models, settings) -> None:
    """With n_gpu_layers = "auto" the second member would still 'fit', with layers moved to the CPU: slower
    than alone, so not a warm pair."""
    from llamactl.planning import fit_together

    spec = prof(models["30b_q4"], name="m-spec", speculation=Speculation(type="ngram-mod"), n_gpu_layers="auto")
    plain = prof(models["30b_q4"], name="m-plain", n_gpu_layers="auto")
    fits, why, _ = fit_together([spec, plain], settings, probe=FileProbe(FAKES / "gpus_1x24.json"))
    assert not fits
    assert why.startswith("'m-plain' would keep ") and why.endswith("layers on the CPU beside m-spec than alone")


def test_warm_groups_are_planned_together_and_the_one_that_does_not_fit_beside_the_others_switches_hard(
        models, settings, monkeypatch) -> None:
    """Two switch groups of a ~14 GiB model on 2 x 24 GiB: the first pair fits (one member per card), the
    second pair would not fit beside it, so only the first group keeps both members loaded."""
    from llamactl.daemon.wiring import build_router
    from tests.router_harness import fake_backends

    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(FAKES / "gpus_2x24.json"))
    from llamactl.settings import Settings

    profiles = {}
    for group in ("a", "b"):
        profiles[f"{group}-spec"] = prof(models["30b_q4"], name=f"{group}-spec", group=group,
                                         speculation=Speculation(type="ngram-mod"))
        profiles[f"{group}-plain"] = prof(models["30b_q4"], name=f"{group}-plain", group=group)
    router = build_router(Settings(), profiles, fake_backends(list(profiles.values())))
    a, b = router.lanes["a"], router.lanes["b"]
    assert a.keep_both_warm and " fit together (" in a.warm_reason
    assert not b.keep_both_warm and b.warm_reason.endswith("with the groups kept warm before it (a) loaded")
