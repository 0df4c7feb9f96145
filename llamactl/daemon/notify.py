"""sd_notify: tell systemd the truth (READY, STATUS, WATCHDOG, RELOADING, STOPPING).

The protocol is one datagram of newline-separated KEY=VALUE pairs to the unix socket named by
$NOTIFY_SOCKET (a path, or "@name" for an abstract socket). Without $NOTIFY_SOCKET every call is a
no-op, so the same code runs under systemd, in a terminal and in tests. Sending never raises: a
broken notify socket must not take the daemon down.

The watchdog interval comes from $WATCHDOG_USEC (set by WatchdogSec=); $WATCHDOG_PID, when set, must be
our pid. Ping at half the interval (`Notifier.watchdog_interval_s`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("llamactl.daemon.notify")


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # abstract namespace
    return raw


class Notifier:
    """One per daemon; reads the environment once (pass `environ` in tests)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        # Only unix sockets ("/path" or "@abstract"); vsock ("vsock:...") is for VMs, not us.
        self.address = _address(raw) if raw.startswith(("/", "@")) else None
        self.watchdog_usec: int | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half of WatchdogSec, or None when no watchdog is armed."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: object) -> bool:
        """Send KEY=VALUE pairs in one datagram. True if it was delivered, False if disabled or failed."""
        if self.address is None:
            return False
        message = "\n".join(f"{k}={_one_line(str(v))}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message, self.address)
            return True
        except OSError as e:
            if not self._warned:  # say it once; a watchdog ping every few seconds must not flood the log
                log.warning("sd_notify to %r failed: %s", self.address, e)
                self._warned = True
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self, status: str | None = None) -> bool:
        """Before a reload (SIGHUP); send `ready()` when it is done. MONOTONIC_USEC is required by systemd >= 253."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, **({"STATUS": status} if status else {}))

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (a model that loads slowly): EXTEND_TIMEOUT_USEC."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    async def watchdog_loop(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping WATCHDOG=1 at half the interval until cancelled. Returns at once when no watchdog is armed.

        `healthy` is asked before each ping; when it says False the ping is skipped, so a daemon whose
        event loop still turns but whose core is wedged gets restarted by systemd.
        """
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            return
        while True:
            if healthy is None or healthy():
                self.watchdog()
            await asyncio.sleep(interval)


def _one_line(value: str) -> str:
    return value.replace("\n", " ")
