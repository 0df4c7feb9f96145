"""The control socket's handler (llamactl.daemon.control.ControlHandler): `llamactl up/down/switch/status/logs`
through a running daemon, answered from the router's lanes and the engines."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from llamactl.daemon.engines import Engines
from llamactl.daemon.wiring import lane_of
from llamactl.errors import LlamactlError, StartError
from llamactl.router import Router


class DaemonControl:
    def __init__(self, router: Router, engines: Engines, *, url: str = "") -> None:
        self.router = router
        self.engines = engines
        self.url = url

    async def up(self, profile: str) -> Any:
        lane = lane_of(self.router, profile)
        self.engines.clear_failure(profile)
        previous = lane.forced
        try:
            await lane.force(profile, timeout_s=self.engines.profiles[profile].load_timeout_s + 60)
        except TimeoutError:
            raise StartError(f"{profile}: not ready in time", cause="load timeout", log_tail=[]) from None
        finally:
            if previous is None and lane.forced == profile:
                await lane.force(None)
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
            await lane.force(None if member == "auto" else member, timeout_s=timeout_s)
        except TimeoutError:
            raise LlamactlError(f"'{member}' did not become ready in {timeout_s:g} s") from None
        return lane.status()

    async def status(self) -> Any:
        servers = await asyncio.to_thread(lambda: [s.to_json() for s in self.engines.supervisor.status()])
        return {"daemon": {"pid": os.getpid(), "url": self.url}, "servers": servers,
                "engines": self.engines.states(), "failed": self.engines.failures(), "router": self.router.status()}

    async def logs_path(self, profile: str) -> str:
        return str(self.engines.supervisor.log_path(profile))
