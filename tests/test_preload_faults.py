"""Status lines of failures. A preload that fails in any way is reported and the daemon goes on to READY: the
preload runs in the daemon's task group, where an exception would end the daemon. A load past its timeout raised
a bare TimeoutError, whose empty message the status line indexed: an IndexError, and the daemon stopped."""

from __future__ import annotations

import asyncio
import logging

import pytest

import llamactl.daemon.service as service_module
from llamactl.daemon.service import Service
from llamactl.settings import Settings


class FailingLane:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def serve_once(self, member: str, *, timeout_s: float) -> None:
        raise self.error


@pytest.mark.parametrize("error", [TimeoutError(), RuntimeError("a bug in a load")])
def test_a_preload_that_fails_is_reported_and_the_daemon_becomes_ready(home, fake_profile, monkeypatch, caplog, error):
    name = fake_profile("first")
    service = Service(Settings(), host="127.0.0.1", port=0, preload=[name], environ={})
    monkeypatch.setattr(service_module, "lane_of", lambda router, profile: FailingLane(error))
    statuses, ready = [], []
    monkeypatch.setattr(service.notifier, "status", statuses.append)
    monkeypatch.setattr(service.notifier, "ready", ready.append)
    with caplog.at_level(logging.ERROR, logger="llamactl.daemon"):
        asyncio.run(service._preload(router=None))  # type: ignore[arg-type]
    assert any(s.startswith(f"{name} failed to load: ") and len(s) > len(f"{name} failed to load: ")
               for s in statuses), statuses
    assert ready and any(f"preloading {name} failed" in r.getMessage() for r in caplog.records)


def test_an_engine_failure_with_an_empty_message_still_makes_a_status_line():
    from llamactl.daemon.service import LaneEvents
    from llamactl.errors import LlamactlError, StartError, first_line

    statuses: list[str] = []

    class Notifier:
        status = staticmethod(statuses.append)

    LaneEvents(Notifier()).failed("big", LlamactlError(""))  # used to raise IndexError in the engine's event
    assert statuses == ["big failed: LlamactlError"]
    assert first_line(StartError("\n  exited with status 1\nlast lines: ...", cause="exit", log_tail=[])) == \
        "  exited with status 1"
    assert first_line(TimeoutError()) == "TimeoutError"
