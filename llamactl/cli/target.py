"""One place decides "through the daemon or standalone" for every command that can go either way."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamactl.settings import Settings



def daemon_client(settings: Settings):
    """The running daemon's control client, or None (then work standalone). Progress of a long wait goes to
    stderr."""
    if not settings.daemon_socket.exists():  # no daemon: its client's modules are not even imported
        return None
    import click

    from llamactl.daemon.control import try_daemon

    return try_daemon(settings, say=lambda message: click.echo(message, err=True))


def supervisor(settings: Settings, *, die_with_parent: bool = False):
    from llamactl.supervisor import Supervisor

    return Supervisor(settings, die_with_parent=die_with_parent)
