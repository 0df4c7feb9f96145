"""Finding the llama-server binary for an engine: profile, env, PATH, then llamactl's engine cache."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import EngineNotFound
from llamactl.settings import Settings

ENGINE_NAMES = ("llama.cpp", "ik_llama.cpp")
PATH_NAMES = {"llama.cpp": "llama-server", "ik_llama.cpp": "ik-llama-server"}
ENV_VARS = {"llama.cpp": "LLAMACTL_LLAMA_SERVER", "ik_llama.cpp": "LLAMACTL_IK_LLAMA_SERVER"}


@dataclass(frozen=True)
class FoundBinary:
    engine: str
    path: Path
    source: str  # "profile", "LLAMACTL_LLAMA_SERVER", "PATH", "engine cache"


def _version_key(dirname: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", dirname.split("-", 1)[-1]))


def cached_builds(engine: str, settings: Settings) -> list[Path]:
    """llama-server binaries built by `llamactl engines install`, newest version first; of one version, a build
    with rpc-server beside it (GGML_RPC: it can use RPC workers) before one without."""
    root = settings.engine_cache_dir
    if not root.is_dir():
        return []
    dirs = sorted(root.glob(f"{engine}-*"), key=lambda d: (_version_key(d.name), (d / "bin" / "rpc-server").is_file()),
                  reverse=True)
    return [d / "bin" / "llama-server" for d in dirs if (d / "bin" / "llama-server").is_file()]


def candidates(engine: str, settings: Settings, profile_binary: str | None = None) -> list[FoundBinary]:
    found: list[FoundBinary] = []
    if profile_binary:
        found.append(FoundBinary(engine, Path(profile_binary), "profile"))
    configured = settings.llama_server if engine == "llama.cpp" else settings.ik_llama_server
    if configured:
        found.append(FoundBinary(engine, Path(configured).expanduser(), ENV_VARS[engine]))
    on_path = shutil.which(PATH_NAMES[engine])
    if on_path:
        found.append(FoundBinary(engine, Path(on_path), "PATH"))
    found += [FoundBinary(engine, p, "engine cache") for p in cached_builds(engine, settings)]
    return found


def find_binary(engine: str, settings: Settings, profile_binary: str | None = None) -> FoundBinary:
    """The binary a profile will run. The first candidate wins; an explicit one must exist."""
    options = candidates(engine, settings, profile_binary)
    if not options:
        raise EngineNotFound(
            f"no llama-server found for engine {engine} (looked at: profile `binary`, {ENV_VARS[engine]}, "
            f"`{PATH_NAMES[engine]}` on PATH, {settings.engine_cache_dir})",
            hint=f"run `llamactl engines install {engine}` or set {ENV_VARS[engine]}",
        )
    chosen = options[0]
    if not (chosen.path.is_file() and os.access(chosen.path, os.X_OK)):
        raise EngineNotFound(f"{chosen.path} (from {chosen.source}) is not an executable file",
                             hint="fix the path, or unset it to use the next candidate")
    return chosen
