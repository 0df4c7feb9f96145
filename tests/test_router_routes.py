"""Every llama-server route through the router, by model, against the fast fake engine: the route table,
requests without `model`, the model-name map, the clear error for a route an engine lacks, GET /props and
/slots, /upstream/PROFILE/..., and auth / body limit / disconnect on every new route."""

from __future__ import annotations

import json

import httpx
import pytest

from llamactl.daemon import auth
from llamactl.profiles import Profile
from llamactl.router import Router, RouterConfig, create_app
from llamactl.router.catalog import Routing
from llamactl.router.routes import RELAYED
from llamactl.settings import Settings
from tests.fakes.fast_backend import FakeBackends, FakeConfig, ServerThread
from tests.router_harness import lane_status, profile, served, wait_for

ENGINE_KEY = "engine-key-only-llamactl-knows"
CLIENT_KEY = "client-key-0123456789abcdef"
MULTIPART = "multipart/form-data; boundary=XyZ"
HI = [{"role": "user", "content": "hi"}]


def multipart_body(model: str | None, audio: bytes = b"RIFF....WAVEfmt fake audio") -> bytes:
    parts = []
    if model is not None:
        parts.append(b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model.encode() + b"\r\n")
    parts.append(b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n")
    return b"".join(parts) + b"--XyZ--\r\n"


def mixed_profiles() -> list[Profile]:
    return [profile("chat", alias="chatty"),
            Profile(name="embed", model="/models/e.gguf", parallel=1, embeddings=True, pooling="mean"),
            Profile(name="ranker", model="/models/r.gguf", parallel=1, reranking=True)]


def backends_for(profiles: list[Profile], **config) -> FakeBackends:
    return FakeBackends({p.name: FakeConfig(name=p.name, **config.get(p.name, {})) for p in profiles},
                        api_key=ENGINE_KEY)


@pytest.fixture
def mixed():
    profiles = mixed_profiles()
    backends = backends_for(profiles)
    config = RouterConfig(routing=Routing(model_map=(("claude-3-5-haiku*", "chat"), ("claude-*", "chatty")),
                                          route_defaults={"/infill": "chat"}))
    with served(profiles, backends, config) as (url, router):
        yield url, router, backends


def model_for(path: str) -> str:
    kind = RELAYED[path].kind
    return {"embed": "embed", "rerank": "ranker"}.get(kind, "chat")


def post(url: str, path: str, model: str | None, **extra) -> httpx.Response:
    if RELAYED[path].multipart:
        return httpx.post(f"{url}{path}", content=multipart_body(model), headers={"content-type": MULTIPART},
                          timeout=10, **extra)
    body = {"input": "hello", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "query": "which?", "documents": ["this one"]}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}{path}", json=body, timeout=10, **extra)


@pytest.mark.parametrize("path", sorted(RELAYED))
def test_every_relayed_route_reaches_the_engine_its_model_names(mixed, path):
    url, _, backends = mixed
    target = model_for(path)
    r = post(url, path, target)
    assert r.status_code == 200, r.text
    assert r.headers["x-llamactl-profile"] == target
    assert backends.backends[target].counters.requests == 1
    others = [name for name in backends.backends if name != target]
    assert all(backends.backends[o].counters.requests == 0 for o in others)
    if RELAYED[path].multipart:  # the form is relayed as it came, audio and all
        assert r.json()["bytes"] == len(multipart_body(target))


def test_non_generation_routes_get_their_own_classes(mixed):
    url, _, _ = mixed
    assert post(url, "/v1/embeddings", "embed").headers["x-llamactl-class"] == "embedding"
    assert post(url, "/v1/rerank", "ranker").headers["x-llamactl-class"] == "rerank"
    assert post(url, "/tokenize", "chat").headers["x-llamactl-class"] == "utility"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'llamactl_requests_total{class="embedding",endpoint="/v1/embeddings",lane="embed",profile="embed",status="200"} 1.0' in metrics


def test_embeddings_sent_to_a_generation_profile_is_a_clear_400(mixed):
    url, _, backends = mixed
    r = post(url, "/v1/embeddings", "chat")
    assert r.status_code == 400
    error = r.json()["error"]
    assert "profile 'chat' does not serve embeddings" in error["message"] and "embeddings = true" in error["hint"]
    r = post(url, "/v1/rerank", "embed")
    assert r.status_code == 400 and "does not serve reranking" in r.json()["error"]["message"]
    assert backends.events == []  # nothing was loaded for them


def test_request_without_model_uses_the_route_default_else_400_listing_names(mixed):
    url, _, backends = mixed
    r = httpx.post(f"{url}/infill", json={"input_prefix": "def f(", "input_suffix": ")"}, timeout=10)
    assert r.status_code == 200 and r.headers["x-llamactl-profile"] == "chat"
    r = httpx.post(f"{url}/tokenize", json={"content": "hi"}, timeout=10)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["valid_models"] == ["chat", "chatty", "embed", "ranker"]
    assert "LLAMACTL_DEFAULT_MODEL" in error["hint"]
    r = post(url, "/v1/audio/transcriptions", None)
    assert r.status_code == 400 and "no 'model'" in r.json()["error"]["message"]


