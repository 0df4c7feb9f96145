"""What the router needs from whoever runs the engines. The router never imports the supervisor:
service.py adapts the Supervisor to this Protocol; tests hand in fakes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Upstream:
    """A ready llama-server: where it listens, the key it wants (sent as Bearer when set), and its log
    (read for acceptance when the engine's timings lack it, as in the pinned ik_llama.cpp)."""

    base_url: str
    api_key: str | None = None
    log_path: str | None = None


class Backends(Protocol):
    async def ensure_ready(self, profile_name: str) -> Upstream:
        """Start the profile if it is not running and return once it serves; raise LlamactlError if not."""
        ...

    async def stop(self, profile_name: str) -> None:
        """Stop the profile if it runs (idempotent)."""
        ...


def serving_now(backends: Backends, profile_name: str) -> bool:
    """Whether `profile_name` already serves without a start (an engine that restarted itself after a crash
    or a worker's return). Backends that cannot tell (`serving` absent) say no."""
    serving = getattr(backends, "serving", None)
    return bool(serving(profile_name)) if serving is not None else False


def worker_down(backends: Backends, profile_name: str, error: Exception) -> None:
    """Tell the backends that planning `profile_name` found one of its RPC workers down (the box asks the workers
    before the engine is started, and may find out before the engine's monitor does). Backends without the step
    (`worker_down` absent) learn it from their own start."""
    down = getattr(backends, "worker_down", None)
    if down is not None:
        down(profile_name, error)


async def fetch_models(backends: Backends, profile_name: str) -> None:
    """Have the profile's model files fetched (models from the Hub) before the lane makes room for it, so a
    download neither holds box memory nor counts against the load timeout. Backends without the step
    (`fetch_models` absent) have their files already."""
    fetch = getattr(backends, "fetch_models", None)
    if fetch is not None:
        await fetch(profile_name)
