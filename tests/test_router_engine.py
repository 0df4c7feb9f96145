"""The router in front of the real llama-server and Gemma 3 270M, through the real Supervisor:
the `openai` package streams through it; a switch keeps both members loaded where the memory plan says
they fit together (the CPU box here), and stops one before starting the other when told not to."""

from __future__ import annotations

import httpx
import openai
import psutil
import pytest

from llamactl.daemon.wiring import build_router, load_profiles
from llamactl.settings import Settings
from llamactl.router import create_app
from tests.conftest import ENGINE_ENV, require_engine
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import wait_for

pytestmark = pytest.mark.engine

CODE_PROMPT = (
    "Repeat this code exactly:\n"
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "def mul(a, b):\n    return a * b\n\nHere it is again:\n"
)


@pytest.fixture
def gemma_group(monkeypatch, write_profile, gemma_path, home):
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    common = f'model = "{gemma_path}"\nctx_size = 1024\ngpus = []\nthreads = 2\nparallel = 1\nload_timeout_s = 180\n'
    write_profile("gem-spec", common + 'group = "gem"\n[speculation]\ntype = "ngram-mod"\n')
    write_profile("gem-plain", common + 'group = "gem"\n')
    return Settings()


def llama_servers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "llama-server" and any("gem" in a or "gemma" in a for a in p.info["cmdline"] or [])]


