"""The daemon's engines: one `Engine` per served profile, behind the router's `Backends` interface.

The router asks "make this profile ready and tell me where it listens" and "stop it"; everything else
(the process, its record, its restarts) is the Engine's. `running()` is where monitors and log relays
live; leaving it stops every engine, loads in progress included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from llamactl.daemon.engine import Engine, EngineEvents, EngineState
from llamactl.daemon.prompt_cache import PromptCache
from llamactl.supervisor.state import process_matches
from llamactl.errors import ProfileNotFound, StartCancelled
from llamactl.names import closest_names
from llamactl.profiles import Profile
from llamactl.router import Upstream
from llamactl.rpc.errors import WorkerError
from llamactl.settings import Settings
from llamactl.supervisor import ServerRecord, Supervisor


def upstream_of(record: ServerRecord) -> Upstream:
    return Upstream(record.url, record.api_key, log_path=str(record.log_path) if record.log_path else None)


class Engines:
    def __init__(self, supervisor: Supervisor, profiles: Mapping[str, Profile], settings: Settings | None = None,
                 *, events: EngineEvents | None = None) -> None:
        self.supervisor = supervisor
        self.profiles = profiles  # the daemon's; a reload changes it, an engine's next start reads it
        self.settings = settings or supervisor.settings
        self.events = events or EngineEvents()
        self.engines: dict[str, Engine] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self.launch_probe: Any = None  # the box scheduler's grants (wiring sets it): what each start plans with
        self.prompt_cache = PromptCache.from_settings(self.settings)  # None: LLAMACTL_PROMPT_CACHE_MIB=0
        if self.prompt_cache is not None:
            self.prompt_cache.publish = lambda what, data: self.events.prompt_cache(what, data)

    def engine(self, name: str) -> Engine:
        engine = self.engines.get(name)
        if engine is None:
            if name not in self.profiles:
                raise ProfileNotFound(f"profile '{name}' is not served by this daemon",
                                      hint=closest_names(name, self.profiles, noun="profiles served"))
            engine = self.engines[name] = Engine(name, supervisor=self.supervisor, settings=self.settings,
                                                 profile_of=self._profile, events=self.events)
            engine.tasks = self._tasks
            engine.launch_probe = self.launch_probe
            engine.prompt_cache = self.prompt_cache
        return engine

    def _profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise ProfileNotFound(f"profile '{name}' is no longer served (removed by a reload)") from None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["Engines"]:
        """Monitor what is started while inside; on exit stop every engine (cancelling loads)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._set_tasks(tg)
                try:
                    yield self
                finally:
                    await self.close()
                    self._set_tasks(None)
        finally:
            self._set_tasks(None)

    def _set_tasks(self, tasks: asyncio.TaskGroup | None) -> None:
        self._tasks = tasks
        for engine in self.engines.values():
            engine.tasks = tasks

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines.values()))

    # -- the router's Backends -----------------------------------------------------------------------

    async def ensure_ready(self, profile_name: str) -> Upstream:
        try:
            return upstream_of(await self.engine(profile_name).ensure_ready())
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we were cancelled
            raise StartCancelled(f"{profile_name}: start cancelled (llamactl down or shutdown)") from None

    async def fetch_models(self, profile_name: str) -> None:
        await self.engine(profile_name).fetch_models()

    def worker_down(self, profile_name: str, error: WorkerError) -> None:
        engine = self.engines.get(profile_name)
        if engine is not None:
            engine.worker_down(error)

    async def stop(self, profile_name: str) -> None:
        engine = self.engines.get(profile_name)
        if engine is not None:
            await engine.stop()
        else:  # never started by this daemon: a record may still be there (stop is idempotent)
            await asyncio.to_thread(self.supervisor.stop, profile_name, self._stop_timeout_s(profile_name))

    def _stop_timeout_s(self, name: str) -> float:
        profile = self.profiles.get(name)
        return profile.stop_timeout_s if profile else 15.0

    def prompt_observed(self, profile_name: str, prompt_n: int | None, cache_n: int | None) -> None:
        """The router saw a request to `profile_name` finish with these timings (judges a restore)."""
        if self.prompt_cache is not None:
            self.prompt_cache.observed(profile_name, prompt_n, cache_n)

    # -- the daemon's questions ----------------------------------------------------------------------

    def adopt(self, record: ServerRecord) -> None:
        self.engine(record.profile).adopt(record)

    def clear_failure(self, name: str) -> None:
        self.engine(name).clear_failure()

    def running_record(self, name: str) -> ServerRecord | None:
        engine = self.engines.get(name)
        return engine.record if engine is not None and engine.state is EngineState.READY else None

    def serving(self, name: str) -> bool:
        """Ready now, its process alive: `ensure_ready` would start nothing."""
        record = self.running_record(name)
        return record is not None and process_matches(record) is not None

    def is_running(self, name: str) -> bool:
        """Running or starting (what `down` would stop)."""
        engine = self.engines.get(name)
        return engine is not None and engine.state in (EngineState.STARTING, EngineState.READY)

    def failures(self) -> dict[str, dict[str, Any]]:
        return {name: {"reason": e.tracker.failed.reason, "log_tail": list(e.tracker.failed.log_tail)}
                for name, e in self.engines.items()
                if e.state is EngineState.FAILED and e.tracker.failed is not None}

    def states(self) -> dict[str, dict[str, Any]]:
        return {name: e.describe() for name, e in sorted(self.engines.items())}
