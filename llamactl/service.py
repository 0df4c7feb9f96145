"""`llamactl serve`: the long-running daemon. Wires profiles + Supervisor + router + control socket +
sd_notify + signals.

What runs, in one asyncio loop (every task owned by a TaskGroup):
- uvicorn serving the router app (API keys and a body limit in front, llamactl/auth.py);
- the control socket (llamactl/control.py) that `llamactl up/down/switch/status/logs` talk to;
- per served child: a monitor task (/health every `health_interval_s`; a hang or a death is stopped and
  restarted with exponential backoff; a crash loop ends `failed`, llamactl/supervisor/recovery.py) and a
  log relay that copies its lines into the daemon's log as `llamactl[PROFILE]: ...`;
- the sd_notify watchdog.

Children are spawned from long-lived threads (one `SpawnerThread` per profile), because
PR_SET_PDEATHSIG fires when the spawning *thread* exits: a daemon killed with SIGKILL takes its
children along. Whatever survives anyway (a daemon that died some other way, a `llamactl up` run
standalone) is found by identity at the next start and adopted or stopped before the router listens.

Signals are handled here only, and a handler only sets an event:
- SIGTERM / SIGINT: STOPPING=1, stop accepting, drain requests in flight up to `drain_timeout_s`,
  stop the children, exit 0.
- SIGHUP: RELOADING=1, re-read the profiles; if any served profile is invalid the old configuration
  stays and the reason is logged; READY=1 again either way. A reload changes how profiles start from
  then on (a running child keeps running as it was started); adding or removing profiles needs a
  restart of the daemon (the router's lanes are fixed at start).

READY=1 is sent once the router listens and every profile in `LLAMACTL_PRELOAD` / `serve --preload`
has been loaded (one that fails to load is reported in STATUS= and `llamactl status`; the daemon is
still ready, so systemd does not kill the other profiles over it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamactl import auth
from llamactl.errors import ConfigError, LlamactlError, ProfileNotFound, StartError
from llamactl.launch import start_profile
from llamactl.policy import PolicyConfig
from llamactl.profiles import Profile, load_all
from llamactl.router import Backends, LaneConfig, Router, RouterConfig, Upstream, create_app
from llamactl.router.lane import Lane
from llamactl.settings import Settings

log = logging.getLogger("llamactl.service")


# ------------------------------------------------------------------------------------------------ logging


def setup_logging(level: str = "info", stream=None) -> None:
    """One line per record, no colour. On a terminal with a timestamp; elsewhere (journald, a pipe)
    without, since the journal stamps every line itself. Children's lines arrive as `llamactl[PROFILE]`."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if tty else "%(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


# ------------------------------------------------------------------------------------------------ backends


@dataclass
class _Child:
    """The daemon's view of one profile's child. Changed only under `lock`."""

    name: str
    tracker: Any
    detector: Any
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    record: Any = None  # the ServerRecord of the running child, or None
    wanted: bool = False  # should be running (started, not stopped): the monitor restarts it
    not_before: float = 0.0  # monotonic: no start before this (backoff)
    monitor: asyncio.Task | None = None
    relay: asyncio.Task | None = None


