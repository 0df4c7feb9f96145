"""What survives the CLI: one JSON record per running server, per-profile locks, per-start key files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from llamactl.names import check_profile_name, is_profile_name

RECORD_SUFFIX = ".json"


@dataclass(frozen=True)
class ServerRecord:
    profile: str
    engine: str
    binary: str
    version: str
    model: str
    alias: str
    pid: int
    create_time: float
    cmdline: list[str]
    port: int
    log_path: str
    started_at: float
    state: str = "starting"  # starting -> ready; a dead process makes the record stale
    ready_at: float | None = None
    api_key: str | None = field(default=None, repr=False)
    placement: str | None = None  # what an automatic placement gave up (layers on the CPU, a shorter context)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def with_state(self, state: str, **changes: object) -> "ServerRecord":
        return replace(self, state=state, **changes)


def process_matches(record: ServerRecord) -> psutil.Process | None:
    """The live process the record describes, verified by pid + create time + cmdline, or None.

    A pid reused by another program never matches, so it is never signalled.
    """
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 0.05:
            return None
        if not same_command(proc.cmdline(), record.cmdline):
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def same_command(actual: list[str], recorded: list[str]) -> bool:
    """The arguments must match exactly; argv[0] may differ (a script run through its interpreter)."""
    args = recorded[1:]
    return len(actual) >= len(recorded) and actual[len(actual) - len(args):] == args and (
        actual[0] == recorded[0] or any(part == recorded[0] for part in actual[:-len(args) or None]))


class StateStore:
    """Records under <state_dir>/servers, locks under <state_dir>/locks. Files are 0600."""

    def __init__(self, state_dir: Path) -> None:
        self.servers_dir = state_dir / "servers"
        self.locks_dir = state_dir / "locks"

    def _path(self, profile: str) -> Path:
        return self.servers_dir / f"{check_profile_name(profile)}{RECORD_SUFFIX}"

    def read(self, profile: str) -> ServerRecord | None:
        try:
            data = json.loads(self._path(profile).read_text())
            return ServerRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # a torn or foreign file: treated as absent, rewritten on next start

    def write(self, record: ServerRecord) -> None:
        self.servers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(record.profile)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f, indent=2)
        tmp.replace(path)

    def remove(self, profile: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(profile).unlink()

    def write_key(self, profile: str, key: str) -> Path:
        """The child's per-start API key, in a 0600 file passed as --api-key-file."""
        path = self.key_path(profile)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return path

    def key_path(self, profile: str) -> Path:
        return self.servers_dir.parent / "keys" / f"{check_profile_name(profile)}.key"

    def remove_key(self, profile: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.key_path(profile).unlink()

    def names(self) -> list[str]:
        if not self.servers_dir.is_dir():
            return []
        return sorted(p.stem for p in self.servers_dir.glob(f"*{RECORD_SUFFIX}") if is_profile_name(p.stem))

    @contextlib.contextmanager
    def lock(self, profile: str, timeout_s: float | None = None) -> Iterator[None]:
        """Exclusive per-profile lock, so two CLIs never start or stop the same profile at once."""
        path = self.locks_dir / f"{check_profile_name(profile)}.lock"
        self.locks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline else 0))
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:  # type: ignore[operator]
                        raise TimeoutError(f"profile {profile} is locked by another llamactl") from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)
