"""A model split across two hosts: a real rpc-server (`llamactl worker`) in one network namespace, the real
llama-server (`llamactl up` / `serve`) in another, joined by a veth pair; the real Gemma 3 270M split between
the main box's CPU and the worker's device. Root and iproute2 needed (CI has both; scripts/test installs ip)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from llamactl.plan.actual import parse_memory_log
from tests import netns
from tests.conftest import require_engine

pytestmark = pytest.mark.engine
PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"
ASK = r"""
import json, sys, httpx
headers = {"Authorization": "Bearer " + open(sys.argv[3]).read().strip()} if sys.argv[3] else {}
r = httpx.post(sys.argv[1] + "/completion", timeout=120, headers=headers,
               json={"prompt": sys.argv[2], "n_predict": 24, "temperature": 0, "cache_prompt": False})
print(json.dumps({"status": r.status_code, "body": r.json() if r.headers.get("content-type", "").startswith(
    "application/json") else r.text}))
"""


def require_netns() -> None:
    why = netns.available()
    if why:
        if os.environ.get("LLAMACTL_REQUIRE_ENGINES") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def pair():
    require_netns()
    hosts = netns.HostPair.create()
    try:
        yield hosts
    finally:
        hosts.close()


@pytest.fixture
def binaries(home) -> tuple[Path, Path]:
    server = require_engine("llama.cpp")
    rpc = server.parent / "rpc-server"
    if not rpc.is_file():
        pytest.fail(f"{rpc} is missing: run scripts/install-engines llama.cpp (it builds rpc-server with GGML_RPC)")
    return server, rpc


def side_env(home_dir: Path, server: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMACTL_")}
    (home_dir / "profiles").mkdir(parents=True, exist_ok=True)
    env.update(LLAMACTL_HOME=str(home_dir), LLAMACTL_PROFILES_DIRS=str(home_dir / "profiles"),
               LLAMACTL_ETC_PROFILES_DIR=str(home_dir / "etc"), LLAMACTL_ENGINES_DIR=str(home_dir / "no-engines"),
               LLAMACTL_LLAMA_SERVER=str(server), **extra)
    return env


class Worker:
    """`llamactl worker` in the worker namespace; started() waits for its 'listens on' line."""

    def __init__(self, pair: netns.HostPair, rpc: Path, home_dir: Path, port: int, *extra: str,
                 host: str | None = None) -> None:
        self.argv = pair.worker([sys.executable, "-m", "llamactl", "worker", "--host", host or pair.worker_ip,
                                 "--port", str(port), "--binary", str(rpc), *extra])
        self.proc = subprocess.Popen(self.argv, env=side_env(home_dir, rpc), stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []

    def started(self) -> "Worker":
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # ends when the worker exits
            self.lines.append(line)
            if "listens on" in line:
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        raise AssertionError(f"worker exited ({self.proc.wait()}):\n{''.join(self.lines)}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def write_main_side(main_home: Path, gemma: Path, worker_address: str, *, n_gpu_layers: int = 10) -> None:
    (main_home / "config").mkdir(parents=True, exist_ok=True)
    (main_home / "config" / "workers.toml").write_text(f'gpu-box = "{worker_address}"\n')
    common = f'model = "{gemma}"\nctx_size = 2048\nthreads = 2\nparallel = 1\nload_timeout_s = 180\n'
    (main_home / "profiles" / "big.toml").write_text(
        common + f'gpus = []\nn_gpu_layers = {n_gpu_layers}\nrpc = ["gpu-box"]\nextra_args = ["-lv", "4"]\n')
    (main_home / "profiles" / "local.toml").write_text(common + "gpus = []\n")


def llamactl_in(pair: netns.HostPair, env: dict[str, str], *args: str, timeout: float = 300
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pair.main([sys.executable, "-m", "llamactl", *args]), env=env, capture_output=True,
                          text=True, timeout=timeout)


def ask(pair: netns.HostPair, url: str, key_file: str | None = None) -> dict:
    """`llamactl up` engines want their per-start key (the key file `status` shows)."""
    done = subprocess.run(pair.main([sys.executable, "-c", ASK, url, PROMPT, key_file or ""]), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def servers_in(pair: netns.HostPair) -> list[str]:
    """The processes left in the namespaces (the test's own `ip netns exec` children are gone by then)."""
    names = []
    for pid in pair.pids(pair.main_ns) + pair.pids(pair.worker_ns):
        try:
            names.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.NoSuchProcess:
            continue
    return names


def test_split_over_rpc_answers_like_local_and_the_plan_matches_the_engine(pair, binaries, gemma_path, tmp_path):
    server, rpc = binaries
    worker = Worker(pair, rpc, tmp_path / "worker-home", 50052).started()
    main_home = tmp_path / "main-home"
    env = side_env(main_home, server)
    write_main_side(main_home, gemma_path, f"{pair.worker_ip}:50052")
    try:
        plan = llamactl_in(pair, env, "plan", "big", "--json")
        assert plan.returncode == 0, plan.stderr
        planned = json.loads(plan.stdout)
        devices = {d["key"]: d for d in planned["devices"]}
        assert set(devices) == {"RPC0", "CPU"} and planned["fits"]
        assert devices["RPC0"]["worker"] == f"gpu-box ({pair.worker_ip}:50052)"
        assert devices["RPC0"]["n_layers"] == 9 and devices["RPC0"]["layers"].endswith("out")
        argv = planned["argv"]
        assert argv[argv.index("--rpc") + 1] == f"{pair.worker_ip}:50052"
        assert argv[argv.index("-dev") + 1] == "RPC0" and argv[argv.index("-ngl") + 1] == "10"
        text = llamactl_in(pair, env, "plan", "big").stdout
        assert f"RPC0 on gpu-box ({pair.worker_ip}:50052)" in text

        gpus = llamactl_in(pair, env, "gpus", "--rpc", "gpu-box")
        assert gpus.returncode == 0, gpus.stderr
        assert re.search(rf"RPC0\s+gpu-box\s+{re.escape(pair.worker_ip)}:50052\s+\d+\s+\d+", gpus.stdout), gpus.stdout

        up = llamactl_in(pair, env, "up", "big")
        assert up.returncode == 0, up.stdout + up.stderr
        [row] = json.loads(llamactl_in(pair, env, "status", "--json").stdout)["servers"]
        split = ask(pair, row["url"], row["key_file"])
        assert split["status"] == 200, split

        # The engine's own accounting, per device (the RPC device included): as close as for local devices.
        log = Path(row["log_path"] if "log_path" in row else main_home / "state" / "logs" / "big.log")
        [actual] = parse_memory_log(log.read_text(errors="replace").splitlines())
        remote_name = f"RPC0[{pair.worker_ip}:50052]"
        assert actual.model.get(remote_name, 0) > 50, actual  # the worker really holds weights
        for key, names in (("RPC0", [remote_name]), ("CPU", ["CPU", "CPU_Mapped", "CPU_REPACK"])):
            act = sum(getattr(actual, kind).get(n, 0.0) for kind in ("model", "kv", "compute", "output") for n in names)
            est = devices[key]["total_mib"] - devices[key]["overhead_mib"]
            weights_act = sum(actual.model.get(n, 0.0) for n in names)
            assert abs(devices[key]["weights_mib"] - weights_act) <= 1, (key, devices[key], actual)
            assert abs(devices[key]["kv_mib"] - sum(actual.kv.get(n, 0.0) for n in names)) <= 1, (key, actual)
            assert act - 1 <= est <= act + max(64, 0.03 * act), (key, est, act, actual)
        assert llamactl_in(pair, env, "down", "big").returncode == 0

        local_up = llamactl_in(pair, env, "up", "local")
        assert local_up.returncode == 0, local_up.stderr
        [row] = json.loads(llamactl_in(pair, env, "status", "--json").stdout)["servers"]
        local = ask(pair, row["url"], row["key_file"])
        assert local["body"]["content"] == split["body"]["content"] and local["body"]["content"].strip()
        assert llamactl_in(pair, env, "down", "local").returncode == 0
    finally:
        llamactl_in(pair, env, "down", "--all")
        assert worker.stop() == 0
    assert servers_in(pair) == []


def test_bad_worker_address_mismatched_version_and_public_bind_are_clear_errors(pair, binaries, gemma_path,
                                                                               tmp_path):
    server, rpc = binaries
    main_home = tmp_path / "main-home"
    env = side_env(main_home, server)

    # Nothing listens at the worker's address: the error names the worker and what was tried.
    write_main_side(main_home, gemma_path, f"{pair.worker_ip}:50099")
    up = llamactl_in(pair, env, "up", "big")
    assert up.returncode == 4, up.stdout + up.stderr
    assert f"worker 'gpu-box' ({pair.worker_ip}:50099) is unreachable: Connection refused" in up.stderr
    assert "tried a TCP connection" in up.stderr and "llamactl worker --host" in up.stderr
    assert json.loads(llamactl_in(pair, env, "status", "--json").stdout)["servers"] == []

    # A worker from another ggml (RPC protocol 6.0.0; ours is recorded in build.json): named, nothing started.
    fake = subprocess.Popen(pair.worker([sys.executable, str(Path(__file__).parent / "fakes" / "fake_rpc_server.py"),
                                         pair.worker_ip, "50053", "6.0.0"]), stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "listening"
        write_main_side(main_home, gemma_path, f"{pair.worker_ip}:50053")
        up = llamactl_in(pair, env, "up", "big")
        assert up.returncode == 4, up.stdout + up.stderr
        ours = json.loads((server.parent.parent / "build.json").read_text())["rpc_protocol"]
        assert (f"worker 'gpu-box' ({pair.worker_ip}:50053) speaks RPC protocol 6.0.0, but {server} speaks {ours}"
                in up.stderr)
        assert json.loads(llamactl_in(pair, env, "status", "--json").stdout)["servers"] == []
    finally:
        fake.kill()
        fake.wait()

    # A worker bound to every interface without --allow-public: refused before rpc-server runs.
    worker = Worker(pair, rpc, tmp_path / "worker-home", 50054, host="0.0.0.0")
    assert worker.proc.wait(30) == 2
    assert worker.proc.stderr is not None
    message = worker.proc.stderr.read()
    assert "0.0.0.0 listens on every interface" in message and "no authentication" in message
    assert "--allow-public" in message
    assert servers_in(pair) == []


class Daemon:
    """`llamactl serve` in the main namespace, its log lines collected."""

    def __init__(self, pair: netns.HostPair, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(pair.main([sys.executable, "-m", "llamactl", "serve", "--port", "0", *args]),
                                     env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = re.search(r"(http://127\.0\.0\.1:\d+)", self.wait_line(r"serving .* on http://")).group(1)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip())
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, pattern: str, timeout_s: float = 180, start: int = 0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {pattern!r}; daemon log:\n" + "\n".join(self.lines[-40:]))
                self.cond.wait(min(left, 1.0))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def test_a_dead_worker_is_named_waited_for_and_the_server_comes_back(pair, binaries, gemma_path, tmp_path):
    server, rpc = binaries
    worker_home = tmp_path / "worker-home"
    worker = Worker(pair, rpc, worker_home, 50052).started()
    main_home = tmp_path / "main-home"
    env = side_env(main_home, server, LLAMACTL_HEALTH_INTERVAL_S="0.3", LLAMACTL_RESTART_BASE_DELAY_S="0.2",
                   LLAMACTL_RESTART_MAX_DELAY_S="2")
    write_main_side(main_home, gemma_path, f"{pair.worker_ip}:50052")
    daemon = Daemon(pair, env, "--preload", "big")
    try:
        daemon.wait_line(r"\[big\]: .*listening on http")
        body = {"model": "big", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        first = ask_router(pair, daemon.url, body)
        assert first["status"] == 200, first

        assert worker.stop() == 0  # the worker host goes away (rpc-server and its supervisor)
        mark = len(daemon.lines)
        failed = ask_router(pair, daemon.url, body)  # the engine finds out on its next compute, and dies
        assert failed["status"] >= 500, failed
        daemon.wait_line(r"big: worker 'gpu-box' .* is unreachable", start=mark)
        status = json.loads(llamactl_in(pair, env, "status", "--json").stdout)
        waiting = status["engines"]["big"]["waiting_for_worker"]
        assert waiting["worker"] == "gpu-box" and f"{pair.worker_ip}:50052" in waiting["reason"]
        text = llamactl_in(pair, env, "status").stdout
        assert "waiting   for worker 'gpu-box'" in text
        meanwhile = ask_router(pair, daemon.url, body)  # a request while the worker is away fails with why
        assert meanwhile["status"] >= 500 and "worker 'gpu-box'" in meanwhile["body"], meanwhile

        worker = Worker(pair, rpc, worker_home, 50052).started()  # it comes back
        daemon.wait_line(r"big: worker 'gpu-box' is back", start=mark)
        again = ask_router(pair, daemon.url, body)
        assert again["status"] == 200, again
        status = json.loads(llamactl_in(pair, env, "status", "--json").stdout)
        assert status["engines"]["big"]["state"] == "ready" and status["engines"]["big"]["waiting_for_worker"] is None
    finally:
        assert daemon.stop() == 0
        worker.stop()
    assert servers_in(pair) == []


ASK_ROUTER = r"""
import json, sys, httpx
r = httpx.post(sys.argv[1] + "/v1/completions", timeout=120, json=json.loads(sys.argv[2]))
print(json.dumps({"status": r.status_code, "body": r.text[:2000]}))
"""


def ask_router(pair: netns.HostPair, url: str, body: dict) -> dict:
    done = subprocess.run(pair.main([sys.executable, "-c", ASK_ROUTER, url, json.dumps(body)]), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
