"""`llamactl serve`: the long-running daemon. Wires profiles + Supervisor + router + control socket +
sd_notify + signals.

What runs, in one asyncio loop (every task owned by a TaskGroup):
- uvicorn serving the router app (API keys and a body limit in front, llamactl/auth.py);
- the control socket (llamactl/daemon/control.py) that `llamactl up/down/switch/status/logs` talk to;
- one Engine per served profile (llamactl/daemon/engine.py): its process, record, restarts with backoff,
  hang detection, and a log relay that copies its lines into the daemon's log as `llamactl[PROFILE]: ...`;
- the sd_notify watchdog.

Engines are spawned from long-lived threads (one `SpawnerThread` per profile), because
PR_SET_PDEATHSIG fires when the spawning *thread* exits: a daemon killed with SIGKILL takes its
children along. Whatever survives anyway (a daemon that died some other way, a `llamactl up` run
standalone) is found by identity at the next start and adopted or stopped before the router listens.

Signals are handled here only, and a handler only sets an event:
- SIGTERM / SIGINT: STOPPING=1, stop accepting, drain requests in flight up to `drain_timeout_s`,
  stop the engines (loads in progress are cancelled), exit 0.
- SIGHUP: RELOADING=1, re-read the profiles (off the event loop, regular files only); if a served profile
  is invalid the old configuration stays and the reason is logged; READY=1 again either way. Profiles
  added, removed or changed rebuild their lanes: a changed lane drains (up to `drain_timeout_s`) and stops
  its engines, and new requests wait for the new lane, which starts members with the new profiles.

READY=1 is sent once the router listens and every profile in `LLAMACTL_PRELOAD` / `serve --preload`
has been loaded (one that fails to load is reported in STATUS= and `llamactl status`; the daemon is
still ready, so systemd does not kill the other profiles over it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from llamactl.daemon import auth
from llamactl.daemon.engine import EngineEvents
from llamactl.daemon.engines import Engines
from llamactl.daemon.handler import DaemonControl
from llamactl.daemon.wiring import build_router, choose_profiles, lane_of, load_profiles, plan_warm_lanes
from llamactl.errors import ConfigError, LlamactlError, first_line
from llamactl.profiles import Profile, load_all
from llamactl.router import Router, create_app, learned
from llamactl.settings import Settings

log = logging.getLogger("llamactl.daemon")


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


def bound_socket(host: str, port: int) -> socket.socket:
    """The router's listening socket. proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on its connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except (OSError, OverflowError, ValueError) as e:  # OverflowError: a port past 65535; ValueError: a NUL
        sock.close()
        raise ConfigError(f"cannot listen on {host[:200]}:{port}: {getattr(e, 'strerror', None) or e}",
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

    # proxy_headers off: the daemon is not behind a proxy it trusts (X-Forwarded-* would only let a client
    # spoof its address); server_header off: no software banner. Both also save work on every request.
    config = uvicorn.Config(app, log_level=log_level, access_log=False, log_config=None, lifespan="on",
                            timeout_graceful_shutdown=max(settings.drain_timeout_s, 0.1), proxy_headers=False,
                            server_header=False)
    return Server(config)


class LaneEvents(EngineEvents):
    """Engine events reach the lane that serves the profile (set once the router exists)."""

    def __init__(self, notifier) -> None:
        self.router: Router | None = None
        self.notifier = notifier

    def down(self, name: str) -> None:
        if self.router is not None:
            with contextlib.suppress(LlamactlError):
                lane_of(self.router, name).engine_down(name)

    def failed(self, name: str, error: LlamactlError) -> None:
        if self.router is not None:
            with contextlib.suppress(LlamactlError):
                lane_of(self.router, name).mark_failed(name, error)
        self.notifier.status(f"{name} failed: {first_line(error)}")

    def state(self, name: str, state: str, reason: str | None) -> None:
        if self.router is not None:
            self.router.events.publish("engine", profile=name, state=state, reason=reason)

    def prompt_cache(self, what: str, data: dict) -> None:
        if self.router is not None:
            self.router.events.publish("prompt_cache", what=what, **data)


class Service:
    def __init__(self, settings: Settings, *, host: str, port: int, only: Iterable[str] = (),
                 preload: Iterable[str] = (), log_level: str = "info", environ: dict[str, str] | None = None) -> None:
        from llamactl.daemon.notify import Notifier

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
        self.router: Router | None = None

    def run(self) -> int:
        """Run on uvloop where it is installed (a faster loop for the relay), else asyncio's own."""
        try:
            import uvloop
        except ImportError:
            return asyncio.run(self.main())
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(self.main())

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self.signals = signals = asyncio.Queue()
        loop.add_signal_handler(signal.SIGTERM, signals.put_nowait, "stop")
        loop.add_signal_handler(signal.SIGINT, signals.put_nowait, "stop")
        loop.add_signal_handler(signal.SIGHUP, signals.put_nowait, "reload")
        try:
            return await self._main()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _main(self) -> int:
        from llamactl.daemon.control import ControlServer
        from llamactl.supervisor import Supervisor

        settings = self.settings
        events = LaneEvents(self.notifier)
        engines = Engines(Supervisor(settings, die_with_parent=True), self.profiles, settings, events=events)
        router = self.router = events.router = build_router(settings, self.profiles, engines)
        router.config.stop_on_shutdown = True
        control = router.control = DaemonControl(router, engines, url=f"http://{self.host}:{self.port}")
        router.alerts.on_change = self._alert_changed
        learned_path = learned.path_in(settings.state_dir)
        try:
            learned.load_into(router, await asyncio.to_thread(learned.read, learned_path), learned_path, time.time())
        except Exception as e:  # noqa: BLE001 - a bad learned.json costs what it held, never the start
            log.warning("%s: not restored (%s: %s); starting without what was learnt before", learned_path,
                        type(e).__name__, e)
        app = create_app(router, middleware=auth.middleware(settings, self.keys, bound_host=self.host))
        async with ControlServer(settings, control):  # DaemonRunning: another daemon owns this state dir
            sock = bound_socket(self.host, self.port)
            url = control.url = f"http://{self.host}:{sock.getsockname()[1]}"
            async with engines.running():
                await self._sweep(engines)
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
                        preloading = tg.create_task(self._preload(router), name="preload")
                        watchdog = tg.create_task(self.notifier.watchdog_loop(), name="watchdog")
                        sampler = tg.create_task(control.sample_loop(settings.memory_sample_s), name="memory")
                        saver = learned.Saver(router, learned_path)
                        learning = tg.create_task(saver.run(LEARNED_SAVE_S), name="learned")
                        await self._wait_for_signals(preloading)
                        self.notifier.stopping("draining requests, then stopping the engines")
                        log.info("stopping: draining requests in flight (up to %.0f s)", settings.drain_timeout_s)
                        preloading.cancel()
                        # Streams still running at the drain deadline end with an error event, just before
                        # uvicorn's own deadline would close them bare.
                        loop = asyncio.get_running_loop()
                        cut = loop.call_later(max(0.0, settings.drain_timeout_s - STREAM_CUT_MARGIN_S),
                                              router.cut_streams)
                        router.events.close()  # event streams (an open dashboard) end now, not at the deadline
                        server.should_exit = True
                        watchdog.cancel()
                        sampler.cancel()
                        learning.cancel()
                        await serving
                        cut.cancel()
                        await saver.save(timeout_s=LEARNED_STOP_TIMEOUT_S)
            sock.close()
        log.info("stopped")
        return 0

    def _alert_changed(self, alert: dict) -> None:
        """An acceptance alert was raised or cleared: the event stream, and systemd's STATUS line."""
        assert self.router is not None
        self.router.events.publish("alert", **alert)
        summary = self.router.alerts.summary()
        self.notifier.status(f"alert: {summary}" if summary else f"serving {len(self.profiles)} profiles")

    async def _sweep(self, engines: Engines) -> None:
        """Before listening: engines an earlier daemon left are adopted (served profile, started with a key,
        same binary) or stopped, so none is left holding VRAM."""
        from llamactl.supervisor.recovery import find_orphans, plan_sweep, stop_orphan

        def same_launch(orphan, profile: Profile) -> bool:
            if profile.engine != orphan.record.engine:
                return False
            return profile.binary is None or Path(str(profile.binary)).resolve() == Path(orphan.record.binary).resolve()

        def find_and_stop():
            plan = plan_sweep(find_orphans(self.settings), self.profiles, same_launch=same_launch)
            for orphan, why in plan.stop:
                log.warning("stopping orphan llama-server %s (pid %d): %s", orphan.profile, orphan.record.pid, why)
                stop_orphan(self.settings, orphan, self.profiles[orphan.profile].stop_timeout_s
                            if orphan.profile in self.profiles else 15.0)
            return plan.adopt

        for orphan in await asyncio.to_thread(find_and_stop):
            log.info("adopting running llama-server %s (pid %d, %s)", orphan.profile, orphan.record.pid,
                     orphan.record.url)
            engines.adopt(orphan.record)

    async def _preload(self, router: Router) -> None:
        """Load the --preload profiles, then tell systemd READY (a failure is reported, not fatal)."""
        for name in self.preload:
            timeout_s = self.profiles[name].load_timeout_s + 60
            self.notifier.status(f"loading {name}")
            self.notifier.extend_timeout(timeout_s)  # systemd's start timeout
            log.info("preloading %s", name)
            unexpected: Exception | None = None  # logged with its traceback
            try:
                await lane_of(router, name).serve_once(name, timeout_s=timeout_s)
                continue
            except TimeoutError:
                why = f"not serving after {timeout_s:.0f} s"
            except LlamactlError as e:
                why = first_line(e)
            except Exception as e:  # noqa: BLE001 - raised here, it would end the daemon's task group (the daemon)
                why, unexpected = f"{type(e).__name__}: {e}", e
            log.error("preloading %s failed: %s", name, why, exc_info=unexpected)
            self.notifier.status(f"{name} failed to load: {why}"[:200])
        self.notifier.ready(f"serving {len(self.profiles)} profiles")

    async def _wait_for_signals(self, preloading: asyncio.Task[None]) -> None:
        """Until "stop": a signal during the preload is acted on at once (SIGTERM cancels the loads)."""
        assert self.signals is not None
        while await self.signals.get() == "reload":  # signals are handled in the order they came
            self.notifier.reloading("reloading profiles")
            await self.reload()
            if preloading.done():
                self.notifier.ready(f"serving {len(self.profiles)} profiles")

    async def reload(self) -> bool:
        """SIGHUP: re-read the profiles (in a thread: a slow or odd file never stalls the daemon). An invalid
        profile that is served keeps the old configuration; one that is not served is reported and skipped."""
        try:
            async with asyncio.timeout(RELOAD_READ_TIMEOUT_S):
                profiles, errors = await asyncio.to_thread(load_all, self.settings)
        except TimeoutError:
            log.error("reload refused: reading the profiles took over %.0f s; the old configuration stays",
                      RELOAD_READ_TIMEOUT_S)
            return False
        try:
            served = set(self.only) or set(self.profiles)
            bad = {n: e for n, e in errors.items() if n in served}
            if bad:
                raise ConfigError("; ".join(f"{n}: {e}" for n, e in bad.items()))
            for name, error in errors.items():
                log.warning("reload: profile %s is not valid and not served: %s", name, error)
            new = choose_profiles(profiles, {}, self.only)
        except LlamactlError as e:
            log.error("reload refused, the old configuration stays: %s", e)
            return False
        added = sorted(set(new) - set(self.profiles))
        removed = sorted(set(self.profiles) - set(new))
        changed = sorted(n for n in self.profiles if n in new and new[n] != self.profiles[n])
        if self.router is not None and (added or removed or changed):
            # Lanes whose profiles changed drain and stop their engines; their next start uses the new profile.
            await self.router.reconfigure(
                new.values(), drain_timeout_s=self.settings.drain_timeout_s,
                prepare=lambda lanes: plan_warm_lanes(lanes, new, self.settings))
        self.profiles.clear()
        self.profiles.update(new)  # the engines share this dict
        log.info("reloaded profiles: %s", "; ".join(
            f"{what}: {', '.join(names)}" for what, names in
            (("added", added), ("removed", removed), ("changed (restarted)", changed)) if names) or "nothing changed")
        return True


RELOAD_READ_TIMEOUT_S = 10.0
LEARNED_SAVE_S = 300.0  # what the router learnt is saved this often, and at a clean stop
LEARNED_STOP_TIMEOUT_S = 10.0  # the stop's save waits no longer for a stalled disk
STREAM_CUT_MARGIN_S = 0.5  # before the drain deadline: time to write the error event before uvicorn closes


def serve(settings: Settings, *, host: str | None = None, port: int | None = None,
          profiles: Iterable[str] = (), preload: Iterable[str] = (), log_level: str = "info") -> int:
    """Run the daemon until SIGTERM / SIGINT; returns the exit status (0 after a clean stop)."""
    setup_logging(log_level)
    host = host or settings.router_host
    port = settings.router_port if port is None else port
    wanted = list(preload) or [p.strip() for p in settings.preload.split(",") if p.strip()]
    return Service(settings, host=host, port=port, only=profiles, preload=wanted, log_level=log_level).run()
