"""`llamactl top`: devices, lanes, traffic classes, recent requests and alerts of a running `serve`, live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from llamactl.cli.options import HTTP_URL, FsPath
from llamactl.errors import ConfigError

if TYPE_CHECKING:
    from llamactl.settings import Settings


def client_key(settings: Settings, key_file: Path | None) -> str | None:
    """The key to present: --key-file, else LLAMACTL_API_KEY, else the daemon's own (same machine)."""
    if key_file is not None:
        try:
            lines = [line.strip() for line in key_file.read_text().splitlines()]
        except OSError as e:
            raise ConfigError(f"cannot read the key file {key_file}: {e.strerror}") from None
        keys = [line for line in lines if line and not line.startswith("#")]
        if not keys:
            raise ConfigError(f"the key file {key_file} holds no key")
        return keys[0]
    if os.environ.get("LLAMACTL_API_KEY"):
        return os.environ["LLAMACTL_API_KEY"].strip()
    from llamactl.daemon.auth import load_keys

    keys = load_keys(settings)
    return keys[0] if keys else None


@click.command()
@click.option("--url", type=HTTP_URL, default=None, help="The running serve (default: http://127.0.0.1:LLAMACTL_ROUTER_PORT).")
@click.option("--key-file", type=FsPath(path_type=Path, dir_okay=False), default=None,
              help="A file holding the API key (default: LLAMACTL_API_KEY, else the daemon's own keys).")
@click.option("--once", is_flag=True, help="Print one picture and exit (no live redraw).")
@click.pass_obj
def top_command(settings: Settings, url: str | None, key_file: Path | None, once: bool) -> None:
    """Watch a running `llamactl serve`: device memory, lanes and switching, per-class acceptance and
    speedup, recent requests with tok/s, acceptance alerts. Live from its event stream; Ctrl-C quits."""
    from rich.console import Console

    from llamactl.top import Feed, TopView, run_live, snapshot

    feed = Feed(url or f"http://127.0.0.1:{settings.router_port}", client_key(settings, key_file))
    view = snapshot(feed, TopView())
    console = Console()
    if once:
        console.print(view.render())
        return
    run_live(feed, view, console)
