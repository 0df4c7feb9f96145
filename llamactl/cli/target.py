"""One place decides "through the daemon or standalone" for every command that can go either way."""

from __future__ import annotations

from llamactl.settings import Settings


def daemon_client(settings: Settings):
    """The running daemon's control client, or None (then work standalone)."""
    from llamactl.daemon.control import try_daemon

    return try_daemon(settings)


def supervisor(settings: Settings, *, die_with_parent: bool = False):
    from llamactl.supervisor import Supervisor

    return Supervisor(settings, die_with_parent=die_with_parent)
