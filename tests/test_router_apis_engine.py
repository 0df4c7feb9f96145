"""Every client's API through the router to the real llama-server: the `anthropic` SDK (Claude Code's API,
with its model names mapped), the `openai` SDK's Responses and embeddings (the bundled demo embedding
profile on Gemma 3 270M), /tokenize, /infill on a model with FIM tokens and the engine's own error for one
without, the engine's own answer for audio; and the clear error for a route the pinned ik build lacks."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from llamactl.router import create_app
from llamactl.daemon.wiring import build_router, load_profiles
from llamactl.settings import Settings
from tests.conftest import ENGINE_ENV, require_engine
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import wait_for
from tests.synth_gguf import write_llama

pytestmark = pytest.mark.engine

CPU = 'gpus = []\nthreads = 2\nparallel = 1\nload_timeout_s = 180\n'


@pytest.fixture
def serve(monkeypatch):
    """Serve the named profiles (and only those) through `llamactl serve`'s router; yields its URL."""
    servers: list[tuple[ServerThread, object]] = []

    def start(*names: str) -> str:
        settings = Settings()
        router = build_router(settings, load_profiles(settings, names))
        server = ServerThread(create_app(router))
        servers.append((server, router))
        return server.url

    yield start
    for server, _ in servers:
        server.stop()  # the router's shutdown stops its engines


@pytest.fixture
def gemma(monkeypatch, write_profile, gemma_path, home):
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    monkeypatch.setenv("LLAMACTL_MODEL_MAP", "claude-haiku-*=gem,claude-*=gem")
    write_profile("gem", f'model = "{gemma_path}"\nctx_size = 1024\n' + CPU)
    return gemma_path


