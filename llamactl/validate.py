"""`llamactl profiles validate`: every check that can be made without starting anything, the same ones `up`
makes (and a few `up` leaves to the engine: a truncated model), plus warnings about switch groups."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from llamactl.errors import LlamactlError, ProfileError
from llamactl.models import BUILTIN_MODELS, NotDownloaded, resolve_model_path
from llamactl.profiles import BUILTIN_PREFIX, Profile, load_all, load_profile
from llamactl.settings import Settings
from llamactl.supervisor.supervisor import check_context
from llamactl.vocab import check_draft_vocabulary


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
    """Model and draft files are complete GGUF files (or builtin models that can be assembled); the context
    fits the model's training context or is scaled."""
    where = str(profile.source or profile.name)
    model = _checked_model(profile.model, "model", where, settings)
    draft = profile.speculation.draft_model
    if profile.speculation.uses_draft_model and draft:
        draft_path = _checked_model(draft, "speculation.draft_model", where, settings)
        if model is not None and draft_path is not None:
            check_draft_vocabulary(model, draft_path, where=f"{where}: speculation.draft_model")
    if model is not None:
        check_context(profile, model, where)


def _checked_model(value: str, key: str, where: str, settings: Settings) -> Path | None:
    """The model file behind `value`, checked; None for a builtin model not assembled yet (its package is) or an
    `hf:` model not pulled yet (its reference was checked when the profile loaded)."""
    try:
        path = resolve_model_path(value, settings)
    except NotDownloaded:
        return None
    if value.startswith(BUILTIN_PREFIX) and not path.exists():
        package, module, _ = BUILTIN_MODELS[value.removeprefix(BUILTIN_PREFIX)]
        try:
            __import__(module)
        except ImportError:
            raise ProfileError(f"{where}: {key} = '{value}' needs the Python package {package}",
                               hint="pip install 'llamactl[demo]'") from None
        return None
    check_gguf_file(path, key, where)
    return path


def check_gguf_file(path: Path, key: str, where: str) -> None:
    """A regular, readable, complete GGUF file (every part of a split one); the error names the key and what is
    wrong with the file."""
    from llamactl.gguf import read_model

    hint = "fix the path (relative paths are relative to the profile file)"
    if not path.exists():
        raise ProfileError(f"{where}: {key}: file not found: looked at {path}", hint=hint)
    if path.is_dir():
        raise ProfileError(f"{where}: {key}: {path} is a directory, not a model file", hint=hint)
    if not path.is_file():
        raise ProfileError(f"{where}: {key}: {path} is not a regular file (a device or a pipe)", hint=hint)
    try:
        gguf = read_model(path)
    except ProfileError as e:
        raise ProfileError(f"{where}: {key}: {e.message}", hint=e.hint) from None
    for part in gguf.parts or (gguf,):
        if part.file_size_bytes < part.data_end:
            raise ProfileError(
                f"{where}: {key}: {part.path} is truncated: its tensors need {part.data_end} bytes, the file has "
                f"{part.file_size_bytes}", hint="the download or copy was cut off; fetch the model again")


def group_warnings(profiles: dict[str, Profile]) -> dict[str, str]:
    """name -> why its switch group is not served as a group. `extends` copies `group`, so a second variant of
    a group member silently joins (and breaks) its parent's group; say so where the user looks."""
    members: dict[str, list[Profile]] = defaultdict(list)
    for profile in profiles.values():
        if profile.group:
            members[profile.group].append(profile)
    warnings = {}
    for group, group_members in members.items():
        roles = sorted("spec" if p.speculation.enabled else "plain" for p in group_members)
        if len(group_members) == 1 or roles == ["plain", "spec"]:  # a group of one is a plain lane
            continue
        names = ", ".join(f"{p.name} ({'spec' if p.speculation.enabled else 'plain'})" for p in group_members)
        for p in group_members:
            inherited = f" ({p.name} extends '{p.extends}', and `extends` copies `group`)" if p.extends else ""
            warnings[p.name] = (f"switch group '{group}' needs one speculative and one plain profile, has {names}: "
                                f"its profiles are served on their own{inherited}; give a variant its own "
                                "`group` key")
    return dict(sorted(warnings.items()))
