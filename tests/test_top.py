"""`llamactl top` against `llamactl serve` as a real process (the fake engine: the data path is what is
tested): one picture with --once, and the live feed picking up a request made after it started."""

from __future__ import annotations

import threading
import time

import httpx
from click.testing import CliRunner
from rich.console import Console

from llamactl.cli import main
from llamactl.top import Feed, TopView, snapshot
from tests.test_service_daemon import FAST, Daemon

KEY = "top-test-key-0123456789abcdef"


def chat(url: str, text: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"model": "fake", "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text


def test_top_once_and_live_with_an_api_key(home, fake_profile, tmp_path, monkeypatch):
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    fake_profile("fake")
    daemon = Daemon(tmp_path, env={"LLAMACTL_API_KEYS": KEY, "LLAMACTL_MEMORY_SAMPLE_S": "0.3"})
    try:
        chat(daemon.url, "first")
        key_file = tmp_path / "key"
        key_file.write_text(f"# the key\n{KEY}\n")
        monkeypatch.delenv("LLAMACTL_API_KEYS", raising=False)
        result = CliRunner().invoke(main, ["top", "--once", "--url", daemon.url, "--key-file", str(key_file)],
                                    terminal_width=200)
        assert result.exit_code == 0, result.output
        out = result.output
        assert "fake" in out and "ready" in out and "host RAM" in out
        assert "recent requests" in out and "chat/completions" not in out  # the activity shows lanes, not paths

        refused = CliRunner().invoke(main, ["top", "--once", "--url", daemon.url])
        assert refused.exit_code != 0 and "needs an API key" in refused.output

        # Live: a request made after top started shows up from the event stream.
        feed = Feed(daemon.url, KEY)
        view = snapshot(feed, TopView())
        before = len(view.requests)
        stop = threading.Event()
        reader = threading.Thread(target=feed.follow, args=(stop,), daemon=True)
        reader.start()
        try:
            chat(daemon.url, "second")
            deadline = time.monotonic() + 20
            while True:
                event = feed.events.get(timeout=max(0.1, deadline - time.monotonic()))
                assert event is not None, "the event stream broke"
                view.apply(event)
                if event["type"] == "request":
                    break
            assert len(view.requests) == min(before + 1, view.requests.maxlen)
            console = Console(record=True, width=200)
            console.print(view.render())
            text = console.export_text()
            assert text.count("fake") >= 2 and "200" in text
        finally:
            stop.set()
    finally:
        daemon.stop()
