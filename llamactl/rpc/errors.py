"""Errors about RPC workers: each names the worker, its address, and what was tried."""

from __future__ import annotations

from llamactl.errors import LlamactlError


class WorkerError(LlamactlError):
    """A worker is unknown, unreachable, or speaks another RPC protocol. `worker` names it."""

    exit_code = 4

    def __init__(self, message: str, *, worker: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.worker = worker


class WorkerUnreachable(WorkerError):
    """Nothing answers at the worker's address (refused, timed out, busy with another client)."""


class WorkerVersionMismatch(WorkerError):
    """The worker's rpc-server and this llama-server were built from different ggml (RPC protocol)."""
