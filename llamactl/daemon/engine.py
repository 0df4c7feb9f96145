"""One profile's engine, owned by the daemon for the daemon's whole life.

An `Engine` answers every question about its profile's llama-server (is it running, where, why did it
fail) and is the only code that changes the answer. Its state moves through TRANSITIONS, one method:

    stopped -> starting -> ready -> (died or hung) backoff -> starting ...   (restart with backoff)
                        \\-> backoff / failed (a start that failed; failed = a crash loop, `up` clears it)
    any -> stopping -> stopped                                               (`down`, shutdown)

A stop cancels a start in progress: the start runs in the profile's spawner thread (see SpawnerThread),
which polls a cancel flag while the engine loads and stops the engine it spawned. Nothing holds a lock
across a load or a backoff, so `down` acts at once. While the engine runs, a monitor task probes /health,
rotates its log, and turns a death or a hang into a restart (after the backoff) or `failed`; a relay
task copies its log lines into the daemon's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from llamactl.daemon import auth
from llamactl.daemon.prompt_cache import PromptCache
from llamactl.engines.logs import classify_exit
from llamactl.errors import LlamactlError, StartCancelled, StartError
from llamactl.hf.pull import PullCancelled, PullProgress
from llamactl.launch import start_profile
from llamactl.models import fetch_profile_models, hf_models
from llamactl.profiles import Profile
from llamactl.rpc.errors import WorkerError
from llamactl.settings import Settings
from llamactl.supervisor import ServerRecord, Supervisor
from llamactl.supervisor.logs import last_line, relay_log, rotate_if_large, tail_lines
from llamactl.supervisor.recovery import (
    Action, HangDetector, HealthCheck, RestartPolicy, RestartTracker, SpawnerThread, Verdict, acheck_health,
)
from llamactl.supervisor.state import process_matches

log = logging.getLogger("llamactl.daemon")
FAULT_PAUSE_S = 30.0  # a watching loop that raised runs again after this (not at once: a fault that repeats)


def retrieved(future: asyncio.Future) -> None:
    """A done-callback: mark the outcome as read. A cancelled shield() drops its own callback on the inner
    future, so an exception the inner one ends with later would be logged as "Future exception was never
    retrieved", with a traceback, although the code that cancelled expects it (a stopped start)."""
    if not future.cancelled():
        future.exception()


async def wait_in_thread(future: asyncio.Future, cancel: threading.Event):
    """The outcome of work running in a thread. Cancelling the wait asks the work to stop (`cancel`) and waits
    until it has, so nothing it started is left behind; its outcome then is expected and marked as read."""
    future.add_done_callback(retrieved)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(future)
        raise


class EngineState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"  # not running; starts again once the backoff delay has passed
    FAILED = "failed"  # a crash loop: not started again until `llamactl up` clears it
    STOPPING = "stopping"


TRANSITIONS: dict[EngineState, set[EngineState]] = {
    EngineState.STOPPED: {EngineState.STARTING, EngineState.READY, EngineState.STOPPING},  # READY: adopted
    EngineState.STARTING: {EngineState.READY, EngineState.BACKOFF, EngineState.FAILED, EngineState.STOPPING},
    EngineState.READY: {EngineState.BACKOFF, EngineState.FAILED, EngineState.STOPPING},
    EngineState.BACKOFF: {EngineState.STARTING, EngineState.STOPPING},
    EngineState.FAILED: {EngineState.STARTING, EngineState.STOPPING},
    EngineState.STOPPING: {EngineState.STOPPED, EngineState.FAILED},
}


class EngineEvents:
    """What the engine tells its owner (the daemon forwards both to the lane serving the profile)."""

    def down(self, name: str) -> None:
        """The engine died or hung; it restarts after its backoff."""

    def failed(self, name: str, error: LlamactlError) -> None:
        """The engine was given up on (a crash loop)."""

    def state(self, name: str, state: str, reason: str | None) -> None:
        """The engine moved to `state` (every change, for the event stream); must not block."""

    def prompt_cache(self, what: str, data: dict[str, Any]) -> None:
        """The prompt cache saved or restored slots (for the event stream); must not block."""


