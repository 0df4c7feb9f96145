"""`llamactl serve` as a real daemon process in front of the fake llama-server: sd_notify, API keys,
the control socket, kill -9 of a child mid-stream, hangs, crash loops, slow loads, SIGHUP with an
invalid profile, SIGTERM draining, and kill -9 of the daemon itself. Loopback only; every wait is
bounded and waits for an event (a log line, a datagram, a process exit), never a fixed sleep."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor

HI = [{"role": "user", "content": "hi"}]  # the least a chat request must hold

KEY = "test-key-0123456789abcdef"
FAST = {  # a monitor that notices within a second, restarts quickly, gives up after 3 crashes
    "LLAMACTL_HEALTH_INTERVAL_S": "0.2", "LLAMACTL_HEALTH_TIMEOUT_S": "0.5", "LLAMACTL_HANG_PROBES": "2",
    "LLAMACTL_RESTART_BASE_DELAY_S": "0.1", "LLAMACTL_RESTART_MAX_CRASHES": "3", "LLAMACTL_DRAIN_TIMEOUT_S": "10",
    "LLAMACTL_ETC_PROFILES_DIR": "/nonexistent",
}


class Daemon:
    """`python -m llamactl serve --port 0` with its stderr collected line by line and its sd_notify
    datagrams received on a socket of our own."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.notify_path = tmp / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.messages: list[str] = []
        self.lines: list[str] = []
        self.cond = threading.Condition()
        full_env = {**os.environ, **FAST, "NOTIFY_SOCKET": str(self.notify_path), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "llamactl", "serve", "--port", "0", *args],
                                     env=full_env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read_log, daemon=True).start()
        threading.Thread(target=self._read_notify, daemon=True).start()
        line = self.wait_line(r"serving .* on (http://127\.0\.0\.1:\d+)")
        self.url = re.search(r"(http://127\.0\.0\.1:\d+)", line).group(1)

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip())
                self.cond.notify_all()

    def _read_notify(self) -> None:
        while True:
            try:
                data = self.notify.recv(4096)
            except OSError:
                return
            with self.cond:
                self.messages.append(data.decode())
                self.cond.notify_all()

    def _wait(self, source: list[str], pattern: str, timeout_s: float, start: int = 0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for item in source[start:]:
                    if rx.search(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and source is self.lines and not self.proc.stderr):
                    raise AssertionError(f"no {pattern!r} within {timeout_s}s; log:\n" + "\n".join(self.lines[-40:]))
                self.cond.wait(min(left, 0.5))

    def wait_line(self, pattern: str, timeout_s: float = 20, start: int = 0) -> str:
        return self._wait(self.lines, pattern, timeout_s, start)

    def wait_notify(self, pattern: str, timeout_s: float = 20) -> str:
        return self._wait(self.messages, pattern, timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self.notify.close()
        return code


def child_pids(settings: Settings) -> dict[str, int]:
    return {s.record.profile: s.record.pid for s in Supervisor(settings).status() if s.alive}


def fake_llama_servers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(part.endswith("fake_llama_server.py") for part in cmd) and "--port" in cmd:
            out.append(p)
    return out


def gone(pid: int, timeout_s: float = 10) -> bool:
    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def stream(url: str, body: dict, headers: dict | None = None, on_first=None) -> list[str]:
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"stream": True, "messages": HI, **body},
                      headers=headers or {}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if on_first is not None and len(events) == 1:
                    on_first()
    return events


@pytest.fixture
def own_home(settings: Settings, monkeypatch):
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    yield settings
    for p in ours(settings):  # never leave one behind, even when an assertion failed
        p.kill()


def ours(settings: Settings) -> list[psutil.Process]:
    out = []
    for p in fake_llama_servers():
        try:
            if p.environ().get("LLAMACTL_TEST_HOME") == str(settings.home):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_daemon_keys_control_kill_child_midstream_reload_and_drain(own_home: Settings, fake_profile, tmp_path,
                                                                  write_profile):
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "fake", "--preload", "fake", env={"LLAMACTL_API_KEYS": KEY})
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        assert daemon.wait_notify(r"READY=1")
        assert any("STATUS=loading fake" in m for m in daemon.messages)
        pid = child_pids(settings)["fake"]
        record = Supervisor(settings).running("fake")

        # Keys: /health open, no key / wrong key 401 (OpenAI shape), and the child refuses its own port without its key.
        assert httpx.get(f"{daemon.url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}):
            r = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "fake", "messages": HI}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{record.url}/v1/chat/completions", json={"model": "fake", "messages": HI}).status_code == 401
        assert record.api_key and record.api_key not in " ".join(psutil.Process(pid).cmdline())
        assert stream(daemon.url, {"model": "fake"}, auth)[-1] == "[DONE]"

        # The CLI talks to the daemon: status shows the server and the lane.
        out = CliRunner().invoke(main, ["status"])
        assert out.exit_code == 0, out.output
        assert "daemon pid" in out.output and "fake: active fake [ready" in out.output

        # kill -9 the child mid-stream: a clean error event and [DONE], then the monitor restarts it.
        mark = len(daemon.lines)
        events = stream(daemon.url, {"model": "fake", "messages": HI, "fake": {"tokens": 200, "delay_s": 0.02}}, auth,
                        on_first=lambda: os.kill(pid, signal.SIGKILL))
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "upstream_stream_broken"
        daemon.wait_line(r"llamactl\[fake\]: main: server is listening", start=mark)
        new_pid = child_pids(settings)["fake"]
        assert new_pid != pid and gone(pid, 1)
        assert stream(daemon.url, {"model": "fake"}, auth)[-1] == "[DONE]"

        # SIGHUP with an invalid profile: refused, the old configuration keeps serving.
        write_profile("fake", "ctx_size = 'lots'\n")
        mark = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_line(r"reload refused, the old configuration stays: fake: .*fake.toml", start=mark)
        daemon.wait_notify(r"RELOADING=1")
        assert stream(daemon.url, {"model": "fake"}, auth)[-1] == "[DONE]"

        # SIGTERM with a stream in flight: it completes, then the daemon stops its child and exits 0.
        got: list[str] = []
        t = threading.Thread(target=lambda: got.extend(
            stream(daemon.url, {"model": "fake", "messages": HI, "fake": {"tokens": 30, "delay_s": 0.03}}, auth,
                   on_first=lambda: daemon.proc.send_signal(signal.SIGTERM))))
        t.start()
        t.join(30)
        assert daemon.proc.wait(30) == 0
        assert got[-1] == "[DONE]" and len(got) == 31, got[-3:]
        assert any("STOPPING=1" in m for m in daemon.messages)
        assert gone(new_pid, 1), "the daemon left its llama-server behind"
        assert not (settings.state_dir / "llamactl.sock").exists()
    finally:
        daemon.stop(signal.SIGKILL)


