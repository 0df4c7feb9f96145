"""`llamactl systemd install [--user] [--dry-run]`: write the unit for this machine, say how to enable it."""

from __future__ import annotations

import os
from pathlib import Path

import click

from llamactl.errors import LlamactlError
from llamactl.settings import Settings


@click.group()
def systemd_command() -> None:
    """Run `llamactl serve` as a systemd service."""


@systemd_command.command("install")
@click.option("--user", "user_unit", is_flag=True, help="A user unit (~/.config/systemd/user) instead of a system one.")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of writing it.")
@click.option("--system-dirs", is_flag=True,
              help="System unit: keep state in /var/lib/llamactl, cache in /var/cache/llamactl, config in "
                   "/etc/llamactl (created by systemd) instead of the installing user's directories.")
@click.option("--service-user", default=None,
              help="System unit: run as this user (default: the user who ran sudo, else the current user).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the unit here instead of the standard location.")
@click.pass_obj
def install_command(settings: Settings, user_unit: bool, dry_run: bool, system_dirs: bool,
                    service_user: str | None, output: Path | None) -> None:
    """Render the unit for this machine (paths, user, hardening) and write it."""
    from llamactl.daemon.systemd_unit import detect_params, enable_instructions, render_unit, unit_path

    if user_unit and (system_dirs or service_user):
        raise click.UsageError("--system-dirs and --service-user are for the system unit")
    params = detect_params(settings, user_unit=user_unit, system_dirs=system_dirs, service_user=service_user)
    text = render_unit(params)
    if dry_run:
        click.echo(text, nl=False)
        return
    path = output or unit_path(user_unit)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)
    except PermissionError:
        raise LlamactlError(f"cannot write {path}: permission denied",
                            hint="run it with sudo, or use --user for a user unit") from None
    click.echo(f"wrote {path}")
    if params.protect_home == "read-only":
        click.echo("note: llamactl or its files live under a home directory, so the unit reads /home (read-only)")
    click.echo("enable it with:")
    for line in enable_instructions(params, path):
        click.echo(f"  {line}")