def test_openai_client_streams_through_the_router_and_a_switch_swaps_the_engine(gemma_group):
    settings = gemma_group
    router = build_router(settings, load_profiles(settings, ["gem-spec"]))  # brings its group
    server = ServerThread(create_app(router))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        pieces = []
        stream = client.chat.completions.create(
            model="gem", messages=[{"role": "user", "content": CODE_PROMPT}], stream=True, max_tokens=16,
            temperature=0)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert len(pieces) >= 2 and "".join(pieces).strip()
        status = httpx.get(f"{server.url}/llamactl/status").json()["lanes"]
        assert [lane["lane"] for lane in status] == ["gem"]
        status = status[0]
        assert status["active"] == "gem-spec"  # greedy work starts on the speculative member (priors)
        # llama.cpp's own /completion, streamed: the final event's timings carry the drafting counts
        with httpx.stream("POST", f"{server.url}/completion", timeout=300, json={
                "model": "gem", "prompt": CODE_PROMPT, "n_predict": 100, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-llamactl-profile"] == "gem-spec"
            assert '"timings"' in "".join(r.iter_text())
        # mean accepted length comes from the engine's /metrics, scraped just after the request
        line = 'llamactl_mean_accepted_length{lane="gem",profile="gem-spec"}'
        wait_for(lambda: line in httpx.get(f"{server.url}/metrics").text, what="mean accepted length")
        metrics = httpx.get(f"{server.url}/metrics").text
        assert float(metrics.split(line)[1].split()[0]) >= 1.0
        assert 'llamactl_requests_total{class="short",endpoint="/v1/chat/completions",lane="gem",profile="gem-spec",status="200"} 1.0' in metrics
        assert "llamactl_draft_tokens_total{class=\"code\",lane=\"gem\",profile=\"gem-spec\"}" in metrics, metrics

        # Two Gemma 3 270M servers fit in this machine's RAM: the plan says so, and a switch keeps both.
        assert status["keep_both_warm"] is True
        assert " fit together (" in status["warm_reason"] and "MiB of host RAM left)" in status["warm_reason"]
        assert {"gem-spec", "gem-plain"} <= set(status["warm_reason"].split(" fit together")[0].split(" + "))
        r = httpx.post(f"{server.url}/llamactl/switch", json={"group": "gem", "member": "gem-plain"}, timeout=300)
        assert r.status_code == 200 and r.json()["active"] == "gem-plain"
        assert r.json()["loaded"] == ["gem-plain", "gem-spec"]
        completion = client.completions.create(model="gem", prompt="Once upon a time", max_tokens=8,
                                               temperature=1.0)
        assert completion.choices[0].text
        spec_pid = router.backends.supervisor.running("gem-spec").pid
        r = httpx.post(f"{server.url}/llamactl/switch", json={"group": "gem", "member": "gem-spec"}, timeout=300)
        assert r.json()["active"] == "gem-spec"
        assert router.backends.supervisor.running("gem-spec").pid == spec_pid  # a drain, not a restart
        assert router.backends.supervisor.running("gem-plain") is not None
    finally:
        server.stop()  # the router's shutdown stops the engines it started
    assert router.backends.supervisor.running("gem-plain") is None
    assert router.backends.supervisor.running("gem-spec") is None


def test_a_hard_switch_stops_one_member_before_starting_the_other(gemma_group, monkeypatch):
    monkeypatch.setenv("LLAMACTL_ROUTER_KEEP_BOTH_WARM", "false")
    settings = Settings()
    router = build_router(settings, load_profiles(settings, ["gem-spec"]))
    server = ServerThread(create_app(router))
    try:
        r = httpx.post(f"{server.url}/llamactl/switch", json={"group": "gem", "member": "gem-spec"}, timeout=300)
        assert r.json()["loaded"] == ["gem-spec"] and r.json()["keep_both_warm"] is False
        r = httpx.post(f"{server.url}/llamactl/switch", json={"group": "gem", "member": "gem-plain"}, timeout=300)
        assert r.status_code == 200 and r.json()["active"] == "gem-plain"
        assert r.json()["loaded"] == ["gem-plain"]
        assert router.backends.supervisor.running("gem-spec") is None
        assert router.backends.supervisor.running("gem-plain") is not None
    finally:
        server.stop()
    assert router.backends.supervisor.running("gem-plain") is None


def test_acceptance_of_an_ik_engine_is_read_from_its_log(monkeypatch, write_profile, gemma_path, home):
    """The pinned ik_llama.cpp's /completion reports no draft counts in its timings, only a log line per
    request: the router reads that line, so the switching policy sees ik's acceptance there too."""
    monkeypatch.setenv(ENGINE_ENV["ik_llama.cpp"], str(require_engine("ik_llama.cpp")))
    common = (f'engine = "ik_llama.cpp"\nmodel = "{gemma_path}"\nctx_size = 1024\ngpus = []\nthreads = 2\n'
              'parallel = 1\nload_timeout_s = 180\ngroup = "ik"\n')
    write_profile("ik-spec", common + f'[speculation]\ntype = "draft"\ndraft_model = "{gemma_path}"\nn_max = 8\n')
    write_profile("ik-plain", common)
    settings = Settings()
    router = build_router(settings, load_profiles(settings, ["ik-spec"]))
    server = ServerThread(create_app(router))
    try:
        r = httpx.post(f"{server.url}/llamactl/switch", json={"group": "ik", "member": "ik-spec"}, timeout=300)
        assert r.status_code == 200
        # This build's /v1 endpoints carry draft_n in their timings; its /completion reports drafting only
        # in the log ("draft acceptance rate = ..." per request).
        r = httpx.post(f"{server.url}/completion", timeout=300, json={
            "model": "ik", "prompt": CODE_PROMPT, "n_predict": 48, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-llamactl-profile"] == "ik-spec"
        assert "draft_n" not in r.json()["timings"] and r.json()["timings"]["predicted_n"] == 48
        line = 'llamactl_draft_tokens_total{class="code",lane="ik",profile="ik-spec"}'
        wait_for(lambda: line in httpx.get(f"{server.url}/metrics").text, timeout_s=15, what="ik acceptance")
        metrics = httpx.get(f"{server.url}/metrics").text
        assert float(metrics.split(line)[1].split()[0]) > 0
        evidence = router.telemetry.evidence("ik")["code"]
        assert 0 < evidence.acceptance["ik-spec"] <= 1 and evidence.acceptance_n == {"ik-spec": 1}
    finally:
        server.stop()
    assert router.backends.supervisor.running("ik-spec") is None


def test_the_pinned_build_still_drafts_when_a_request_turns_speculation_off(gemma_group):
    """Why a mainline group switches per process: per-request `speculative.*` fields are accepted by this build
    but do not stop drafting (the engine self-test finds the same, tests/test_selftest.py, and the router then
    keeps the members apart). If this fails after an engine update, the self-test will find per-request
    switching possible there too: check that tests/test_selftest.py expects it."""
    settings = gemma_group
    from llamactl.profiles import load_profile
    from llamactl.supervisor import Supervisor

    sup = Supervisor(settings)
    record = sup.start(load_profile("gem-spec", settings))
    try:
        for off in ({"speculative.type": "none"}, {"speculative.n_max": 0}, {"speculative": {"type": "none"}}):
            r = httpx.post(f"{record.url}/completion", timeout=120, json={
                "prompt": CODE_PROMPT, "n_predict": 64, "temperature": 0, "cache_prompt": False, **off})
            assert r.status_code == 200
            assert r.json()["timings"].get("draft_n", 0) > 0, f"{off} turned drafting off: a soft switch works now"
    finally:
        sup.stop("gem-spec")
