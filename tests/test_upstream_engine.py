"""/upstream/PROFILE/... against the real llama-server: a HEAD is answered as soon as its headers are (not when
the engine's keep-alive runs out), an oversized request gets the engine's own 4xx (not a 502), a profile name
spelled with escapes reaches the path after it, and the engine's CORS headers (it echoes any Origin, with
credentials) never reach the client."""

from __future__ import annotations

import httpx
import pytest

from llamactl.daemon.wiring import build_router, load_profiles
from llamactl.router import create_app
from llamactl.settings import Settings
from tests.conftest import ENGINE_ENV, require_engine
from tests.fakes.fast_backend import ServerThread

pytestmark = pytest.mark.engine

CPU = 'gpus = []\nthreads = 2\nparallel = 1\nload_timeout_s = 180\nctx_size = 1024\n'
ENGINE_KEEP_ALIVE_S = 5  # cpp-httplib's default: a relay that waited for a HEAD body waited this long


@pytest.fixture
def url(monkeypatch, write_profile, gemma_path, home):
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    write_profile("gem", f'model = "{gemma_path}"\n' + CPU)
    settings = Settings()
    server = ServerThread(create_app(build_router(settings, load_profiles(settings, ["gem"]))))
    try:
        assert httpx.get(f"{server.url}/upstream/gem/health", timeout=200).status_code == 200  # loads it
        yield server.url
    finally:
        server.stop()


def test_upstream_head_large_headers_escaped_names_and_cors(url):
    # HEAD: the answer ends with its headers (a client timeout below the engine's keep-alive would expire).
    with httpx.Client(timeout=ENGINE_KEEP_ALIVE_S / 2) as client:
        for _ in range(3):  # and the next request on the pool still works
            head = client.head(f"{url}/upstream/gem/props")
            assert head.status_code == 200 and head.content == b""
            assert client.get(f"{url}/upstream/gem/props").json()["default_generation_settings"]

    # Many or large headers: the engine refuses them itself, and that answer is what the client gets.
    for headers in ({"x-big": "a" * 20000}, {f"x-h{i}": "v" * 100 for i in range(400)}):
        r = httpx.get(f"{url}/upstream/gem/props", headers=headers, timeout=30)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert httpx.get(f"{url}/upstream/gem/health", timeout=30).status_code == 200

    # An escaped profile name: the rest of the path is what reaches the engine.
    r = httpx.get(f"{url}/upstream/%67em/props", timeout=30)
    assert r.status_code == 200 and "default_generation_settings" in r.json()
    assert httpx.get(f"{url}/upstream/gem%2Fx/props", timeout=30).status_code in (400, 404)

    # The engine echoes the Origin with credentials; the router relays neither.
    r = httpx.get(f"{url}/upstream/gem/props", headers={"Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 200
    assert not [name for name in r.headers if name.lower().startswith("access-control-")], dict(r.headers)
    preflight = httpx.options(f"{url}/upstream/gem/props", timeout=30, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert not [name for name in preflight.headers if name.lower().startswith("access-control-")]
