"""A worker found down by someone other than the engine (the box, planning a start) is the engine's to wait for:
`status` names the worker as soon as the failed request does, whoever found out first. The real Engine and
Supervisor with the fake llama-server; the monitor's probe is slowed so that only the call under test can notice."""

from __future__ import annotations

import asyncio
import os
import signal

from llamactl.daemon.engine import EngineState
from llamactl.daemon.engines import Engines
from llamactl.profiles import load_profile
from llamactl.rpc.errors import WorkerUnreachable
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor
from llamactl.supervisor.state import process_matches
from tests.test_engine_cancel import until

GONE = WorkerUnreachable("worker 'gpu-box' (10.0.0.2:50052) is unreachable: Connection refused", worker="gpu-box")


def run(scenario, name: str) -> None:
    settings = Settings(health_interval_s=300)  # the monitor would see the death only in 5 minutes

    async def main():
        engines = Engines(Supervisor(settings), {name: load_profile(name, settings)}, settings)
        async with engines.running():
            await scenario(engines, engines.engine(name))

    asyncio.run(main())


def test_a_dead_engine_told_its_worker_is_down_waits_for_it_and_says_so(home, fake_profile):
    name = fake_profile("big")

    async def scenario(engines, engine):
        record = await engine.ensure_ready()
        os.kill(record.pid, signal.SIGKILL)
        await until(lambda: process_matches(record) is None, what="the engine's death")
        assert engine.state is EngineState.READY and engine.waiting_for is None  # nobody has noticed yet

        engines.worker_down(name, GONE)

        waiting = engines.states()[name]["waiting_for_worker"]
        assert waiting == {"worker": "gpu-box", "reason": GONE.message}
        assert engine.state is EngineState.BACKOFF and engine.record is None
        assert engine.tracker.failed is None or "gpu-box" in engine.tracker.failed.reason

    run(scenario, name)


def test_a_live_engine_is_left_alone_a_busy_worker_does_not_answer_probes(home, fake_profile):
    name = fake_profile("big")

    async def scenario(engines, engine):
        record = await engine.ensure_ready()
        engines.worker_down(name, GONE)
        assert engine.state is EngineState.READY and engine.record is record and engine.waiting_for is None
        engines.worker_down("never-started", GONE)  # a profile without an engine: nothing to tell
        assert "never-started" not in engines.engines

    run(scenario, name)


def test_a_stopped_engine_is_not_marked_waiting_nobody_retries_it(home, fake_profile):
    name = fake_profile("big")

    async def scenario(engines, engine):
        await engine.ensure_ready()
        assert await engine.stop()
        engines.worker_down(name, GONE)
        assert engine.state is EngineState.STOPPED and engines.states()[name]["waiting_for_worker"] is None

    run(scenario, name)