class SupervisorBackends:
    """The router's Backends over the (synchronous) Supervisor.

    Starts run on a per-profile SpawnerThread (see the module docstring); every start gets a fresh random
    API key only this process knows (`auth.new_child_key`, handed to the child as a 0600 key file), so
    nothing else on the machine can talk to a child behind the router's back.

    Inside `async with backends.running():` each started child is also monitored and restarted (the
    daemon); without it (tests, a router in a thread) starts and stops are all it does.
    """

    def __init__(self, supervisor, profiles: dict[str, Profile], settings: Settings | None = None, *,
                 on_down: Callable[[str], None] | None = None,
                 on_failed: Callable[[str, LlamactlError], None] | None = None) -> None:
        self.supervisor = supervisor
        self.profiles = profiles
        self.settings = settings or supervisor.settings
        self.on_down = on_down
        self.on_failed = on_failed
        self.children: dict[str, _Child] = {}
        self._spawners: dict[str, Any] = {}
        self._tg: asyncio.TaskGroup | None = None

    # -- plumbing ------------------------------------------------------------------------------------

    def _policy(self):
        from llamactl.supervisor.recovery import RestartPolicy

        s = self.settings
        return RestartPolicy(base_delay_s=s.restart_base_delay_s, max_delay_s=s.restart_max_delay_s,
                             max_crashes=s.restart_max_crashes, window_s=s.restart_window_s)

    def _child(self, name: str) -> _Child:
        from llamactl.supervisor.recovery import HangDetector, RestartTracker

        child = self.children.get(name)
        if child is None:
            child = self.children[name] = _Child(name, RestartTracker(self._policy()),
                                                 HangDetector(self.settings.hang_probes))
        return child

    def _spawner(self, name: str):
        from llamactl.supervisor.recovery import SpawnerThread

        spawner = self._spawners.get(name)
        if spawner is None:
            spawner = self._spawners[name] = SpawnerThread(f"llamactl-spawn-{name}")
        return spawner

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["SupervisorBackends"]:
        """Monitor what is started while inside; on exit stop every child this daemon runs."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                try:
                    yield self
                finally:
                    self._tg = None
                    for child in self.children.values():
                        for task in (child.monitor, child.relay):
                            if task is not None:
                                task.cancel()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every child, then let the spawner threads go (PDEATHSIG fires when they exit)."""
        for name, child in list(self.children.items()):
            if child.record is not None or child.wanted:
                await self.stop(name)
        spawners, self._spawners = list(self._spawners.values()), {}
        for spawner in spawners:
            await asyncio.to_thread(spawner.shutdown)

    # -- the Backends protocol -------------------------------------------------------------------

    async def ensure_ready(self, profile_name: str) -> Upstream:
        from llamactl.supervisor.state import process_matches

        if profile_name not in self.profiles:
            raise ProfileNotFound(f"profile '{profile_name}' is not served by this daemon")
        child = self._child(profile_name)
        async with child.lock:
            if child.tracker.failed is not None:
                raise self._failed_error(profile_name)
            if child.record is not None:
                if process_matches(child.record) is not None:
                    return upstream_of(child.record)
                self._crashed(child, self._death_reason(child.record))  # died before the monitor saw it
                if child.tracker.failed is not None:
                    raise self._failed_error(profile_name)
            wait_s = child.not_before - time.monotonic()
            if wait_s > 0:
                log.info("%s: restarting in %.1f s (backoff)", profile_name, wait_s)
                await asyncio.sleep(wait_s)
            record = await self._start(child)
            return upstream_of(record)

    async def stop(self, profile_name: str) -> None:
        profile = self.profiles.get(profile_name)
        timeout = profile.stop_timeout_s if profile else 15.0
        child = self._child(profile_name)
        child.wanted = False
        current = asyncio.current_task()
        for task in (child.monitor, child.relay):
            if task is not None and task is not current:
                task.cancel()
        async with child.lock:
            child.record = None
            # A start cancelled mid-way still finishes in its thread; Supervisor.stop waits for its lock.
            await asyncio.to_thread(self.supervisor.stop, profile_name, timeout)

    # -- start, crash, fail ----------------------------------------------------------------------

    async def _start(self, child: _Child):
        profile = self.profiles[child.name]
        try:
            # The same plan-then-start path as `llamactl up`: refuse what does not fit, apply the placement.
            record = await self._spawner(child.name).run(start_profile, self.supervisor, profile,
                                                         api_key=auth.new_child_key())
        except StartError as e:
            error = with_plan(e, profile, self.settings) if e.cause == "out of memory" else e
            self._start_failed(child, error)
            raise error from None
        child.record = record
        child.wanted = True
        child.detector.reset()
        self._watch(child, from_end=False)
        return record

    def adopt(self, record) -> None:
        """Serve an orphan an earlier daemon started (its record holds the key it was started with)."""
        child = self._child(record.profile)
        child.record = record
        child.wanted = True
        self._watch(child, from_end=True)

    def _watch(self, child: _Child, *, from_end: bool) -> None:
        if self._tg is None:
            return
        if child.monitor is None or child.monitor.done():
            child.monitor = self._tg.create_task(self._monitor(child), name=f"monitor:{child.name}")
        if self.settings.relay_child_logs and child.record is not None:
            if child.relay is not None:
                child.relay.cancel()
            child.relay = self._tg.create_task(relay_log(child.name, Path(child.record.log_path), from_end),
                                               name=f"relay:{child.name}")

    def _start_failed(self, child: _Child, error: StartError) -> None:
        decision = child.tracker.on_exit(time.monotonic(), uptime_s=0.0, reason=f"start failed: {error.message}",
                                         log_tail=error.log_tail)
        self._decided(child, decision)

    def _crashed(self, child: _Child, reason: str) -> None:
        from llamactl.supervisor.state import tail_lines

        record = child.record
        child.record = None
        if child.relay is not None and child.relay is not asyncio.current_task():
            child.relay.cancel()
        uptime = time.time() - (record.ready_at or record.started_at)
        tail = tail_lines(Path(record.log_path), self._policy().log_lines)
        log.error("%s: %s", child.name, reason)
        decision = child.tracker.on_exit(time.monotonic(), uptime_s=uptime, reason=reason, log_tail=tail)
        if self.on_down is not None:
            self.on_down(child.name)
        self._decided(child, decision)

    def _decided(self, child: _Child, decision) -> None:
        from llamactl.supervisor.recovery import Action

        if decision.action is Action.FAIL:
            child.wanted = False
            log.error("%s: %s; not restarting (`llamactl up %s` tries again)", child.name, decision.reason, child.name)
            if self.on_failed is not None:
                self.on_failed(child.name, self._failed_error(child.name))
        else:
            child.not_before = time.monotonic() + decision.delay_s
            log.warning("%s: restart %d in %.1f s", child.name, decision.attempt, decision.delay_s)

    def _failed_error(self, name: str) -> StartError:
        failed = self._child(name).tracker.failed
        return StartError(f"profile '{name}' failed: {failed.reason}", cause="crash loop",
                          log_tail=list(failed.log_tail),
                          hint=f"read `llamactl logs {name}`; `llamactl up {name}` clears the failure and starts it")

    def clear_failure(self, name: str) -> None:
        child = self._child(name)
        child.tracker.on_started()
        child.tracker.crashes.clear()
        child.tracker.consecutive = 0
        child.not_before = 0.0

    def failures(self) -> dict[str, dict[str, Any]]:
        return {name: {"reason": c.tracker.failed.reason, "log_tail": list(c.tracker.failed.log_tail)}
                for name, c in self.children.items() if c.tracker.failed is not None}

    @staticmethod
    def _death_reason(record) -> str:
        from llamactl.engines.logs import classify_exit
        from llamactl.supervisor.state import tail_lines

        cause = classify_exit(tail_lines(Path(record.log_path), 15))
        return f"llama-server (pid {record.pid}) died: {cause.cause}" + (f" ({cause.line})" if cause.line else "")

    async def _monitor(self, child: _Child) -> None:
        """Probe /health every health_interval_s; a death or a hang is stopped, counted and restarted."""
        import httpx

        from llamactl.supervisor.recovery import Probe, Verdict, aprobe_health
        from llamactl.supervisor.state import process_matches, rotate_if_large

        s = self.settings
        async with httpx.AsyncClient() as client:
            while True:
                if child.record is None:
                    if not child.wanted or child.tracker.failed is not None:
                        return
                    try:
                        await self.ensure_ready(child.name)  # waits out the backoff
                    except LlamactlError as e:
                        log.warning("%s: restart failed: %s", child.name, getattr(e, "message", e))
                    continue
                await asyncio.sleep(s.health_interval_s)
                record = child.record
                if record is None:
                    continue
                alive = process_matches(record) is not None
                if alive:  # a log grows while the engine runs: keep it under log_max_bytes (copy, truncate)
                    try:
                        await asyncio.to_thread(rotate_if_large, Path(record.log_path), s.log_max_bytes,
                                                s.log_backups)
                    except OSError as e:  # a full disk must not take the daemon down
                        log.warning("%s: rotating %s failed: %s", child.name, record.log_path, e)
                probe = (await aprobe_health(record.url, timeout_s=s.health_timeout_s, client=client) if alive
                         else Probe(False, "process gone"))
                if child.record is not record:
                    continue
                verdict = child.detector.observe(probe, alive=alive)
                if verdict is Verdict.SUSPECT:
                    log.warning("%s: /health failed (%s)", child.name, probe.detail)
                if verdict not in (Verdict.HUNG, Verdict.DEAD):
                    continue
                async with child.lock:
                    if child.record is not record:
                        continue
                    if verdict is Verdict.HUNG:
                        reason = child.detector.reason()
                        profile = self.profiles.get(child.name)
                        await asyncio.to_thread(self.supervisor.stop, child.name,
                                                profile.stop_timeout_s if profile else 15.0)
                    else:
                        reason = self._death_reason(record)
                        await asyncio.to_thread(self.supervisor.stop, child.name, 1.0)  # drops the stale record
                    child.detector.reset()
                    self._crashed(child, reason)


