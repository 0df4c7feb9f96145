"""Interrupting a load at every place a user can: `down` during a load, SIGTERM to the daemon during a load,
`llamactl up` killed while the engine loads, a state record that cannot be written, an engine started
outside the daemon without a key, a reload with a broken profile the daemon does not serve and with a FIFO
in the profiles dir. Real processes (the fake llama-server loads for as long as we say); every wait is
bounded and waits for an event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.errors import StartError
from llamactl.profiles import load_profile
from llamactl.supervisor import Supervisor
from llamactl.supervisor.process import ManagedProcess
from llamactl.supervisor.state import StateStore
from tests.test_service_daemon import Daemon, gone, ours, own_home  # noqa: F401 - own_home is a fixture

HI = [{"role": "user", "content": "hi"}]  # the least a chat request must hold


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def loading_pid(settings, name: str) -> int:
    """The pid of `name`'s engine once its record says it is starting."""
    def find():
        record = StateStore(settings.state_dir).read(name)
        return record.pid if record is not None else None
    return wait_until(find, 20, f"{name}'s engine to be spawned")


def test_down_during_a_load_cancels_it_and_the_engine_stays_stopped(own_home, fake_profile, tmp_path):
    settings = own_home
    fake_profile("slow", load_timeout_s=120, FAKE_LOAD_S="60", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "slow")
    try:
        waiting = {}
        request = threading.Thread(target=lambda: waiting.setdefault("r", httpx.post(
            f"{daemon.url}/v1/chat/completions", json={"model": "slow", "messages": HI}, timeout=60)))
        request.start()
        pid = loading_pid(settings, "slow")
        started = time.monotonic()
        out = CliRunner().invoke(main, ["down", "slow"])
        took = time.monotonic() - started
        assert out.exit_code == 0, out.output
        assert "stopped slow" in out.output  # it was loading: that counts as running
        assert took < 10, f"down waited {took:.1f}s (the load takes 60 s)"
        assert gone(pid, 5)
        request.join(30)
        r = waiting["r"]
        assert r.status_code == 503 and "stopped" in r.json()["error"]["message"], r.text
        # It stays stopped: the daemon's engine says so, and no engine appears for 10 health intervals (0.2 s
        # each), in which a monitor left running would have restarted it.
        state = json.loads(CliRunner().invoke(main, ["status", "--json"]).output)
        assert state["engines"]["slow"]["state"] == "stopped", state["engines"]
        assert not state["servers"]
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert not ours(settings), "the engine came back after down"
            time.sleep(0.1)
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)


