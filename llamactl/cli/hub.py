"""`llamactl pull` (models from the Hugging Face Hub, ahead of time) and `llamactl models` (what the cache
holds, which profiles use it, removing one)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from llamactl.cli.main import main, pass_settings
from llamactl.errors import LlamactlError

if TYPE_CHECKING:
    from llamactl.settings import Settings

PLAIN_LINE_EVERY_S = 2.0


class PullDisplay:
    """Download progress for a person: a bar (bytes, rate, ETA) on a terminal, a line every few seconds
    otherwise (a log, a pipe). Used as a context manager around the pulls; call it with each PullProgress."""

    def __init__(self, *, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bars = None
        self._tasks: dict[str, int] = {}
        self._last_line: dict[str, float] = {}

    def __enter__(self) -> PullDisplay:
        if self.tty:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, state) -> None:
        if self._bars is not None:
            task = self._tasks.get(state.ref)
            if task is None:
                task = self._tasks[state.ref] = self._bars.add_task(state.ref, total=state.total_bytes or None)
            self._bars.update(task, completed=state.done_bytes, description=f"{state.ref} ({state.file})")
            return
        now = time.monotonic()
        done = state.total_bytes and state.done_bytes >= state.total_bytes
        if done or now - self._last_line.get(state.ref, -PLAIN_LINE_EVERY_S) >= PLAIN_LINE_EVERY_S:
            self._last_line[state.ref] = now
            click.echo(state.text(), err=True)


def pull_profile(profile, settings: Settings, display: PullDisplay) -> list:
    """The profile's `hf:` models, downloaded where missing (Ctrl-C stops a download; the next pull resumes)."""
    from llamactl.models import fetch_profile_models

    return fetch_profile_models(profile, settings, progress=display)


@main.command()
@click.argument("targets", nargs=-1, required=True, metavar="REF|PROFILE...")
@pass_settings
def pull(settings: Settings, targets: tuple[str, ...]) -> None:
    """Download models from the Hugging Face Hub ahead of time: `hf:` references, or the profiles that use them
    (only the files each reference names; what the cache has already is not fetched again)."""
    from llamactl.hf.pull import HubConfig, pull_model
    from llamactl.hf.refs import is_hf_ref, parse_ref
    from llamactl.models import hf_models
    from llamactl.names import check_profile_name
    from llamactl.profiles import load_profile

    jobs = []  # (what the user named, reference, where) - all checked before anything downloads
    for target in targets:
        if is_hf_ref(target):
            jobs.append((target, parse_ref(target), f"`llamactl pull {target}`"))
            continue
        profile = load_profile(check_profile_name(target), settings)
        refs = hf_models(profile)
        if not refs:
            click.echo(f"{target}: uses no hf: model, nothing to pull ({profile.model})", err=True)
        for key, value in refs:
            jobs.append((target, parse_ref(value), f"profile '{target}' ({profile.source}), key {key}"))
    config = HubConfig.from_environ()
    try:
        with PullDisplay() as display:
            for _, ref, where in jobs:
                path = pull_model(ref, config, where=where, progress=display)
                click.echo(f"{ref}: {path}")
    except KeyboardInterrupt:
        click.echo("interrupted: what was downloaded is kept; `llamactl pull` again resumes it", err=True)
        raise SystemExit(130) from None


@main.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """The models in the Hugging Face cache: size, which profiles use them (`llamactl models rm REF` removes one)."""
    if ctx.invoked_subcommand is not None:
        return
    from llamactl.hf.cache import cached_models
    from llamactl.hf.pull import HubConfig
    from llamactl.settings import Settings

    settings = ctx.find_object(Settings)
    config = HubConfig.from_environ()
    found = cached_models(config)
    if not found:
        click.echo(f"no models in the Hugging Face cache ({config.cache_dir}); `llamactl pull REF|PROFILE` fetches one")
        return
    users = _profiles_by_path(settings)
    click.echo(f"{'SIZE':>9}  {'PROFILES':<24} MODEL")
    for model in found:
        names = ", ".join(users.get(model.first_path, [])) or "-"
        parts = f" ({len(model.files)} parts)" if len(model.files) > 1 else ""
        partial = "" if model.complete else "  [incomplete: `llamactl pull` it again]"
        click.echo(f"{model.size_bytes / 1e9:>7.2f}GB  {names:<24} {model.reference}{parts}{partial}")
    click.echo(f"cache: {config.cache_dir}")


@models.command("rm")
@click.argument("ref")
@pass_settings
def models_rm(settings: Settings, ref: str) -> None:
    """Remove REF (an hf: reference) from the Hugging Face cache."""
    from llamactl.hf.cache import remove_model
    from llamactl.hf.pull import HubConfig
    from llamactl.hf.refs import parse_ref

    config = HubConfig.from_environ()
    parsed = parse_ref(ref)
    users = [name for path, names in _profiles_by_path(settings).items() for name in names
             if (config.repo_folder(parsed.repo) in path.parents)]
    files, freed = remove_model(parsed, config)
    click.echo(f"removed {', '.join(files)} from {parsed.repo} ({freed / 1e9:.2f} GB freed)")
    if users:
        click.echo(f"note: profiles using {parsed.repo}: {', '.join(sorted(set(users)))}; their next start downloads "
                   "what they need again", err=True)


def _profiles_by_path(settings: Settings) -> dict:
    """Cached model file -> the profiles whose `hf:` references name it."""
    from llamactl.hf.pull import HubConfig, cached_model
    from llamactl.hf.refs import parse_ref
    from llamactl.models import hf_models
    from llamactl.profiles import load_all

    config = HubConfig.from_environ()
    by_path: dict = {}
    profiles, _ = load_all(settings)
    for name, profile in sorted(profiles.items()):
        for key, value in hf_models(profile):
            try:
                path = cached_model(parse_ref(value), config, where=f"profile '{name}', key {key}")
            except LlamactlError:
                continue
            if path is not None:
                by_path.setdefault(path, []).append(name)
    return by_path
