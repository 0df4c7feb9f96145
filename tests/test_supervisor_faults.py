"""Supervision against the fake llama-server: every fault ends with nothing left running."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time

import psutil
import pytest

from llamactl.errors import StartError
from llamactl.profiles import load_profile
from llamactl.supervisor import Supervisor


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_with_arg(fragment: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(fragment in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def start(settings, name):
    return Supervisor(settings).start(load_profile(name, settings))


def test_up_status_down_leaves_nothing(settings, fake_profile):
    name = fake_profile(FAKE_LOAD_S="0.5")
    sup = Supervisor(settings)
    record = start(settings, name)
    assert record.state == "ready" and record.port > 0
    [status] = sup.status()
    assert status.alive and status.rss_bytes and status.record.pid == record.pid
    assert start(settings, name).pid == record.pid  # already running: same server, no second one
    assert sup.stop(name)
    assert gone(record.pid)
    assert sup.status() == [] and sup.running(name) is None
    assert not sup.stop(name)


def test_crash_on_start_is_classified_and_cleaned_up(settings, fake_profile):
    name = fake_profile(mode="crash_on_start")
    with pytest.raises(StartError) as err:
        start(settings, name)
    assert err.value.cause == "model file unreadable"
    assert any("failed to open GGUF file" in line for line in err.value.log_tail)
    assert "exited with code 1" in str(err.value)
    assert Supervisor(settings).status() == []


def test_out_of_memory_while_loading_is_reported_as_such(settings, fake_profile):
    name = fake_profile(mode="crash_on_start",
                        FAKE_CRASH_MESSAGE="ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer")
    with pytest.raises(StartError) as err:
        start(settings, name)
    assert err.value.cause == "out of memory"
    assert "llamactl plan" in str(err.value)


def test_load_slower_than_timeout_is_stopped(settings, fake_profile, home):
    name = fake_profile(FAKE_LOAD_S="60", load_timeout_s=1.5)
    with pytest.raises(StartError) as err:
        start(settings, name)
    assert err.value.cause == "load timeout"
    assert processes_with_arg(str(home)) == []
    assert Supervisor(settings).status() == []


def test_hanging_server_times_out_and_is_stopped(settings, fake_profile, home):
    name = fake_profile(mode="hang", load_timeout_s=3)
    with pytest.raises(StartError, match="not ready after 3 s"):
        start(settings, name)
    assert processes_with_arg(str(home)) == []


def test_ignored_sigterm_escalates_to_sigkill(settings, fake_profile):
    name = fake_profile(mode="ignore_sigterm", stop_timeout_s=1)
    record = start(settings, name)
    assert Supervisor(settings).stop(name, timeout_s=1)
    assert gone(record.pid)


def test_grandchildren_are_stopped_with_the_group(settings, fake_profile, home):
    name = fake_profile(mode="grandchild")
    record = start(settings, name)
    group = [p for p in psutil.process_iter() if _pgid(p.pid) == record.pid]
    assert len(group) >= 2
    Supervisor(settings).stop(name)
    assert all(gone(p.pid) for p in group)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_port_taken_once_is_retried_on_a_new_port(settings, fake_profile, home):
    name = fake_profile(mode="port_taken_once", FAKE_STATE_FILE=str(home / "taken"))
    record = start(settings, name)
    assert (home / "taken").exists() and record.state == "ready"
    Supervisor(settings).stop(name)


def test_port_always_taken_fails_with_that_cause(settings, fake_profile):
    name = fake_profile(mode="port_taken")
    with pytest.raises(StartError) as err:
        start(settings, name)
    assert err.value.cause == "port in use"


def test_crash_after_ready_shows_dead_and_down_cleans_up(settings, fake_profile):
    name = fake_profile(mode="crash_later", FAKE_CRASH_AFTER_S="0.3")
    record = start(settings, name)
    sup = Supervisor(settings)
    deadline = time.monotonic() + 10
    while not gone(record.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    [status] = sup.status()
    assert not status.alive and status.to_json()["state"] == "dead"
    assert not sup.stop(name)  # nothing to stop; the stale record is removed
    assert sup.status() == []


def test_a_reused_pid_is_never_signalled(settings, fake_profile):
    name = fake_profile()
    sup = Supervisor(settings)
    record = start(settings, name)
    sup.stop(name)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        # A stale record pointing at an unrelated live process (as after a pid reuse).
        sup.store.write(dataclasses.replace(record, pid=bystander.pid))
        assert sup.running(name) is None
        assert not sup.stop(name)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def _foreground(settings, name):
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "llamactl", "up", name, "--foreground"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "ready at" in line:
            break
    record = Supervisor(settings).running(name)
    assert record is not None
    return proc, record


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_foreground_stops_the_server_on_a_signal(settings, fake_profile, monkeypatch, signum):
    import signal

    from tests.conftest import FAKES

    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(FAKES / "gpus_cpu.json"))
    name = fake_profile()
    proc, record = _foreground(settings, name)
    proc.send_signal(getattr(signal, signum))
    assert proc.wait(timeout=20) == 0
    assert gone(record.pid) and Supervisor(settings).status() == []


def test_foreground_cli_killed_takes_the_server_with_it(settings, fake_profile, monkeypatch):
    from tests.conftest import FAKES

    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(FAKES / "gpus_cpu.json"))
    name = fake_profile()
    proc, record = _foreground(settings, name)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while not gone(record.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(record.pid)


def test_a_running_servers_log_is_rotated_when_large(settings, fake_profile, monkeypatch):
    from pathlib import Path

    from llamactl.settings import Settings

    monkeypatch.setenv("LLAMACTL_LOG_MAX_BYTES", "10")
    settings = Settings()
    name = fake_profile()
    record = start(settings, name)
    sup = Supervisor(settings)
    log = Path(record.log_path)
    before = log.read_text()
    assert len(before) > 10
    sup.status()
    assert Path(f"{log}.1").read_text() == before and log.stat().st_size == 0
    import httpx

    httpx.get(f"{record.url}/health")  # the child keeps appending to the truncated file
    assert "GET /health" in log.read_text()
    sup.stop(name)
    # the next start keeps the previous run's log as .1
    start(settings, name)
    assert Path(f"{log}.2").read_text() == before
    sup.stop(name)


def test_two_clis_starting_the_same_profile_at_once_start_one_server(settings, fake_profile):
    """Two `llamactl up` processes race for one profile: the per-profile lock lets one start the server;
    the other waits and gets the same server. One record, one process."""
    import re
    import sys

    name = fake_profile(FAKE_LOAD_S="1.0", LLAMACTL_TEST_HOME=str(settings.home))
    clis = [subprocess.Popen([sys.executable, "-m", "llamactl", "up", name], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [cli.communicate(timeout=60)[0] for cli in clis]
    try:
        assert [cli.returncode for cli in clis] == [0, 0], outputs
        pids = {int(m) for out in outputs for m in re.findall(r"pid (\d+)", out)}
        assert len(pids) == 1, outputs
        servers = [p for p in processes_with_arg("fake_llama_server.py")
                   if p.environ().get("LLAMACTL_TEST_HOME") == str(settings.home)]
        [status] = Supervisor(settings).status()
        assert [p.pid for p in servers] == [status.record.pid] == list(pids) and status.alive
    finally:
        Supervisor(settings).stop(name)


class _Squatter:
    """Another local user's process that bound the port llamactl picked and answers /health with 200."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = b'{"status": "ok"}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_squatter_on_the_port_is_not_taken_for_the_engine(settings, fake_profile, monkeypatch):
    """The first port llamactl picks is already bound by someone else who answers /health: the start must
    not declare that 'ready'; it stops its own child and retries on a fresh port, which the child owns."""
    from llamactl.supervisor import supervisor as supervisor_module

    squatter = _Squatter()
    real_free_port = supervisor_module.free_port
    ports = iter([squatter.port, squatter.port])
    monkeypatch.setattr(supervisor_module, "free_port", lambda host="127.0.0.1": next(ports, None) or real_free_port())
    name = fake_profile()
    try:
        record = start(settings, name)
        assert record.port != squatter.port
        owners = [c for c in psutil.Process(record.pid).net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == record.port]
        assert owners, "the recorded engine does not listen on the recorded port"
        Supervisor(settings).stop(name)
    finally:
        squatter.close()


def test_a_squatter_on_every_port_fails_with_port_in_use(settings, fake_profile, monkeypatch):
    from llamactl.supervisor import supervisor as supervisor_module

    squatter = _Squatter()
    monkeypatch.setattr(supervisor_module, "free_port", lambda host="127.0.0.1": squatter.port)
    name = fake_profile()
    try:
        with pytest.raises(StartError) as err:
            start(settings, name)
        assert err.value.cause == "port in use" and "another process answered" in err.value.message
        assert Supervisor(settings).status() == []
    finally:
        squatter.close()
