"""The prompt cache that outlives its engine, on the real llama-server and Gemma 3 270M (a sliding-window model, so
`[cache] persist = true` adds --swa-full): a ~3k-token prompt repeated after an unload and reload, after a switch
that reloads (the group's other member, same model and KV layout), and after a restart of `llamactl serve`
re-processes under 15% of the prompt; without the cache the same repeat re-processes all of it."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import openai
import pytest

from llamactl.settings import Settings
from tests.conftest import ENGINE_ENV, require_engine
from tests.router_harness import wait_for
from tests.test_service_daemon import Daemon

pytestmark = pytest.mark.engine

COMMON = """
model = "{model}"
ctx_size = 4096
gpus = []
threads = 2
parallel = 1
load_timeout_s = 180
group = "pc"
[cache]
persist = {persist}
"""


def long_prompt() -> str:
    """About 3k tokens of code-like text (a coding agent's fixed prefix)."""
    lines = [f"def step_{i}(value):\n    return value * {i} + {i % 7}  # step {i} of the pipeline\n" for i in range(100)]
    return "".join(lines) + "\n# The function that calls every step in order:\n"


def ask(client: openai.OpenAI, prompt: str, model: str = "pc") -> dict:
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    timings = answer.model_extra["timings"]
    return {"prompt_n": timings["prompt_n"], "cache_n": timings["cache_n"]}


def active(url: str) -> str | None:
    return next(lane for lane in httpx.get(f"{url}/llamactl/status").json()["lanes"] if lane["lane"] == "pc")["active"]


def cache_of(url: str, profile: str) -> dict:
    return httpx.get(f"{url}/llamactl/status").json()["prompt_cache"]["profiles"][profile]


@pytest.fixture
def cache_home(monkeypatch, write_profile, gemma_path, home):
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    monkeypatch.setenv("LLAMACTL_ROUTER_KEEP_BOTH_WARM", "false")  # a switch reloads: stop one, start the other
    monkeypatch.setenv("LLAMACTL_PROMPT_CACHE_MIN_TOKENS", "256")
    write_profile("pc-plain", COMMON.format(model=gemma_path, persist="true"))
    write_profile("pc-spec", COMMON.format(model=gemma_path, persist="true") + '[speculation]\ntype = "ngram-mod"\n')
    return Settings()


def test_a_long_prompt_survives_unload_a_reloading_switch_and_a_restart(cache_home, tmp_path):
    prompt = long_prompt()
    daemon = Daemon(tmp_path, "--profile", "pc-plain")
    try:
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=600)
        first = ask(client, prompt)
        total = first["prompt_n"] + first["cache_n"]
        assert total >= 2500 and first["cache_n"] == 0
        member = active(daemon.url)

        # unload, then the same prompt: its slot comes back from disk before the request is served
        unloaded = httpx.post(f"{daemon.url}/llamactl/profiles/{member}/unload", timeout=120)
        assert unloaded.status_code == 200, unloaded.text
        again = ask(client, prompt)
        assert again["prompt_n"] < 0.15 * total and again["cache_n"] > 0.85 * total
        # the router judges the restore on the request's timings (recorded just after the answer is sent)
        wait_for(lambda: cache_of(daemon.url, member)["reused_tokens"] > 0, what="the restore judged", timeout_s=10)
        cache = cache_of(daemon.url, member)
        assert cache["restores"] == 1 and cache["bytes"] > 0 and cache["reused_tokens"] == again["cache_n"]
        assert cache["last_restore"]["prefill_saved_s"] > 0
        assert cache["persist"]["on"] is True and "--swa-full" in cache["persist"]["reason"]
        shown = subprocess.run([sys.executable, "-m", "llamactl", "status"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert f"{member}: on ([cache] persist = true" in shown.stdout and "1 restore(s)" in shown.stdout

        # a switch that reloads: the other member (same model, same KV layout) gets the slot
        other = "pc-spec" if member == "pc-plain" else "pc-plain"
        switched = httpx.post(f"{daemon.url}/llamactl/switch", json={"group": "pc", "member": other}, timeout=300)
        assert switched.status_code == 200, switched.text
        after_switch = ask(client, prompt)
        assert after_switch["prompt_n"] < 0.15 * total, after_switch

        metrics = httpx.get(f"{daemon.url}/metrics").text
        assert f'llamactl_prompt_cache_restores_total{{profile="{other}"}} 1.0' in metrics
    finally:
        assert daemon.stop(signal.SIGTERM, timeout_s=120) == 0

    # a restart of serve: the clean stop saved the slot; the new daemon's engine restores it
    daemon = Daemon(tmp_path, "--profile", "pc-plain")
    try:
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=600)
        if other != active(daemon.url):
            httpx.post(f"{daemon.url}/llamactl/switch", json={"group": "pc", "member": other}, timeout=300)
        after_restart = ask(client, prompt)
        assert after_restart["prompt_n"] < 0.15 * total, after_restart
    finally:
        assert daemon.stop(signal.SIGTERM, timeout_s=120) == 0
