"""A start that is stopped or given up on leaves nothing in the log but what it says on purpose: no "Future
exception was never retrieved" with a StartCancelled (or StartError) traceback when the futures are collected.
The real Engine and Supervisor with the fake llama-server."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from llamactl.daemon.engine import EngineState
from llamactl.daemon.engines import Engines
from llamactl.errors import StartError
from llamactl.profiles import load_profile
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor


async def until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll a condition on the loop (not a fixed sleep): returns as soon as it holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run_collecting(scenario) -> list[dict]:
    """Run `scenario(engines)` on a fresh loop; return what the loop's exception handler was given, with every
    future collected while the loop still runs."""
    seen: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: seen.append(context))
        await scenario()
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    return seen


def engines_for(settings: Settings, name: str) -> Engines:
    return Engines(Supervisor(settings), {name: load_profile(name, settings)}, settings)


def test_a_stopped_load_logs_no_unretrieved_start_cancelled(settings: Settings, fake_profile):
    name = fake_profile("slow", load_timeout_s=60, FAKE_LOAD_S="60")

    async def scenario():
        engines = engines_for(settings, name)
        async with engines.running():
            engine = engines.engine(name)
            waiter = asyncio.create_task(engine.ensure_ready())
            await until(lambda: engine.supervisor.log_path(name).exists()
                        and "fake llama-server pid" in engine.supervisor.log_path(name).read_text(), what="spawn")
            assert await engine.stop()
            with pytest.raises((StartError, asyncio.CancelledError)):  # its start was cancelled by the stop
                await waiter

    seen = run_collecting(scenario)
    assert not [c for c in seen if "never retrieved" in c.get("message", "")], seen


def test_a_start_whose_callers_gave_up_and_that_fails_logs_no_unretrieved_error(settings: Settings, fake_profile):
    name = fake_profile("broken", mode="crash_on_start", FAKE_CRASH_DELAY_S="0.5")

    async def scenario():
        engines = engines_for(settings, name)
        async with engines.running():
            engine = engines.engine(name)
            waiter = asyncio.create_task(engine.ensure_ready())
            await until(lambda: engine.state is EngineState.STARTING, what="starting")
            waiter.cancel()  # the client went away; the start goes on for others and then fails
            await until(lambda: engine._start is None, what="the start to end")
            assert engine.state is not EngineState.READY

    seen = run_collecting(scenario)
    assert not [c for c in seen if "never retrieved" in c.get("message", "")], seen