def upstream_of(record) -> Upstream:
    return Upstream(record.url, record.api_key, log_path=str(record.log_path) if record.log_path else None)


def with_plan(error: StartError, profile: Profile, settings: Settings) -> StartError:
    """An out-of-memory start failure, with the memory plan's numbers (what llamactl expected to fit)."""
    try:
        from llamactl.planning import plan_for_launch

        plan = plan_for_launch(profile, settings, None, with_argv=False)
        text = plan.text()
    except Exception as e:  # noqa: BLE001 - the plan is extra information; never hide the real error
        text = f"(no plan: {e})"
    return StartError(f"{error.message}\nthe memory plan for '{profile.name}' was:\n{text}", cause=error.cause,
                      log_tail=error.log_tail, hint=error.hint)


async def relay_log(name: str, path: Path, from_end: bool, poll_s: float = 0.5) -> None:
    """Copy a child's log lines into the daemon's log as `llamactl[NAME]: line` (journald-friendly)."""
    logger = logging.getLogger(f"llamactl[{name}]")
    pos: int | None = None
    pending = b""
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if pos is None:
            pos = size if from_end else 0
        if size < pos:  # rotated or truncated
            pos, pending = 0, b""
        if size > pos:
            with path.open("rb") as f:
                f.seek(pos)
                data = f.read(min(size - pos, 1 << 20))
            pos += len(data)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if line.strip():
                    logger.info("%s", line.decode(errors="replace").rstrip())
            if len(pending) > 65536:
                logger.info("%s", pending.decode(errors="replace"))
                pending = b""
        await asyncio.sleep(poll_s)