def test_sigterm_to_the_daemon_during_a_load_cancels_the_load(own_home, fake_profile, tmp_path):
    settings = own_home
    fake_profile("slow", load_timeout_s=120, FAKE_LOAD_S="60", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "slow", env={"LLAMACTL_DRAIN_TIMEOUT_S": "1"})
    try:
        threading.Thread(target=lambda: httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "slow", "messages": HI},
                                                   timeout=60), daemon=True).start()
        pid = loading_pid(settings, "slow")
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM, timeout_s=30) == 0
        took = time.monotonic() - started
        assert took < 15, f"the daemon took {took:.1f}s to stop during a 60 s load"
        assert gone(pid, 5)
        assert not ours(settings)
    finally:
        daemon.stop(signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_interrupted_while_loading_leaves_nothing_running(own_home, fake_profile, sig):
    settings = own_home
    fake_profile("slow", load_timeout_s=120, FAKE_LOAD_S="60", LLAMACTL_TEST_HOME=str(settings.home))
    up = subprocess.Popen([sys.executable, "-m", "llamactl", "up", "slow"], env=dict(os.environ),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = loading_pid(settings, "slow")
        up.send_signal(sig)
        _, err = up.communicate(timeout=30)
        assert up.returncode != 0
        assert "interrupted" in err, err
        assert gone(pid, 5), "the engine kept loading after `up` was interrupted"
        assert StateStore(settings.state_dir).read("slow") is None, "a record was left behind"
    finally:
        if up.poll() is None:
            up.kill()


def test_a_start_left_half_done_is_not_reported_ready(own_home, fake_profile):
    """`up` killed with SIGKILL mid-load (nothing can clean up) leaves a "starting" record and a loading
    engine: the next `up` replaces it and waits for /health, instead of returning at once."""
    settings = own_home
    fake_profile("slowish", FAKE_LOAD_S="1", LLAMACTL_TEST_HOME=str(settings.home))
    up = subprocess.Popen([sys.executable, "-m", "llamactl", "up", "slowish"], env=dict(os.environ),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = loading_pid(settings, "slowish")
    up.kill()
    up.wait(10)
    out = CliRunner().invoke(main, ["up", "slowish"])
    assert out.exit_code == 0, out.output
    assert "ready at" in out.output and "already running" not in out.output
    record = Supervisor(settings).running("slowish")
    assert record is not None and record.state == "ready"
    assert httpx.get(f"{record.url}/health", timeout=5).status_code == 200
    assert gone(first, 5)
    Supervisor(settings).stop("slowish")


def test_a_record_that_cannot_be_written_stops_the_engine(own_home, fake_profile, monkeypatch):
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    spawned: list[int] = []
    real_spawn = ManagedProcess.spawn

    def spawn(self):
        real_spawn(self)
        spawned.append(self.pid)

    def full_disk(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ManagedProcess, "spawn", spawn)
    monkeypatch.setattr(StateStore, "write", full_disk)
    with pytest.raises(StartError) as e:
        Supervisor(settings).start(load_profile("fake", settings))
    assert e.value.cause == "state dir unwritable" and "stopped the engine" in e.value.message
    assert spawned and gone(spawned[0], 5), "the engine ran on, invisible to status and down"


def test_the_daemon_refuses_an_engine_started_without_a_key(own_home, fake_profile, tmp_path):
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "fake")
    try:
        # as `llamactl up --foreground fake` does beside a running daemon (it does not go through it)
        outside = Supervisor(settings).start(load_profile("fake", settings))
        assert outside.api_key is None
        r = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "fake", "messages": HI}, timeout=30)
        assert r.status_code == 503, r.text
        assert "without an API key" in r.json()["error"]["message"]
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)
        Supervisor(settings).stop("fake")


def test_reload_skips_a_broken_profile_it_does_not_serve_and_a_fifo(own_home, fake_profile, write_profile,
                                                                      home, tmp_path):
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path)
    try:
        daemon.wait_notify(r"READY=1")
        write_profile("broken", "this is not toml = = =")
        os.mkfifo(home / "profiles" / "pipe.toml")
        fake_profile("fake", stop_timeout_s=7, LLAMACTL_TEST_HOME=str(settings.home))  # a change to a served profile
        start = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_line(r"reloaded profiles: changed \(restarted\): fake", start=start)
        assert any("pipe.toml: not a regular file" in line for line in daemon.lines[start:])
        assert httpx.get(f"{daemon.url}/health", timeout=5).status_code == 200
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)


def test_profiles_listing_does_not_hang_on_a_fifo_or_read_a_device(home, settings):
    os.mkfifo(home / "profiles" / "pipe.toml")
    os.symlink("/dev/zero", home / "profiles" / "zero.toml")
    out = CliRunner().invoke(main, ["profiles", "validate", "--no-files"])
    assert out.exit_code == 2
    assert "pipe.toml: not a regular file" in out.output and "zero.toml: not a regular file" in out.output


def test_a_bad_setting_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "llamactl", "status"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LLAMACTL_ROUTER_PORT": "99999"})
    assert out.returncode == 2
    assert "LLAMACTL_ROUTER_PORT='99999'" in out.stderr and "Traceback" not in out.stderr


def test_exit_codes_match_with_and_without_the_daemon(own_home, fake_profile, tmp_path):
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    standalone = CliRunner().invoke(main, ["up", "nosuch"])
    daemon = Daemon(tmp_path)
    try:
        through = CliRunner().invoke(main, ["up", "nosuch"])
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)
    assert standalone.exit_code == through.exit_code == 2, (standalone.output, through.output)


