"""The /ui dashboard in a real browser: Playwright driving Debian's chromium (headless, no network) against
`llamactl serve` as a real process with the real engine and Gemma 3 270M in a switch group of two members.

With API keys set, the page without a key shows only the login; with the key: the group appears, a chat
request appears in the activity table with its tok/s, forcing the other member from the page changes the
active member, the log tail shows new lines, device memory is drawn. A screenshot goes to docs/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import ENGINE_ENV, require_engine
from tests.test_service_daemon import Daemon

pytestmark = pytest.mark.engine

KEY = "dashboard-test-key-0123456789"
CPU = 'gpus = []\nthreads = 2\nparallel = 1\nload_timeout_s = 180\nctx_size = 1024\n'
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UPDATE_SCREENSHOT = os.environ.get("UPDATE_SCREENSHOT") == "1"  # read before the fixtures clean the environment
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Debian's chromium is not installed: `apt-get install chromium` (scripts/test does it as root)")
    return found


@pytest.fixture
def daemon(home, write_profile, gemma_path, tmp_path, monkeypatch):
    monkeypatch.setenv(ENGINE_ENV["llama.cpp"], str(require_engine("llama.cpp")))
    write_profile("ui-plain", f'model = "{gemma_path}"\ngroup = "ui"\n' + CPU)
    write_profile("ui-spec", f'model = "{gemma_path}"\ngroup = "ui"\n' + CPU + '[speculation]\ntype = "ngram-mod"\n')
    d = Daemon(tmp_path, env={"LLAMACTL_API_KEYS": KEY, "LLAMACTL_MEMORY_SAMPLE_S": "0.5"})
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium_binary(), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1400})
        try:
            yield context.new_page()
        finally:
            context.close()


def chat(url: str, text: str) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=180,
                          json={"model": "ui", "messages": [{"role": "user", "content": text}], "max_tokens": 16})
    assert response.status_code == 200, response.text
    return response.json()


def test_dashboard_in_a_real_browser(daemon, page, tmp_path):
    page.set_default_timeout(60_000)
    # Without a key: the login, and nothing else.
    page.goto(f"{daemon.url}/ui")
    page.wait_for_selector("#login:not([hidden])")
    assert page.locator("[data-lane]").count() == 0
    assert page.locator("#app").is_hidden()
    assert "ui-plain" not in page.content()
    assert httpx.get(f"{daemon.url}/llamactl/events", timeout=5).status_code == 401

    # With the key (kept in sessionStorage, never in the URL).
    page.fill("#key", KEY)
    page.click("#login-form button")
    lane = page.wait_for_selector('[data-lane="ui"]')
    assert KEY not in page.url
    assert lane.query_selector('[data-member="ui-plain"]') and lane.query_selector('[data-member="ui-spec"]')
    page.wait_for_selector('#devices [data-device="host RAM"]')

    # A chat request appears in the activity table with its tok/s.
    chat(daemon.url, "Name a colour.")
    cell = page.wait_for_selector("#activity tbody tr td.tok-s:not(:empty)")
    assert float(cell.inner_text()) > 0

    # Forcing the member that does not serve now makes it the active one.
    active = page.inner_text('[data-lane="ui"] .active-member')
    other = "ui-plain" if active == "ui-spec" else "ui-spec"
    page.click(f'[data-lane="ui"] [data-member="{other}"] [data-action="force"]')
    page.wait_for_function(
        "m => document.querySelector('[data-lane=\"ui\"] .active-member').textContent === m", arg=other,
        timeout=180_000)

    # The log tail of that member shows new lines when it serves a request.
    page.select_option("#log-profile", other)
    page.wait_for_function("() => document.querySelector('#log').textContent.length > 0")
    before = len(page.inner_text("#log"))
    chat(daemon.url, "Name a fruit.")
    page.wait_for_function("n => document.querySelector('#log').textContent.length > n", arg=before)
    page.wait_for_selector(f'#activity tbody tr:nth-child(1) >> text="{other}"')

    # The picture in the README: refreshed with UPDATE_SCREENSHOT=1 (a test run leaves docs/ alone).
    shot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
