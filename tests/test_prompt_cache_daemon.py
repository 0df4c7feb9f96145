"""The daemon's prompt cache I/O against the fake llama-server, for what the real one will not do on demand: a save
that never answers (the stop still ends, nothing half-written is kept), a restore the engine refuses and one that
loads but does not take (both dropped, never an error for the start or the request), and a changed profile that
must not restore an old file. The happy path on the real engine is tests/test_prompt_cache_engine.py."""

from __future__ import annotations

import asyncio
import os
import stat

import httpx
import psutil
import pytest

from llamactl.daemon.engines import Engines
from llamactl.profiles import load_profile
from llamactl.router import Upstream
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor

PROMPT = "x" * 2000  # the fake counts one token per character


async def complete(upstream: Upstream, prompt: str) -> dict:
    headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
    async with httpx.AsyncClient(base_url=upstream.base_url, headers=headers, timeout=10) as client:
        response = await client.post("/completion", json={"prompt": prompt})
    return response.json()["timings"]


def store_files(settings: Settings) -> list[str]:
    return sorted(n for n in os.listdir(settings.prompt_cache_dir) if n != "manifest.json")


@pytest.fixture
def cache_settings(fake_profile, monkeypatch):
    monkeypatch.setenv("LLAMACTL_PROMPT_CACHE_SAVE_TIMEOUT_S", "1")
    def make(**env: str):
        name = fake_profile("pc", **env)
        settings = Settings()
        return name, settings, {name: load_profile(name, settings)}
    return make


async def start_fill_stop(engines: Engines, name: str) -> None:
    upstream = await engines.ensure_ready(name)
    assert (await complete(upstream, PROMPT))["cache_n"] == 0
    await engines.stop(name)


def test_slots_saved_at_a_stop_come_back_before_the_next_start_serves(cache_settings):
    name, settings, profiles = cache_settings()

    async def main() -> None:
        engines = Engines(Supervisor(settings, die_with_parent=True), profiles, settings)
        async with engines.running():
            await start_fill_stop(engines, name)
            files = store_files(settings)
            assert len(files) == 1 and files[0].endswith("-slot0.bin")
            assert stat.S_IMODE(os.stat(settings.prompt_cache_dir / files[0]).st_mode) == 0o600
            assert engines.prompt_cache.status(name)["saves"] == 1

            upstream = await engines.ensure_ready(name)
            status = engines.prompt_cache.status(name)
            assert status["restores"] == 1 and status["restored_tokens"] == len(PROMPT)
            timings = await complete(upstream, PROMPT + "more")
            assert timings["cache_n"] == len(PROMPT) and timings["prompt_n"] == 4
            engines.prompt_observed(name, timings["prompt_n"], timings["cache_n"])
            status = engines.prompt_cache.status(name)
            assert status["reused_tokens"] == len(PROMPT)
            # the saving engine prefilled 1000 tokens in 2 s (its /metrics): 2000 tokens would have taken 4 s
            assert status["last_restore"]["prefill_saved_s"] == pytest.approx(4.0)
            assert engines.states()[name]["prompt_cache"]["persist"]["on"] is True

    asyncio.run(main())


def test_a_save_that_never_answers_does_not_hold_up_the_stop(cache_settings, caplog):
    name, settings, profiles = cache_settings(FAKE_SLOTS="hang_save")

    async def main() -> None:
        engines = Engines(Supervisor(settings, die_with_parent=True), profiles, settings)
        async with engines.running():
            upstream = await engines.ensure_ready(name)
            pid = engines.running_record(name).pid
            await complete(upstream, PROMPT)
            async with asyncio.timeout(30):  # the save gives up after 1 s; then the usual stop
                await engines.stop(name)
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            assert store_files(settings) == []  # the half-written save is not kept
            assert engines.prompt_cache.status(name)["saves"] == 0
            assert "saving its slots took over 1 s" in caplog.text

    asyncio.run(main())


@pytest.mark.parametrize("fault, counter", [("refuse_restore", "failed"), ("not_taken", "not_taken")])
def test_a_restore_that_fails_or_does_not_take_is_dropped_and_the_engine_serves(cache_settings, fault, counter,
                                                                               caplog):
    name, settings, profiles = cache_settings()

    async def main() -> None:
        engines = Engines(Supervisor(settings, die_with_parent=True), profiles, settings)
        async with engines.running():
            await start_fill_stop(engines, name)
            assert len(store_files(settings)) == 1
            # the same engine and model (env is not part of the key), now with the fault
            env = {**profiles[name].env, "FAKE_SLOTS": fault}
            profiles[name] = profiles[name].model_copy(update={"env": env})
            upstream = await engines.ensure_ready(name)
            timings = await complete(upstream, PROMPT)
            engines.prompt_observed(name, timings["prompt_n"], timings["cache_n"])
            assert engines.prompt_cache.status(name)[counter] == 1
            assert store_files(settings) == []
            assert engines.prompt_cache.status(name)["reused_tokens"] == 0
            assert ("restore failed" if fault == "refuse_restore" else "did not take") in caplog.text

    asyncio.run(main())


def test_a_changed_profile_never_restores_an_old_file(cache_settings):
    name, settings, profiles = cache_settings()

    async def main() -> None:
        engines = Engines(Supervisor(settings, die_with_parent=True), profiles, settings)
        async with engines.running():
            await start_fill_stop(engines, name)
            old = store_files(settings)
            profiles[name] = profiles[name].model_copy(update={"cache_type_k": "q8_0", "flash_attn": "on"})
            upstream = await engines.ensure_ready(name)
            assert engines.prompt_cache.status(name)["restores"] == 0
            assert (await complete(upstream, PROMPT))["cache_n"] == 0
            await engines.stop(name)
            assert len(store_files(settings)) == 2 and set(old) < set(store_files(settings))  # one key each

    asyncio.run(main())


def test_an_unusable_cache_directory_starts_the_engine_without_the_cache(cache_settings, caplog):
    name, settings, profiles = cache_settings()
    settings.prompt_cache_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.prompt_cache_dir.write_text("a file where the directory should be")

    async def main() -> None:
        engines = Engines(Supervisor(settings, die_with_parent=True), profiles, settings)
        async with engines.running():
            upstream = await engines.ensure_ready(name)
            assert (await complete(upstream, PROMPT))["cache_n"] == 0
            assert "--slot-save-path" not in engines.running_record(name).cmdline
            await engines.stop(name)
        assert "engines start without it" in caplog.text

    asyncio.run(main())
