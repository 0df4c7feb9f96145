"""`llamactl worker`: run rpc-server on this host and keep it running (restart with backoff), with a log and a
state file `llamactl worker status` reads. rpc-server has no authentication: binding anything but a private
address needs allow_public."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llamactl.errors import ConfigError, EngineNotFound, StartError
from llamactl.rpc.workers import bind_problem
from llamactl.settings import Settings
from llamactl.supervisor.logs import rotate_logs, tail_lines
from llamactl.supervisor.process import die_with_parent_preexec, line_buffered, stop_group
from llamactl.supervisor.recovery import Action, RestartPolicy, RestartTracker, exit_reason

READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerOptions:
    host: str
    port: int = 50052
    devices: tuple[str, ...] = ()
    cache_dir: Path | None = None  # rpc-server -c: keep tensors sent before, on local disk
    threads: int | None = None
    allow_public: bool = False
    binary: Path | None = None


@dataclass
class WorkerRecord:
    """What `llamactl worker status` shows: written by the running `llamactl worker`."""

    host: str
    port: int
    pid: int  # the `llamactl worker` process
    state: str  # starting, running, backoff, failed, stopped
    binary: str
    log_path: str
    child_pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = field(default_factory=time.time)
    devices: list[str] = field(default_factory=list)


def find_rpc_server(settings: Settings, explicit: Path | None = None) -> Path:
    """--binary, else `rpc-server` on PATH, else llamactl's own llama.cpp build (newest)."""
    import shutil

    from llamactl.engines.binaries import cached_builds

    if explicit is not None:
        candidates = [explicit]
    else:
        on_path = shutil.which("rpc-server")
        candidates = [Path(on_path)] if on_path else []
        candidates += [b.parent / "rpc-server" for b in cached_builds("llama.cpp", settings)]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise EngineNotFound(
        "no rpc-server found (looked at: " + (str(explicit) if explicit else
                                            f"`rpc-server` on PATH, {settings.engine_cache_dir}/llama.cpp-*/bin") + ")",
        hint="run `llamactl engines install llama.cpp` (it builds rpc-server with GGML_RPC), or pass --binary")


def rpc_server_argv(binary: Path, options: WorkerOptions) -> list[str]:
    argv = [str(binary), "--host", options.host, "--port", str(options.port)]
    if options.devices:
        argv += ["--device", ",".join(options.devices)]
    if options.threads:
        argv += ["--threads", str(options.threads)]
    if options.cache_dir is not None:
        argv.append("--cache")
    return argv


def rpc_server_env(options: WorkerOptions) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    if options.cache_dir is not None:
        env["LLAMA_CACHE"] = str(options.cache_dir)  # rpc-server keeps its tensor cache under $LLAMA_CACHE/rpc
    return env


def check_bind(options: WorkerOptions) -> None:
    problem = bind_problem(options.host)
    if problem and not options.allow_public:
        raise ConfigError(
            f"llamactl worker --host {options.host}: {problem}; rpc-server has no authentication and no "
            "encryption, so anyone who reaches it can use this box's memory and compute and read the tensors sent to it",
            hint="bind the private address the main box reaches (e.g. a LAN or WireGuard address), or use a tunnel "
                 "(ssh -L) to 127.0.0.1; pass --allow-public only if a firewall already limits who can connect")


def state_path(settings: Settings, port: int) -> Path:
    return settings.state_dir / "workers" / f"{port}.json"