# ------------------------------------------------------------------------------------------------ router


def router_config(settings: Settings) -> RouterConfig:
    return RouterConfig(lane=LaneConfig(
        max_queue=settings.router_max_queue,
        queue_timeout_s=settings.router_queue_timeout_s,
        idle_ttl_s=settings.router_idle_ttl_s,
        keep_both_warm=settings.router_keep_both_warm is True,
        policy=PolicyConfig(min_dwell_s=settings.router_min_dwell_s),
    ), max_body_bytes=settings.max_body_bytes)


def load_profiles(settings: Settings, only: Iterable[str] = ()) -> dict[str, Profile]:
    profiles, errors = load_all(settings)
    for name, error in errors.items():
        log.warning("profile %s is not served: %s", name, error)
    return choose_profiles(profiles, errors, only)


def choose_profiles(profiles: dict[str, Profile], errors: dict[str, Any], only: Iterable[str] = ()) -> dict[str, Profile]:
    wanted = list(only)
    if wanted:
        missing = [n for n in wanted if n not in profiles]
        if missing:
            raise ConfigError(f"cannot serve {', '.join(missing)}: " + "; ".join(
                str(errors[n]) if n in errors else f"no profile named '{n}'" for n in missing))
        chosen = {n: profiles[n] for n in wanted}
        # A profile named on the command line brings its switch group's other member along.
        for p in list(chosen.values()):
            if p.group:
                chosen.update({q.name: q for q in profiles.values() if q.group == p.group})
        profiles = chosen
    if not profiles:
        raise ConfigError("no valid profiles to serve", hint="`llamactl profiles validate` shows what is wrong")
    return profiles


