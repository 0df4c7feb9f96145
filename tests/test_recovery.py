"""Recovery: backoff and crash loops (pure, then with a real crashing child), hang detection against a
real hung server, the orphan sweep with real processes, and children dying with a SIGKILLed daemon."""

from __future__ import annotations

import asyncio

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from llamactl.profiles import load_profile
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor, free_port
from llamactl.supervisor.recovery import (
    Action, HangDetector, HealthCheck, RestartPolicy, RestartTracker, Verdict, exit_reason,
    acheck_health, find_orphans, plan_sweep, stop_orphan,
)
from llamactl.supervisor.state import StateStore
from tests.conftest import FAKE_SERVER

REPO = Path(__file__).resolve().parent.parent


def gone(pid: int, timeout_s: float = 10.0) -> bool:
    """True once `pid` has exited (a zombie counts: it holds no memory and no GPU)."""
    try:
        proc = psutil.Process(pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
            try:
                proc.wait(timeout=0.1)
                return True
            except psutil.TimeoutExpired:
                continue
        return False
    except psutil.NoSuchProcess:
        return True


# ------------------------------------------------------------------------------ restart policy (pure)


def test_backoff_doubles_up_to_the_cap():
    t = RestartTracker(RestartPolicy(base_delay_s=1, factor=2, max_delay_s=10, max_crashes=100, window_s=1e9))
    delays = [t.on_exit(float(i), uptime_s=1, reason="x").delay_s for i in range(6)]
    assert delays == [1, 2, 4, 8, 10, 10]


def test_crash_loop_ends_in_failed_with_reason_and_log_tail():
    t = RestartTracker(RestartPolicy(max_crashes=3, window_s=60, log_lines=2))
    assert t.on_exit(0, uptime_s=1, reason="exited with code 1").action is Action.RESTART
    assert t.on_exit(10, uptime_s=1, reason="exited with code 1").action is Action.RESTART
    d = t.on_exit(20, uptime_s=1, reason="exited with code 1", log_tail=["a", "b", "GGML_ASSERT failed"])
    assert d.action is Action.FAIL and t.failed == d
    assert d.reason == "crash loop: 3 crashes in 60 s; last: exited with code 1"
    assert d.log_tail == ("b", "GGML_ASSERT failed")


def test_crashes_outside_the_window_do_not_count_and_a_stable_run_resets_the_backoff():
    t = RestartTracker(RestartPolicy(max_crashes=3, window_s=60, stable_after_s=100))
    t.on_exit(0, uptime_s=1, reason="x")
    t.on_exit(10, uptime_s=1, reason="x")
    d = t.on_exit(100, uptime_s=1, reason="x")  # the first two are older than the window
    assert d.action is Action.RESTART and d.attempt == 3 and d.delay_s == 4
    d = t.on_exit(400, uptime_s=250, reason="x")  # it ran fine for a while: start over
    assert d.action is Action.RESTART and d.attempt == 1 and d.delay_s == 1


def test_exit_reason():
    assert exit_reason(1) == "exited with code 1"
    assert exit_reason(-9) == "killed by SIGKILL"
    assert exit_reason(None) == "exited"


def test_a_real_crash_loop_is_detected(settings: Settings, fake_profile):
    """A child that crashes after becoming ready, restarted by the policy until it gives up."""
    name = fake_profile("crashy", mode="crash_later", FAKE_CRASH_AFTER_S="0.2")
    profile = load_profile(name, settings)
    sup = Supervisor(settings)
    tracker = RestartTracker(RestartPolicy(base_delay_s=0.01, max_crashes=3, window_s=60))
    decisions = []
    for _ in range(5):
        record = sup.start(profile)
        assert gone(record.pid)
        # A zombie leader can show before its other threads are gone, and its pidfd only fires then:
        # a blocking wait, not wait(0), collects the exit code.
        exit_code = psutil.Process(record.pid).wait(timeout=10) if psutil.pid_exists(record.pid) else None
        lines = (Path(record.log_path).read_text().splitlines())
        d = tracker.on_exit(time.monotonic(), uptime_s=time.time() - record.started_at,
                            reason=f"exited with code {exit_code}", log_tail=lines)
        decisions.append(d.action)
        if d.action is Action.FAIL:
            break
    assert decisions == [Action.RESTART, Action.RESTART, Action.FAIL]
    assert "GGML_ASSERT failed: crash" in tracker.failed.log_tail
    assert sup.running(name) is None


# ------------------------------------------------------------------------------------ hang detection


def _spawn_fake(mode: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--port", str(port), "-m", "x"],
                            env={**os.environ, "FAKE_LLAMA_MODE": mode}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "fake llama-server pid N mode M", printed just before it binds
    assert "fake llama-server" in line
    return proc, f"http://127.0.0.1:{port}"


def test_a_live_but_unresponsive_server_is_declared_hung():
    proc, url = _spawn_fake("hang")
    try:
        detector = HangDetector(threshold=3)
        verdicts = [detector.observe(asyncio.run(acheck_health(url, timeout_s=0.3)), alive=proc.poll() is None)
                    for _ in range(3)]
        assert verdicts == [Verdict.SUSPECT, Verdict.SUSPECT, Verdict.HUNG]
        assert detector.reason().startswith("hung: /health failed 3 times in a row")
    finally:
        proc.kill()
        proc.wait()
    assert detector.observe(asyncio.run(acheck_health(url, timeout_s=0.3)), alive=proc.poll() is None) is Verdict.DEAD


def test_a_healthy_answer_resets_the_count():
    proc, url = _spawn_fake("normal")
    try:
        detector = HangDetector(threshold=2)
        assert detector.observe(HealthCheck(False, "timeout"), alive=True) is Verdict.SUSPECT
        deadline = time.monotonic() + 10
        probe = asyncio.run(acheck_health(url, timeout_s=1))
        while not probe.ok and time.monotonic() < deadline:  # until the fake's listener is up
            probe = asyncio.run(acheck_health(url, timeout_s=1))
        assert probe == HealthCheck(True, "200")
        assert detector.observe(probe, alive=True) is Verdict.OK and detector.failures == 0
    finally:
        proc.kill()
        proc.wait()


# -------------------------------------------------------------------------------------- orphan sweep


def test_find_orphans_returns_live_servers_and_drops_stale_records(settings: Settings, fake_profile):
    profile = load_profile(fake_profile("left"), settings)
    record = Supervisor(settings).start(profile, api_key="secret")
    store = StateStore(settings.state_dir)
    # A record whose process died, and one whose pid now belongs to another program (pid reuse).
    store.write(replace(record, profile="dead", pid=2**22 + 7))
    store.write(replace(record, profile="reused", pid=os.getpid()))
    try:
        orphans = find_orphans(settings)
        assert [(o.profile, o.process.pid) for o in orphans] == [("left", record.pid)]
        assert store.names() == ["left"]  # the stale records are gone, this process was not touched

        plan = plan_sweep(orphans, {"left": profile})
        assert [o.profile for o in plan.adopt] == ["left"]
        plan = plan_sweep(orphans, {})
        assert [(o.profile, why) for o, why in plan.stop] == [("left", "profile 'left' is not served by this daemon")]
        plan = plan_sweep([replace(orphans[0], record=replace(record, api_key=None))], {"left": profile})
        assert "without an API key" in plan.stop[0][1]
        plan = plan_sweep(orphans, {"left": profile}, same_launch=lambda o, p: False)
        assert plan.stop[0][1] == "its profile changed since it was started"

        assert stop_orphan(settings, orphans[0], timeout_s=5)
        assert gone(record.pid) and store.names() == []
        assert not stop_orphan(settings, orphans[0], timeout_s=5)  # already gone: nothing to do
    finally:
        Supervisor(settings).stop_all(5)


def test_stop_orphan_kills_one_that_ignores_sigterm(settings: Settings, fake_profile):
    record = Supervisor(settings).start(load_profile(fake_profile("stubborn", mode="ignore_sigterm"), settings))
    [orphan] = find_orphans(settings)
    started = time.monotonic()
    assert stop_orphan(settings, orphan, timeout_s=0.5)
    assert gone(record.pid) and time.monotonic() - started < 5


# -------------------------------------------------------------------- children die with the daemon

DAEMON = """
import sys, time
from llamactl.profiles import load_profile
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor
from llamactl.supervisor.recovery import SpawnerThread
settings = Settings()
supervisor = Supervisor(settings, die_with_parent=True)
spawner = SpawnerThread()
record = spawner.submit(supervisor.start, load_profile(sys.argv[1], settings), api_key="k").result()
print(record.pid, flush=True)
time.sleep(3600)
"""


def test_sigkilled_daemon_takes_its_children_along_and_the_next_start_finds_nothing(settings, fake_profile):
    name = fake_profile("daemonchild")
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, name], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        child_pid = int(daemon.stdout.readline())
        assert psutil.Process(child_pid).is_running()
        time.sleep(0.3)  # the spawner thread is idle now; a short-lived thread would have killed it here
        assert psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        assert gone(child_pid), "the llama-server outlived its daemon"
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert find_orphans(settings) == []  # and its record is cleaned at the next start
    assert StateStore(settings.state_dir).names() == []


def test_spawning_from_a_short_lived_thread_kills_the_child_when_the_thread_ends(settings, fake_profile):
    """Why SpawnerThread exists: PR_SET_PDEATHSIG follows the thread, not the process."""
    profile = load_profile(fake_profile("thready"), settings)
    supervisor = Supervisor(settings, die_with_parent=True)
    records = []
    thread = threading.Thread(target=lambda: records.append(supervisor.start(profile)))
    thread.start()
    thread.join(30)
    try:
        assert gone(records[0].pid), "expected PDEATHSIG to fire when the spawning thread exited"
    finally:
        with pytest.raises(ChildProcessError):
            while True:
                os.waitpid(records[0].pid, 0)  # reap it: it was our child
        supervisor.stop_all(5)
