"""A page on another origin, in a real browser (Playwright driving Debian's chromium), against `llamactl serve`
as a real process with a real engine profile and no API keys (the default): it iframes /upstream/P/, loads
/props?model=P as an image, fetches and posts (no-cors, text/plain), submits a form to /llamactl/switch and
follows a link to /upstream/P/. No engine is started or switched, the page reads nothing, and only a link to
the dashboard's page opens."""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest

from tests.conftest import ENGINE_ENV, require_engine
from tests.test_dashboard_browser import CHROMIUM_ARGS, chromium_binary
from tests.test_service_daemon import Daemon

pytestmark = pytest.mark.engine

CPU = 'gpus = []\nthreads = 2\nparallel = 1\nload_timeout_s = 180\nctx_size = 1024\n'

PAGE = """<!doctype html><html><body>
<iframe id="framed" src="{d}/upstream/victim/"></iframe>
<img id="image" src="{d}/props?model=victim">
<iframe name="sink"></iframe>
<form id="form" method="POST" action="{d}/llamactl/switch" target="sink" enctype="text/plain">
  <input name='{{"group": "victims", "member": "victim", "x": "' value='"}}'></form>
<a id="link" href="{d}/upstream/victim/">engine</a>
<a id="dashboard" href="{d}/ui">dashboard</a>
<script>
window.results = {{}};
const note = (key, promise) => promise.then(v => results[key] = v, e => results[key] = "error: " + e.name);
note("status", fetch("{d}/llamactl/status").then(r => r.text()));
note("events", fetch("{d}/llamactl/events").then(r => r.text()));
note("load", fetch("{d}/llamactl/profiles/victim/load", {{method: "POST", mode: "no-cors"}}).then(r => r.type));
note("chat", fetch("{d}/v1/chat/completions", {{method: "POST", mode: "no-cors",
     headers: {{"Content-Type": "text/plain"}},
     body: JSON.stringify({{model: "victim", messages: [{{role: "user", content: "hi"}}]}})}}).then(r => r.type));
</script></body></html>"""


@pytest.fixture
def daemon(home, write_profile, gemma_path, tmp_path, monkeypatch):
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    write_profile("victim", f'model = "{gemma_path}"\ngroup = "victims"\n' + CPU)
    write_profile("victim-ngram", f'model = "{gemma_path}"\ngroup = "victims"\n' + CPU +
                  '[speculation]\ntype = "ngram-mod"\n')
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def foreign_site(daemon):
    """The attacker's page, served from another origin on loopback (localhost: another site than 127.0.0.1)."""
    page = PAGE.format(d=daemon.url).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_foreign_page_starts_nothing_and_reads_nothing(daemon, foreign_site, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium_binary(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(foreign_site)
            page.wait_for_function("() => ['status', 'events', 'load', 'chat'].every(k => k in window.results)")
            results = page.evaluate("window.results")
            assert results["status"].startswith("error") and results["events"].startswith("error"), results
            assert results["load"] == "opaque" and results["chat"] == "opaque"  # sent, unreadable, refused
            with page.expect_event("framenavigated", predicate=lambda frame: frame.name == "sink"):
                page.evaluate("document.getElementById('form').submit()")  # into the hidden frame
            with page.expect_navigation() as followed:
                page.click("#link")
            assert followed.value.status == 403
            page.goto(foreign_site)
            with page.expect_navigation() as opened:
                page.click("#dashboard")
            assert opened.value.status == 200  # the dashboard's page itself may be linked to
        finally:
            context.close()

    status = httpx.get(f"{daemon.url}/llamactl/status", timeout=10).json()
    lane = next(entry for entry in status["lanes"] if entry["lane"] == "victims")
    assert lane["loaded"] == [] and lane["loading"] == [] and lane["forced"] is None, lane
    assert not [line for line in daemon.lines if "victim" in line and ("start" in line or "load" in line)
                and "serving" not in line], daemon.lines[-20:]
