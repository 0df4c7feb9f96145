"""`llamactl worker` when its port is taken says so at once (no "listens on", no crash loop of restarts), and
`worker status` never shows the pids of a worker that is gone (a pid may belong to another process by now)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.errors import StartError
from llamactl.rpc.runner import WorkerOptions, WorkerRecord, WorkerRunner, state_path
from llamactl.settings import Settings
from tests.conftest import require_engine


def rpc_server() -> Path:
    rpc = require_engine("llama.cpp").parent / "rpc-server"
    assert rpc.is_file(), "run scripts/install-engines llama.cpp (it builds rpc-server)"
    return rpc


@pytest.mark.engine
def test_a_port_in_use_is_said_at_once(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "llamactl", "worker", "--host", "127.0.0.1", "--port", str(port),
                            "--binary", str(rpc_server())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, r.stderr
    assert f"port in use: 127.0.0.1:{port} is in use" in r.stderr and "ss -ltnp" in r.stderr, r.stderr
    assert "listens on" not in r.stderr and "restarting" not in r.stderr, r.stderr


@pytest.mark.engine
def test_rpc_servers_own_bind_failure_line_means_port_in_use(settings: Settings):
    """Something may take the port between the check and rpc-server's bind: its line says so, and it exits 0."""
    runner = WorkerRunner(WorkerOptions(host="127.0.0.1", port=_free_port(), binary=rpc_server()), settings,
                          say=lambda m: None)
    with pytest.raises(StartError, match="port in use") as caught:
        runner._check_port(["Starting RPC server v7.0.0", "Failed to create server socket"])
    assert caught.value.cause == "port in use"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_record(settings: Settings, port: int, pid: int, started_at: float, state: str = "running") -> None:
    record = WorkerRecord(host="127.0.0.1", port=port, pid=pid, state=state, binary="/x/rpc-server",
                          log_path="/x/worker.log", child_pid=pid, started_at=started_at)
    path = state_path(settings, port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record)))


def test_worker_status_shows_no_stale_pid(settings: Settings):
    me = psutil.Process(os.getpid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_record(settings, 50001, dead.pid, time.time())  # its worker exited
    _write_record(settings, 50002, me.pid, me.create_time() - 3600)  # the pid now belongs to a newer process
    _write_record(settings, 50003, me.pid, time.time(), state="backoff")  # alive (this process stands in for it)
    rows = {row["port"]: row for row in json.loads(
        CliRunner().invoke(main, ["worker", "status", "--json"]).output)["workers"]}
    for gone in (50001, 50002):
        assert rows[gone]["state"].startswith("gone") and rows[gone]["pid"] is None and rows[gone]["child_pid"] is None
    assert rows[50003]["state"] == "backoff" and rows[50003]["pid"] == me.pid
    text = CliRunner().invoke(main, ["worker", "status"]).output
    assert f"rpc-server pid {me.pid}" in text and text.count("rpc-server pid -") == 2, text