def read_records(settings: Settings) -> list[WorkerRecord]:
    records = []
    for path in sorted((settings.state_dir / "workers").glob("*.json")):
        try:
            records.append(WorkerRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return records


def _write(path: Path, record: WorkerRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(path)


BIND_FAILED = "Failed to create server socket"  # rpc-server's line when it cannot bind (it then exits 0)


def port_in_use(host: str, port: int) -> str | None:
    """Why rpc-server could not bind host:port (something listens there already), or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as rpc-server does: TIME_WAIT is no conflict
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            return f"{host}:{port} is in use ({e.strerror})"
    return None


def _listens(pid: int, port: int) -> bool:
    """Whether the process `pid` itself listens on `port` (a connection that succeeds could be another's)."""
    import psutil

    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def record_is_live(record: WorkerRecord) -> bool:
    """Whether the `llamactl worker` that wrote `record` still runs: its pid exists and is the same process
    (not a newer one that reuses the pid: it started before the record was made)."""
    import psutil

    try:
        return psutil.Process(record.pid).create_time() <= record.started_at + 1.0
    except psutil.Error:
        return False


class WorkerRunner:
    """One rpc-server child, restarted with backoff until stop() (a signal) or a crash loop."""

    def __init__(self, options: WorkerOptions, settings: Settings, *, policy: RestartPolicy | None = None,
                 say=print) -> None:
        check_bind(options)
        self.options = options
        self.settings = settings
        self.binary = find_rpc_server(settings, options.binary)
        self.say = say
        self.tracker = RestartTracker(policy or RestartPolicy(
            base_delay_s=settings.restart_base_delay_s, max_delay_s=settings.restart_max_delay_s,
            max_crashes=settings.restart_max_crashes, window_s=settings.restart_window_s))
        self.stopping = threading.Event()
        self.log_path = settings.log_dir / f"worker-{options.port}.log"
        self.state_file = state_path(settings, options.port)
        self.record = WorkerRecord(host=options.host, port=options.port, pid=os.getpid(), state="starting",
                                   binary=str(self.binary), log_path=str(self.log_path),
                                   devices=list(options.devices))
        self.child: subprocess.Popen[bytes] | None = None

    def stop(self, *_: object) -> None:
        self.stopping.set()

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self.options.cache_dir is not None:
            self.options.cache_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_logs(self.log_path, self.settings.log_backups)
        with self.log_path.open("ab") as log:
            return subprocess.Popen(line_buffered(rpc_server_argv(self.binary, self.options)),
                                    env=rpc_server_env(self.options), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                    preexec_fn=die_with_parent_preexec)

    def _wait_listening(self, child: subprocess.Popen[bytes]) -> bool:
        """True once the child itself listens on the port; False if it exits (or the deadline passes)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not self.stopping.is_set():
            if child.poll() is not None:
                return False
            if _listens(child.pid, self.options.port):
                return True
            self.stopping.wait(0.05)
        return False

    def _check_port(self, log_tail: list[str] | None = None) -> None:
        """StartError("port in use") when something else holds the port (seen before a start, or in rpc-server's
        last lines): no restart fixes that, so no backoff and no crash loop."""
        held = port_in_use(self.options.host, self.options.port)
        if held is None and not any(BIND_FAILED in line for line in log_tail or ()):
            return
        why = held or f"{self.options.host}:{self.options.port} is in use (rpc-server: {BIND_FAILED!r})"
        self._set(state="failed", child_pid=None, last_exit=f"port in use: {why}")
        raise StartError(f"worker: port in use: {why}", cause="port in use", log_tail=list(log_tail or ()),
                         hint=f"stop what listens there (`ss -ltnp 'sport = :{self.options.port}'` shows it), or "
                              "give `llamactl worker --port` another port")

    def _set(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.record, key, value)
        _write(self.state_file, self.record)

    def run(self) -> int:
        """Run until stopped; 0 on a stop, 4 when the first start fails or a crash loop ends it."""
        first = True
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                self._check_port()
                self.child = child = self._spawn()
                self._set(state="starting", child_pid=child.pid)
                if self._wait_listening(child):
                    self._set(state="running")
                    self.say(f"rpc-server (pid {child.pid}) listens on {self.options.host}:{self.options.port}; "
                             f"log: {self.log_path}")
                    first = False
                    while not self.stopping.is_set() and child.poll() is None:
                        self.stopping.wait(0.2)
                if self.stopping.is_set():
                    break
                if child.poll() is None:  # never listened in time
                    stop_group(child.pid, 5.0, reap=child)
                reason = f"rpc-server (pid {child.pid}) {exit_reason(child.returncode)}"
                tail = tail_lines(self.log_path, 15)
                self._check_port(tail)
                if first:
                    self._set(state="failed", child_pid=None, last_exit=reason)
                    raise StartError(f"{reason} before listening on {self.options.host}:{self.options.port}",
                                     cause="worker start failed", log_tail=tail,
                                     hint="is the address one of this host's, and the port free?")
                decision = self.tracker.on_exit(time.monotonic(), uptime_s=time.monotonic() - started, reason=reason,
                                                log_tail=tail)
                if decision.action is Action.FAIL:
                    self._set(state="failed", child_pid=None, last_exit=decision.reason)
                    raise StartError(f"worker on port {self.options.port}: {decision.reason}", cause="crash loop",
                                     log_tail=list(decision.log_tail))
                self._set(state="backoff", child_pid=None, restarts=self.record.restarts + 1, last_exit=reason)
                self.say(f"{reason}; restarting in {decision.delay_s:.1f} s")
                self.stopping.wait(decision.delay_s)
        finally:
            if self.child is not None and self.child.poll() is None:
                stop_group(self.child.pid, 5.0, reap=self.child)
            if self.record.state != "failed":
                self.state_file.unlink(missing_ok=True)
        return 0


def install_signal_handlers(runner: WorkerRunner) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, runner.stop)
