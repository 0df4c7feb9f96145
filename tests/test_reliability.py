"""Reliability of the router in front of fake backends: 200 concurrent streaming clients (nothing lost,
memory bounded), fuzzing of the profile loader and of the router's request parsing (hypothesis), and a fault in
one of the router's own tasks.
Bounded in time and count; loopback only. Figures: docs/reliability.md."""

from __future__ import annotations

import asyncio
import gc
import json

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from llamactl.daemon import auth
from llamactl.errors import ProfileError
from llamactl.profiles import Profile, parse_profile
from llamactl.router import LaneConfig, Router, RouterConfig, create_app
from llamactl.settings import Settings
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import fake_backends, profile

CLIENTS = 200
TOKENS = 20
KEY = "reliability-key-0123456789"


async def _one_stream(client: httpx.AsyncClient, url: str, i: int) -> list[str]:
    events = []
    body = {"model": "solo", "stream": True, "messages": [{"role": "user", "content": f"client {i}"}],
            "fake": {"tokens": TOKENS, "delay_s": 0.005}}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return events


async def _round(url: str) -> list[list[str]]:
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
    async with httpx.AsyncClient(limits=limits, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        return await asyncio.gather(*(_one_stream(client, url, i) for i in range(CLIENTS)))


def test_200_concurrent_streams_lose_nothing_and_memory_stays_bounded(settings: Settings, monkeypatch):
    monkeypatch.setenv("LLAMACTL_API_KEYS", KEY)
    profiles = [profile("solo", parallel=50)]  # 50 slots: 150 clients wait in the queue at first
    backends = fake_backends(profiles)
    router = Router(profiles, backends, RouterConfig(lane=LaneConfig(max_queue=CLIENTS + 56)))
    server = ServerThread(create_app(router, middleware=auth.middleware(Settings())))
    me = psutil.Process()
    try:
        rss = []
        for _ in range(3):
            results = asyncio.run(_round(server.url))
            for events in results:  # every client got every token, the final chunk and [DONE], in order
                assert len(events) == TOKENS + 2 and events[-1] == "[DONE]"
                assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:TOKENS]] == \
                    [f"tok{i} " for i in range(TOKENS)]
            gc.collect()
            rss.append(me.memory_info().rss)
        counters = backends.backends["solo"].counters
        assert counters.completed == 3 * CLIENTS and counters.cancelled == 0
        assert counters.max_concurrent <= 50
        status = httpx.get(f"{server.url}/llamactl/status", headers={"X-Api-Key": KEY}).json()["lanes"][0]
        assert status["in_flight"] == 0 and status["queue_depth"] == 0
        growth_mib = (rss[2] - rss[0]) / 2**20
        print(f"\nRSS after rounds of {CLIENTS} streams: {[round(r / 2**20, 1) for r in rss]} MiB; "
              f"growth rounds 1->3 {growth_mib:.1f} MiB")
        assert growth_mib < 16, f"memory grew {growth_mib:.1f} MiB over two rounds of {CLIENTS} streams"
    finally:
        server.stop()
        backends.close()


# ------------------------------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
PROFILE_KEYS = ["model", "engine", "binary", "ctx_size", "parallel", "gpus", "tensor_split", "group", "alias",
                "speculation", "cache", "rope", "env", "extra_args", "load_timeout_s", "stop_timeout_s",
                "extends", "n_gpu_layers", "threads", "flash_attn", "draft_model", "type", "kv"]


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(PROFILE_KEYS) | st.text(max_size=12), json_values, max_size=8),
       st.sampled_from(["p", "coding", "x-y"]))
def test_profile_loader_returns_a_profile_or_a_profile_error(data, name):
    try:
        result = parse_profile(name, data, None)
    except ProfileError as e:
        assert str(e)
        return
    assert isinstance(result, Profile)


@pytest.fixture(scope="module")
def fuzz_router():
    import os

    old = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LLAMACTL_")}
    os.environ["LLAMACTL_API_KEYS"] = KEY
    os.environ["LLAMACTL_MAX_BODY_BYTES"] = "4096"
    try:
        profiles = [profile("solo", parallel=4)]
        backends = fake_backends(profiles)
        server = ServerThread(create_app(Router(profiles, backends, RouterConfig()),
                                         middleware=auth.middleware(Settings())))
    finally:
        for k in ("LLAMACTL_API_KEYS", "LLAMACTL_MAX_BODY_BYTES"):
            os.environ.pop(k)
        os.environ.update(old)
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    yield client
    client.close()
    server.stop()
    backends.close()


def _openai_error(r: httpx.Response) -> dict:
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error, r.text
    return error


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()) |
       st.dictionaries(st.sampled_from(["model", "messages", "stream", "max_tokens", "prompt", "temperature"]),
                       json_values, max_size=5).map(lambda v: json.dumps(v).encode()),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/completion"]))
def test_router_request_parsing_never_500s(fuzz_router, body, path):
    r = fuzz_router.post(path, content=body, headers={"Content-Type": "application/json"})
    if r.status_code != 200:
        error = _openai_error(r)
        # The router's own answers are 4xx; a 5xx may only be the (fake) engine's, relayed and labelled.
        assert r.status_code in (400, 404, 413) or error.get("source") == "upstream", (r.status_code, r.text)


def test_malformed_huge_and_mistyped_requests(fuzz_router):
    as_json = {"Content-Type": "application/json"}  # without it a body is refused (415: web_guard)
    r = fuzz_router.post("/v1/chat/completions", content=b"{not json", headers=as_json)
    assert r.status_code == 400 and _openai_error(r)["type"] == "invalid_request_error"
    r = fuzz_router.post("/v1/chat/completions", content=b"[1, 2]", headers=as_json)
    assert r.status_code == 400
    r = fuzz_router.post("/v1/chat/completions", json={"model": 12, "messages": []})
    assert r.status_code in (400, 404) and _openai_error(r)
    r = fuzz_router.post("/v1/chat/completions", content=b"{" + b" " * 10_000 + b"}", headers=as_json)
    assert r.status_code == 413 and _openai_error(r)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    r = fuzz_router.post("/v1/chat/completions", content=chunks(), headers=as_json)
    assert r.status_code == 413
    r = fuzz_router.post("/v1/chat/completions", json={"model": "solo"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and _openai_error(r)["code"] == "invalid_api_key"
    hi = [{"role": "user", "content": "hi"}]
    assert fuzz_router.post("/v1/chat/completions", json={"model": "solo", "messages": hi}).status_code == 200


def test_a_telemetry_task_that_raises_does_not_end_the_router(caplog):
    """The router's own tasks (reading acceptance from a log, scraping /metrics, learning per-request hosts)
    run in its task group: one that raised used to end the group, every lane's dispatcher with it."""
    profiles = [profile("solo")]
    backends = fake_backends(profiles)

    async def main() -> None:
        router = Router(profiles, backends, RouterConfig())
        async with router.running():
            async def broken() -> None:
                raise ValueError("a telemetry bug")

            router._spawn(broken(), name="scrape:solo")
            for _ in range(20):
                await asyncio.sleep(0)
            assert all(not task.done() for task in router._dispatchers.values()) and router._dispatchers

    try:
        with caplog.at_level("ERROR", logger="llamactl.router"):
            asyncio.run(main())
    finally:
        backends.close()
    assert any("scrape:solo failed" in r.getMessage() and r.exc_info for r in caplog.records)
