"""The control socket: a real unix socket, permissions, stale sockets, one daemon per state dir,
errors passed through to the CLI, and a client that falls back to standalone."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llamactl.daemon.control import (
    ControlServer, DaemonClient, DaemonError, DaemonRunning, daemon_lock, socket_path, try_daemon,
)
from llamactl.errors import NotRunning
from llamactl.settings import Settings


class FakeHandler:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.up_release = threading.Event()

    async def up(self, profile: str):
        self.calls.append(("up", profile))
        if profile == "nope":
            raise NotRunning("profile 'nope' is not running", hint="start it with `llamactl up nope`")
        if profile == "boom":
            raise RuntimeError("bug")
        return {"profile": profile, "state": "ready", "port": 1234}

    async def down(self, profile: str):
        self.calls.append(("down", profile))
        return True

    async def switch(self, group: str, member: str, timeout_s: float):
        self.calls.append(("switch", group, member, timeout_s))
        return {"lane": group, "active": member}

    async def status(self):
        return {"lanes": [], "servers": [{"profile": "a", "state": "ready"}]}

    async def logs_path(self, profile: str) -> str:
        return f"/logs/{profile}.log"


@contextmanager
def daemon(settings: Settings, handler=None) -> Iterator[ControlServer]:
    """Run a ControlServer on its own event loop thread, as the daemon would."""
    handler = handler or FakeHandler()
    loop = asyncio.new_event_loop()
    server = ControlServer(settings, handler)
    started = threading.Event()
    stop = asyncio.Event()
    error: list[BaseException] = []

    async def main() -> None:
        try:
            async with server:
                started.set()
                await stop.wait()
        except BaseException as e:
            error.append(e)
            started.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),))
    thread.start()
    started.wait(10)
    try:
        if error:
            raise error[0]
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_requests_round_trip(settings: Settings):
    handler = FakeHandler()
    with daemon(settings, handler):
        client = try_daemon(settings)
        assert isinstance(client, DaemonClient)
        assert client.up("coding") == {"profile": "coding", "state": "ready", "port": 1234}
        assert client.down("coding") is True
        assert client.switch("gem", "gem-plain", timeout_s=5) == {"lane": "gem", "active": "gem-plain"}
        assert client.status()["servers"] == [{"profile": "a", "state": "ready"}]
        assert client.logs_path("coding") == Path("/logs/coding.log")
    assert handler.calls == [("up", "coding"), ("down", "coding"), ("switch", "gem", "gem-plain", 5.0)]


def test_socket_is_0600_in_a_0700_dir_and_is_removed_on_exit(settings: Settings):
    settings.state_dir.mkdir(parents=True, mode=0o755)
    settings.state_dir.chmod(0o755)
    with daemon(settings):
        path = socket_path(settings)
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(settings.state_dir.stat().st_mode) == 0o700
    assert not path.exists()
    assert try_daemon(settings) is None


def test_errors_reach_the_cli_with_their_hint(settings: Settings):
    with daemon(settings):
        client = try_daemon(settings)
        with pytest.raises(DaemonError) as e:
            client.up("nope")
        assert e.value.message == "profile 'nope' is not running"
        assert e.value.hint == "start it with `llamactl up nope`"
        assert e.value.type == "NotRunning"
        with pytest.raises(DaemonError, match="internal error in the daemon: RuntimeError: bug"):
            client.up("boom")
        with pytest.raises(DaemonError, match="'op' must be one of"):
            client.request("reboot")
        with pytest.raises(DaemonError, match="'profile' must be a non-empty string"):
            client.request("up", {"profile": 3})
        with pytest.raises(DaemonError, match="'timeout_s' must be a positive number"):
            client.request("switch", {"group": "g", "member": "m", "timeout_s": "soon"})
        assert client.status()  # the channel survives all of the above


def test_malformed_request_gets_an_answer_not_a_hang(settings: Settings):
    with daemon(settings):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(socket_path(settings)))
            s.sendall(b"{not json\n")
            answer = s.recv(4096)
        assert b'"ok": false' in answer and b"bad_request" in answer


def test_stale_socket_is_detected_and_cleaned(settings: Settings):
    path = socket_path(settings)
    path.parent.mkdir(parents=True, mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # a socket file nobody listens on: what a SIGKILLed daemon leaves behind
    s.close()
    assert path.exists()
    assert try_daemon(settings) is None  # the CLI goes standalone
    assert not path.exists()  # and the stale file is gone


def test_daemon_replaces_a_stale_socket(settings: Settings):
    path = socket_path(settings)
    path.parent.mkdir(parents=True, mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    with daemon(settings):
        assert try_daemon(settings).status()


def test_one_daemon_per_state_dir(settings: Settings):
    with daemon(settings):
        with pytest.raises(DaemonRunning, match="another llamactl daemon is running"):
            with daemon(settings):
                pass
        assert try_daemon(settings).status()  # the first one is untouched


def test_client_does_not_remove_the_socket_of_a_daemon_that_is_starting(settings: Settings):
    path = socket_path(settings)
    path.parent.mkdir(parents=True, mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, not yet listening
    try:
        with daemon_lock(settings):  # held by the (starting) daemon
            assert try_daemon(settings) is None
            assert path.exists()
    finally:
        s.close()


def test_a_file_that_is_not_a_socket_is_not_deleted(settings: Settings):
    path = socket_path(settings)
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_text("precious")
    with pytest.raises(Exception, match="is not a socket"):
        with daemon(settings):
            pass
    assert path.read_text() == "precious"


def test_other_users_are_refused(settings: Settings):
    """Defence in depth: even with loosened permissions, a peer of another uid gets no service."""
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    python = shutil.which("python3", path="/usr/bin:/bin")  # one any user may run (the venv may be private)
    if python is None:
        pytest.skip("no system python3 to run as another user")
    public = Path(tempfile.mkdtemp(prefix="llamactl-ctl-"))
    try:
        server = ControlServer(settings, FakeHandler(), path=public / "ctl.sock")

        async def main() -> bytes:
            async with server:
                public.chmod(0o755)
                server.path.chmod(0o666)
                probe = ("import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(5); "
                         f"s.connect({str(server.path)!r}); s.sendall(b'{{\"op\": \"status\"}}\\n'); "
                         "print(s.recv(4096).decode())")
                proc = await asyncio.create_subprocess_exec(python, "-c", probe, user=65534,
                                                            stdout=asyncio.subprocess.PIPE)
                out, _ = await asyncio.wait_for(proc.communicate(), 20)
                return out

        answer = asyncio.run(main())
        assert b"permission denied" in answer and b"lanes" not in answer
    finally:
        shutil.rmtree(public, ignore_errors=True)