def test_anthropic_sdk_streams_and_answers_through_the_router_with_mapped_names(gemma, serve):
    url = serve("gem")
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    message = client.messages.create(model="claude-sonnet-4-6", max_tokens=8, extra_body={"temperature": 0},
                                     system="You answer briefly.",
                                     messages=[{"role": "user", "content": "Name a colour."}])
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert 0 < message.usage.output_tokens <= 8 and message.usage.input_tokens > 0
    with client.messages.stream(model="claude-haiku-4-5-20251001", max_tokens=8, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Count: one, two,"}]) as stream:
        pieces = [text for text in stream.text_stream]
        final = stream.get_final_message()
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert 0 < final.usage.output_tokens <= 8
    counted = client.messages.count_tokens(model="claude-sonnet-4-6",
                                           messages=[{"role": "user", "content": "Name a colour."}])
    assert counted.input_tokens > 0
    metrics = httpx.get(f"{url}/metrics").text
    assert 'endpoint="/v1/messages",lane="gem",profile="gem",status="200"} 2.0' in metrics
    # tokens counted from each answer's own usage (the stream's from its message_delta event)
    line = 'llamactl_completion_tokens_total{class="short",lane="gem",profile="gem"}'
    assert float(metrics.split(line)[1].split()[0]) == message.usage.output_tokens + final.usage.output_tokens
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="gpt-4o", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert "unknown model 'gpt-4o'" in str(raised.value)


def test_openai_responses_embeddings_tokenize_and_audio(gemma, write_profile, serve):
    url = serve("gem", "demo-embed")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    response = client.responses.create(model="gem", input="Name a colour.", max_output_tokens=8, temperature=0)
    assert response.status == "completed" and response.output_text.strip()
    assert 0 < response.usage.output_tokens <= 8
    embeddings = client.embeddings.create(model="demo-embed", input=["red", "a longer sentence about blue"])
    assert [e.index for e in embeddings.data] == [0, 1]
    assert len(embeddings.data[0].embedding) == 640  # Gemma 3 270M's width
    assert embeddings.data[0].embedding != embeddings.data[1].embedding
    r = httpx.post(f"{url}/tokenize", json={"model": "gem", "content": "Hello world"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["tokens"]) >= 2
    r = httpx.post(f"{url}/detokenize", json={"model": "gem", "tokens": r.json()["tokens"]}, timeout=60)
    assert "Hello world" in r.json()["content"]
    # no audio model here: the engine's own refusal comes back with its status, marked as the engine's
    r = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "gem"}, timeout=60,
                   files={"file": ("a.wav", b"RIFF\x24\x00\x00\x00WAVEfmt ", "audio/wav")})
    assert r.status_code >= 400 and r.headers["x-llamactl-error-source"] == "upstream"
    error = r.json()["error"]
    assert error["source"] == "upstream" and error["profile"] == "gem" and error["code"] == r.status_code
    assert "llama-server (gem) answered" in error["message"]
    models = {m["id"]: m["llamactl"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert models["gem"]["state"] == "ready" and models["demo-embed"]["serves"] == "embeddings"
    assert models["gem"]["ctx_size"] == 1024 and models["gem"]["engine"] == "llama.cpp"
    assert models["demo-embed"]["ctx_size"] == 2048
    assert models["claude-*"] == {"kind": "mapped", "maps_to": "gem", "glob": True}


def test_infill_on_a_model_with_fim_tokens_and_the_engines_error_without(gemma, write_profile, home, serve):
    fim = write_llama(home / "fim.gguf", n_layer=1, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=512,
                      ctx_train=2048, fim=True)
    write_profile("coder", f'model = "{fim}"\n' + CPU)  # ctx_size 0: the model's own 2048
    url = serve("coder", "gem")
    models = {m["id"]: m["llamactl"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert models["coder"]["ctx_size"] == 2048 and models["coder"]["state"] == "unloaded"
    r = httpx.post(f"{url}/infill", timeout=120, json={
        "model": "coder", "input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n", "n_predict": 3})
    assert r.status_code == 200, r.text
    assert r.headers["x-llamactl-profile"] == "coder" and r.json()["tokens_predicted"] >= 1
    r = httpx.post(f"{url}/infill", timeout=120, json={"model": "gem", "input_prefix": "x", "n_predict": 2})
    assert r.status_code >= 400 and r.headers["x-llamactl-error-source"] == "upstream"
    assert "Infill is not supported by this model" in r.json()["error"]["message"]


def test_a_route_the_pinned_ik_lacks_is_a_clear_error(write_profile, gemma_path, home, monkeypatch, serve):
    """The pinned ik (ik-llama-cpp-python 0.1.5) has /v1/responses and /v1/messages, but not /responses,
    rerank, audio or the */input_tokens counts. One missing route is known from the binary before anything
    loads; /responses (its literal is the tail of "/v1/responses") is learnt from the engine's 404."""
    binary = require_engine("ik_llama.cpp")
    monkeypatch.setenv(ENGINE_ENV["ik_llama.cpp"], str(binary))
    write_profile("ik", f'engine = "ik_llama.cpp"\nmodel = "{gemma_path}"\nctx_size = 1024\n' + CPU)
    url = serve("ik")
    for path in ("/v1/chat/completions/input_tokens", "/responses"):
        r = httpx.post(f"{url}{path}", timeout=120, json={
            "model": "ik", "max_output_tokens": 4, "input": "hi", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 501, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "route_not_served" and error["engine"] == "ik_llama.cpp" and error["route"] == path
        assert error["engine_version"] != "unknown" and error["engine_version"] in error["message"]
        assert "profile 'ik' runs ik_llama.cpp" in error["message"] and f"POST {path}" in error["message"]
        assert "/upstream/ik/" in error["hint"]
        if path.endswith("input_tokens"):  # refused from the binary's routes: nothing was loaded for it
            models = {m["id"]: m["llamactl"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
            assert models["ik"]["state"] == "unloaded"
    # what the build does serve works through the same router, Anthropic Messages included
    r = httpx.post(f"{url}/v1/messages", timeout=120, json={
        "model": "ik", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["type"] == "message"


CODE_PROMPT = (
    "Repeat this code exactly:\n"
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "def mul(a, b):\n    return a * b\n\nHere it is again:\n"
)


def test_anthropic_stream_on_a_speculative_profile_records_acceptance(monkeypatch, write_profile, gemma_path, home,
                                                                      serve):
    """Anthropic events carry no drafting counts: they are read from the engine's log, as for ik's timings."""
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    write_profile("spec", f'model = "{gemma_path}"\nctx_size = 1024\n' + CPU + '[speculation]\ntype = "ngram-mod"\n')
    url = serve("spec")
    with httpx.stream("POST", f"{url}/v1/messages", timeout=300, json={
            "model": "spec", "max_tokens": 100, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": CODE_PROMPT}]}) as r:
        assert r.status_code == 200 and r.headers["x-llamactl-class"] == "code"
        assert "message_stop" in "".join(r.iter_text())
    line = 'llamactl_draft_tokens_total{class="code",lane="spec",profile="spec"}'
    wait_for(lambda: line in httpx.get(f"{url}/metrics").text, what="drafting counts")
    metrics = httpx.get(f"{url}/metrics").text
    assert float(metrics.split(line)[1].split()[0]) > 0, metrics
    completion = 'llamactl_completion_tokens_total{class="code",lane="spec",profile="spec"}'
    assert float(metrics.split(completion)[1].split()[0]) > 0
