"""The CLI against a daemon that accepts connections but does not answer (SIGSTOP): a sentence within seconds
and exit 6 instead of a silent wait of minutes; progress during a long wait, which notices a daemon that stops
answering mid-way; and a command whose client went away before the daemon read it is not carried out later.
A real `llamactl serve` process with the fake llama-server; the CLI runs as its own process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

from llamactl.daemon.control import socket_path
from llamactl.settings import Settings
from tests.test_service_daemon import Daemon, child_pids, own_home  # noqa: F401 - own_home is a fixture

ANSWER = {"LLAMACTL_DAEMON_ANSWER_S": "1"}


def cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamactl", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout_s)


def test_a_stopped_daemon_is_said_at_once_and_a_command_it_read_late_is_not_carried_out(own_home: Settings,
                                                                                        fake_profile, tmp_path):
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "fake")
    try:
        daemon.wait_notify(r"READY=1")
        assert cli("up", "fake").returncode == 0
        child = child_pids(settings)["fake"]
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            for command in (("down", "fake"), ("up", "fake"), ("switch", "fake", "auto"), ("status",)):
                r = cli(*command, env=ANSWER, timeout_s=30)  # before: 120 s, 900 s, 610 s, 30 s of silence
                assert r.returncode == 6, (command, r.stderr)
                assert "is not answering" in r.stderr and f"pid {daemon.proc.pid}, stopped" in r.stderr, r.stderr
                assert f"kill -CONT {daemon.proc.pid}" in r.stderr and "nothing was asked of it" in r.stderr
                assert "Traceback" not in r.stderr
            # A client that sent its command while the daemon was stopped, then gave up.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(socket_path(settings)))
                s.sendall(json.dumps({"op": "down", "args": {"profile": "fake"}}).encode() + b"\n")
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        daemon.wait_line(r"gave up `down fake`: its client went away")
        assert child_pids(settings).get("fake") == child  # the down it read late was not carried out
        r = cli("status", env=ANSWER)
        assert r.returncode == 0 and "fake" in r.stdout, r.stderr
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)


def test_a_long_wait_shows_progress_and_notices_a_daemon_that_stops_answering(own_home: Settings, fake_profile,
                                                                             tmp_path):
    settings = own_home
    fake_profile("slow", load_timeout_s=120, FAKE_LOAD_S="60", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "slow")
    up = None
    try:
        daemon.wait_notify(r"READY=1")
        up = subprocess.Popen([sys.executable, "-m", "llamactl", "up", "slow"], env={**os.environ, **ANSWER},
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        seen = []
        for line in up.stderr:
            seen.append(line)
            if "still waiting for the daemon: `up slow`" in line:
                break
        assert any("still waiting" in line for line in seen), seen
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            rest = up.stderr.read()  # ends when the CLI exits; before: it waited the whole 900 s
            assert up.wait(30) == 6, rest
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        assert "stopped answering while `up` waited" in rest and "the command was sent" in rest, rest
        assert daemon.stop() == 0
    finally:
        if up is not None and up.poll() is None:
            up.kill()
        daemon.stop(signal.SIGKILL)