def test_hung_child_is_restarted_and_a_crash_loop_ends_failed(own_home: Settings, fake_profile, tmp_path):
    settings = own_home
    fake_profile("hangs", mode="hang_later", FAKE_HANG_AFTER_S="0.3", LLAMACTL_TEST_HOME=str(settings.home))
    fake_profile("crashes", mode="crash_later", FAKE_CRASH_AFTER_S="0.6", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "hangs", "--profile", "crashes", "--preload", "hangs")
    try:
        daemon.wait_notify(r"READY=1")
        first = child_pids(settings)["hangs"]
        daemon.wait_line(r"hangs: hung: /health failed 2 times in a row while the process lived")
        daemon.wait_line(r"hangs: restart 1 in")
        assert gone(first, 10), "the hung child was not stopped"

        # crashes: every start dies soon after ready -> 3 crashes -> failed, with the reason.
        r = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "crashes", "messages": HI}, timeout=30)
        assert r.status_code == 200, r.text
        daemon.wait_line(r"crashes: crash loop: 3 crashes in .*; not restarting", timeout_s=30)
        r = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "crashes", "messages": HI}, timeout=30)
        assert r.status_code == 503, r.text
        assert "crash loop" in r.json()["error"]["message"]
        out = CliRunner().invoke(main, ["status"])
        assert re.search(r"crashes\s+failed\s+crash loop: 3 crashes", out.output), out.output
        assert "GGML_ASSERT failed" in out.output  # the last log lines
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)
    assert not ours(settings)


def test_slow_load_and_oom_fail_cleanly_and_a_child_ignoring_sigterm_is_killed(own_home: Settings, fake_profile,
                                                                             tmp_path):
    settings = own_home
    fake_profile("slow", load_timeout_s=0.5, FAKE_LOAD_S="30", LLAMACTL_TEST_HOME=str(settings.home))
    fake_profile("oom", mode="oom", LLAMACTL_TEST_HOME=str(settings.home))
    fake_profile("stubborn", mode="ignore_sigterm", stop_timeout_s=0.5, LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "slow", "--profile", "oom", "--profile", "stubborn",
                    "--preload", "stubborn")
    try:
        daemon.wait_notify(r"READY=1")
        stubborn = child_pids(settings)["stubborn"]
        r = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "slow", "messages": HI}, timeout=30)
        assert r.status_code == 503 and "not ready after 0.5 s (load_timeout_s)" in r.json()["error"]["message"]
        assert "slow" not in child_pids(settings)
        r = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "oom", "messages": HI}, timeout=30)
        message = r.json()["error"]["message"]
        assert r.status_code == 503 and "out of memory" in message and "memory plan for 'oom'" in message, message
        assert daemon.stop() == 0
        assert gone(stubborn, 1), "a child that ignores SIGTERM outlived the daemon"
    finally:
        daemon.stop(signal.SIGKILL)


