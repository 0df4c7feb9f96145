"""A web page must not drive a local llamactl: every route of the real router app, behind the middleware
`llamactl serve` uses, over real loopback HTTP, refuses a foreign Host (DNS rebinding), a foreign Origin
(CSRF, reading answers) and a non-JSON body (a `text/plain` simple request); same-origin pages, configured
origins and ordinary clients still work."""

from __future__ import annotations

import httpx
import pytest
from starlette.routing import Route

from llamactl.daemon import auth
from llamactl.daemon.web_guard import WebGuardMiddleware, split_host, split_origin
from llamactl.router import Router, RouterConfig, create_app
from llamactl.settings import Settings
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import fake_backends, group_profiles

EVIL = "http://evil.example"


@pytest.fixture
def served(settings: Settings, monkeypatch):
    monkeypatch.setenv("LLAMACTL_ALLOWED_ORIGINS", "http://dashboard.test:3000")
    monkeypatch.setenv("LLAMACTL_ALLOWED_HOSTS", "llm.lan")
    profiles = group_profiles("coding")
    backends = fake_backends(profiles)
    app = create_app(Router(profiles, backends, RouterConfig()), middleware=auth.middleware(Settings()))
    server = ServerThread(app)
    try:
        yield server.url, app
    finally:
        server.stop()
        backends.close()


def every_route(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app has, so a route added later is covered without editing this test."""
    out = []
    for route in app.routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    out.append((method, route.path))
    return out


def test_a_rebound_host_gets_421_on_every_route(served):
    url, app = served
    routes = every_route(app) + [("POST", "/a/route/added/later")]
    assert ("POST", "/llamactl/switch") in routes and ("POST", "/v1/chat/completions") in routes
    for method, path in routes:
        r = httpx.request(method, url + path, headers={"Host": "evil.example:8080"}, json={"model": "coding"})
        assert r.status_code == 421, (method, path, r.status_code)
        assert "LLAMACTL_ALLOWED_HOSTS" in r.json()["error"]["message"]


def test_a_foreign_origin_gets_403_on_every_route(served):
    url, app = served
    for method, path in every_route(app):
        r = httpx.request(method, url + path, headers={"Origin": EVIL}, json={"model": "coding"})
        assert r.status_code == 403, (method, path, r.status_code)
        assert "access-control-allow-origin" not in r.headers
    # The instance: a page pinning a switch group.
    r = httpx.post(f"{url}/llamactl/switch", headers={"Origin": EVIL}, json={"group": "coding", "member": "coding-plain"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.post(f"{url}/llamactl/switch", headers={"Origin": "null"}, json={"group": "coding", "member": "auto"})
    assert r.status_code == 403  # sandboxed iframes and file:// pages
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Sec-Fetch-Site": "cross-site"}, json={"model": "coding"})
    assert r.status_code == 403  # a browser that sent no Origin still says where the request comes from


def test_a_text_plain_body_is_not_parsed_as_json(served):
    url, app = served
    body = b'{"model": "coding", "messages": [{"role": "user", "content": "hi"}]}'
    for method, path in every_route(app):
        if method != "POST":
            continue
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": content_type} if content_type else {}
            r = httpx.post(url + path, content=body, headers=headers)
            assert r.status_code == 415, (path, content_type, r.status_code)
            assert "application/json" in r.json()["error"]["message"]


def test_same_origin_configured_origins_and_plain_clients_work(served):
    url, _ = served
    port = httpx.URL(url).port
    chat = {"model": "coding", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30).status_code == 200
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"llm.lan:{port}", "app.localhost"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host
    # The dashboard is served by the daemon itself: its requests carry the daemon's own origin.
    same = httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"Origin": f"http://127.0.0.1:{port}"},
                      timeout=30)
    assert same.status_code == 200
    allowed = "http://dashboard.test:3000"
    r = httpx.get(f"{url}/llamactl/status", headers={"Origin": allowed})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
    assert "access-control-allow-credentials" not in r.headers
    preflight = httpx.options(f"{url}/llamactl/switch", headers={
        "Origin": allowed, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == allowed
    evil_preflight = httpx.options(f"{url}/llamactl/switch", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert evil_preflight.status_code == 403
    # A link followed from another site is a navigation: it cannot read the answer, and it is not refused.
    nav = httpx.get(f"{url}/llamactl/status", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert nav.status_code == 200


def test_keys_are_still_checked_first(settings: Settings, monkeypatch):
    monkeypatch.setenv("LLAMACTL_API_KEYS", "k" * 20)
    profiles = group_profiles("coding")
    backends = fake_backends(profiles)
    server = ServerThread(create_app(Router(profiles, backends, RouterConfig()), middleware=auth.middleware(Settings())))
    try:
        r = httpx.post(f"{server.url}/llamactl/switch", headers={"Origin": EVIL}, content=b"{}")
        assert r.status_code == 401
        r = httpx.post(f"{server.url}/llamactl/switch", headers={"Origin": EVIL, "Authorization": "Bearer " + "k" * 20},
                       json={"group": "coding", "member": "auto"})
        assert r.status_code == 403  # a key does not make a foreign page's request acceptable
    finally:
        server.stop()
        backends.close()


def test_bound_address_is_allowed_and_wildcard_means_the_machine_s_addresses():
    guard = WebGuardMiddleware(None, bound_host="192.0.2.7")
    assert guard.host_allowed("192.0.2.7") and guard.host_allowed("localhost") and guard.host_allowed("127.0.0.2")
    assert not guard.host_allowed("192.0.2.8") and not guard.host_allowed("evil.example")
    anywhere = WebGuardMiddleware(None, bound_host="0.0.0.0")
    assert anywhere.host_allowed("127.0.0.1") and not anywhere.host_allowed("evil.example")
    assert not anywhere.host_allowed("203.0.113.99")


def test_host_and_origin_parsing():
    assert split_host("Example.COM.:8080") == ("example.com", 8080)
    assert split_host("[::1]:80") == ("::1", 80)
    assert split_host("[::1]") == ("::1", None)
    assert split_host("h:notaport") == ("h", -1)
    assert split_origin("http://127.0.0.1:8080") == ("http", "127.0.0.1", 8080)
    assert split_origin("https://x.test") == ("https", "x.test", 443)
    assert split_origin("null") is None and split_origin("ftp://x") is None and split_origin("http://a/b") is None