class Engine:
    def __init__(self, name: str, *, supervisor: Supervisor, settings: Settings,
                 profile_of: Callable[[str], Profile], events: EngineEvents | None = None) -> None:
        self.name = name
        self.supervisor = supervisor
        self.settings = settings
        self.profile_of = profile_of  # the current profile (a reload changes it for the next start)
        self.events = events or EngineEvents()
        self.state = EngineState.STOPPED
        self.record: ServerRecord | None = None
        self.tracker = RestartTracker(restart_policy(settings))
        self.detector = HangDetector(settings.hang_probes)
        self.not_before = 0.0  # monotonic: no start before this (backoff)
        self.tasks: asyncio.TaskGroup | None = None  # where monitor and relay run (the daemon's); None: none
        self._spawner: SpawnerThread | None = None
        self._start: asyncio.Task[ServerRecord] | None = None
        self._cancel = threading.Event()
        self._stop_lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None
        # The box scheduler's grant: what this engine's start plans with (None: the GPUs as they are now).
        self.launch_probe: Callable[[str], Any] | None = None
        self.waiting_for: WorkerError | None = None  # an RPC worker that is down: restarts wait for it
        self.download: PullProgress | None = None  # while its hf: models download (before the start)
        self._fetch_cancel = threading.Event()
        self._worker_waits = 0
        self.prompt_cache: PromptCache | None = None  # the daemon's: slots saved at a stop, restored at a start
        self._started_as: Profile | None = None  # the profile the running engine was started with (its cache key)

    # -- state ---------------------------------------------------------------------------------------

    def _move(self, new: EngineState) -> None:
        if new is not self.state and new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"engine {self.name}: illegal state change {self.state.value} -> {new.value}")
        changed, self.state = new is not self.state, new
        if changed:
            failed = self.tracker.failed if new in (EngineState.FAILED, EngineState.BACKOFF) else None
            self.events.state(self.name, new.value, failed.reason if failed else None)

    def describe(self) -> dict[str, Any]:
        failed = self.tracker.failed
        return {"profile": self.name, "state": self.state.value,
                "pid": self.record.pid if self.record else None,
                "url": self.record.url if self.record else None,
                "reason": failed.reason if failed else None,
                "waiting_for_worker": None if self.waiting_for is None else {
                    "worker": self.waiting_for.worker, "reason": self.waiting_for.message},
                "downloading": self.download.text() if self.download is not None else None,
                "progress": self.load_progress() if self.state is EngineState.STARTING or self.download else None,
                "prompt_cache": self._prompt_cache_status()}

    def _prompt_cache_status(self) -> dict[str, Any] | None:
        if self.prompt_cache is None:
            return None
        return self.prompt_cache.status(self.name)

    def load_progress(self) -> str | None:
        """While its models download: how far; while starting: the engine's own latest log line."""
        download = self.download
        if download is not None:
            return download.text()
        return last_line(self.supervisor.log_path(self.name))

    async def fetch_models(self) -> None:
        """Download the profile's hf: models that are not in the cache (in a thread; `download` says how far).
        Cancelling it (a stop, a shutdown) stops the download at its next chunk and waits until it has."""
        profile = self.profile_of(self.name)
        if not hf_models(profile):
            return
        self._fetch_cancel = cancel = threading.Event()

        def progress(state: PullProgress) -> None:
            self.download = state

        future = asyncio.get_running_loop().run_in_executor(None, functools.partial(
            fetch_profile_models, profile, self.settings, progress=progress, cancelled=cancel.is_set))
        try:
            await wait_in_thread(future, cancel)
        except PullCancelled:  # a stop of this engine while nobody cancelled the caller
            raise StartCancelled(f"{self.name}: download stopped (llamactl down or shutdown)") from None
        finally:
            self.download = None

    # -- start ---------------------------------------------------------------------------------------

    async def ensure_ready(self) -> ServerRecord:
        """Start the engine unless it runs, and return its record once it serves. Several callers share one
        start. Raises StartError (failed, backoff start failed, cancelled by a stop)."""
        while True:
            if self._stop_lock.locked():  # a stop is under way: start afresh after it
                async with self._stop_lock:
                    pass
                continue
            if self.state is EngineState.FAILED:
                raise self.failed_error()
            if self.state is EngineState.READY and self.record is not None:
                if process_matches(self.record) is not None:
                    return self.record
                self._lost(self.record, self._death_reason(self.record))  # died before the monitor saw it
                continue
            if self._start is None:
                self._start = asyncio.create_task(self._run_start(), name=f"start:{self.name}")
                self._start.add_done_callback(retrieved)  # its callers may all have given up by the time it ends
            # shield: a caller that gives up (a client gone) does not cancel a start others wait for
            return await asyncio.shield(self._start)

    async def _run_start(self) -> ServerRecord:
        self._move(EngineState.STARTING)
        self._cancel = cancel = threading.Event()
        try:
            wait_s = self.not_before - time.monotonic()
            if wait_s > 0:
                log.info("%s: restarting in %.1f s (backoff)", self.name, wait_s)
                await asyncio.sleep(wait_s)  # a stop cancels this task here
            profile = self.profile_of(self.name)
            record = await self._spawn(profile, cancel)
            if self.prompt_cache is not None:  # before any request: they wait, as during the load
                await self.prompt_cache.restore(self.name, profile, record)
        except asyncio.CancelledError:
            raise
        except StartCancelled:
            raise
        except StartError as e:
            error = with_plan(e, self.profile_of(self.name), self.settings) if e.cause == "out of memory" else e
            self._decided(self.tracker.on_exit(time.monotonic(), uptime_s=0.0, reason=f"start failed: {e.message}",
                                               log_tail=e.log_tail))
            raise error from None
        except WorkerError as e:  # an RPC worker is down: not our crash; wait for it with backoff
            self._wait_for_worker(e)
            raise e
        except LlamactlError as e:  # a profile or engine problem found before spawning: no crash to count
            self._move(EngineState.BACKOFF)
            raise e
        finally:
            if self._start is asyncio.current_task():
                self._start = None
        self.record, self._started_as = record, profile
        if self.waiting_for is not None:
            log.info("%s: worker '%s' is back; serving again", self.name, self.waiting_for.worker)
        self.waiting_for, self._worker_waits = None, 0
        self._move(EngineState.READY)
        self.detector.reset()
        self._watch(from_end=False)
        return record

    def _wait_for_worker(self, error: WorkerError) -> None:
        """Back off (doubling, capped) until the worker answers again; the monitor retries the start."""
        self.waiting_for = error
        self._worker_waits += 1
        policy = self.tracker.policy
        delay = min(policy.max_delay_s, policy.base_delay_s * policy.factor ** (self._worker_waits - 1))
        self.not_before = time.monotonic() + delay
        self._move(EngineState.BACKOFF)
        log.warning("%s: waiting for worker '%s' (%s); next try in %.1f s", self.name, error.worker, error.message,
                    delay)
        self._start_monitor()  # keep trying even with nobody asking

    def worker_down(self, error: WorkerError) -> None:
        """Someone else found one of this engine's RPC workers down (the box, planning a start): where the engine
        is dead or already backing off, it waits for that worker as if its own monitor or start had found it, so
        `status` and the restarts say the same as the failed request. A live engine is left alone: a worker
        serves one client at a time, and a busy one does not answer a probe."""
        if self.state is EngineState.BACKOFF:
            self.waiting_for = error
        elif self.state is EngineState.READY and self.record is not None and process_matches(self.record) is None:
            self.waiting_for = error
            self._lost(self.record, f"{error.message}; so {self._death_reason(self.record)}")

    async def _spawn(self, profile: Profile, cancel: threading.Event) -> ServerRecord:
        """The plan-then-start of `llamactl up`, in the spawner thread. Cancelling this coroutine asks the
        thread to stop the engine it is starting, and waits until it has (so nothing is left running)."""
        if self._spawner is None:
            self._spawner = SpawnerThread(f"llamactl-spawn-{self.name}")
        key = auth.new_child_key()
        probe = self.launch_probe(self.name) if self.launch_probe is not None else None
        slots = await self.prompt_cache.slot_dir() if self.prompt_cache is not None else None
        future = self._spawner.submit(start_profile, self.supervisor, profile, api_key=key, cancelled=cancel.is_set,
                                      probe=probe, slot_save_path=slots)
        record = await wait_in_thread(asyncio.wrap_future(future), cancel)
        if record.api_key != key and not record.api_key:
            raise StartError(
                f"profile '{self.name}' is already running outside the daemon (pid {record.pid}) without an API "
                "key, so anything on this machine could use it behind the router's back; the daemon does not "
                "serve it", cause="unkeyed engine", log_tail=[],
                hint=f"stop it (`llamactl down {self.name}`, or Ctrl-C the `llamactl up --foreground` that runs "
                     "it); the daemon then starts its own")
        return record

    def adopt(self, record: ServerRecord) -> None:
        """Serve an engine an earlier daemon started (its record holds the key it was started with)."""
        self.record = record
        with contextlib.suppress(LlamactlError):
            self._started_as = self.profile_of(self.name)  # best effort: the profile may have changed since
        self._move(EngineState.READY)
        self._watch(from_end=True)

    def clear_failure(self) -> None:
        """`llamactl up`: forget the crash loop and the backoff."""
        self.tracker.on_started()
        self.tracker.crashes.clear()
        self.tracker.consecutive = 0
        self.not_before = 0.0
        if self.state is EngineState.FAILED:
            self._move(EngineState.STOPPING)
            self._move(EngineState.STOPPED)

    # -- stop ----------------------------------------------------------------------------------------

    async def stop(self) -> bool:
        """Stop the engine, cancelling a start in progress; True if one ran or was starting."""
        async with self._stop_lock:
            start, was = self._start, self.record is not None or self._start is not None
            self._cancel.set()
            self._fetch_cancel.set()
            self._stop_watching()
            if start is not None:
                start.cancel()
                await asyncio.wait([start])
            failed = self.state is EngineState.FAILED
            running, started_as = (self.record, self._started_as) if self.state is EngineState.READY else (None, None)
            self._move(EngineState.STOPPING)
            try:
                if self.prompt_cache is not None and running is not None and started_as is not None:
                    await self.prompt_cache.save(self.name, started_as, running)
                stopped = await asyncio.to_thread(self.supervisor.stop, self.name, self._stop_timeout_s())
            finally:
                self.record = self._started_as = None
                self._move(EngineState.FAILED if failed else EngineState.STOPPED)
            return was or stopped

    async def close(self) -> None:
        """Stop, then let the spawner thread go (PDEATHSIG fires when it exits)."""
        await self.stop()
        spawner, self._spawner = self._spawner, None
        if spawner is not None:
            await asyncio.to_thread(spawner.shutdown)

    def _stop_timeout_s(self) -> float:
        try:
            return self.profile_of(self.name).stop_timeout_s
        except LlamactlError:
            return 15.0

    # -- watching a running engine -------------------------------------------------------------------

    def _watch(self, *, from_end: bool) -> None:
        if self.tasks is None or self.record is None:
            return
        self._start_monitor()
        if self.settings.relay_child_logs:
            if self._relay is not None:
                self._relay.cancel()
            path = Path(self.record.log_path)
            self._relay = self.tasks.create_task(
                self._keep_running("log relay", lambda: relay_log(self.name, path, from_end)),
                name=f"relay:{self.name}")

    def _start_monitor(self) -> None:
        """The monitor task, unless one runs (it probes a running engine and restarts one in backoff)."""
        if self.tasks is not None and (self._monitor is None or self._monitor.done()):
            self._monitor = self.tasks.create_task(self._keep_running("monitor", self._monitor_loop),
                                                   name=f"monitor:{self.name}")

    def _stop_watching(self) -> None:
        current = asyncio.current_task()
        for task in (self._monitor, self._relay):
            if task is not None and task is not current:
                task.cancel()
        self._monitor = self._relay = None

    async def _keep_running(self, what: str, loop: Callable[[], Any]) -> None:
        """Run a watching loop (the monitor, the log relay) until it returns. Whatever it raises is logged (the
        traceback once, then a line a time) and it runs again after FAULT_PAUSE_S: raised, it would end the
        daemon's task group, every engine and the router with it."""
        faults = 0
        while True:
            try:
                await loop()
                return
            except Exception as e:  # noqa: BLE001
                faults += 1
                if faults == 1:
                    log.exception("%s: the %s failed; it runs again in %.0f s", self.name, what, FAULT_PAUSE_S)
                else:
                    log.warning("%s: the %s failed again (%d times): %s: %s", self.name, what, faults,
                                type(e).__name__, e)
            await asyncio.sleep(FAULT_PAUSE_S)

    async def _monitor_loop(self) -> None:
        """Check /health every health_interval_s; a death or a hang is stopped, counted and restarted."""
        s = self.settings
        async with httpx.AsyncClient() as client:
            while True:
                if self.state is EngineState.BACKOFF:
                    try:
                        await self.ensure_ready()  # waits out the backoff
                    except LlamactlError as e:
                        log.warning("%s: restart failed: %s", self.name, e.message)
                    continue
                if self.state is not EngineState.READY:
                    return
                await asyncio.sleep(s.health_interval_s)
                record = self.record
                if record is None or self.state is not EngineState.READY:
                    continue
                alive = process_matches(record) is not None
                if alive:  # a log grows while the engine runs: keep it under log_max_bytes (copy, truncate)
                    try:
                        await asyncio.to_thread(rotate_if_large, Path(record.log_path), s.log_max_bytes,
                                                s.log_backups)
                    except OSError as e:  # a full disk must not take the daemon down
                        log.warning("%s: rotating %s failed: %s", self.name, record.log_path, e)
                probe = (await acheck_health(record.url, timeout_s=s.health_timeout_s, client=client) if alive
                         else HealthCheck(False, "process gone"))
                if self.record is not record:
                    continue
                verdict = self.detector.observe(probe, alive=alive)
                if verdict is Verdict.SUSPECT:
                    log.warning("%s: /health failed (%s)", self.name, probe.detail)
                if verdict is Verdict.HUNG:
                    reason = self.detector.reason()
                    await asyncio.to_thread(self.supervisor.stop, self.name, self._stop_timeout_s())
                elif verdict is Verdict.DEAD:
                    reason = self._death_reason(record)
                    await asyncio.to_thread(self.supervisor.stop, self.name, 1.0)  # drops the stale record
                    gone = await asyncio.to_thread(self._gone_worker)
                    if gone is not None:
                        reason = f"{gone.message}; so {reason}"
                        self.waiting_for = gone
                else:
                    continue
                if self.record is record:  # else a stop came first
                    self._lost(record, reason)

    def _lost(self, record: ServerRecord, reason: str) -> None:
        """The running engine died or hung (and is stopped): count it, then restart later or fail."""
        self.record = None
        if self._relay is not None and self._relay is not asyncio.current_task():
            self._relay.cancel()
        self.detector.reset()
        uptime = time.time() - (record.ready_at or record.started_at)
        tail = tail_lines(Path(record.log_path), self.tracker.policy.log_lines)
        log.error("%s: %s", self.name, reason)
        decision = self.tracker.on_exit(time.monotonic(), uptime_s=uptime, reason=reason, log_tail=tail)
        self.events.down(self.name)
        self._decided(decision)

    def _decided(self, decision) -> None:
        if decision.action is Action.FAIL:
            self._move(EngineState.FAILED)
            log.error("%s: %s; not restarting (`llamactl up %s` tries again)", self.name, decision.reason, self.name)
            self.events.failed(self.name, self.failed_error())
        else:
            self._move(EngineState.BACKOFF)
            self.not_before = time.monotonic() + decision.delay_s
            log.warning("%s: restart %d in %.1f s", self.name, decision.attempt, decision.delay_s)

    def failed_error(self) -> StartError:
        failed = self.tracker.failed
        reason = failed.reason if failed else "failed"
        return StartError(f"profile '{self.name}' failed: {reason}", cause="crash loop",
                          log_tail=list(failed.log_tail) if failed else [],
                          hint=f"read `llamactl logs {self.name}`; `llamactl up {self.name}` clears the failure "
                               "and starts it")

    def _gone_worker(self) -> WorkerError | None:
        """After a death: the first of the profile's RPC workers that no longer answers (the likely cause)."""
        try:
            profile = self.profile_of(self.name)
            if not profile.rpc:
                return None
            from llamactl.rpc.hello import worker_version
            from llamactl.rpc.probe import profile_workers

            for worker in profile_workers(profile, self.settings):
                try:
                    worker_version(worker, timeout_s=2.0)
                except WorkerError as e:
                    return e
        except LlamactlError:
            return None
        return None

    @staticmethod
    def _death_reason(record: ServerRecord) -> str:
        cause = classify_exit(tail_lines(Path(record.log_path), 15))
        return f"llama-server (pid {record.pid}) died: {cause.cause}" + (f" ({cause.line})" if cause.line else "")


def restart_policy(settings: Settings) -> RestartPolicy:
    return RestartPolicy(base_delay_s=settings.restart_base_delay_s, max_delay_s=settings.restart_max_delay_s,
                         max_crashes=settings.restart_max_crashes, window_s=settings.restart_window_s)


def with_plan(error: StartError, profile: Profile, settings: Settings) -> StartError:
    """An out-of-memory start failure, with the memory plan's numbers (what llamactl expected to fit)."""
    try:
        from llamactl.planning import plan_for_launch

        text = plan_for_launch(profile, settings, None, with_argv=False).text()
    except Exception as e:  # noqa: BLE001 - the plan is extra information; never hide the real error
        text = f"(no plan: {e})"
    return StartError(f"{error.message}\nthe memory plan for '{profile.name}' was:\n{text}", cause=error.cause,
                      log_tail=error.log_tail, hint=error.hint)
