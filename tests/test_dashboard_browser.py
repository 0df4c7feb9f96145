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
    # An acceptance alert on any request that drafts and has a draft rejected (threshold 1.0, 1 token).
    d = Daemon(tmp_path, env={"LLAMACTL_API_KEYS": KEY, "LLAMACTL_MEMORY_SAMPLE_S": "0.5",
                              "LLAMACTL_ALERT_ACCEPTANCE_BELOW": "1.0", "LLAMACTL_ALERT_MIN_DRAFTED": "1"})
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


REPEATED = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
            "def mul(a, b):\n    return a * b\n\nHere it is again:\n")


def chat(url: str, text: str, model: str = "ui", max_tokens: int = 16) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=180,
                          json={"model": model, "messages": [{"role": "user", "content": text}],
                                "max_tokens": max_tokens, "temperature": 0})
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
    # The prompt cache says, for the member that started, whether it persists and why (a sliding-window model: off).
    page.wait_for_selector("#prompt-cache [data-prompt-cache]")
    assert "off (off by default: a sliding-window model" in page.inner_text("#prompt-cache")

    # Drafting with a rejected draft raises the acceptance alert: on the page and in sd_notify's STATUS.
    answer = chat(daemon.url, REPEATED, model="ui-spec", max_tokens=48)
    timings = answer.get("timings", {})
    assert timings.get("draft_n", 0) > timings.get("draft_n_accepted", 0), f"no rejected draft: {timings}"
    page.wait_for_selector("#alerts .alert")
    assert "ui / code" in page.inner_text("#alerts")
    daemon.wait_notify(r"STATUS=alert: acceptance")

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

    page.fill("#log-filter", "print_timing")  # the filter (and no machine paths from the load lines in the picture)
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('print_timing')")
    assert "load_model" not in page.inner_text("#log")

    # The picture in the README: refreshed with UPDATE_SCREENSHOT=1 (a test run leaves docs/ alone).
    shot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # The plan of a profile against the memory free now.
    page.select_option("#plan-profile", "ui-plain")
    page.click("#plan-run")
    page.wait_for_function("() => /ui-plain/.test(document.querySelector('#plan').textContent) && "
                           "!/planning/.test(document.querySelector('#plan').textContent)")
