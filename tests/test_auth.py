"""API keys: loading, constant-time check, the ASGI middleware in front of the real router app (over
loopback HTTP), body limits, the bind refusal, and a real llama-server child that answers 401 without
its per-start key."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import psutil
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from llamactl.daemon import auth
from llamactl.errors import ConfigError
from llamactl.profiles import load_profile
from llamactl.router import Router, RouterConfig, create_app
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor
from tests.conftest import ENGINE_ENV, require_engine
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import fake_backends, profile

KEY = "k" * 20
OTHER = "o" * 24


# ------------------------------------------------------------------------------------------- keys


def test_keys_from_env_and_file(settings: Settings, tmp_path: Path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# the team\n{OTHER}\n\n{KEY}  # duplicate of the env one\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("LLAMACTL_API_KEYS", f" {KEY} ,, ")
    monkeypatch.setenv("LLAMACTL_API_KEY_FILE", str(key_file))
    assert auth.load_keys(Settings()) == (KEY, OTHER)
    assert auth.load_keys(settings) == ()


def test_a_key_file_others_can_read_is_refused(tmp_path: Path, monkeypatch, settings):
    key_file = tmp_path / "keys"
    key_file.write_text(KEY)
    key_file.chmod(0o644)
    monkeypatch.setenv("LLAMACTL_API_KEY_FILE", str(key_file))
    with pytest.raises(ConfigError, match="readable by others") as e:
        auth.load_keys(Settings())
    assert e.value.hint == f"chmod 600 {key_file}"
    monkeypatch.setenv("LLAMACTL_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        auth.load_keys(Settings())


def test_short_keys_are_refused(monkeypatch, settings):
    monkeypatch.setenv("LLAMACTL_API_KEYS", "hunter2")
    with pytest.raises(ConfigError, match="shorter than 16"):
        auth.load_keys(Settings())


def test_presented_key_and_check():
    assert auth.presented_key({"Authorization": f"Bearer {KEY}"}) == KEY
    assert auth.presented_key({"authorization": f"bearer  {KEY} "}) == KEY
    assert auth.presented_key({"X-Api-Key": KEY}) == KEY
    assert auth.presented_key([(b"x-api-key", KEY.encode())]) == KEY
    assert auth.presented_key({"Authorization": f"Basic {KEY}"}) is None
    assert auth.presented_key({"Authorization": "Bearer "}) is None
    assert auth.key_ok(KEY, [OTHER, KEY])
    assert not auth.key_ok(KEY[:-1], [KEY])
    assert not auth.key_ok(None, [KEY])
    assert not auth.key_ok(KEY, [])


def test_child_keys_are_fresh_and_long():
    keys = {auth.new_child_key() for _ in range(100)}
    assert len(keys) == 100 and all(len(k) >= 32 for k in keys)


def test_check_bind():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        auth.check_bind(host, [], allow_insecure=False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "myhost.lan"):
        with pytest.raises(ConfigError, match=f"refusing to serve on {host} without API keys"):
            auth.check_bind(host, [], allow_insecure=False)
        auth.check_bind(host, [KEY], allow_insecure=False)
        auth.check_bind(host, [], allow_insecure=True)


# ------------------------------------------------------------------------------------ middleware


def echo_app(*middleware: Middleware) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"bytes": len(body)})

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"]),
                             Route("/health", health)], middleware=list(middleware))


def test_middleware_401_in_openai_shape_and_health_open():
    client = TestClient(echo_app(Middleware(auth.ApiKeyMiddleware, keys=[KEY])))
    assert client.get("/health").status_code == 200
    r = client.post("/v1/chat/completions", json={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert "Missing API key" in error["message"]
    r = client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer wrong-key-wrong-key"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."
    assert client.post("/v1/chat/completions", json={}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.post("/v1/chat/completions", json={}, headers={"X-Api-Key": KEY}).status_code == 200


def test_body_limit_by_length_and_by_counting():
    client = TestClient(echo_app(Middleware(auth.BodyLimitMiddleware, max_bytes=1000)))
    assert client.post("/v1/chat/completions", content=b"x" * 1000).json() == {"bytes": 1000}
    r = client.post("/v1/chat/completions", content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b"y" * 100

    assert client.post("/v1/chat/completions", content=chunks()).status_code == 413
    assert client.post("/v1/chat/completions", content=b"x" * 10,
                       headers={"content-length": "abc"}).status_code in (400, 413)


def test_router_app_behind_the_middleware_over_http(settings: Settings, monkeypatch):
    """The real router app, real uvicorn on loopback, `auth.middleware(settings)` as service.py would pass it."""
    monkeypatch.setenv("LLAMACTL_API_KEYS", KEY)
    monkeypatch.setenv("LLAMACTL_MAX_BODY_BYTES", "4096")
    profiles = [profile("solo")]
    backends = fake_backends(profiles)
    router = Router(profiles, backends, RouterConfig())
    server = ServerThread(create_app(router, middleware=auth.middleware(Settings())))
    try:
        url = server.url
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/llamactl/status").status_code == 401
        r = httpx.post(f"{url}/v1/completions", json={"model": "solo", "prompt": "x"}, timeout=30,
                       headers={"X-Api-Key": "nope-nope-nope-nope"})
        assert r.status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json={"model": "solo", "prompt": "x"}, timeout=30,
                        headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text
        big = httpx.post(f"{url}/v1/completions", json={"model": "solo", "prompt": "x" * 5000}, timeout=30,
                         headers={"Authorization": f"Bearer {KEY}"})
        assert big.status_code == 413
        unauth_big = httpx.post(f"{url}/v1/completions", content=b"x" * 5000, timeout=30)
        assert unauth_big.status_code == 401  # keys are checked before any body is read
    finally:
        server.stop()
        backends.close()


# ------------------------------------------------------------------------- real llama-server child


@pytest.mark.engine
@pytest.mark.parametrize("engine", ["llama.cpp", "ik_llama.cpp"])
def test_real_child_refuses_requests_without_its_key(settings: Settings, monkeypatch, write_profile, gemma_path,
                                                     engine):
    monkeypatch.setenv(ENGINE_ENV[engine], str(require_engine(engine)))
    write_profile("keyed", f'engine = "{engine}"\nmodel = "{gemma_path}"\nctx_size = 512\ngpus = []\n'
                           'threads = 2\nparallel = 1\nload_timeout_s = 180\n')
    settings = Settings()
    supervisor = Supervisor(settings)
    key = auth.new_child_key()
    record = supervisor.start(load_profile("keyed", settings), api_key=key)
    try:
        url = record.url
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # open, as documented
        def chat(**headers):
            return httpx.post(f"{url}/v1/chat/completions", timeout=60, headers=headers, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code

        assert chat() == 401
        assert chat(Authorization=f"Bearer {auth.new_child_key()}") == 401
        assert chat(Authorization=f"Bearer {key}") == 200
        # the key travels in a 0600 file, never in argv (/proc/PID/cmdline is world-readable)
        assert key not in " ".join(psutil.Process(record.pid).cmdline())
        key_file = settings.state_dir / "keys" / "keyed.key"
        assert key_file.stat().st_mode & 0o077 == 0
    finally:
        supervisor.stop("keyed", 10)
