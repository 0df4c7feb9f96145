"""End to end with the real engine: the bundled Gemma served by the stand-in Hub as a repo with a decoy quant,
target and drafter as `hf:` references; `llamactl pull`, then `up`; again with the Hub gone, online and
offline."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ENGINE_ENV, require_engine, write_tiny_gguf
from tests.hub_standin import HubStandin, StandinRepo
from tests.test_engine_real import llamactl

pytestmark = pytest.mark.engine
GEMMA_REPO = "acme/gemma-3-270m-it-GGUF"


@pytest.fixture
def hub(tmp_path, monkeypatch, home):
    """The stand-in Hub, no repos yet, with the real client pointed at it and the real engine to serve."""
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    standin = HubStandin().start()
    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield standin
    standin.stop()


@pytest.fixture
def gemma_hub(hub, tmp_path, gemma_path):
    hub.repos[GEMMA_REPO] = StandinRepo({"gemma-3-270m-it-Q4_K_M.gguf": gemma_path,
                                         "gemma-3-270m-it-Q8_0.gguf": write_tiny_gguf(tmp_path / "decoy.gguf")})
    return hub


def up_ready_down(profile: str, model_file: str) -> None:
    """`up`, the one server ready on `model_file`, `down`."""
    llamactl("up", profile)
    try:
        [row] = json.loads(llamactl("status", "--json").stdout)["servers"]
        assert row["state"] == "ready" and row["model"].endswith(model_file)
    finally:
        llamactl("down", profile)


def test_pull_then_up_with_hf_target_and_drafter_and_again_without_the_hub(gemma_hub, write_profile,
                                                                           monkeypatch, gemma_path):
    write_profile("hub-spec", f"""
        model = "hf:{GEMMA_REPO}:Q4_K_M"
        ctx_size = 2048
        gpus = []
        threads = 2
        parallel = 1
        load_timeout_s = 180
        [speculation]
        type = "draft"
        draft_model = "hf:{GEMMA_REPO}:Q4_K_M"
        n_max = 4
    """)
    pulled = llamactl("pull", "hub-spec")
    assert pulled.stdout.count("gemma-3-270m-it-Q4_K_M.gguf") == 2  # target and drafter: one file
    assert [r.path.rsplit("/", 1)[1] for r in gemma_hub.downloads()] == ["gemma-3-270m-it-Q4_K_M.gguf"]

    def up_and_down() -> None:
        up_ready_down("hub-spec", "gemma-3-270m-it-Q4_K_M.gguf")

    up_and_down()
    gemma_hub.stop()  # the Hub is gone
    up_and_down()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    up_and_down()
    assert len(gemma_hub.downloads()) == 1


def test_a_split_model_from_the_hub_is_pulled_planned_and_served_whole(hub, tmp_path, write_profile):
    """A model published in four parts (NAME-00001-of-00004.gguf, ...), named by its first part: `pull` fetches
    every part, `plan` weighs every part's tensors (the first part alone holds one layer of four), and the
    real engine serves it from the first part's path."""
    from tests.synth_gguf import write_llama

    whole = write_llama(tmp_path / "whole.gguf")
    (tmp_path / "parts").mkdir()
    first = write_llama(tmp_path / "parts" / "m.gguf", split_max_tensors=12)
    parts = sorted((tmp_path / "parts").glob("m-0000?-of-00004.gguf"))
    assert first == parts[0] and len(parts) == 4
    hub.repos["acme/split-GGUF"] = StandinRepo({f"F16/{p.name}": p for p in parts})
    body = """
        ctx_size = 512
        gpus = []
        threads = 2
        parallel = 1
        load_timeout_s = 120
    """
    write_profile("split", 'model = "hf:acme/split-GGUF/F16/m-00001-of-00004.gguf"' + body)
    write_profile("whole", f'model = "{whole}"' + body)
    llamactl("pull", "split")
    assert sorted(r.path.rsplit("/", 1)[1] for r in hub.downloads()) == [p.name for p in parts]
    split_plan, whole_plan = (json.loads(llamactl("plan", name, "--json").stdout) for name in ("split", "whole"))
    assert split_plan["devices"][-1]["weights_mib"] == whole_plan["devices"][-1]["weights_mib"] > 0
    up_ready_down("split", "m-00001-of-00004.gguf")
