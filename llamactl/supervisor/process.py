"""One llama-server child: spawn in its own process group, wait until ready, stop the whole group.

ManagedProcess owns the child's state; every change goes through `_move`, which checks TRANSITIONS.
"""

from __future__ import annotations

import ctypes
import enum
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from llamactl.engines.common import LaunchSpec


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: dict[State, set[State]] = {
    State.STOPPED: {State.STARTING},
    State.STARTING: {State.READY, State.STOPPING, State.FAILED},
    State.READY: {State.STOPPING, State.FAILED},
    State.STOPPING: {State.STOPPED},
    State.FAILED: {State.STARTING, State.STOPPING, State.STOPPED},
}

HEALTH_TIMEOUT_S = 2.0  # ik accepts the connection and hangs while loading: a short timeout means "loading"
POLL_INTERVAL_S = 0.05  # /health at least this often; each poll is about a millisecond of CPU beside the loading engine
# Between polls the log's size is looked at this often (a stat: microseconds): an engine logs a line as it becomes
# ready ("model loaded", "listening"), so a log that grew is polled at once instead of up to 50 ms later.
LOG_WATCH_S = 0.01
PR_SET_PDEATHSIG = 1


class ReadyOutcome(enum.Enum):
    READY = "ready"
    EXITED = "exited"
    TIMED_OUT = "timed out"
    PORT_TAKEN = "port taken"  # /health answered, but from a socket another process owns


def line_buffered(argv: list[str]) -> list[str]:
    """Run under `stdbuf -oL -eL` where available: ik_llama.cpp logs to stdout through C stdio,
    which a file makes block-buffered, so its per-request lines would show up only at exit.
    stdbuf execs the binary, so the process's command line is still exactly `argv`."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-oL", "-eL", *argv] if stdbuf else argv


def die_with_parent_preexec() -> None:
    """preexec_fn: SIGKILL this child when the spawning thread's process dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ManagedProcess:
    def __init__(self, spec: LaunchSpec, log_path: Path, *, cwd: Path, die_with_parent: bool = False) -> None:
        self.spec = spec
        self.log_path = log_path
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.state = State.STOPPED
        self.popen: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def _move(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal process state change {self.state.value} -> {new.value}")
        self.state = new

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def spawn(self) -> None:
        self._move(State.STARTING)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Own session => own process group; the child never gets the CLI's Ctrl-C.
            self.popen = subprocess.Popen(
                line_buffered(self.spec.argv), env=self.spec.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                preexec_fn=die_with_parent_preexec if self.die_with_parent else None,
            )

    def create_time(self) -> float:
        return psutil.Process(self.pid).create_time()

    def poll_exit(self) -> int | None:
        assert self.popen is not None
        code = self.popen.poll()
        if code is not None:
            self.exit_code = code
        return code

    def listens_on(self, port: int) -> bool:
        """Whether the child (or a process it started) holds the listening socket on `port`: a /health 200 from
        a socket someone else bound first (a squatter on the same box) is not our engine being ready."""
        try:
            leader = psutil.Process(self.pid)
            family = [leader, *leader.children(recursive=True)]
        except psutil.Error:
            return False
        for proc in family:
            try:
                if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                       for c in proc.net_connections(kind="inet")):
                    return True
            except psutil.Error:
                continue
        return False

    def wait_ready(self, url: str, timeout_s: float, on_tick: Callable[[], None] | None = None,
                   port: int | None = None) -> ReadyOutcome:
        """Poll /health until 200 (from a socket the child owns, when `port` is given), the process exits, or
        the deadline passes. /health is asked every POLL_INTERVAL_S, and at once when the log has grown."""
        deadline = time.monotonic() + timeout_s
        next_poll = 0.0
        logged = -1
        while True:
            if self.poll_exit() is not None:
                self._move(State.FAILED)
                return ReadyOutcome.EXITED
            now = time.monotonic()
            size = self._log_size()
            if now >= next_poll or size != logged:
                logged, next_poll = size, now + POLL_INTERVAL_S
                if health_status(url, HEALTH_TIMEOUT_S) == 200:
                    if port is not None and not self.listens_on(port):
                        self._move(State.FAILED)
                        return ReadyOutcome.PORT_TAKEN
                    self._move(State.READY)
                    return ReadyOutcome.READY
            if on_tick:
                on_tick()
            if time.monotonic() >= deadline:
                self._move(State.FAILED)
                return ReadyOutcome.TIMED_OUT
            time.sleep(LOG_WATCH_S)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return -1

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the group, wait, SIGKILL the group, reap."""
        if self.state is State.STOPPED:
            return
        self._move(State.STOPPING)
        if self.popen is not None:
            stop_group(self.popen.pid, timeout_s, reap=self.popen)
        self._move(State.STOPPED)


def health_status(url: str, timeout_s: float) -> int | None:
    """GET URL/health: its status code, or None when there is no answer (refused: not listening yet; timed out:
    ik while loading). The standard library's client: this runs in `llamactl up`, where importing httpx would be
    a tenth of a second of the command."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return members


def stop_group(pgid: int, timeout_s: float, reap: subprocess.Popen[bytes] | None = None) -> bool:
    """Stop every process in group `pgid`: SIGTERM, wait up to timeout_s, then SIGKILL.

    Returns True if it had to SIGKILL. `reap` is our own Popen for the leader, waited on so no
    zombie is left behind.
    """
    killed = False
    members = _group_members(pgid)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(members, timeout=timeout_s)
    if alive:
        killed = True
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        psutil.wait_procs(alive, timeout=5)
    if reap is not None:
        try:
            reap.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return killed
