"""`llamactl worker --host ADDR`: run and supervise llama.cpp's rpc-server on this box for a main box's
profiles (`rpc = [...]`); `llamactl worker status` shows the workers running here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from llamactl.cli.options import FsPath

if TYPE_CHECKING:
    from llamactl.settings import Settings



@click.group("worker", invoke_without_command=True)
@click.option("--host", help="Address to bind (required): this host's private address the main box reaches.")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True)
@click.option("--device", "devices", multiple=True,
              help="Device(s) to serve, e.g. CUDA0 (repeat or comma-separate; default: rpc-server's choice).")
@click.option("--cache-dir", type=FsPath(file_okay=False, path_type=Path), default=None,
              help="Keep tensors the main box sent before here (rpc-server -c): later loads skip the network.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for a CPU device.")
@click.option("--allow-public", is_flag=True,
              help="Allow a wildcard or public bind address (rpc-server has NO authentication or encryption).")
@click.option("--binary", type=FsPath(dir_okay=False, path_type=Path), default=None,
              help="rpc-server to run (default: PATH, then llamactl's llama.cpp build).")
@click.pass_context
def worker_command(ctx: click.Context, host: str | None, port: int, devices: tuple[str, ...], cache_dir: Path | None,
                   threads: int | None, allow_public: bool, binary: Path | None) -> None:
    """Run rpc-server here and restart it with backoff until stopped (Ctrl-C, SIGTERM)."""
    if ctx.invoked_subcommand is not None:
        return
    from llamactl.rpc.runner import WorkerOptions, WorkerRunner, install_signal_handlers

    if not host:
        raise click.UsageError("--host is required: the private address of this box the main box connects to")
    settings: Settings = ctx.obj
    wanted = tuple(d for item in devices for d in item.split(",") if d)
    runner = WorkerRunner(WorkerOptions(host=host, port=port, devices=wanted, cache_dir=cache_dir, threads=threads,
                                        allow_public=allow_public, binary=binary), settings,
                          say=lambda msg: click.echo(msg, err=True))
    install_signal_handlers(runner)
    sys.exit(runner.run())


@worker_command.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status_command(settings: Settings, as_json: bool) -> None:
    """The workers `llamactl worker` runs on this box: address, state, rpc-server pid, restarts, protocol."""
    from dataclasses import asdict

    from llamactl.errors import LlamactlError
    from llamactl.rpc.hello import worker_version
    from llamactl.rpc.runner import read_records, record_is_live
    from llamactl.rpc.workers import Worker

    rows = []
    for record in read_records(settings):
        row = asdict(record)
        if not record_is_live(record):  # its pids are stale (maybe another process's by now): not shown
            row.update(pid=None, child_pid=None)
            if record.state != "failed":  # a failed one says why in last_exit
                row["state"] = "gone (its `llamactl worker` is not running)"
        elif record.state == "running":
            try:
                row["protocol"] = worker_version(Worker("self", record.host, record.port), timeout_s=2.0)
            except LlamactlError:
                row["protocol"] = None  # busy serving a main box (one client at a time), or not answering
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"workers": rows}, indent=2))
        return
    if not rows:
        click.echo("no worker runs here (start one with `llamactl worker --host ADDR`)")
        return
    for row in rows:
        proto = row.get("protocol")
        extra = f", RPC protocol {proto}" if proto else (", busy or not answering" if "protocol" in row else "")
        click.echo(f"{row['host']}:{row['port']}  {row['state']}  rpc-server pid {row['child_pid'] or '-'}  "
                   f"restarts {row['restarts']}{extra}" + (f"  last exit: {row['last_exit']}" if row['last_exit'] else ""))
        click.echo(f"    log: {row['log_path']}")