def test_default_model_setting_serves_requests_without_model():
    profiles = mixed_profiles()
    backends = backends_for(profiles)
    with served(profiles, backends, RouterConfig(routing=Routing(default_model="chatty"))) as (url, _):
        r = httpx.post(f"{url}/tokenize", json={"content": "hi"}, timeout=10)
        assert r.status_code == 200 and r.headers["x-llamactl-profile"] == "chat"


def test_model_map_globs_route_client_names_and_are_listed(mixed):
    url, router, _ = mixed
    for name in ("claude-3-5-haiku-20241022", "claude-sonnet-4-5"):
        r = httpx.post(f"{url}/v1/messages", timeout=10, json={
            "model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.headers["x-llamactl-profile"] == "chat"
        assert r.json()["type"] == "message"
    r = httpx.post(f"{url}/v1/messages", json={"model": "gpt-4o", "messages": []}, timeout=10)
    assert r.status_code == 404
    body = r.json()
    assert body["type"] == "error" and body["error"]["code"] == "model_not_found"  # Anthropic's shape too
    assert "LLAMACTL_MODEL_MAP" in body["error"]["hint"]
    data = httpx.get(f"{url}/v1/models").json()["data"]
    mapped = {m["id"]: m["llamactl"] for m in data if m["llamactl"]["kind"] == "mapped"}
    assert mapped == {"claude-3-5-haiku*": {"kind": "mapped", "maps_to": "chat", "glob": True},
                      "claude-*": {"kind": "mapped", "maps_to": "chatty", "glob": True}}
    status = httpx.get(f"{url}/llamactl/status").json()
    assert status["model_map"] == {"claude-3-5-haiku*": "chat", "claude-*": "chatty"}


def test_a_map_entry_naming_nothing_served_is_a_problem_not_a_route():
    profiles = [profile("chat")]
    router = Router(profiles, backends_for(profiles), RouterConfig(routing=Routing(model_map=(("gpt-*", "nope"),))))
    assert router.catalog.routing.model_map == ()
    assert any("model map 'gpt-*' names 'nope'" in p for p in router.catalog.problems)


def test_models_show_state_engine_context_and_group():
    profiles = [Profile(name="a", model="/m.gguf", ctx_size=2048, parallel=1),
                Profile(name="e", model="/e.gguf", embeddings=True, parallel=1)]
    backends = backends_for(profiles)
    with served(profiles, backends) as (url, _):
        entries = {m["id"]: m["llamactl"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert entries["a"]["state"] == "unloaded" and entries["a"]["ctx_size"] == 2048
        assert entries["a"]["engine"] == "llama.cpp" and entries["a"]["is_group"] is False
        assert entries["e"]["serves"] == "embeddings"
        assert post(url, "/v1/completions", "a").status_code == 200
        entries = {m["id"]: m["llamactl"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert entries["a"]["state"] == "ready" and entries["e"]["state"] == "unloaded"


def test_a_route_the_engine_lacks_is_a_clear_501_naming_profile_engine_and_route():
    profiles = [Profile(name="old", model="/m.gguf", engine="ik_llama.cpp", parallel=1)]
    backends = backends_for(profiles, old={"missing_routes": ("/v1/messages", "/v1/responses")})
    with served(profiles, backends) as (url, _):
        r = httpx.post(f"{url}/v1/messages", timeout=10, json={
            "model": "old", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 501
        body = r.json()
        assert body["type"] == "error"
        error = body["error"]
        assert error["code"] == "route_not_served" and error["route"] == "/v1/messages"
        assert error["profile"] == "old" and error["engine"] == "ik_llama.cpp"
        assert "profile 'old' runs ik_llama.cpp" in error["message"] and "POST /v1/messages" in error["message"]
        assert "/upstream/old/" in error["hint"]
        assert httpx.post(f"{url}/v1/responses", json={"model": "old", "input": "x"}).status_code == 501
        assert post(url, "/v1/chat/completions", "old").status_code == 200


def test_props_and_slots_by_model_carry_the_engine_key_not_the_clients(mixed):
    url, _, _ = mixed
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    r = httpx.get(f"{url}/props", params={"model": "embed"}, headers=headers, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "embed" and body["fake"] == "/props"
    assert body["authorization"] == f"Bearer {ENGINE_KEY}"
    r = httpx.get(f"{url}/slots", params={"model": "chatty", "fail_on_no_slot": "1"}, timeout=10)
    assert r.json()["name"] == "chat" and "fail_on_no_slot=1" in r.json()["query"]
    r = httpx.get(f"{url}/props", params={"model": "nope"}, timeout=10)
    assert r.status_code == 404


def test_upstream_reaches_anything_on_a_profile_loading_it_on_demand(mixed):
    url, _, backends = mixed
    assert backends.events == []
    r = httpx.get(f"{url}/upstream/chat/", timeout=10)
    assert r.status_code == 200 and "fake llama-server ui" in r.text
    assert backends.events == [("start", "chat")]
    r = httpx.get(f"{url}/upstream/chat", timeout=10)
    assert r.status_code == 307 and r.headers["location"].endswith("/upstream/chat/")
    r = httpx.get(f"{url}/upstream/chat/props?x=1", headers={"X-Api-Key": CLIENT_KEY}, timeout=10)
    assert r.json()["query"] == "x=1" and r.json()["authorization"] == f"Bearer {ENGINE_KEY}"
    r = httpx.post(f"{url}/upstream/ranker/v1/chat/completions", json={"max_tokens": 2}, timeout=10)
    assert r.status_code == 200 and r.headers["x-llamactl-profile"] == "ranker"
    r = httpx.get(f"{url}/upstream/nope/", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["valid_profiles"] == ["chat", "embed", "ranker"]


def test_slot_actions_through_upstream_are_refused_so_no_client_writes_the_prompt_cache(mixed):
    url, _, backends = mixed
    for path in ("/slots/0?action=save", "/slots/0?action=restore", "/slots/1?action=erase", "//slots/0?action=save",
                 "/%73lots/0?action=save", "/x/../slots/0?action=save", "/slots"):
        r = httpx.post(f"{url}/upstream/chat{path}", json={"filename": "../../../etc/cron.d/x"}, timeout=10)
        assert r.status_code == 403, path
        assert "prompt cache" in r.json()["error"]["message"] and r.json()["error"]["hint"]
    assert backends.events == []  # refused before anything was started or forwarded
    r = httpx.get(f"{url}/upstream/chat/slots", timeout=10)
    assert r.status_code == 200  # reading the slots is still allowed


def test_anthropic_stream_is_relayed_and_its_usage_counted(mixed):
    url, _, _ = mixed
    with httpx.stream("POST", f"{url}/v1/messages", timeout=10, json={
            "model": "chat", "max_tokens": 100, "stream": True, "temperature": 0.5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "fake": {"tokens": 7}}) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    line = 'llamactl_completion_tokens_total{class="chat",lane="chat",profile="chat"} 7.0'
    wait_for(lambda: line in httpx.get(f"{url}/metrics").text, what="anthropic usage recorded")


def test_anthropic_stream_broken_by_the_engine_ends_with_an_anthropic_error_event(mixed):
    url, _, _ = mixed
    with httpx.stream("POST", f"{url}/v1/messages", timeout=10, json={
            "model": "chat", "max_tokens": 100, "stream": True, "messages": HI, "fake": {"crash_after": 2}}) as r:
        text = "".join(r.iter_text())
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ")
    assert json.loads(last.split("data: ", 1)[1])["error"]["code"] == "upstream_stream_broken"


# -- auth, body limit, disconnect on every new route, with the daemon's own middleware ----------------------

NEW_ROUTES = sorted(set(RELAYED) - {"/v1/chat/completions", "/v1/completions", "/completion"})


@pytest.fixture
def guarded(home):
    profiles = mixed_profiles()
    backends = backends_for(profiles)
    router = Router(profiles, backends, RouterConfig(routing=Routing(default_model="chat")))
    settings = Settings(max_body_bytes=16 * 1024 * 1024)
    server = ServerThread(create_app(router, middleware=auth.middleware(settings, (CLIENT_KEY,))))
    try:
        yield server.url, backends
    finally:
        server.stop()
        backends.close()


def test_new_routes_need_a_key_and_refuse_a_50_mb_body(guarded):
    url, backends = guarded
    big = b"x" * (50 * 1024 * 1024)
    for path in NEW_ROUTES + ["/upstream/chat/"]:
        r = httpx.post(f"{url}{path}", json={"model": "chat"}, timeout=10)
        assert r.status_code == 401, path
        r = httpx.post(f"{url}{path}", content=big, timeout=30,
                       headers={"Authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"})
        assert r.status_code == 413, path
    for path in ("/props", "/slots", "/upstream/chat/"):
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 401
    assert all(b.counters.requests == 0 for b in backends.backends.values())
    assert backends.events == []


GENERATING_STREAMS = ["/v1/messages", "/v1/responses", "/responses", "/chat/completions", "/completions", "/infill"]


@pytest.mark.parametrize("path", GENERATING_STREAMS)
def test_disconnect_mid_stream_stops_generation(guarded, path):
    url, backends = guarded
    backend = backends.backends["chat"]
    with httpx.stream("POST", f"{url}{path}", headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=10, json={
            "model": "chat", "stream": True, "max_tokens": 1000, "messages": HI, "prompt": "hi", "input": "hi",
            "fake": {"delay_s": 0.01}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    wait_for(lambda: backend.counters.cancelled == 1, what="upstream cancel")
    assert backend.counters.completed == 0


def test_slot_is_released_after_a_disconnect_on_the_anthropic_route(mixed):
    url, _, backends = mixed
    with httpx.stream("POST", f"{url}/v1/messages", timeout=10, json={
            "model": "chat", "stream": True, "max_tokens": 1000, "messages": HI, "fake": {"delay_s": 0.01}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    wait_for(lambda: backends.backends["chat"].counters.cancelled == 1, what="upstream cancel")
    wait_for(lambda: lane_status(url, "chat")["in_flight"] == 0, what="slot released")
