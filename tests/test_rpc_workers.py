"""Workers by name, addresses, the HELLO handshake bytes, --list-devices parsing, the bind check, the worker's
systemd unit (pure parts and small I/O; the real two-host runs are in test_rpc_netns.py)."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from llamactl.errors import ConfigError, ProfileError
from llamactl.engines.install import rpc_protocol_version
from llamactl.rpc.devices import parse_list_devices
from llamactl.rpc.errors import WorkerUnreachable
from llamactl.rpc.hello import compatible, hello_request, parse_hello_response, worker_version
from llamactl.rpc.runner import WorkerOptions, check_bind, rpc_server_argv
from llamactl.rpc.workers import Worker, bind_problem, load_workers, parse_endpoint, resolve_workers
from tests.test_systemd import verify


def test_workers_toml_beside_the_profiles_names_workers(tmp_path: Path):
    profiles = tmp_path / "config" / "profiles"
    profiles.mkdir(parents=True)
    (tmp_path / "config" / "workers.toml").write_text('gpu-box = "10.0.0.2:50052"\n[attic]\naddress = "10.0.0.3"\n')
    known = load_workers([profiles])
    assert known["gpu-box"] == Worker("gpu-box", "10.0.0.2", 50052)
    assert known["attic"].endpoint == "10.0.0.3:50052"  # rpc-server's default port
    both = resolve_workers(["gpu-box", "10.0.0.9:6000"], known, "profile 'big'")
    assert [w.endpoint for w in both] == ["10.0.0.2:50052", "10.0.0.9:6000"]
    assert both[1].label == "10.0.0.9:6000" and both[0].label == "'gpu-box' (10.0.0.2:50052)"


def test_unknown_worker_twice_listed_and_bad_addresses_are_named():
    with pytest.raises(ProfileError, match=r"key rpc: no worker named 'gpu-bx' \(known: gpu-box\)") as e:
        resolve_workers(["gpu-bx"], {"gpu-box": Worker("gpu-box", "10.0.0.2", 50052)}, "profile 'big'")
    assert "workers.toml" in (e.value.hint or "")
    with pytest.raises(ProfileError, match="listed twice"):
        resolve_workers(["10.0.0.2:1", "10.0.0.2:1"], {}, "profile 'big'")
    for bad in ("10.0.0.2:0", "10.0.0.2:x", ":5", "a b:5"):
        with pytest.raises(ConfigError, match="is not host:port"):
            parse_endpoint(bad, "workers.toml")
    assert parse_endpoint("[fd00::2]:7000", "w") == ("fd00::2", 7000)


@pytest.mark.parametrize("host,why", [("0.0.0.0", "every interface"), ("::", "every interface"),
                                      ("8.8.8.8", "public address"), ("10.1.2.3", None), ("192.168.1.5", None),
                                      ("127.0.0.1", None), ("fd00::5", None), ("gpu-box.lan", "host name")])
def test_bind_check_refuses_wildcard_and_public_addresses(host: str, why: str | None):
    problem = bind_problem(host)
    assert (problem is None) if why is None else (why in problem)
    if why is not None:
        with pytest.raises(ConfigError, match="no authentication") as e:
            check_bind(WorkerOptions(host=host))
        assert "--allow-public" in (e.value.hint or "")
        check_bind(WorkerOptions(host=host, allow_public=True))  # an explicit choice


def test_hello_bytes_and_version_rule():
    request = hello_request()
    assert request[0] == 14 and struct.unpack("<Q", request[1:9])[0] == 24 and len(request) == 33
    assert parse_hello_response(struct.pack("<Q", 28) + bytes([7, 1, 3, 0]) + bytes(24)) == "7.1.3"
    with pytest.raises(ValueError):
        parse_hello_response(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert compatible("7.0.0", "7.0.5") and compatible("7.2.0", "7.1.0")
    assert not compatible("7.0.0", "6.0.0") and not compatible("7.0.0", "7.1.0")


def test_hello_against_a_listener_that_is_not_rpc_and_a_closed_port():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_http() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer_http)
    thread.start()
    with pytest.raises(WorkerUnreachable, match="answered, but not as an rpc-server"):
        worker_version(Worker("web", "127.0.0.1", port), timeout_s=5)
    thread.join()
    server.close()
    with pytest.raises(WorkerUnreachable, match=r"'gone' \(127.0.0.1:\d+\) is unreachable: Connection refused"):
        worker_version(Worker("gone", "127.0.0.1", port), timeout_s=5)


def test_list_devices_output_maps_rpc_devices_to_their_workers():
    output = ("Available devices:\n"
              "  RPC0: 10.0.0.2:50052 (24090 MiB, 23000 MiB free)\n"
              "  RPC1: 10.0.0.2:50052 (12000 MiB, 11000 MiB free)\n"
              "  RPC2: 10.0.0.3:50052 (64000 MiB, 60000 MiB free)\n"
              "  CUDA0: NVIDIA GeForce RTX 3090 (24124 MiB, 23500 MiB free)\n")
    workers = [Worker("gpu-box", "10.0.0.2", 50052), Worker("attic", "10.0.0.3", 50052)]
    devices = parse_list_devices(output, workers)
    assert [(d.name, d.worker, d.free_mib) for d in devices] == [
        ("RPC0", "gpu-box", 23000), ("RPC1", "gpu-box", 11000), ("RPC2", "attic", 60000)]
    assert devices[2].label == "RPC2 10.0.0.3:50052 on attic (10.0.0.3:50052)"


def test_rpc_protocol_version_comes_from_the_source_tree(tmp_path: Path):
    header = tmp_path / "ggml" / "include" / "ggml-rpc.h"
    header.parent.mkdir(parents=True)
    header.write_text("#define RPC_PROTO_MAJOR_VERSION    7\n#define RPC_PROTO_MINOR_VERSION    0\n"
                      "#define RPC_PROTO_PATCH_VERSION    2\n")
    assert rpc_protocol_version(tmp_path) == "7.0.2"
    assert rpc_protocol_version(tmp_path / "nothing") is None


def test_rpc_server_argv_and_cache_dir(tmp_path: Path):
    argv = rpc_server_argv(Path("rpc-server"), WorkerOptions(host="10.0.0.2", port=6000, devices=("CUDA0", "CUDA1"),
                                                             cache_dir=tmp_path, threads=4))
    assert argv == ["rpc-server", "--host", "10.0.0.2", "--port", "6000", "--device", "CUDA0,CUDA1",
                    "--threads", "4", "--cache"]


def test_worker_systemd_unit_passes_verify(settings, tmp_path: Path):
    from llamactl.daemon.systemd_unit import detect_params, render_unit

    params = detect_params(settings, user_unit=False, worker_args=("--host", "10.0.0.2", "--port", "50052"))
    assert params.unit_name == "llamactl-worker.service"
    text = render_unit(params)
    assert "worker --host 10.0.0.2 --port 50052" in text and "Type=exec" in text and "WatchdogSec" not in text
    assert verify(text, tmp_path, user=False, name="llamactl-worker.service") == ""


def test_systemd_install_worker_refuses_a_public_bind(settings):
    from click.testing import CliRunner

    from llamactl.cli import main

    out = CliRunner().invoke(main, ["systemd", "install", "--worker", "--host", "0.0.0.0", "--dry-run"])
    assert out.exit_code == 2 and "no authentication" in out.output
    out = CliRunner().invoke(main, ["systemd", "install", "--worker", "--host", "10.0.0.2", "--dry-run"])
    assert out.exit_code == 0 and "llamactl-worker" in out.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.engine
def test_worker_restarts_a_dead_rpc_server_and_status_shows_it(home, tmp_path: Path):
    import json
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from tests.conftest import require_engine

    rpc = require_engine("llama.cpp").parent / "rpc-server"
    assert rpc.is_file(), "run scripts/install-engines llama.cpp (it builds rpc-server)"
    port = _free_port()
    env = {**os.environ, "LLAMACTL_RESTART_BASE_DELAY_S": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "llamactl", "worker", "--host", "127.0.0.1", "--port", str(port),
                             "--binary", str(rpc), "--cache-dir", str(tmp_path / "rpc-cache")],
                            env=env, stderr=subprocess.PIPE, text=True)

    def status() -> list[dict]:
        done = subprocess.run([sys.executable, "-m", "llamactl", "worker", "status", "--json"], env=env,
                              capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout)["workers"]

    def wait_listening(after: str) -> str:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listens on" in line and after not in line:
                return line
        raise AssertionError(f"worker exited ({proc.wait()})")

    try:
        wait_listening(after="\0")
        [row] = status()
        assert row["state"] == "running" and row["port"] == port and row["restarts"] == 0
        assert row["protocol"] == json.loads((rpc.parent.parent / "build.json").read_text())["rpc_protocol"]
        child = row["child_pid"]
        assert psutil.Process(child).cmdline()[-1] == "--cache"
        os.kill(child, signal.SIGKILL)  # rpc-server dies; its supervisor starts another after the backoff
        wait_listening(after=f"pid {child})")
        [row] = status()
        assert row["restarts"] == 1 and row["child_pid"] != child and "killed by SIGKILL" in row["last_exit"]
        assert (tmp_path / "rpc-cache" / "rpc").is_dir()  # rpc-server's tensor cache lives under --cache-dir
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert status() == [] and not psutil.pid_exists(row["child_pid"])


def test_of_one_version_the_build_with_rpc_server_is_preferred(settings, home):
    from llamactl.engines.binaries import cached_builds

    for name, with_rpc in (("llama.cpp-0.3.36", False), ("llama.cpp-0.3.36-rpc", True), ("llama.cpp-0.3.30-rpc", True)):
        bin_dir = settings.engine_cache_dir / name / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "llama-server").write_text("")
        if with_rpc:
            (bin_dir / "rpc-server").write_text("")
    assert [p.parent.parent.name for p in cached_builds("llama.cpp", settings)] == [
        "llama.cpp-0.3.36-rpc", "llama.cpp-0.3.36", "llama.cpp-0.3.30-rpc"]