def build_router(settings: Settings, profiles: dict[str, Profile], backends: Backends | None = None) -> Router:
    if backends is None:
        from llamactl.supervisor import Supervisor

        backends = SupervisorBackends(Supervisor(settings, die_with_parent=True), profiles, settings)
    router = Router(profiles.values(), backends, router_config(settings))
    if settings.router_keep_both_warm == "auto":
        inventory, warm = None, []
        for lane in router.lanes.values():
            if lane.spec.is_group:
                inventory = decide_warm(lane, [profiles[m] for m in lane.spec.members], settings, inventory, warm)
                if lane.keep_both_warm:
                    warm.append(lane.name)
    return router


def decide_warm(lane: Lane, members: list[Profile], settings: Settings, inventory=None,
                beside: Iterable[str] = ()):
    """Keep a switch group's members both running when the memory plan says they fit together, beside the
    groups already kept warm (a switch is then a drain, not a restart); otherwise a switch stops one
    member before starting the other. Returns the inventory left for the next group (None: probe)."""
    from llamactl.planning import KnownInventory, fit_together

    try:
        probe = KnownInventory(inventory) if inventory is not None else None
        lane.keep_both_warm, why, left = fit_together(members, settings, probe=probe)
    except Exception as e:  # noqa: BLE001 - no plan (model missing, NVML error): the safe choice
        lane.keep_both_warm, why, left = False, f"no memory plan ({getattr(e, 'message', e)})", inventory
    beside = list(beside)
    if beside and not lane.keep_both_warm:
        why += f", with the groups kept warm before it ({', '.join(beside)}) loaded"
    lane.warm_reason = why
    log.info("lane %s: %s switch: %s", lane.name, "warm" if lane.keep_both_warm else "hard", why)
    return left if lane.keep_both_warm else inventory


def lane_of(router: Router, profile: str):
    for lane in router.lanes.values():
        if profile in lane.spec.members:
            return lane
    raise ProfileNotFound(f"profile '{profile}' is not served by this daemon",
                          hint="served: " + ", ".join(sorted(m for l in router.lanes.values() for m in l.spec.members)))


# ------------------------------------------------------------------------------------------------ control


class DaemonControl:
    """The control socket's handler (llamactl.control.ControlHandler) over the router and the backends."""

    def __init__(self, router: Router, backends: SupervisorBackends, *, url: str = "") -> None:
        self.router = router
        self.backends = backends
        self.url = url

    async def up(self, profile: str) -> Any:
        lane = lane_of(self.router, profile)
        self.backends.clear_failure(profile)
        previous = lane.forced
        try:
            await lane.force(profile, timeout_s=self.backends.profiles[profile].load_timeout_s + 60)
        except TimeoutError:
            raise StartError(f"{profile}: not ready in time", cause="load timeout", log_tail=[]) from None
        finally:
            if previous is None and lane.forced == profile:
                await lane.force(None)
        record = self.backends.children[profile].record
        return {"profile": profile, "lane": lane.name, "pid": record.pid if record else None, "router": self.url}

    async def down(self, profile: str) -> Any:
        lane = lane_of(self.router, profile)
        was = profile in lane.upstreams or (profile in self.backends.children
                                            and self.backends.children[profile].record is not None)
        await lane.unload(profile)
        return {"profile": profile, "stopped": was}

    async def switch(self, group: str, member: str, timeout_s: float) -> Any:
        lane = self.router.lane(group)
        try:
            await lane.force(None if member == "auto" else member, timeout_s=timeout_s)
        except TimeoutError:
            raise LlamactlError(f"'{member}' did not become ready in {timeout_s:g} s") from None
        return lane.status()

    async def status(self) -> Any:
        servers = await asyncio.to_thread(lambda: [s.to_json() for s in self.backends.supervisor.status()])
        return {"daemon": {"pid": os.getpid(), "url": self.url}, "servers": servers,
                "failed": self.backends.failures(), "router": self.router.status()}

    async def logs_path(self, profile: str) -> str:
        return str(self.backends.supervisor.log_path(profile))


