"""Recovery for a long-running daemon: restart policy, hang detection, orphan sweep, a spawner thread.

- `RestartTracker` (pure; time is passed in): exponential backoff with a cap, and crash-loop detection
  that ends in `failed` with the reason and the child's last log lines.
- `acheck_health` + `HangDetector`: a process that lives but does not answer /health
  for `threshold` consecutive probes is "hung" (restart it).
- `find_orphans` / `plan_sweep` / `stop_orphan`: at daemon start, the llama-servers an earlier llamactl
  started (records in <state_dir>/servers, verified by pid + create time + cmdline) are found and either
  adopted or stopped, so none is left holding VRAM.
- `SpawnerThread`: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the
  process. A daemon that wants its children to die with it (even on SIGKILL) must spawn them from a
  thread that lives as long as the daemon; this is that thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import psutil

from llamactl.settings import Settings
from llamactl.supervisor.process import stop_group
from llamactl.supervisor.state import ServerRecord, StateStore, process_matches

T = TypeVar("T")

# ------------------------------------------------------------------------------------ restart policy


@dataclass(frozen=True)
class RestartPolicy:
    base_delay_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 60.0
    max_crashes: int = 5  # this many crashes within window_s: a crash loop -> failed
    window_s: float = 300.0
    stable_after_s: float = 120.0  # a child that ran this long without crashing resets the backoff
    log_lines: int = 15


class Action(enum.Enum):
    RESTART = "restart"
    FAIL = "failed"


@dataclass(frozen=True)
class RestartDecision:
    action: Action
    delay_s: float  # wait this long before restarting (0 for FAIL)
    reason: str
    attempt: int  # consecutive crashes counted so far
    log_tail: tuple[str, ...] = ()


@dataclass
class RestartTracker:
    """One per profile. Feed it every unexpected exit or hang; it says restart (after a delay) or fail.

    Deterministic: no jitter, time is an argument. Several profiles crash-looping at once are already
    spread by their different crash times; add jitter at the caller if that ever matters.
    """

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    crashes: deque[float] = field(default_factory=deque)
    consecutive: int = 0
    failed: RestartDecision | None = None

    def on_started(self) -> None:
        """A manual (re)start clears a failed state."""
        self.failed = None

    def on_exit(self, now: float, *, uptime_s: float, reason: str, log_tail: Iterable[str] = ()) -> RestartDecision:
        """The child exited (or was killed as hung) at `now` after running `uptime_s` seconds."""
        p = self.policy
        if uptime_s >= p.stable_after_s:
            self.consecutive = 0
        self.consecutive += 1
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - p.window_s:
            self.crashes.popleft()
        tail = tuple(log_tail)[-p.log_lines:]
        if len(self.crashes) >= p.max_crashes:
            self.failed = RestartDecision(
                Action.FAIL, 0.0,
                f"crash loop: {len(self.crashes)} crashes in {p.window_s:g} s; last: {reason}",
                self.consecutive, tail)
            return self.failed
        delay = min(p.max_delay_s, p.base_delay_s * p.factor ** (self.consecutive - 1))
        return RestartDecision(Action.RESTART, delay, reason, self.consecutive, tail)


def exit_reason(exit_code: int | None) -> str:
    """A child's exit code in words: "exited with code 1", "killed by SIGKILL"."""
    if exit_code is None:
        return "exited"
    if exit_code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exited with code {exit_code}"


# ---------------------------------------------------------------------------------- hang detection

HEALTH_CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class HealthCheck:
    ok: bool
    detail: str  # "200", "503", "timeout", "refused: ..."


def _health_result(status: int | None, error: Exception | None) -> HealthCheck:
    if error is not None:
        kind = "timeout" if isinstance(error, httpx.TimeoutException) else type(error).__name__
        return HealthCheck(False, f"{kind}: {error}" if str(error) else kind)
    return HealthCheck(status == 200, str(status))


async def acheck_health(url: str, *, timeout_s: float = HEALTH_CHECK_TIMEOUT_S,
                        client: httpx.AsyncClient | None = None) -> HealthCheck:
    try:
        if client is not None:
            r = await client.get(f"{url}/health", timeout=timeout_s)
        else:
            async with httpx.AsyncClient() as c:
                r = await c.get(f"{url}/health", timeout=timeout_s)
        return _health_result(r.status_code, None)
    except httpx.HTTPError as e:
        return _health_result(None, e)


class Verdict(enum.Enum):
    OK = "ok"
    SUSPECT = "suspect"  # failed probes, below the threshold
    HUNG = "hung"  # alive but unresponsive: restart it
    DEAD = "dead"  # the process is gone: that is a crash, not a hang