def test_a_reload_that_changes_routing_takes_effect(own_home, fake_profile, write_profile, model_file, tmp_path):
    """alias, parallel and group changes, and an added profile, without restarting the daemon: the changed
    lane drains, its engine restarts with the new profile, the router answers by the new names."""
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path)
    try:
        daemon.wait_notify(r"READY=1")
        assert httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "fake", "messages": HI}, timeout=30).status_code == 200
        first_pid = ours(settings)[0].pid
        from tests.conftest import FAKE_SERVER
        common = f"""
            binary = "{FAKE_SERVER}"
            model = "{model_file}"
            [env]
            LLAMACTL_TEST_HOME = "{settings.home}"
        """
        write_profile("fake", 'alias = "renamed"\nparallel = 3\ngroup = "pair"\n' + common)
        write_profile("twin", 'group = "pair"\n' + common + '[speculation]\ntype = "ngram-mod"\n')
        start = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_line(r"reloaded profiles: added: twin; changed \(restarted\): fake", start=start)
        assert gone(first_pid, 10), "the changed profile's engine kept running as it was"
        lanes = {lane["lane"]: lane for lane in httpx.get(f"{daemon.url}/llamactl/status", timeout=5).json()["lanes"]}
        assert "pair" in lanes and "fake" not in lanes and lanes["pair"]["group"] is True
        assert lanes["pair"]["slots"]["fake"] == 3 and set(lanes["pair"]["members"]) == {"fake", "twin"}
        r = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "renamed", "messages": HI}, timeout=30)
        assert r.status_code == 200 and r.headers["x-llamactl-profile"] == "fake", r.text
        # The twin may be warming up beside it (both fit): find fake's engine by the alias it now serves.
        engine = wait_until(lambda: [p for p in ours(settings) if "renamed" in p.cmdline()], 10, "fake's engine")
        cmdline = engine[0].cmdline()
        assert len(engine) == 1 and cmdline[cmdline.index("-np") + 1] == "3"
        assert httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "twin", "messages": HI}, timeout=30).status_code == 200
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)


def test_a_stream_cut_at_the_drain_deadline_ends_with_an_error_event(own_home, fake_profile, tmp_path):
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "fake", "--preload", "fake", env={"LLAMACTL_DRAIN_TIMEOUT_S": "2"})
    events: list[str] = []
    try:
        daemon.wait_notify(r"READY=1")
        body = {"model": "fake", "messages": HI, "stream": True, "fake": {"tokens": 200, "delay_s": 0.1}}  # a 20 s stream
        with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.stop(signal.SIGKILL)
    error = json.loads(next(e for e in reversed(events) if e.startswith("{") and '"error"' in e))
    assert error["error"]["code"] == "shutting_down" and "drain deadline" in error["error"]["message"]
    assert events[-1] == "[DONE]" and len(events) < 100  # cut, not served to the end


def test_an_open_dashboard_does_not_hold_up_a_stop(own_home, fake_profile, tmp_path):
    """The event stream and a followed log are the daemon's own streams: a stop ends them at once instead of
    waiting out the drain timeout (20 s here)."""
    settings = own_home
    fake_profile("fake", LLAMACTL_TEST_HOME=str(settings.home))
    daemon = Daemon(tmp_path, "--profile", "fake", "--preload", "fake", env={"LLAMACTL_DRAIN_TIMEOUT_S": "20"})
    endings: dict[str, str] = {}
    connected: set[str] = set()

    def read(name: str, path: str) -> None:
        with httpx.stream("GET", f"{daemon.url}{path}", timeout=60) as r:
            last = ""
            for line in r.iter_lines():
                connected.add(name)
                last = line or last
            endings[name] = last

    try:
        daemon.wait_notify(r"READY=1")
        readers = [threading.Thread(target=read, args=("events", "/llamactl/events")),
                   threading.Thread(target=read, args=("log", "/llamactl/logs/fake?follow=1"))]
        for reader in readers:
            reader.start()
        wait_until(lambda: connected == {"events", "log"}, 10, "both streams to be open")
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
        took = time.monotonic() - started
        for reader in readers:
            reader.join(10)
        assert took < 10, f"the stop waited {took:.1f}s for the open streams"
        assert "stopping" in endings.get("events", ""), endings
    finally:
        daemon.stop(signal.SIGKILL)
