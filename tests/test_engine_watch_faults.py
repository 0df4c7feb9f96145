"""A watching loop of an engine (its /health monitor, its log relay) that raises is logged and runs again; it
used to end the daemon's task group, every engine and the router with it. The real Engine and Supervisor with
the fake llama-server; the fault is injected where a real one would come from (a log file that cannot be read,
a process table that cannot be read)."""

from __future__ import annotations

import asyncio
import logging

import llamactl.daemon.engine as engine_module
from llamactl.daemon.engine import EngineState
from llamactl.daemon.engines import Engines
from llamactl.profiles import load_profile
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor
from tests.test_engine_cancel import until


def test_a_monitor_and_a_relay_that_raise_run_again_and_the_daemon_goes_on(home, fake_profile, monkeypatch, caplog):
    name = fake_profile("watched")
    settings = Settings(health_interval_s=0.05)
    monkeypatch.setattr(engine_module, "FAULT_PAUSE_S", 0.01)
    relays, probes = [], []
    real_relay, real_matches = engine_module.relay_log, engine_module.process_matches

    async def relay(*args):
        relays.append(args)
        if len(relays) == 1:
            raise PermissionError("the log cannot be read")
        await real_relay(*args)

    def matches(record):
        probes.append(record)
        if len(probes) == 1:
            raise OSError("the process table cannot be read")
        return real_matches(record)

    monkeypatch.setattr(engine_module, "relay_log", relay)
    monkeypatch.setattr(engine_module, "process_matches", matches)

    async def main() -> None:
        engines = Engines(Supervisor(settings), {name: load_profile(name, settings)}, settings)
        async with engines.running():
            engine = engines.engine(name)
            await engine.ensure_ready()
            await until(lambda: len(relays) >= 2 and len(probes) >= 3, what="both loops running again")
            assert engine.state is EngineState.READY  # the probe that raised is not taken for a death

    with caplog.at_level(logging.WARNING, logger="llamactl.daemon"):
        asyncio.run(main())
    failed = [r for r in caplog.records if "failed; it runs again" in r.getMessage()]
    assert {r.getMessage().split(":")[1].strip() for r in failed} == {"the log relay failed; it runs again in 0 s",
                                                                       "the monitor failed; it runs again in 0 s"}
    assert all(r.exc_info for r in failed)
