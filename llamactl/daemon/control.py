"""The daemon's control channel: a unix socket in the state dir that `llamactl up/down/switch/status/logs`
use to talk to a running `llamactl serve`, falling back to standalone when there is none.

Protocol: one JSON object per line each way, one request per connection.
  request:  {"op": "ping" | "up" | "down" | "switch" | "status" | "logs-path", "args": {...}}
  response: {"ok": true, "result": ...}  or  {"ok": false, "error": {"message", "hint", "type"}}

Liveness: a daemon that accepts connections but does not answer (stopped with SIGSTOP, wedged) would hold a
CLI for the whole of a long command's wait (900 s for `up`). So the client first asks `ping`, answered by the
server itself within LLAMACTL_DAEMON_ANSWER_S, and only then sends the command; during the long wait it pings
again on a second connection every few seconds (and says how long it has waited), giving up with
DaemonNotAnswering as soon as a ping goes unanswered. A command read after its client went away (the daemon
was stopped with it queued, then resumed) is not carried out: the log says it was given up.

Safety: the socket is 0600 in a 0700 directory, and the server also checks the peer's uid
(SO_PEERCRED): only the daemon's own user (or root) is answered. A socket file with no listener
behind it (a daemon killed with SIGKILL) is detected and removed. One daemon per state dir: the
daemon holds an flock on <state_dir>/daemon.lock for its whole life. (Two CLIs starting or stopping
the same profile are already serialised by the Supervisor's per-profile locks, StateStore.lock; the
daemon lock is a different thing, a singleton, so it lives outside <state_dir>/locks where any file
name could be a profile's.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llamactl.errors import LlamactlError
from llamactl.inputs import parse_json, switch_request
from llamactl.names import check_profile_name, is_profile_name, shown
from llamactl.settings import Settings

if TYPE_CHECKING:
    import asyncio  # the server's, imported where it runs: the CLI's client side needs no event loop

log = logging.getLogger("llamactl.daemon.control")

DAEMON_LOCK_NAME = "daemon.lock"
MAX_MESSAGE_BYTES = 64 * 1024
REQUEST_READ_TIMEOUT_S = 5.0
OPS = ("ping", "up", "down", "switch", "status", "logs-path")
PROGRESS_EVERY_ANSWERS = 2  # during a long wait: ping and say how long it has been, every 2 x answer_s


class DaemonError(LlamactlError):
    """The daemon answered with an error (its message and hint are passed through). Its exit code is the one
    the same error has standalone, so `llamactl up nosuch` exits alike with or without a daemon."""

    def __init__(self, message: str, *, hint: str | None = None, type_: str = "error") -> None:
        super().__init__(message, hint=hint)
        self.type = type_
        self.exit_code = exit_code_of(type_)


def exit_code_of(type_name: str) -> int:
    """The exit code of the LlamactlError class named `type_name` (1 for anything else)."""
    pending: list[type[LlamactlError]] = [LlamactlError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == type_name:
            return cls.exit_code
        pending += cls.__subclasses__()
    return LlamactlError.exit_code


class DaemonRunning(LlamactlError):
    exit_code = 5


class DaemonNotAnswering(LlamactlError):
    """The daemon accepts connections but does not answer (stopped, wedged): nothing was asked of it, or what
    was asked will not be carried out once it resumes."""

    exit_code = 6


class ControlHandler(Protocol):
    """What the daemon (service.py) plugs into the control server. Results must be JSON-serialisable.

    Raise LlamactlError (or a subclass) for a failure the user should see; its message and hint go
    back to the CLI unchanged.
    """

    async def up(self, profile: str) -> Any: ...

    async def down(self, profile: str) -> Any: ...

    async def switch(self, group: str, member: str, timeout_s: float) -> Any: ...

    async def status(self) -> Any: ...

    async def logs_path(self, profile: str) -> str: ...


def socket_path(settings: Settings) -> Path:
    return settings.daemon_socket


@contextlib.contextmanager
def daemon_lock(settings: Settings) -> Iterator[None]:
    """Hold the daemon singleton lock; raises DaemonRunning at once if another process holds it."""
    _secure_dir(settings.state_dir)
    fd = os.open(settings.state_dir / DAEMON_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonRunning(f"another llamactl daemon is running on {settings.state_dir}",
                                hint="stop it first (systemctl stop llamactl), or use another LLAMACTL_HOME") from None
        yield
    finally:
        os.close(fd)


def _secure_dir(path: Path) -> None:
    """Create `path` 0700, or tighten it to 0700 if we own it; refuse one that others can write to."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid():
        if stat.S_IMODE(st.st_mode) != 0o700:
            path.chmod(0o700)
    elif os.getuid() != 0 or st.st_mode & 0o022:
        raise LlamactlError(f"{path} belongs to uid {st.st_uid}, not to this user; refusing to put the "
                            "control socket there", hint="set LLAMACTL_HOME to a directory of your own")


