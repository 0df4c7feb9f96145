"""Supervision of llama-server children: spawn, health, stop, state that outlives the CLI."""

from llamactl.supervisor.state import ServerRecord
from llamactl.supervisor.supervisor import ServerStatus, Supervisor, free_port

__all__ = ["ServerRecord", "ServerStatus", "Supervisor", "free_port"]
