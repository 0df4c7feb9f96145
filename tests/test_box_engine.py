"""The box scheduler with the real llama-server and Gemma 3 270M on a described box whose host RAM has room for one
engine (about 326 MiB planned each): a request for another profile stops the idle one first; a stream on one is
never cut, the other waits for it; a profile that cannot fit even alone is refused at once."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from llamactl.daemon.wiring import build_router, load_profiles
from llamactl.router import create_app
from llamactl.settings import Settings
from tests.conftest import ENGINE_ENV, require_engine
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import wait_for

pytestmark = pytest.mark.engine


def described_host_box(monkeypatch, write_profile, gemma_path, tmp_path, host_mib: int, names: tuple[str, ...]):
    """A described box of `host_mib` MiB of host RAM and no GPU, with a demo-sized profile per name."""
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    box = tmp_path / "box.json"
    box.write_text(json.dumps({"gpus": [], "host": {"total_mib": host_mib, "free_mib": host_mib}}))
    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(box))
    common = f'model = "{gemma_path}"\nctx_size = 1024\ngpus = []\nthreads = 2\nparallel = 1\nload_timeout_s = 180\n'
    for name in names:
        write_profile(name, common)


@pytest.fixture
def one_model_box(monkeypatch, write_profile, gemma_path, home, tmp_path):
    described_host_box(monkeypatch, write_profile, gemma_path, tmp_path, 520, ("a", "b"))
    write_profile("huge", f'model = "{gemma_path}"\nctx_size = 32768\ngpus = []\nthreads = 2\nparallel = 4\n')
    return Settings()


def running(router) -> set[str]:
    return {name for name in ("a", "b", "huge") if router.backends.supervisor.running(name) is not None}


def test_a_second_model_replaces_the_idle_first_and_a_stream_is_never_cut(one_model_box):
    settings = one_model_box
    router = build_router(settings, load_profiles(settings))
    server = ServerThread(create_app(router))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        assert client.completions.create(model="a", prompt="Hello", max_tokens=4).choices[0].text is not None
        assert running(router) == {"a"}
        devices = httpx.get(f"{server.url}/llamactl/status").json()["box"]["devices"]
        assert devices[0]["device"] == "CPU" and set(devices[0]["ours_mib"]) == {"a"}

        # b while a sits idle: a is stopped first, b is not started beside it
        assert client.completions.create(model="b", prompt="Hello", max_tokens=4).choices[0].text is not None
        assert running(router) == {"b"}
        box = httpx.get(f"{server.url}/llamactl/status").json()["box"]
        assert box["evictions"][-1]["lane"] == "a" and box["evictions"][-1]["for"] == "b"
        assert set(box["devices"][0]["ours_mib"]) == {"b"} and box["devices"][0]["free_mib"] >= 0

        # a stream on b holds b; a request for a waits for it, and the stream ends whole
        stream = client.completions.create(model="b", prompt="Count from one to fifty: one, two,", max_tokens=48,
                                           temperature=0, stream=True)
        first = next(iter(stream))
        answer: dict[str, object] = {}

        def ask_a() -> None:
            answer["a"] = client.completions.create(model="a", prompt="Hi", max_tokens=2).choices[0].text

        asker = threading.Thread(target=ask_a)
        asker.start()
        wait_for(lambda: "a" in httpx.get(f"{server.url}/llamactl/status").json()["box"]["waiting"],
                 what="a waiting for b's memory", timeout_s=60)
        assert running(router) == {"b"}  # not cut, not doubled
        chunks = [first, *stream]
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        asker.join(timeout=300)
        assert "a" in answer and running(router) == {"a"}
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "llamactl_box_evictions_total 2.0" in metrics

        # never fits even alone: refused at once with the shortfall, nothing stopped
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="huge", prompt="Hi", max_tokens=2)
        assert refused.value.status_code == 503 and "does not fit even on an empty box" in str(refused.value)
        assert running(router) == {"a"}
    finally:
        server.stop()
    assert running(router) == set()


@pytest.fixture
def two_model_box(monkeypatch, write_profile, gemma_path, home, tmp_path):
    described_host_box(monkeypatch, write_profile, gemma_path, tmp_path, 800, ("a", "b", "c"))
    return Settings()


def test_three_profiles_on_a_box_for_two_a_third_stops_one_idle_engine_not_both(two_model_box):
    settings = two_model_box
    router = build_router(settings, load_profiles(settings))
    server = ServerThread(create_app(router))
    names = {"a", "b", "c"}
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        for name in ("a", "b"):
            assert client.completions.create(model=name, prompt="Hello", max_tokens=4).choices[0].text is not None
        assert {n for n in names if router.backends.supervisor.running(n)} == {"a", "b"}  # two fit: no eviction
        assert httpx.get(f"{server.url}/llamactl/status").json()["box"]["evictions"] == []

        assert client.completions.create(model="c", prompt="Hello", max_tokens=4).choices[0].text is not None
        now = {n for n in names if router.backends.supervisor.running(n)}
        box = httpx.get(f"{server.url}/llamactl/status").json()["box"]
        assert len(now) == 2 and "c" in now
        (stopped,) = names - now
        assert [e["lane"] for e in box["evictions"]] == [stopped] and box["evictions"][0]["for"] == "c"
        assert box["devices"][0]["free_mib"] >= 0
    finally:
        server.stop()
