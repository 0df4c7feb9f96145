"""Does a llama-server binary honour a per-request draft depth? Found out by running it, never from its version.

One small server with a model as target AND draft (`-md`, depth 8, one slot, CPU only): the same prompt once
with `"speculative.n_max": 0` and once without. The engine says what it drafted: mainline in the response's
timings (`draft_n`), the pinned ik_llama.cpp in a log line per request ("draft acceptance rate = ..."). The
binary honours per-request depth when the request without the field drafted and the one with depth 0 did not.
Expected on the pinned builds: ik honours it, mainline ignores every per-request speculative field.

The verdict is cached by binary path + mtime + size (like the --help probe). A run takes tens of seconds on a
busy CPU: callers run it in a thread (`SelfTest.run`), and `cancel()` from any thread stops its server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llamactl.engines.capabilities import probe
from llamactl.engines.common import LaunchInputs, child_env
from llamactl.engines.logs import parse_acceptance
from llamactl.errors import LlamactlError

log = logging.getLogger("llamactl.engines")

DEPTH = 8
N_PREDICT = 8
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 180.0
LOG_WAIT_S = 2.0
PROMPT = "def add(a, b):\n    return a + b\n\n" * 4 + "def add(a, b):\n"
VERSION = 1  # of the test itself: a changed test runs again on every binary


@dataclass(frozen=True)
class Observation:
    """What one request drafted, as the engine reported it (None: it reported nothing about drafting)."""

    timings_drafted: int | None  # timings.draft_n (mainline)
    log_drafted: int | None  # tokens drafted in the acceptance lines it logged (ik); None: no line

    @property
    def drafted(self) -> int:
        return max(self.timings_drafted or 0, self.log_drafted or 0)


@dataclass(frozen=True)
class Verdict:
    honoured: bool
    detail: str


def judge(off: Observation, on: Observation) -> Verdict:
    """Pure: depth 0 per request is honoured when the plain request drafted and the depth-0 one did not."""
    if on.drafted == 0:
        return Verdict(False, "the server drafted nothing even without a per-request depth: cannot tell")
    if off.drafted > 0:
        return Verdict(False, f"a request with speculative.n_max = 0 still drafted {off.drafted} tokens")
    return Verdict(True, f"speculative.n_max = 0 drafted nothing; without it {on.drafted} tokens were drafted")


def cache_file(binary: Path, cache_dir: Path) -> Path:
    st = binary.stat()
    key = hashlib.sha1(f"{binary.resolve()}|{st.st_mtime_ns}|{st.st_size}|{VERSION}".encode()).hexdigest()
    return cache_dir / "selftest" / f"{key}.json"


def cached(binary: Path, cache_dir: Path) -> Verdict | None:
    """The verdict for `binary` if it was tested already (None: never, or the binary changed since)."""
    try:
        data = json.loads(cache_file(binary, cache_dir).read_text())
        return Verdict(bool(data["honoured"]), str(data["detail"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(binary: Path, cache_dir: Path, verdict: Verdict) -> None:
    path = cache_file(binary, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(verdict), f)
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SelfTest:
    """One run of the self-test on `binary` (engine `engine`) with `model` as target and draft."""

    def __init__(self, engine: str, binary: Path, model: Path, cache_dir: Path) -> None:
        self.engine, self.binary, self.model, self.cache_dir = engine, binary, model, cache_dir
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self.started = threading.Event()  # set once its server process exists (`pid`)
        self.pid: int | None = None

    def cancel(self) -> None:
        """Stop the run (any thread): its server is killed at once; run() then returns None."""
        self._stop.set()
        self._kill()

    def run(self) -> Verdict | None:
        """The verdict (cached, else measured and cached); None when cancelled or the server could not be run."""
        known = cached(self.binary, self.cache_dir)
        if known is not None:
            return known
        try:
            verdict = self._measure()
        except (LlamactlError, OSError, ValueError) as e:
            if not self._stop.is_set():
                log.warning("per-request depth self-test of %s could not run: %s", self.binary, e)
            return None
        except Exception as e:  # noqa: BLE001 - httpx errors and the like: the answer is "not known"
            if not self._stop.is_set():
                log.warning("per-request depth self-test of %s failed: %s", self.binary, e)
            return None
        finally:
            self._kill()
        if verdict is None:
            return None
        _store(self.binary, self.cache_dir, verdict)
        log.info("per-request depth on %s: %s (%s)", self.binary, "honoured" if verdict.honoured else "ignored",
                 verdict.detail)
        return verdict

    def _measure(self) -> Verdict | None:
        import httpx

        from llamactl.engines import build_launch
        from llamactl.profiles import Profile, Speculation

        caps = probe(self.binary, self.cache_dir)
        profile = Profile(name="selftest", engine=self.engine, model=str(self.model), ctx_size=1024, gpus=[],
                          parallel=1, speculation=Speculation(type="draft", draft_model=str(self.model), n_max=DEPTH))
        port = _free_port()
        inputs = LaunchInputs(binary=self.binary, model_path=self.model, port=port, draft_model_path=self.model)
        launch = build_launch(profile, caps, inputs, os.environ)
        with tempfile.TemporaryDirectory(prefix="llamactl-selftest-") as tmp:
            log_path = Path(tmp) / "server.log"
            with open(log_path, "wb") as out, self._lock:
                if self._stop.is_set():
                    return None
                self._process = subprocess.Popen(launch.argv, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=child_env(os.environ, profile),
                                                 start_new_session=True)
                self.pid = self._process.pid
                self.started.set()
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
                if not self._wait_healthy(client):
                    return None
                off = self._ask(client, log_path, {"speculative.n_max": 0})
                on = self._ask(client, log_path, {}, wait_for_line=True)
        if off is None or on is None:
            return None
        return judge(off, on)

    def _wait_healthy(self, client) -> bool:
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not self._stop.is_set():
            process = self._process
            if process is None or process.poll() is not None:
                raise OSError(f"the server exited with status {process.returncode if process else '?'} at start")
            try:
                if client.get("/health", timeout=5).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            self._stop.wait(0.2)  # polling a starting server: there is nothing to be told by
        return False

    def _ask(self, client, log_path: Path, fields: dict[str, object], wait_for_line: bool = False) -> Observation | None:
        if self._stop.is_set():
            return None
        offset = log_path.stat().st_size
        r = client.post("/completion", json={"prompt": PROMPT, "n_predict": N_PREDICT, "temperature": 0,
                                             "cache_prompt": False, **fields})
        r.raise_for_status()
        timings = r.json().get("timings") or {}
        drafted = timings.get("draft_n")
        lines = _acceptance_after(log_path, offset)
        deadline = time.monotonic() + LOG_WAIT_S
        # ik writes the line as the request ends; a drafting request without one yet may still write it
        while wait_for_line and lines is None and not drafted and time.monotonic() < deadline:
            self._stop.wait(0.05)
            lines = _acceptance_after(log_path, offset)
        return Observation(int(drafted) if isinstance(drafted, (int, float)) else None, lines)

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()


def _acceptance_after(log_path: Path, offset: int) -> int | None:
    """Tokens drafted in the acceptance lines logged after `offset` (None: no line)."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    found = [a for line in text.splitlines() if (a := parse_acceptance(line)) is not None]
    return sum(a.generated for a in found) if found else None