def listener_alive(path: Path, timeout_s: float = 1.0) -> bool:
    """Whether something accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(str(path))
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return False
            raise


def remove_stale_socket(path: Path) -> bool:
    """Remove a socket file with no listener behind it. True if one was removed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise LlamactlError(f"{path} exists and is not a socket", hint="move it away; llamactl needs that name")
    if listener_alive(path):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    log.info("removed stale control socket %s (no daemon behind it)", path)
    return True


# ------------------------------------------------------------------------------------------------ server


class ControlServer:
    """asyncio unix-socket server. Use as `async with ControlServer(settings, handler) as server:`.

    On entry it takes the daemon lock (so a second daemon on the same state dir fails fast with
    DaemonRunning), removes a stale socket, binds with 0600, and serves until exit; on exit it closes
    and unlinks its own socket.
    """

    def __init__(self, settings: Settings, handler: ControlHandler, *, path: Path | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.path = path or socket_path(settings)
        self._stack = contextlib.ExitStack()
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    async def __aenter__(self) -> "ControlServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        import asyncio

        _secure_dir(self.path.parent)
        self._stack.enter_context(daemon_lock(self.settings))
        try:
            remove_stale_socket(self.path)
            old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
            try:
                self._server = await asyncio.start_unix_server(self._serve_one, path=str(self.path),
                                                               limit=MAX_MESSAGE_BYTES)
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            self._inode = self.path.lstat().st_ino
        except BaseException:
            self._stack.close()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and self.path.lstat().st_ino == self._inode:
                self.path.unlink()  # only our own socket, never one a newer daemon made
        self._stack.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        line = b""
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_READ_TIMEOUT_S)
            except (asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
                line = b""
            # Read first, then refuse: answering before the peer has written makes its write fail (EPIPE).
            if not _peer_allowed(writer):
                await _reply(writer, _error("permission denied: not the daemon's user", "forbidden"))
                return
            try:
                request = parse_json(line, "the request line")
            except ValueError as e:
                await _reply(writer, _error(f"bad request: expected one JSON object per line ({e})", "bad_request"))
                return
            if _client_gone(writer):
                log.warning("control: gave up %s: its client went away before the daemon read it (was the "
                            "daemon stopped?); not carrying it out", _describe(request))
                return
            await _reply(writer, await self.dispatch(request))
        except (ConnectionError, asyncio.IncompleteReadError):
            if line.strip():  # not a probe that connects and closes (listener_alive)
                log.info("control: the client went away before its answer")  # Ctrl-C, or it stopped waiting
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def dispatch(self, request: object) -> dict[str, Any]:
        if not isinstance(request, dict) or request.get("op") not in OPS:
            return _error(f"bad request: 'op' must be one of {', '.join(OPS)}", "bad_request")
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return _error("bad request: 'args' must be an object", "bad_request")
        op = request["op"]
        if op == "ping":
            return {"ok": True, "result": {"pid": os.getpid()}}
        try:
            if op == "status":
                result = await self.handler.status()
            elif op == "switch":
                try:
                    group, member, timeout_s = switch_request(args, 600.0)
                except ValueError as e:
                    raise _BadArgs(str(e)) from None
                result = await self.handler.switch(group, member, timeout_s)
            else:
                profile = check_profile_name(_str_arg(args, "profile"))
                method = {"up": self.handler.up, "down": self.handler.down, "logs-path": self.handler.logs_path}[op]
                result = await method(profile)
        except _BadArgs as e:
            return _error(f"bad request: {e}", "bad_request")
        except LlamactlError as e:
            return _error(e.message, type(e).__name__, e.hint)
        except Exception as e:  # the handler's bug must not kill the control channel
            log.exception("control %s failed", op)
            return _error(f"internal error in the daemon: {type(e).__name__}: {e}", "internal_error")
        return {"ok": True, "result": result}


class _BadArgs(ValueError):
    pass


def _client_gone(writer: asyncio.StreamWriter) -> bool:
    """Whether the client closed its socket after sending its line. Linux reports POLLHUP on a unix socket once
    the peer has shut both directions; a client that only shut its writing side (and waits for the answer,
    like `nc -N`) gives no POLLHUP."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))


def _describe(request: object) -> str:
    """A request as a log line may show it: its op and profile or group, bounded (a client wrote them)."""
    if not isinstance(request, dict):
        return "a request"
    op = request.get("op") if request.get("op") in OPS else "an unknown op"
    args = request.get("args") if isinstance(request.get("args"), dict) else {}
    target = args.get("profile") or args.get("group") or ""
    return f"`{op} {target if is_profile_name(target) else shown(target, 64)}`"


def _str_arg(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise _BadArgs(f"'{key}' must be a non-empty string")
    return value


def _error(message: str, type_: str, hint: str | None = None) -> dict[str, Any]:
    return {"ok": False, "error": {"message": message, "type": type_, "hint": hint}}


async def _reply(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    writer.write(json.dumps(payload, default=str).encode() + b"\n")
    await writer.drain()


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


# ------------------------------------------------------------------------------------------------ client


class DaemonClient:
    """Synchronous client for CLIs. Each call opens one connection; every call but `ping` first checks the
    daemon answers within `answer_s`, and a long wait pings it again and reports progress through `say`."""

    def __init__(self, path: Path, *, timeout_s: float = 30.0, answer_s: float = 5.0,
                 say: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.answer_s = answer_s
        self.say = say

    def request(self, op: str, args: dict[str, Any] | None = None, *, wait_s: float | None = None) -> Any:
        """Send one request; `wait_s` bounds the whole exchange (default: the client's timeout_s)."""
        if op != "ping":
            self.ping()
        wait_s = wait_s or self.timeout_s
        started = time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.settimeout(self.answer_s)
                s.connect(str(self.path))
                s.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
                data = self._wait_for_answer(s, op, args or {}, started, wait_s)
            except socket.timeout:
                raise self._not_answering(s, f"no answer to `{op}` within {wait_s:g} s", sent=True) from None
            except OSError as e:
                raise DaemonError(f"lost the llamactl daemon at {self.path}: {e}",
                                  hint="is `llamactl serve` still running? (systemctl status llamactl)") from None
        try:
            response = json.loads(data)
        except ValueError:
            raise DaemonError(f"the daemon sent a malformed answer: {data[:200]!r}") from None
        if not response.get("ok"):
            error = response.get("error") or {}
            raise DaemonError(str(error.get("message", "unknown error")), hint=error.get("hint"),
                              type_=str(error.get("type", "error")))
        return response.get("result")

    def _wait_for_answer(self, s: socket.socket, op: str, args: dict[str, Any], started: float,
                         wait_s: float) -> bytes:
        """Read the answer line; every PROGRESS_EVERY_ANSWERS x answer_s, check the daemon still answers a
        ping (a second connection) and say how long this has taken."""
        if op == "ping":
            return _read_line(s)
        tick = self.answer_s * PROGRESS_EVERY_ANSWERS
        chunks: list[bytes] = []
        while True:
            left = started + wait_s - time.monotonic()
            if left <= 0:
                raise socket.timeout
            s.settimeout(min(tick, left))
            try:
                line = _read_line(s, chunks)
                return line
            except socket.timeout:
                if started + wait_s - time.monotonic() <= 0:
                    raise
            try:
                self.ping()
            except DaemonNotAnswering:
                raise self._not_answering(s, f"it stopped answering while `{op}` waited", sent=True) from None
            if self.say is not None:
                target = args.get("profile") or args.get("group") or ""
                self.say(f"still waiting for the daemon: `{op} {target}` for {time.monotonic() - started:.0f} s "
                         f"(gives up after {wait_s:g} s)")

    def ping(self) -> Any:
        """The daemon's own answer (its pid), within answer_s; DaemonNotAnswering otherwise."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.answer_s)
            try:
                s.connect(str(self.path))
                s.sendall(b'{"op": "ping"}\n')
                data = _read_line(s)
            except socket.timeout:
                raise self._not_answering(s, f"no answer within {self.answer_s:g} s") from None
            except OSError as e:
                raise DaemonError(f"lost the llamactl daemon at {self.path}: {e}",
                                  hint="is `llamactl serve` still running? (systemctl status llamactl)") from None
        if not data:
            raise DaemonError(f"the llamactl daemon at {self.path} closed the connection without an answer",
                              hint="is `llamactl serve` still running? (systemctl status llamactl)")
        return data

    def _not_answering(self, s: socket.socket, why: str, *, sent: bool = False) -> DaemonNotAnswering:
        pid = _listener_pid(s)
        state = _process_state(pid)
        where = f"pid {pid}" + (f", {state}" if state else "") if pid else "its pid unknown"
        if state == "stopped":
            hint = f"it was stopped (SIGSTOP, Ctrl-Z): `kill -CONT {pid}` resumes it"
        else:
            hint = ("it may be wedged: `systemctl status llamactl` or its log; `systemctl restart llamactl` "
                    "restarts it")
        outcome = ("the command was sent: if the daemon read it before it stopped, it carries it out when it "
                   "resumes (its log says)" if sent else "nothing was asked of it")
        return DaemonNotAnswering(f"the llamactl daemon at {self.path} is not answering ({where}): {why}; "
                                  f"{outcome}", hint=hint)

    def up(self, profile: str, timeout_s: float = 900.0) -> Any:
        return self.request("up", {"profile": profile}, wait_s=timeout_s)

    def down(self, profile: str, timeout_s: float = 120.0) -> Any:
        return self.request("down", {"profile": profile}, wait_s=timeout_s)

    def switch(self, group: str, member: str, timeout_s: float = 600.0) -> Any:
        return self.request("switch", {"group": group, "member": member, "timeout_s": timeout_s},
                            wait_s=timeout_s + 10)

    def status(self) -> Any:
        return self.request("status")

    def logs_path(self, profile: str) -> Path:
        return Path(self.request("logs-path", {"profile": profile}))


def _listener_pid(s: socket.socket) -> int | None:
    """The pid of the process that listens on the socket `s` is connected to (SO_PEERCRED)."""
    try:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid or None


def _process_state(pid: int | None) -> str | None:
    if not pid:
        return None
    import psutil

    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return None


def _read_line(s: socket.socket, chunks: list[bytes] | None = None) -> bytes:
    """One line from `s`. `chunks` keeps what was read so far across a timeout, for a caller that retries."""
    chunks = [] if chunks is None else chunks
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        if b"\n" in chunk:
            break
        if sum(len(c) for c in chunks) > 64 * MAX_MESSAGE_BYTES:
            raise DaemonError("the daemon's answer is too large")
    return b"".join(chunks).split(b"\n", 1)[0]


def try_daemon(settings: Settings, *, timeout_s: float = 30.0,
               say: Callable[[str], None] | None = None) -> DaemonClient | None:
    """A client for the running daemon, or None when there is none (then work standalone).

    A socket file left by a daemon that died without cleaning up is detected here; it is removed only
    when the daemon lock is free (no daemon is starting right now), so a client never races a daemon.
    """
    path = socket_path(settings)
    if not path.exists():
        return None
    if listener_alive(path):
        return DaemonClient(path, timeout_s=timeout_s, answer_s=settings.daemon_answer_s, say=say)
    with contextlib.suppress(OSError, LlamactlError):  # DaemonRunning: one is starting; leave its socket
        with daemon_lock(settings):
            remove_stale_socket(path)
    return None
