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
    app.state.backends = backends  # what the tests check was started (nothing, for a foreign page)
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
            wanted = "multipart/form-data" if path.endswith("/transcriptions") else "application/json"
            assert wanted in r.json()["error"]["message"]


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
    # A link followed from another site may open the dashboard's page, and nothing else.
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert httpx.get(f"{url}/ui", headers=link).status_code == 200
    assert httpx.get(f"{url}/llamactl/status", headers=link).status_code == 403


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


# What a page on another site makes its browser send: a link, a form, an iframe, an image, a script, a fetch.
FOREIGN_BROWSER_REQUESTS = [
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"},
    {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"},
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"},
    {"Referer": "http://evil.example/page.html"},  # a browser without Fetch Metadata
]


def test_no_route_but_the_page_answers_a_request_from_another_site(served):
    """The issue's instances: an iframe of /upstream/P/ or a link to /props?model=P loaded P; the event stream
    answered a navigation. Every route (and one added later), every kind of request a foreign page can make."""
    url, app = served
    routes = every_route(app) + [("GET", "/upstream/coding/"), ("GET", "/props?model=coding"),
                                 ("GET", "/llamactl/events"), ("GET", "/a/route/added/later")]
    for method, path in routes:
        for headers in FOREIGN_BROWSER_REQUESTS:
            if path.startswith("/ui") and headers.get("Sec-Fetch-Dest", "document") == "document" and method == "GET":
                continue  # the page itself (below)
            r = httpx.request(method, url + path.replace("{profile}", "coding").replace("{action}", "load")
                              .replace("{file}", "app.js"), headers=headers, json={"model": "coding"}, timeout=10)
            assert r.status_code == 403, (method, path, headers, r.status_code)
            assert "another site" in r.json()["error"]["message"]
    assert app.state.backends.events == []  # nothing was started
    for page in ("/ui", "/ui/", "/ui/index.html"):
        assert httpx.get(url + page, headers=FOREIGN_BROWSER_REQUESTS[0]).status_code == 200
        assert httpx.get(url + page, headers=FOREIGN_BROWSER_REQUESTS[1]).status_code == 403  # not framed


def test_text_plain_to_the_audio_route_is_told_it_takes_multipart(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/audio/transcriptions", content=b"model=coding", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    message = r.json()["error"]["message"]
    assert "multipart/form-data" in message and "JSON" not in message