# ------------------------------------------------------------------------------------------------ serve


def bound_socket(host: str, port: int) -> socket.socket:
    """The router's listening socket. proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on its connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}",
                          hint="pick another port with `llamactl serve --port` (or LLAMACTL_ROUTER_PORT)") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _uvicorn_server(app, settings: Settings, log_level: str):
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # signals are service.py's: handlers set events, see Service.run
            yield

    config = uvicorn.Config(app, log_level=log_level, access_log=False, log_config=None, lifespan="on",
                            timeout_graceful_shutdown=max(settings.drain_timeout_s, 0.1))
    return Server(config)


class Service:
    def __init__(self, settings: Settings, *, host: str, port: int, only: Iterable[str] = (),
                 preload: Iterable[str] = (), log_level: str = "info", environ: dict[str, str] | None = None) -> None:
        from llamactl.notify import Notifier

        self.settings = settings
        self.host, self.port = host, port
        self.only = list(only)
        self.log_level = log_level
        self.keys = auth.load_keys(settings)
        auth.check_bind(host, self.keys, settings.allow_insecure_bind)
        self.profiles = load_profiles(settings, self.only)
        self.preload = [p for p in preload if p]
        for name in self.preload:
            if name not in self.profiles:
                raise ConfigError(f"cannot preload '{name}': it is not served",
                                  hint="served: " + ", ".join(sorted(self.profiles)))
        self.notifier = Notifier(environ)
        self.signals: asyncio.Queue[str] | None = None  # "stop" / "reload", put by the signal handlers

    def run(self) -> int:
        return asyncio.run(self.main())

    async def main(self) -> int:
        from llamactl.control import ControlServer
        from llamactl.supervisor import Supervisor

        loop = asyncio.get_running_loop()
        self.signals = signals = asyncio.Queue()
        loop.add_signal_handler(signal.SIGTERM, signals.put_nowait, "stop")
        loop.add_signal_handler(signal.SIGINT, signals.put_nowait, "stop")
        loop.add_signal_handler(signal.SIGHUP, signals.put_nowait, "reload")
        try:
            return await self._main(ControlServer, Supervisor)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _main(self, ControlServer, Supervisor) -> int:
        settings = self.settings
        supervisor = Supervisor(settings, die_with_parent=True)
        router: Router | None = None

        def on_down(name: str) -> None:
            if router is not None:
                with contextlib.suppress(LlamactlError):
                    lane_of(router, name).engine_down(name)

        def on_failed(name: str, error: LlamactlError) -> None:
            if router is not None:
                with contextlib.suppress(LlamactlError):
                    lane_of(router, name).mark_failed(name, error)
            self.notifier.status(f"{name} failed: {error.message.splitlines()[0]}")

        backends = SupervisorBackends(supervisor, self.profiles, settings, on_down=on_down, on_failed=on_failed)
        router = build_router(settings, self.profiles, backends)
        router.config.stop_on_shutdown = True
        url = f"http://{self.host}:{self.port}"
        control = DaemonControl(router, backends, url=url)
        app = create_app(router, middleware=auth.middleware(settings, self.keys))
        async with ControlServer(settings, control):  # DaemonRunning: another daemon owns this state dir
            sock = bound_socket(self.host, self.port)
            url = control.url = f"http://{self.host}:{sock.getsockname()[1]}"
            async with backends.running():
                await asyncio.to_thread(self._sweep, backends)
                server = _uvicorn_server(app, settings, self.log_level)
                async with asyncio.TaskGroup() as tg:
                    serving = tg.create_task(server.serve(sockets=[sock]), name="uvicorn")
                    while not server.started:
                        if serving.done():
                            break
                        await asyncio.sleep(0.02)
                    if server.started:
                        log.info("serving %s on %s%s", ", ".join(router.catalog.valid_names()), url,
                                 " (API keys required)" if self.keys else "")
                        await self._preload(router)
                        self.notifier.ready(f"serving {len(self.profiles)} profiles on {url}")
                        watchdog = tg.create_task(self.notifier.watchdog_loop(), name="watchdog")
                        await self._wait_for_signals(backends)
                        self.notifier.stopping("draining requests, then stopping the engines")
                        log.info("stopping: draining requests in flight (up to %.0f s)", settings.drain_timeout_s)
                        server.should_exit = True
                        watchdog.cancel()
            sock.close()
        log.info("stopped")
        return 0

    def _sweep(self, backends: SupervisorBackends) -> None:
        """Before listening: servers an earlier daemon left are adopted (served profile, started with a
        key, same binary + model) or stopped, so none is left holding VRAM."""
        from llamactl.supervisor.recovery import find_orphans, plan_sweep, stop_orphan

        def same_launch(orphan, profile: Profile) -> bool:
            if profile.engine != orphan.record.engine:
                return False
            return profile.binary is None or Path(str(profile.binary)).resolve() == Path(orphan.record.binary).resolve()

        plan = plan_sweep(find_orphans(self.settings), self.profiles, same_launch=same_launch)
        for orphan, why in plan.stop:
            log.warning("stopping orphan llama-server %s (pid %d): %s", orphan.profile, orphan.record.pid, why)
            stop_orphan(self.settings, orphan, self.profiles[orphan.profile].stop_timeout_s
                        if orphan.profile in self.profiles else 15.0)
        for orphan in plan.adopt:
            log.info("adopting running llama-server %s (pid %d, %s)", orphan.profile, orphan.record.pid,
                     orphan.record.url)
            backends.adopt(orphan.record)

    async def _preload(self, router: Router) -> None:
        for name in self.preload:
            self.notifier.status(f"loading {name}")
            log.info("preloading %s", name)
            lane = lane_of(router, name)
            try:
                await lane.force(name, timeout_s=self.profiles[name].load_timeout_s + 60)
            except (LlamactlError, TimeoutError) as e:
                log.error("preloading %s failed: %s", name, e)
                self.notifier.status(f"{name} failed to load: {str(e).splitlines()[0]}")
            finally:
                if lane.forced == name:
                    await lane.force(None)

    async def _wait_for_signals(self, backends: SupervisorBackends) -> None:
        assert self.signals is not None
        while await self.signals.get() == "reload":  # signals are handled in the order they came
            self.notifier.reloading("reloading profiles")
            self.reload(backends)
            self.notifier.ready(f"serving {len(self.profiles)} profiles")

    def reload(self, backends: SupervisorBackends) -> bool:
        """SIGHUP: re-read the profiles. Any invalid served profile keeps the old configuration."""
        try:
            profiles, errors = load_all(self.settings)
            names = set(self.only) or set(profiles) | set(errors)
            bad = {n: e for n, e in errors.items() if n in names or n in self.profiles}
            if bad:
                raise ConfigError("; ".join(f"{n}: {e}" for n, e in bad.items()))
            new = choose_profiles(profiles, errors, self.only)
        except LlamactlError as e:
            log.error("reload refused, the old configuration stays: %s", e)
            return False
        added = sorted(set(new) - set(self.profiles))
        removed = sorted(set(self.profiles) - set(new))
        if added or removed:
            log.warning("reload: profiles added (%s) or removed (%s) take effect when the daemon restarts",
                        ", ".join(added) or "-", ", ".join(removed) or "-")
        changed = sorted(n for n in self.profiles if n in new and new[n] != self.profiles[n])
        for name in changed:
            self.profiles[name] = new[name]  # backends share this dict: the next start uses it
        log.info("reloaded profiles%s", f"; changed (used from their next start): {', '.join(changed)}"
                 if changed else ": nothing changed")
        return True


def serve(settings: Settings, *, host: str | None = None, port: int | None = None,
          profiles: Iterable[str] = (), preload: Iterable[str] = (), log_level: str = "info") -> int:
    """Run the daemon until SIGTERM / SIGINT; returns the exit status (0 after a clean stop)."""
    setup_logging(log_level)
    host = host or settings.router_host
    port = settings.router_port if port is None else port
    wanted = list(preload) or [p.strip() for p in settings.preload.split(",") if p.strip()]
    return Service(settings, host=host, port=port, only=profiles, preload=wanted, log_level=log_level).run()
