"""sd_notify over a real datagram socket: path and abstract addresses, no-op without systemd, watchdog."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from llamactl.daemon.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path):
    """A datagram socket standing in for systemd's notify socket; yields (NOTIFY_SOCKET value, recv)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    s.bind(str(path))
    s.settimeout(5)

    def recv(block: bool = True) -> dict[str, str]:
        s.settimeout(5 if block else 0)
        data = s.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    yield str(path), recv
    s.close()


def test_ready_status_stopping_reach_the_socket(listener):
    address, recv = listener
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("serving coding")
    assert recv() == {"READY": "1", "STATUS": "serving coding"}
    assert n.status("loading coding\nstep 2")
    assert recv() == {"STATUS": "loading coding step 2"}  # one line per field, always
    assert n.stopping()
    assert recv() == {"STOPPING": "1"}
    assert n.watchdog()
    assert recv() == {"WATCHDOG": "1"}
    assert n.extend_timeout(90)
    assert recv() == {"EXTEND_TIMEOUT_USEC": "90000000"}


def test_reloading_carries_the_monotonic_clock(listener):
    address, recv = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": address}).reloading("reloading profiles")
    msg = recv()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1" and msg["STATUS"] == "reloading profiles"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_abstract_socket():
    name = f"llamactl-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert s.recv(100) == b"READY=1"


def test_without_systemd_everything_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    asyncio.run(asyncio.wait_for(n.watchdog_loop(), 1))  # returns at once


def test_a_dead_socket_does_not_raise(tmp_path: Path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.ready() is False
    assert n.watchdog() is False


def test_watchdog_interval_and_pid():
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15.0
    other = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None  # meant for another process
    mine = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval_s == 0.0005
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "0"}).watchdog_interval_s is None


def test_watchdog_loop_pings_and_skips_when_unhealthy(listener):
    address, recv = listener

    def drain() -> int:
        count = 0
        try:
            while True:
                recv(block=False)
                count += 1
        except BlockingIOError:
            return count

    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "20000"})  # ping every 10 ms
    healthy = {"ok": True, "asked": 0}

    def check() -> bool:
        healthy["asked"] += 1
        return healthy["ok"]

    async def main() -> None:
        task = asyncio.create_task(n.watchdog_loop(check))
        try:
            got = await asyncio.to_thread(lambda: [recv() for _ in range(3)])
            assert got == [{"WATCHDOG": "1"}] * 3
            healthy["ok"] = False
            asked = healthy["asked"]
            while healthy["asked"] < asked + 2:
                await asyncio.sleep(0.01)
            drain()  # what was sent before the flag
            asked = healthy["asked"]
            while healthy["asked"] < asked + 3:  # three more rounds: no ping
                await asyncio.sleep(0.01)
            assert drain() == 0
        finally:
            task.cancel()

    asyncio.run(main())
