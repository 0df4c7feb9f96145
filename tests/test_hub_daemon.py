"""`llamactl serve` fetches an `hf:` model itself on the first request, showing the download where it shows a
load (status, the event stream), before the box plans the engine's memory."""

from __future__ import annotations

import json
import threading
import time

import httpx
from click.testing import CliRunner

from llamactl.cli import main
from tests.conftest import FAKE_SERVER
from tests.test_hub_pull import REPO, cache, hub  # noqa: F401 - the stand-in fixture
from tests.test_service_daemon import Daemon, own_home  # noqa: F401 - fixtures


def test_the_daemon_downloads_a_missing_model_on_demand_and_shows_it(hub, own_home, write_profile, tmp_path):  # noqa: F811
    write_profile("tiny", f"""
        binary = "{FAKE_SERVER}"
        model = "hf:{REPO}:Q4_K_M"
        load_timeout_s = 20
    """)
    gate = hub.gates["tiny-Q4_K_M.gguf"] = threading.Event()
    daemon = Daemon(tmp_path, "--profile", "tiny")
    answers: list[httpx.Response] = []
    try:
        asking = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{daemon.url}/v1/chat/completions", timeout=60,
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})))
        asking.start()
        deadline, shown = time.monotonic() + 30, None
        while shown is None and time.monotonic() < deadline:  # polls the daemon's answer, not a timer
            status = json.loads(CliRunner().invoke(main, ["status", "--json"]).output)
            shown = (status.get("engines") or {}).get("tiny", {}).get("downloading")
        assert shown and f"downloading hf:{REPO}:Q4_K_M (tiny-Q4_K_M.gguf)" in shown
        assert "starting  downloading" in CliRunner().invoke(main, ["status"]).output
        gate.set()
        asking.join(60)
        assert answers and answers[0].status_code == 200, answers and answers[0].text
        assert list(cache(tmp_path).glob("models--*/snapshots/*/tiny-Q4_K_M.gguf"))
        assert [r.path.rsplit("/", 1)[1] for r in hub.downloads()] == ["tiny-Q4_K_M.gguf"]
    finally:
        gate.set()
        daemon.stop()
