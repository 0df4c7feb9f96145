"""Helpers for router tests: profiles in memory, a router served by uvicorn in a thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from llamactl.profiles import Profile, Speculation
from llamactl.router import Router, RouterConfig, create_app
from tests.fakes.fast_backend import FakeBackends, FakeConfig, ServerThread


def profile(name: str, *, group: str | None = None, spec: bool = False, parallel: int | None = 1,
            alias: str | None = None) -> Profile:
    return Profile(name=name, model="/models/fake.gguf", group=group, alias=alias, parallel=parallel,
                   speculation=Speculation(type="ngram-mod" if spec else "none"))


def group_profiles(group: str = "coding", parallel: int = 1) -> list[Profile]:
    return [profile(f"{group}-spec", group=group, spec=True, parallel=parallel),
            profile(f"{group}-plain", group=group, parallel=parallel)]


def fake_backends(profiles: list[Profile], **kwargs) -> FakeBackends:
    return FakeBackends({p.name: FakeConfig(name=p.name, spec=p.speculation.enabled) for p in profiles}, **kwargs)


@contextmanager
def served(profiles: list[Profile], backends, config: RouterConfig | None = None) -> Iterator[tuple[str, Router]]:
    router = Router(profiles, backends, config or RouterConfig())
    server = ServerThread(create_app(router))
    try:
        yield server.url, router
    finally:
        if isinstance(backends, FakeBackends):
            for backend in backends.backends.values():
                backend.gate.set()  # never leave a held request behind a failed assertion
        server.stop()
        if isinstance(backends, FakeBackends):
            backends.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll a condition (not a fixed sleep): returns as soon as it holds, fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def lane_status(url: str, lane: str) -> dict:
    status = httpx.get(f"{url}/llamactl/status", timeout=5).json()
    return next(entry for entry in status["lanes"] if entry["lane"] == lane)
