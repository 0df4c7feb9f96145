"""The relay: OpenAI endpoints through the router to a fake backend; streaming, errors, disconnects."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.router_harness import fake_backends, group_profiles, lane_status, profile, served, wait_for


@pytest.fixture
def solo():
    profiles = [profile("solo", parallel=2, alias="solo-alias")]
    backends = fake_backends(profiles)
    with served(profiles, backends) as (url, router):
        yield url, router, backends


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_chat_completion_non_stream(solo):
    url, router, backends = solo
    r = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "solo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "fake": {"tokens": 5}})
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert r.headers["x-llamactl-profile"] == "solo"
    assert r.headers["x-llamactl-class"] == "short"  # max_tokens <= 16
    assert backends.backends["solo"].counters.completed == 1


def test_alias_and_missing_model_resolve_with_one_lane(solo):
    url, _, backends = solo
    assert httpx.post(f"{url}/v1/completions", json={"model": "solo-alias", "prompt": "x"}).status_code == 200
    assert httpx.post(f"{url}/completion", json={"prompt": "x", "n_predict": 3}).json()["tokens_predicted"] == 3
    assert backends.backends["solo"].counters.completed == 2


def test_stream_is_relayed_event_by_event_with_final_timings(solo):
    url, router, _ = solo
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={
            "model": "solo", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 64,
            "fake": {"delay_s": 0.001, "tokens": 6}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:6]] == [f"tok{i} " for i in range(6)]
    assert chunks[-1]["timings"]["predicted_n"] == 6  # the engine's final timings chunk passes through
    # the sample is recorded once the response is complete, which may be just after the client saw it
    line = 'llamactl_completion_tokens_total{class="chat",lane="solo",profile="solo"} 6.0'
    wait_for(lambda: line in httpx.get(f"{url}/metrics").text, what="metrics recorded")
    metrics = httpx.get(f"{url}/metrics").text
    assert 'llamactl_time_to_first_token_seconds_count{class="chat",lane="solo"} 1.0' in metrics


def test_stream_chunks_arrive_before_the_stream_ends(solo):
    """No buffering: the first event reaches the client while the backend is still held."""
    url, _, backends = solo
    backend = backends.backends["solo"]
    first = threading.Event()
    with httpx.stream("POST", f"{url}/completion", json={
            "prompt": "x", "stream": True, "n_predict": 3, "fake": {"delay_s": 0.2}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                first.set()
                # the backend is still producing: it has not completed the request yet
                assert backend.counters.completed == 0
                break
    assert first.is_set()


def test_unknown_model_is_404_listing_valid_names(solo):
    url, _, _ = solo
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "sollo", "messages": []})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["source"] == "llamactl"
    assert error["valid_models"] == ["solo", "solo-alias"]
    assert "did you mean 'solo'" in error["hint"]


def test_bad_json_is_400_openai_shape(solo):
    url, _, _ = solo
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-llamactl-error-source"] == "llamactl"


def test_upstream_error_keeps_status_and_says_upstream(solo):
    url, _, _ = solo
    r = httpx.post(f"{url}/v1/completions", json={"model": "solo", "prompt": "x", "fake": {"status": 500}})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["source"] == "upstream" and error["profile"] == "solo"
    assert "fake failure" in error["message"]


def test_crash_mid_stream_ends_with_an_error_event(solo):
    url, router, backends = solo
    with httpx.stream("POST", f"{url}/v1/completions", json={
            "model": "solo", "prompt": "x", "stream": True, "max_tokens": 10, "fake": {"crash_after": 3}}) as r:
        text = "".join(r.iter_text())
    events = sse_events(text)
    assert len([e for e in events if "tok" in e]) == 3
    error = json.loads(events[-2])["error"]
    assert error["source"] == "upstream" and error["code"] == "upstream_stream_broken"
    assert events[-1] == "[DONE]"
    assert backends.backends["solo"].counters.crashed == 1
    # the lane asks the backends again before the next request; the next one is served
    r = httpx.post(f"{url}/v1/completions", json={"model": "solo", "prompt": "x"})
    assert r.status_code == 200


def test_client_disconnect_cancels_upstream(solo):
    url, _, backends = solo
    backend = backends.backends["solo"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={
            "model": "solo", "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 1000,
            "fake": {"delay_s": 0.01}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    wait_for(lambda: backend.counters.cancelled == 1, what="upstream cancel")
    assert backend.counters.completed == 0
    wait_for(lambda: lane_status(url, "solo")["in_flight"] == 0, what="slot released")


def test_models_lists_groups_profiles_and_aliases():
    profiles = group_profiles("coding") + [profile("chat", alias="chatty")]
    backends = fake_backends(profiles)
    with served(profiles, backends) as (url, _):
        data = httpx.get(f"{url}/v1/models").json()["data"]
        kinds = {m["id"]: m["llamactl"]["kind"] for m in data}
        assert kinds == {"chat": "profile", "chatty": "profile", "coding": "group", "coding-plain": "profile",
                         "coding-spec": "profile"}
        coding = next(m for m in data if m["id"] == "coding")
        assert coding["llamactl"]["members"] == {"coding-plain": "plain", "coding-spec": "spec"}
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert backends.events == []  # listing models loads nothing


def test_start_failure_is_503_from_engine():
    profiles = [profile("broken")]
    backends = fake_backends(profiles, fail={"broken"})
    with served(profiles, backends) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "broken", "prompt": "x"})
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["source"] == "engine" and error["profile"] == "broken"
        assert "out of memory" in error["message"]
        assert lane_status(url, "broken")["state"] == "failed"
