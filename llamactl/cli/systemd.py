"""`llamactl systemd install [--user] [--dry-run]`: write the unit for this machine, say how to enable it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from llamactl.errors import LlamactlError
from llamactl.cli.options import FsPath

if TYPE_CHECKING:
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
@click.option("--output", type=FsPath(dir_okay=False, path_type=Path), default=None,
              help="Write the unit here instead of the standard location.")
@click.option("--worker", is_flag=True, help="A unit for `llamactl worker` (rpc-server for a main box) instead.")
@click.option("--host", "worker_host", default=None, help="--worker: the private address rpc-server binds.")
@click.option("--port", "worker_port", type=click.IntRange(1, 65535), default=50052, show_default=True,
              help="--worker: its port.")
@click.option("--device", "worker_devices", multiple=True, help="--worker: device(s) to serve.")
@click.option("--cache-dir", "worker_cache_dir", default=None, help="--worker: rpc-server's tensor cache.")
@click.option("--allow-public", is_flag=True, help="--worker: allow a wildcard or public bind address.")
@click.pass_obj
def install_command(settings: Settings, user_unit: bool, dry_run: bool, system_dirs: bool,
                    service_user: str | None, output: Path | None, worker: bool, worker_host: str | None,
                    worker_port: int, worker_devices: tuple[str, ...], worker_cache_dir: str | None,
                    allow_public: bool) -> None:
    """Render the unit for this machine (paths, user, hardening) and write it."""
    from llamactl.daemon.systemd_unit import detect_params, enable_instructions, render_unit, unit_path

    if user_unit and (system_dirs or service_user):
        raise click.UsageError("--system-dirs and --service-user are for the system unit")
    worker_args = None
    if worker:
        from llamactl.rpc.runner import WorkerOptions, check_bind

        if not worker_host:
            raise click.UsageError("--worker needs --host: the private address rpc-server binds")
        check_bind(WorkerOptions(host=worker_host, port=worker_port, allow_public=allow_public))
        worker_args = ("--host", worker_host, "--port", str(worker_port),
                       *(a for d in worker_devices for a in ("--device", d)),
                       *(("--cache-dir", worker_cache_dir) if worker_cache_dir else ()),
                       *(("--allow-public",) if allow_public else ()))
    elif worker_host or worker_devices or worker_cache_dir or allow_public:
        raise click.UsageError("--host, --device, --cache-dir and --allow-public are for --worker")
    params = detect_params(settings, user_unit=user_unit, system_dirs=system_dirs, service_user=service_user,
                           worker_args=worker_args)
    text = render_unit(params)
    if dry_run:
        click.echo(text, nl=False)
        return
    path = output or unit_path(user_unit, name=params.unit_name)
    if path.exists() and not path.is_file():  # --output /dev/null would replace the device with a file
        raise LlamactlError(f"--output: {path} exists and is not a regular file", hint="give a file's path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)
    except PermissionError:
        raise LlamactlError(f"cannot write {path}: permission denied",
                            hint="run it with sudo, or use --user for a user unit") from None
    except OSError as e:
        raise LlamactlError(f"cannot write {path}: {e.strerror}", hint="give --output a path in a writable "
                            "directory") from None
    click.echo(f"wrote {path}")
    if params.protect_home == "read-only":
        click.echo("note: llamactl or its files live under a home directory, so the unit reads /home (read-only)")
    click.echo("enable it with:")
    for line in enable_instructions(params, path):
        click.echo(f"  {line}")
