"""`llamactl profiles validate`: every check that can be made without starting anything."""

from __future__ import annotations

from llamactl.errors import LlamactlError, ProfileError
from llamactl.models import resolve_model_path
from llamactl.profiles import BUILTIN_PREFIX, Profile, load_all, load_profile
from llamactl.settings import Settings
from llamactl.supervisor.supervisor import check_context


def validate_profiles(settings: Settings, names: list[str] | None = None, *,
                      check_files: bool = True) -> dict[str, LlamactlError | None]:
    """name -> None (valid) or the first error found: schema, extends, model files, context."""
    if names is None:
        profiles, errors = load_all(settings)
        results: dict[str, LlamactlError | None] = {**{n: None for n in profiles}, **errors}
    else:
        profiles, results = {}, {}
        for name in names:
            try:
                profiles[name] = load_profile(name, settings)
                results[name] = None
            except LlamactlError as e:
                results[name] = e
    if check_files:
        for name, profile in profiles.items():
            try:
                check_model_files(profile, settings)
            except LlamactlError as e:
                results[name] = e
    return dict(sorted(results.items()))


def check_model_files(profile: Profile, settings: Settings) -> None:
    """Model and draft files exist; the context fits the model's training context or is scaled."""
    where = str(profile.source or profile.name)
    model = resolve_model_path(profile.model, settings)
    if profile.is_builtin_model and not model.exists():
        return  # assembled on first start from the installed package
    if not model.is_file():
        raise ProfileError(f"{where}: model: file not found: looked at {model}",
                           hint="fix the path (relative paths are relative to the profile file)")
    draft = profile.speculation.draft_model
    if profile.speculation.uses_draft_model and draft and not draft.startswith(BUILTIN_PREFIX):
        draft_path = resolve_model_path(draft, settings)
        if not draft_path.is_file():
            raise ProfileError(f"{where}: speculation.draft_model: file not found: looked at {draft_path}",
                               hint="fix the path (relative paths are relative to the profile file)")
    check_context(profile, model, where)
