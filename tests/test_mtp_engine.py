"""MTP speculation that really runs: a tiny GLM-4.5-style model with one NextN block (tests/mtp_gguf.py, random
weights, so acceptance means nothing) starts with `[speculation] type = "mtp"` on the pinned mainline
(--spec-type draft-mtp) and on the pinned ik_llama.cpp (-mtp), and drafts for requests sent through the router
`llamactl serve` runs (in-process, and as the daemon process itself): judged by what the engine itself reports
(mainline: the response's timings.draft_n and its acceptance log line; ik: its acceptance log line)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from llamactl.daemon.wiring import build_router, load_profiles
from llamactl.router import create_app
from llamactl.settings import Settings
from tests.conftest import ENGINE_ENV, require_engine
from tests.fakes.fast_backend import ServerThread
from tests.mtp_gguf import write_glm4moe_mtp
from tests.router_harness import wait_for
from tests.test_per_request_engine import acceptance_lines, log_end

pytestmark = pytest.mark.engine

PROMPT = "def add(a, b):\n    return a + b\n"


def mtp_profile(write_profile, model: Path, engine: str, name: str = "glm") -> None:
    write_profile(name, f'engine = "{engine}"\nmodel = "{model}"\nctx_size = 1024\ngpus = []\nthreads = 2\n'
                  'parallel = 1\nload_timeout_s = 180\n[speculation]\ntype = "mtp"\nn_max = 3\n')


def serve(settings: Settings, name: str):
    router = build_router(settings, load_profiles(settings, [name]))
    return router, ServerThread(create_app(router))


def test_mainline_drafts_with_the_models_mtp_layer_through_the_router(monkeypatch, write_profile, home, tmp_path):
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    mtp_profile(write_profile, write_glm4moe_mtp(tmp_path / "glm.gguf"), "llama.cpp")
    router, server = serve(Settings(), "glm")
    try:
        r = httpx.post(f"{server.url}/completion", timeout=300, json={
            "model": "glm", "prompt": PROMPT, "n_predict": 16, "temperature": 0, "cache_prompt": False})
        assert r.status_code == 200, r.text
        assert r.headers["x-llamactl-profile"] == "glm"
        timings = r.json()["timings"]
        assert timings["draft_n"] > 0, timings  # the engine drafted: with nothing but the model's NextN head
        engine = router.backends.supervisor.running("glm")
        assert "draft-mtp" in engine.cmdline and "-md" not in engine.cmdline and "--spec-draft-model" not in engine.cmdline
        log_path = router.lanes["glm"].upstreams["glm"].log_path
        start = log_end(log_path)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        done = client.completions.create(model="glm", prompt=PROMPT, max_tokens=16, temperature=0)
        assert done.usage.completion_tokens > 0
        wait_for(lambda: acceptance_lines(log_path, start), timeout_s=30, what="the engine's acceptance line")
        assert sum(a.generated for a in acceptance_lines(log_path, start)) > 0
        # the router counted the engine's drafted tokens
        wait_for(lambda: 'llamactl_draft_tokens_total{' in httpx.get(f"{server.url}/metrics").text,
                 what="the router's drafted-token counter")
    finally:
        server.stop()


def test_ik_drafts_with_the_models_mtp_layer_through_the_router(monkeypatch, write_profile, home, tmp_path):
    monkeypatch.setenv(ENGINE_ENV["ik_llama.cpp"], str(require_engine("ik_llama.cpp")))
    mtp_profile(write_profile, write_glm4moe_mtp(tmp_path / "glm.gguf"), "ik_llama.cpp")
    router, server = serve(Settings(), "glm")
    try:
        engine_log = None
        for _ in range(2):  # the second request drafts on an MTP context already warm
            start = log_end(engine_log) if engine_log else 0
            r = httpx.post(f"{server.url}/completion", timeout=300, json={
                "model": "glm", "prompt": PROMPT, "n_predict": 16, "temperature": 0, "cache_prompt": False})
            assert r.status_code == 200, r.text
            engine_log = router.lanes["glm"].upstreams["glm"].log_path
            wait_for(lambda: acceptance_lines(engine_log, start), timeout_s=30, what="ik's acceptance line")
            assert sum(a.generated for a in acceptance_lines(engine_log, start)) > 0
        engine = router.backends.supervisor.running("glm")
        assert "-mtp" in engine.cmdline and "-md" not in engine.cmdline
        # the router read ik's acceptance lines (its timings carry no draft counts)
        wait_for(lambda: 'llamactl_draft_tokens_total{' in httpx.get(f"{server.url}/metrics").text,
                 what="the router's drafted-token counter")
    finally:
        server.stop()


def test_llamactl_serve_as_a_process_serves_an_mtp_profile_that_drafts(monkeypatch, write_profile, home, tmp_path):
    """The same through `llamactl serve` run as the daemon it is: its own process, its router, its engine."""
    from tests.test_service_daemon import Daemon

    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    mtp_profile(write_profile, write_glm4moe_mtp(tmp_path / "glm.gguf"), "llama.cpp")
    daemon = Daemon(tmp_path, "--profile", "glm")
    try:
        r = httpx.post(f"{daemon.url}/completion", timeout=300, json={
            "model": "glm", "prompt": PROMPT, "n_predict": 16, "temperature": 0, "cache_prompt": False})
        assert r.status_code == 200, r.text
        assert r.json()["timings"]["draft_n"] > 0, r.json()["timings"]
    finally:
        assert daemon.stop() == 0
