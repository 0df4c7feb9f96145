"""`llamactl plan`: bundled profiles on described boxes, refusal with shortfall and suggestions, JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.models import BUILTIN_MODELS
from tests.synth_gguf import write_header_only, write_llama

FAKES = Path(__file__).parent / "fakes"
BOXES = ["gpus_1x24", "gpus_2x24", "gpus_4x80", "gpus_24_12", "gpus_cpu"]


@pytest.fixture
def builtin_model(home: Path, gemma_path: Path) -> Path:
    """The demo model where a fresh LLAMACTL_HOME looks for it (a link, not a 253 MB copy)."""
    target = home / "cache" / "models" / BUILTIN_MODELS["gemma3-270m"][2]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(gemma_path)
    return target


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("name", ["demo", "demo-draft", "demo-ngram"])
def test_bundled_profiles_on_described_boxes(home, builtin_model, box: str, name: str) -> None:
    # The bundled profiles live in the package's profiles/ directory, found after the test's own.
    out = run("plan", name, "--gpus", str(FAKES / f"{box}.json"), "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["fits"] is True
    assert data["profile"] == name
    keys = [d["key"] for d in data["devices"]]
    assert keys == ["CPU"]  # the demo profiles say gpus = []: CPU even on a GPU box
    cpu = data["devices"][0]
    assert cpu["weights_mib"] >= 240 and cpu["kv_mib"] > 0 and cpu["compute_mib"] > 0
    if name == "demo-draft":
        assert cpu["draft_mib"] > 240
    else:
        assert cpu["draft_mib"] == 0
    assert data["overrides"]["n_gpu_layers"] == 0 and data["overrides"]["gpus"] == []


def test_profile_that_cannot_fit_is_refused_with_shortfall_and_suggestions(home, write_profile, tmp_path) -> None:
    big = write_header_only(tmp_path / "big.gguf")
    write_profile("big", f'model = "{big}"\nctx_size = 131072\nn_gpu_layers = "all"\n')
    out = run("plan", "big", "--gpus", str(FAKES / "gpus_1x24.json"))
    assert out.exit_code == 7, out.output
    assert "fits: NO" in out.output
    assert "CUDA0: short by" in out.output
    assert "changes that would make it fit" in out.output
    assert "n_gpu_layers = " in out.output and "MiB" in out.output
    as_json = run("plan", "big", "--gpus", str(FAKES / "gpus_1x24.json"), "--json")
    data = json.loads(as_json.output)
    assert data["fits"] is False
    assert data["devices"][0]["shortfall_mib"] > 0
    assert data["suggestions"] and all(s["fits"] for s in data["suggestions"])


def test_gpus_file_from_the_environment(home, write_profile, tmp_path) -> None:
    model = write_llama(tmp_path / "small.gguf")
    write_profile("small", f'model = "{model}"\nctx_size = 8192\n')
    env = {"LLAMACTL_GPUS_FILE": str(FAKES / "gpus_2x24.json")}
    data = json.loads(run("plan", "small", "--json", env=env).output)
    assert data["gpu_source"].endswith("gpus_2x24.json")
    assert data["gpus"] in ([0], [1]) and data["fits"]
    text = run("plan", "small", env=env).output
    assert "CUDA" in text and "fits: yes" in text


def test_missing_engine_still_plans_and_says_why_no_argv(home, write_profile, tmp_path) -> None:
    model = write_llama(tmp_path / "small.gguf")
    write_profile("small", f'model = "{model}"\nctx_size = 8192\ngpus = []\n')
    data = json.loads(run("plan", "small", "--json", "--gpus", str(FAKES / "gpus_cpu.json")).output)
    assert data["fits"] and data["argv"] is None
    assert any("argv" in n for n in data["notes"])


def test_unknown_profile_is_a_clean_error(home) -> None:
    out = run("plan", "nope")
    assert out.exit_code == 2 and "no profile named 'nope'" in out.output
    assert "Traceback" not in out.output


def test_bad_gpus_file_is_a_clean_error(home, write_profile, tmp_path) -> None:
    model = write_llama(tmp_path / "small.gguf")
    write_profile("small", f'model = "{model}"\n')
    bad = tmp_path / "bad.json"
    bad.write_text("[{}]")
    out = run("plan", "small", "--gpus", str(bad))
    assert out.exit_code == 2 and "missing" in out.output
    assert os.environ.get("LLAMACTL_GPUS_FILE") is None


def test_the_plan_says_whether_the_prompt_cache_persists_and_counts_swa_full(home, write_profile, tmp_path) -> None:
    from tests.synth_gguf import write_gemma3

    swa = write_gemma3(tmp_path / "swa.gguf")
    plain = write_llama(tmp_path / "plain.gguf")
    base = 'ctx_size = 65536\ngpus = []\nparallel = 1\n'
    write_profile("swa-default", f'model = "{swa}"\n{base}')
    write_profile("swa-persist", f'model = "{swa}"\n{base}[cache]\npersist = true\n')
    write_profile("plain-default", f'model = "{plain}"\n{base}')
    cpu = str(FAKES / "gpus_cpu.json")
    plans = {name: json.loads(run("plan", name, "--gpus", cpu, "--json").output)
             for name in ("swa-default", "swa-persist", "plain-default")}
    assert plans["swa-default"]["persist"]["on"] is False and "sliding-window" in plans["swa-default"]["persist"]["reason"]
    assert plans["swa-persist"]["persist"] == {"on": True, "swa_full": True, "reason": plans["swa-persist"]["persist"]["reason"]}
    assert plans["plain-default"]["persist"]["on"] is True and plans["plain-default"]["context"]["swa_full"] is False
    # --swa-full holds the whole context in the sliding-window layers too: the plan counts it
    assert plans["swa-persist"]["context"]["swa_full"] is True
    assert plans["swa-persist"]["devices"][0]["kv_mib"] > 3 * plans["swa-default"]["devices"][0]["kv_mib"]
    text = run("plan", "swa-persist", "--gpus", cpu).output
    assert "prompt cache on disk: on ([cache] persist = true" in text and "KV planned with --swa-full" in text


def test_extra_args_that_move_or_add_memory_the_plan_does_not_count_are_noted(home, write_profile, tmp_path) -> None:
    """extra_args passes what the plan does not model; the few flags that move the KV cache or tensors, or load a
    projector or adapters, make the plan wrong by their size, and the plan says which."""
    model = write_llama(tmp_path / "small.gguf")
    write_profile("vision", f'model = "{model}"\nctx_size = 8192\n'
                            'extra_args = ["--mmproj", "/m/mmproj.gguf", "-nkvo", "-ot", "exps=CPU", "-lv", "3"]\n')
    data = json.loads(run("plan", "vision", "--json", "--gpus", str(FAKES / "gpus_1x24.json")).output)
    noted = [n for n in data["notes"] if n.startswith("extra_args ")]
    assert [n.split()[1] for n in noted] == ["-nkvo", "-ot", "--mmproj"], noted
    write_profile("ikdraft", f'engine = "ik_llama.cpp"\nmodel = "{model}"\nctx_size = 8192\n'
                             'extra_args = ["--draft-params", "-ngl 0 -c 512"]\n')
    ik = json.loads(run("plan", "ikdraft", "--json", "--gpus", str(FAKES / "gpus_1x24.json")).output)
    assert any(n.startswith("extra_args --draft-params is the draft model's own command line") for n in ik["notes"])
    assert all(n.endswith("the plan is off by that much") for n in noted)
    write_profile("plain", f'model = "{model}"\nctx_size = 8192\nextra_args = ["-lv", "3"]\n')
    plain = json.loads(run("plan", "plain", "--json", "--gpus", str(FAKES / "gpus_1x24.json")).output)
    assert not [n for n in plain["notes"] if n.startswith("extra_args ")]
