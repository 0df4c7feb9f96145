"""The estimate against the real llama-server's own buffer accounting (CPU build).

Marked `engine`: skipped when no binary is built, a failure when LLAMACTL_REQUIRE_ENGINES=1.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from llamactl.planning import plan_for_launch
from llamactl.profiles import Profile, Speculation
from tests.conftest import require_engine
from tests.synth_gguf import write_deepseek2, write_gemma3, write_granitehybrid, write_llama

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.engine


def _bench():
    """scripts/bench_memory.py (its Case, runner and log comparison), loaded once."""
    if "bench_memory" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "scripts" / "bench_memory.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_memory"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_memory"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("synth")
    return {"llama": write_llama(d / "llama.gguf"), "gemma3": write_gemma3(d / "gemma3.gguf"),
            "deepseek2": write_deepseek2(d / "deepseek2.gguf"), "hybrid": write_granitehybrid(d / "hybrid.gguf")}


def _check(bench, binary: Path, case) -> None:
    est_t, est_d = bench.planned(case)
    actual, tail = bench.run_engine(case.argv(binary), case.n_contexts)
    assert actual, f"llama-server reported no buffers:\n{tail}"
    for est, act in ((est_t, actual[0]), (est_d, actual[1] if len(actual) > 1 else None)):
        if est is None:
            continue
        assert act is not None, f"no draft buffers reported:\n{tail}"
        a = bench.actual_dict(act)
        assert abs(est["model"] - a["model"]) < 0.5, (est, a)  # weights: exact from the tensor table
        assert abs(est["kv"] - a["kv"]) < 0.5, (est, a)  # KV / recurrent state: exact formula
        e_tot, a_tot = sum(est.values()), sum(a.values())
        assert e_tot >= a_tot - 0.01, f"underestimate: {est} vs {a}"
        assert e_tot - a_tot <= max(64, 0.03 * a_tot), f"too far: {est} vs {a}"


@pytest.mark.parametrize("arch,ctx,kv", [("llama", 32768, "f16"), ("gemma3", 65536, "q8_0"),
                                         ("deepseek2", 16384, "q4_0"), ("hybrid", 32768, "f16")])
def test_synthetic_architectures(synth, arch: str, ctx: int, kv: str) -> None:
    binary = require_engine("llama.cpp")
    bench = _bench()
    _check(bench, binary, bench.Case(arch, synth[arch], ctx, kv))


def test_real_gemma_with_itself_as_draft(gemma_path: Path) -> None:
    binary = require_engine("llama.cpp")
    bench = _bench()
    _check(bench, binary, bench.Case("gemma", gemma_path, 16384, "f16", parallel=1, draft=gemma_path))


def test_real_gemma_without_flash_attention(gemma_path: Path) -> None:
    binary = require_engine("llama.cpp")
    bench = _bench()
    _check(bench, binary, bench.Case("gemma", gemma_path, 8192, "f16", flash_attn="off"))


def test_plan_shows_the_engine_argv_with_the_placement(home, settings, synth, monkeypatch) -> None:
    binary = require_engine("llama.cpp")
    monkeypatch.setenv("LLAMACTL_LLAMA_SERVER", str(binary))
    from llamactl.settings import Settings

    profile = Profile(name="p", model=str(synth["llama"]), ctx_size=8192, gpus=[],
                      speculation=Speculation(type="none"))
    plan = plan_for_launch(profile, Settings(), Path(__file__).parent / "fakes" / "gpus_cpu.json")
    assert plan.fits
    assert plan.argv and plan.argv[0] == str(binary)
    assert str(synth["llama"]) in plan.argv
    joined = " ".join(plan.argv)
    assert "-c 8192" in joined or "--ctx-size 8192" in joined