def test_kill9_daemon_children_die_and_the_next_start_sweeps_orphans(own_home: Settings, fake_profile, tmp_path):
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "fake", "--preload", "fake")
    daemon.wait_notify(r"READY=1")
    pid = child_pids(settings)["fake"]
    daemon.stop(signal.SIGKILL)
    assert gone(pid, 10), "the llama-server outlived its SIGKILLed daemon"

    # A server started without a per-start key (as `llamactl up` did before it gave engines keys) is still
    # running when the daemon starts: it is stopped by identity, and the stale control socket of the killed
    # daemon does not get in the way. (Started in its own process, so the server is not this test's child:
    # no zombie to reap here.)
    keyless_up = ("from llamactl.profiles import load_profile; from llamactl.settings import load_settings; "
                  "from llamactl.supervisor import Supervisor; s = load_settings(); "
                  "Supervisor(s).start(load_profile('fake', s))")
    subprocess.run([sys.executable, "-c", keyless_up], check=True, timeout=30, capture_output=True)
    standalone = Supervisor(settings).running("fake")
    daemon = Daemon(tmp_path, "--profile", "fake")
    try:
        daemon.wait_line(r"stopping orphan llama-server fake \(pid %d\): started without an API key" % standalone.pid)
        daemon.wait_notify(r"READY=1")
        assert gone(standalone.pid, 5)
        r = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "fake", "messages": HI}, timeout=30)
        assert r.status_code == 200
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)
    assert not ours(settings)


def test_the_daemon_rotates_a_running_childs_log(own_home: Settings, fake_profile, tmp_path):
    """No `llamactl status` needed: the daemon's monitor keeps a running engine's log under log_max_bytes."""
    settings = own_home
    fake_profile("chatty", LLAMACTL_TEST_HOME=str(settings.home))  # the fake logs every /health probe
    daemon = Daemon(tmp_path, "--profile", "chatty", "--preload", "chatty", env={"LLAMACTL_LOG_MAX_BYTES": "2048"})
    log = settings.log_dir / "chatty.log"
    try:
        daemon.wait_notify(r"READY=1")
        deadline = time.monotonic() + 20
        while not log.with_name("chatty.log.1").exists():
            assert time.monotonic() < deadline, f"no rotation; log is {log.stat().st_size} bytes"
            time.sleep(0.1)
        assert log.with_name("chatty.log.1").stat().st_size > 2048
        assert log.stat().st_size < log.with_name("chatty.log.1").stat().st_size
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)
    assert not ours(settings)


def test_what_the_router_learnt_survives_a_restart_of_the_daemon(own_home: Settings, fake_profile, tmp_path):
    """A clean stop saves each member's measurements to <state_dir>/learned.json; the next daemon restores
    them before it serves, so the switching policy does not pay again to find out what it knew."""
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    path = settings.state_dir / "learned.json"
    daemon = Daemon(tmp_path, "--profile", "fake")
    try:
        for _ in range(2):  # answers that say how many tokens they decoded: a speed to learn
            assert httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "fake", "messages": HI}, timeout=30).status_code == 200
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)
    saved = json.loads(path.read_text())
    assert [(r["lane"], r["member"]) for r in saved["samples"]] == [("fake", "fake")] * 2
    assert all(r["tok_s"] > 0 for r in saved["samples"])
    again = Daemon(tmp_path, "--profile", "fake")
    try:
        again.wait_line(r"learned\.json: restored 2 measurements")
        assert again.stop() == 0
    finally:
        again.stop(signal.SIGKILL)
    assert not ours(settings)


def test_cli_up_down_logs_switch_go_through_the_running_daemon(own_home: Settings, fake_profile, tmp_path,
                                                               write_profile):
    """With a daemon running, the CLI asks it (over the control socket) instead of starting servers itself:
    the daemon's supervisor owns the child, which therefore has the daemon's per-start key."""
    settings = own_home
    fake_profile("g-spec", LLAMACTL_TEST_HOME=str(settings.home))
    fake_profile("g-plain", LLAMACTL_TEST_HOME=str(settings.home))
    for name in ("g-spec", "g-plain"):
        path = settings.home / "profiles" / f"{name}.toml"
        text = path.read_text().replace("[env]", 'group = "g"\n' + ('[speculation]\ntype = "ngram-mod"\n'
                                                                   if name == "g-spec" else "") + "[env]", 1)
        path.write_text(text)
    daemon = Daemon(tmp_path, "--profile", "g-spec")
    cli = CliRunner()
    try:
        daemon.wait_notify(r"READY=1")
        assert child_pids(settings) == {}
        out = cli.invoke(main, ["up", "g-spec"])
        assert out.exit_code == 0 and "served by the daemon at" in out.output, out.output
        record = Supervisor(settings).running("g-spec")
        assert record is not None and record.api_key  # started by the daemon, with its per-start key
        out = cli.invoke(main, ["logs", "g-spec", "-n", "100"])
        assert out.exit_code == 0 and "fake llama-server pid %d" % record.pid in out.output, out.output
        out = cli.invoke(main, ["switch", "g", "g-plain"])
        assert out.exit_code == 0 and "g: active g-plain" in out.output and "forced to g-plain" in out.output
        assert "g-plain" in child_pids(settings)
        out = cli.invoke(main, ["down", "g-plain"])
        assert out.exit_code == 0 and "stopped g-plain" in out.output, out.output
        assert "g-plain" not in child_pids(settings)
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)
    assert not ours(settings)
