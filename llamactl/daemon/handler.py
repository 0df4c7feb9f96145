"""The control socket's handler (llamactl.daemon.control.ControlHandler): `llamactl up/down/switch/status/logs`
through a running daemon, answered from the router's lanes and the engines. The router holds it too
(`router.control`) for what only the daemon knows: engine logs, plans, device memory."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from llamactl.daemon.engine import EngineState
from llamactl.daemon.engines import Engines
from llamactl.daemon.memory import sample_memory
from llamactl.daemon.wiring import lane_of
from llamactl.errors import LlamactlError, StartError
from llamactl.router import Router
from llamactl.supervisor.logs import follow_lines

log = logging.getLogger("llamactl.daemon")


class DaemonControl:
    def __init__(self, router: Router, engines: Engines, *, url: str = "") -> None:
        self.router = router
        self.engines = engines
        self.url = url
        self.last_memory: dict[str, Any] | None = None

    async def up(self, profile: str) -> Any:
        lane = lane_of(self.router, profile)
        self.engines.clear_failure(profile)
        await self.engines.fetch_models(profile)  # a download does not count against the load timeout
        try:
            await lane.serve_once(profile, timeout_s=self.engines.profiles[profile].load_timeout_s + 60)
        except TimeoutError:
            raise StartError(f"{profile}: not ready in time", cause="load timeout", log_tail=[]) from None
        record = self.engines.running_record(profile)
        return {"profile": profile, "lane": lane.name, "pid": record.pid if record else None, "router": self.url}

    async def down(self, profile: str) -> Any:
        lane = lane_of(self.router, profile)
        running = self.engines.is_running(profile)
        loaded = await lane.unload(profile)
        return {"profile": profile, "stopped": loaded or running}

    async def switch(self, group: str, member: str, timeout_s: float) -> Any:
        lane = self.router.lane(group)
        try:
            await self.router.switch(lane, member, timeout_s)
        except TimeoutError:
            raise LlamactlError(f"'{member}' did not become ready in {timeout_s:g} s") from None
        return lane.status()

    async def status(self) -> Any:
        servers = await asyncio.to_thread(lambda: [s.to_json() for s in self.engines.supervisor.status()])
        return {"daemon": {"pid": os.getpid(), "url": self.url}, "servers": servers,
                "engines": self.engines.states(), "failed": self.engines.failures(), "router": self.router.status()}

    async def logs_path(self, profile: str) -> str:
        return str(self.engines.supervisor.log_path(profile))

    # -- the dashboard's questions (router.control) ---------------------------------------------------

    async def follow_log(self, profile: str, lines: int, follow: bool) -> AsyncIterator[str]:
        async for line in follow_lines(self.engines.supervisor.log_path(profile), lines, follow,
                                       keep_going=lambda: not self.router.events.closing):
            yield line

    async def plan(self, profile: str) -> dict[str, Any]:
        """`llamactl plan PROFILE` against the memory free now."""
        from llamactl.planning import plan_for_launch

        found = self.engines.profiles[profile]
        plan = await asyncio.to_thread(plan_for_launch, found, self.engines.settings, None)
        return {"profile": profile, "text": plan.text(), "plan": plan.to_json()}

    async def devices(self) -> dict[str, Any]:
        return self.last_memory if self.last_memory is not None else await self.sample()

    async def sample(self) -> dict[str, Any]:
        """Sample device memory (in a thread), publish it, and the load progress of engines starting."""
        engines = list(self.engines.engines.items())

        def measure() -> dict[str, Any]:
            pids = {name: e.record.pid for name, e in engines if e.record is not None}
            for name, e in engines:  # one still loading has a state record (with its pid) but no Engine.record yet
                if e.state is EngineState.STARTING and (found := self.engines.supervisor.running(name)) is not None:
                    pids[name] = found.pid
            return sample_memory(self.engines.settings, pids)

        sample = await asyncio.to_thread(measure)
        self.last_memory = sample
        self.router.events.publish("memory", **sample)
        for name, engine in list(self.engines.engines.items()):
            if engine.state is EngineState.STARTING or engine.download is not None:  # loading, or downloading first
                progress = await asyncio.to_thread(engine.load_progress)
                self.router.events.publish("engine", profile=name, state="starting", progress=progress,
                                           rss_mib=sample_rss(sample, name))
        return sample

    async def sample_loop(self, interval_s: float) -> None:
        while True:
            try:
                await self.sample()
            except Exception as e:  # noqa: BLE001 - a failed sample must not stop the daemon
                log.warning("sampling device memory failed: %s", e)
            await asyncio.sleep(interval_s)


def sample_rss(sample: dict[str, Any], profile: str) -> int | None:
    host = next((d for d in sample["devices"] if d["kind"] == "host"), None)
    return host["engines"].get(profile) if host else None
