"""Happy paths against the real llama-server (both forks) and the real Gemma 3 270M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from llamactl.engines.logs import parse_acceptance
from tests.conftest import ENGINE_ENV, require_engine

pytestmark = pytest.mark.engine
CODE_PROMPT = (
    "Repeat this code exactly:\n"
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "def mul(a, b):\n    return a * b\n\nHere it is again:\n"
)


@pytest.fixture(params=["llama.cpp", "ik_llama.cpp"])
def engine(request, monkeypatch, home):
    binary = require_engine(request.param)
    monkeypatch.setenv(ENGINE_ENV[request.param], str(binary))
    return request.param


def llamactl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"llamactl {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def gemma_profile(write_profile, engine: str, gemma_path, name: str, body: str = "") -> str:
    write_profile(name, f"""
        engine = "{engine}"
        model = "{gemma_path}"
        ctx_size = 2048
        gpus = []
        threads = 2
        load_timeout_s = 180
        {body}
    """)
    return name


def test_up_chat_status_down(engine, write_profile, gemma_path, home):
    name = gemma_profile(write_profile, engine, gemma_path, "coding")
    up = llamactl("up", name)
    assert "ready at http://127.0.0.1:" in up.stdout
    [row] = json.loads(llamactl("status", "--json").stdout)["servers"]
    assert row["profile"] == name and row["state"] == "ready" and row["engine"] == engine
    assert row["rss_mib"] > 50  # the model is really loaded
    chat = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
    # Started with a key of its own (0600 file, shown by `up` and `status`): a web page cannot use it.
    assert str(row["key_file"]) in up.stdout and oct(os.stat(row["key_file"]).st_mode & 0o777) == "0o600"
    page = httpx.post(f"{row['url']}/v1/chat/completions", timeout=120, json=chat,
                      headers={"Origin": "http://evil.example"})
    assert page.status_code == 401
    reply = httpx.post(f"{row['url']}/v1/chat/completions", timeout=120, json=chat, headers=key_header(row))
    assert reply.status_code == 200
    body = reply.json()
    assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0
    logs = llamactl("logs", name, "-n", "400").stdout
    assert "127.0.0.1" in logs and str(row["port"]) in logs  # the engine's own lines: where it listens
    down = llamactl("down", name)
    assert f"stopped {name}" in down.stdout
    assert not psutil.pid_exists(row["pid"]) or psutil.Process(row["pid"]).status() == psutil.STATUS_ZOMBIE
    assert json.loads(llamactl("status", "--json").stdout)["servers"] == []
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(row["port"]) in (p.info["cmdline"] or [])]
    assert leftovers == []


def key_header(row: dict) -> dict[str, str]:
    """The Authorization header for an engine `llamactl up` started (its key file, from `status --json`)."""
    return {"Authorization": f"Bearer {open(row['key_file']).read().strip()}"}


def _drafted_tokens(engine: str, url: str, log_path: str, headers: dict[str, str]) -> int:
    reply = httpx.post(f"{url}/completion", timeout=180, headers=headers, json={
        "prompt": CODE_PROMPT, "n_predict": 48, "temperature": 0, "cache_prompt": False})
    assert reply.status_code == 200
    timings = reply.json()["timings"]
    if "draft_n" in timings:
        return timings["draft_n"]
    # The pinned ik build reports acceptance only in its log, a line per request.
    deadline = time.monotonic() + 15
    while True:
        with open(log_path) as f:
            found = [a for a in map(parse_acceptance, f) if a is not None]
        if found or time.monotonic() > deadline:
            return sum(a.generated for a in found)
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_speculation_really_drafts(engine, kind, write_profile, gemma_path):
    if kind == "ngram":
        body = '[speculation]\ntype = "ngram-mod"'
    else:
        body = f'[speculation]\ntype = "draft"\ndraft_model = "{gemma_path}"\nn_max = 8'
    name = gemma_profile(write_profile, engine, gemma_path, f"spec-{kind}", "parallel = 1\n" + body)
    llamactl("up", name)
    try:
        [row] = json.loads(llamactl("status", "--json").stdout)["servers"]
        assert _drafted_tokens(engine, row["url"], row["log"], key_header(row)) > 0
    finally:
        llamactl("down", name)


def test_truncated_model_is_reported_as_unreadable(engine, write_profile, gemma_path, home):
    broken = home / "truncated.gguf"
    with open(gemma_path, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(16 * 2**20))  # header and tensor table intact, weights cut off
    name = gemma_profile(write_profile, engine, broken, "broken")
    done = llamactl("up", name, check=False)
    assert done.returncode == 4, done.stderr
    assert "model file unreadable" in done.stderr and "last log lines" in done.stderr
    assert json.loads(llamactl("status", "--json").stdout)["servers"] == []


def test_bad_flag_value_is_reported_as_bad_flag(write_profile, gemma_path, monkeypatch, home):
    monkeypatch.setenv("LLAMACTL_LLAMA_SERVER", str(require_engine("llama.cpp")))
    name = gemma_profile(write_profile, "llama.cpp", gemma_path, "badflag", 'extra_args = ["--numa", "bogus"]')
    done = llamactl("up", name, check=False)
    assert done.returncode == 4 and "bad flag" in done.stderr, done.stderr
    assert json.loads(llamactl("status", "--json").stdout)["servers"] == []


def test_a_port_taken_between_choosing_and_binding_is_retried(engine, write_profile, gemma_path, settings,
                                                               monkeypatch):
    """Another program binds the port llamactl chose before the engine does: the real engine fails to
    bind, the failure is read as "port in use", and the start is retried on a new port."""
    import socket

    from llamactl.profiles import load_profile
    from llamactl.supervisor import Supervisor, supervisor as supervisor_module

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_port = supervisor_module.free_port
    chosen = []

    def choose(host: str = "127.0.0.1") -> int:
        chosen.append(taken if not chosen else real_free_port(host))
        return chosen[-1]

    monkeypatch.setattr(supervisor_module, "free_port", choose)
    name = gemma_profile(write_profile, engine, gemma_path, "squatted")
    sup = Supervisor(settings)
    try:
        record = sup.start(load_profile(name, settings))
        assert len(chosen) == 2 and record.port == chosen[1] != taken
        assert httpx.get(f"{record.url}/health", timeout=10).status_code == 200
        logs = sorted(settings.log_dir.glob(f"{name}.log*"))
        assert any("bind" in p.read_text(errors="replace").lower() for p in logs)  # the first try's failure
    finally:
        sup.stop(name)
        squatter.close()


def test_the_bundled_demo_profile_answers_a_chat_completion(monkeypatch, home, gemma_path):
    """README's first command in small: `llamactl up demo`, then a chat completion. The demo model is a
    base model without a chat template; the profile's Q/A template makes chat work."""
    from llamactl.models import BUILTIN_MODELS

    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    target = home / "cache" / "models" / BUILTIN_MODELS["gemma3-270m"][2]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(gemma_path)
    llamactl("up", "demo")
    try:
        [row] = json.loads(llamactl("status", "--json").stdout)["servers"]
        reply = httpx.post(f"{row['url']}/v1/chat/completions", timeout=120, headers=key_header(row), json={
            "model": "demo", "max_tokens": 16, "temperature": 0, "stop": ["\n"],
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert reply.status_code == 200
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    finally:
        llamactl("down", "demo")