@dataclass
class HangDetector:
    """Counts consecutive failed probes of a *ready* child while its process lives.

    With probes every `interval` seconds and a 3 s timeout, threshold 3 means a hang is declared
    within about 3 * (interval + 3) seconds. A busy llama-server still answers /health (it has its own
    HTTP threads), so failures mean it is wedged, not merely busy.
    """

    threshold: int = 3
    failures: int = 0
    last: HealthCheck | None = None

    def observe(self, probe: HealthCheck, *, alive: bool) -> Verdict:
        self.last = probe
        if not alive:
            return Verdict.DEAD
        if probe.ok:
            self.failures = 0
            return Verdict.OK
        self.failures += 1
        return Verdict.HUNG if self.failures >= self.threshold else Verdict.SUSPECT

    def reset(self) -> None:
        self.failures = 0
        self.last = None

    def reason(self) -> str:
        detail = self.last.detail if self.last else "no answer"
        return f"hung: /health failed {self.failures} times in a row while the process lived ({detail})"


# ------------------------------------------------------------------------------------- orphan sweep


@dataclass(frozen=True)
class Orphan:
    """A llama-server an earlier llamactl started that is still running."""

    record: ServerRecord
    process: psutil.Process

    @property
    def profile(self) -> str:
        return self.record.profile


def find_orphans(settings: Settings) -> list[Orphan]:
    """Every recorded server whose process is still the one recorded (pid + create time + cmdline).

    Records whose process is gone (or whose pid now belongs to another program) are removed on the way:
    they describe nothing, and a reused pid is never signalled. Call it once at daemon start, before
    anything is started, so every live record is from an earlier run (a daemon killed with SIGKILL, or
    `llamactl up` run standalone).
    """
    store = StateStore(settings.state_dir)
    found = []
    for name in store.names():
        with store.lock(name, timeout_s=5):
            record = store.read(name)
            if record is None:
                continue
            proc = process_matches(record)
            if proc is None:
                store.remove(name)
                continue
            found.append(Orphan(record, proc))
    return found


@dataclass(frozen=True)
class SweepPlan:
    adopt: list[Orphan]
    stop: list[tuple[Orphan, str]]  # with the reason


def plan_sweep(orphans: Iterable[Orphan], served: dict[str, Any], *,
               same_launch: Callable[[Orphan, Any], bool] | None = None) -> SweepPlan:
    """Pure: which orphans the daemon may keep serving and which it must stop.

    Adopt only a server for a profile this daemon serves, that was started with a per-start API key
    (so nothing can reach it behind the router), and, if `same_launch` is given, whose launch still
    matches the profile (same binary, model, flags). Everything else is stopped.
    """
    adopt, stop = [], []
    for orphan in orphans:
        profile = served.get(orphan.profile)
        if profile is None:
            stop.append((orphan, f"profile '{orphan.profile}' is not served by this daemon"))
        elif not orphan.record.api_key:
            stop.append((orphan, "started without an API key (reachable behind the router's back)"))
        elif same_launch is not None and not same_launch(orphan, profile):
            stop.append((orphan, "its profile changed since it was started"))
        else:
            adopt.append(orphan)
    return SweepPlan(adopt, stop)


def stop_orphan(settings: Settings, orphan: Orphan, timeout_s: float = 15.0) -> bool:
    """Stop an orphan's whole process group (SIGTERM, wait, SIGKILL) and drop its record.

    Re-checks identity under the profile lock first. True if it was still running.
    """
    store = StateStore(settings.state_dir)
    with store.lock(orphan.profile, timeout_s=timeout_s):
        if process_matches(orphan.record) is None:
            current = store.read(orphan.profile)
            if current == orphan.record:
                store.remove(orphan.profile)
            return False
        stop_group(orphan.record.pid, timeout_s)
        if store.read(orphan.profile) == orphan.record:
            store.remove(orphan.profile)
        return True


# ------------------------------------------------------------------------------------ spawner thread


class SpawnerThread:
    """One long-lived thread that runs every call that spawns a child (Supervisor.start).

    PR_SET_PDEATHSIG (Supervisor(die_with_parent=True)) delivers SIGKILL to the child when the thread
    that forked it exits. asyncio.to_thread's pool threads are not guaranteed to live as long as the
    daemon, so spawning there could kill a healthy child later. Calls run one at a time, in order;
    a start blocks until the engine is ready, so use one SpawnerThread per profile (or accept that
    starts queue behind each other).
    """

    def __init__(self, name: str = "llamactl-spawner") -> None:
        # A pool worker waits for work forever; it exits only on shutdown() or when the pool is
        # garbage-collected, so keep this object for the daemon's whole life.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn, *args, **kwargs)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self) -> None:
        """Call after every child is stopped: once this thread exits, PDEATHSIG kills what it spawned."""
        self._pool.shutdown(wait=True)
