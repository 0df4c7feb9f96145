"""The real ik_llama.cpp and Gemma 3 270M (target and draft): a switch group of a drafting member and its plain
twin serves alternating code and creative phases from ONE engine process, drafting exactly for the requests the
policy gave the drafter (read from the engine's own per-request acceptance lines), never starting the twin."""

from __future__ import annotations

import httpx
import pytest

from llamactl.daemon.wiring import build_router, load_profiles
from llamactl.engines.logs import parse_acceptance
from llamactl.router import create_app
from llamactl.settings import Settings
from tests.conftest import ENGINE_ENV, require_engine
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import wait_for

pytestmark = pytest.mark.engine

CODE = "def add(a, b):\n    return a + b\n\n" * 3 + "def add(a, b):\n"
CREATIVE = "Write a short dreamy poem about the sea at night:\n"
PHASES = [("code", CODE, 0.0)] * 3 + [("creative", CREATIVE, 1.0)] * 3 + [("code", CODE, 0.0)] * 3


def acceptance_lines(log_path: str, start: int) -> list:
    with open(log_path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    return [a for line in text.splitlines() if (a := parse_acceptance(line)) is not None]


def log_end(log_path: str) -> int:
    with open(log_path, "rb") as f:
        return f.seek(0, 2)


def test_a_drafting_member_and_its_plain_twin_share_one_ik_engine(monkeypatch, write_profile, gemma_path, home):
    monkeypatch.setenv(ENGINE_ENV["ik_llama.cpp"], str(require_engine("ik_llama.cpp")))
    common = (f'engine = "ik_llama.cpp"\nmodel = "{gemma_path}"\nctx_size = 1024\ngpus = []\nthreads = 2\n'
              'load_timeout_s = 180\ngroup = "ik"\n')
    write_profile("ik-spec", common + f'parallel = 1\n[speculation]\ntype = "draft"\ndraft_model = "{gemma_path}"\n'
                  'n_max = 8\n')
    write_profile("ik-plain", common + "parallel = 2\n")
    settings = Settings()
    router = build_router(settings, load_profiles(settings, ["ik-spec"]))
    supervisor = router.backends.supervisor
    server = ServerThread(create_app(router))
    lane = router.lanes["ik"]
    try:
        # The first use of the group asks the engine self-test (in a thread); until it answers, per process.
        r = httpx.post(f"{server.url}/llamactl/switch", json={"group": "ik", "member": "ik-spec"}, timeout=300)
        assert r.status_code == 200
        wait_for(lambda: lane.hosts == {"ik-plain": "ik-spec"}, timeout_s=300, what="the per-request self-test")
        assert httpx.post(f"{server.url}/llamactl/switch", json={"group": "ik", "member": "auto"}).status_code == 200
        engine = supervisor.running("ik-spec")
        log_path = lane.upstreams["ik-spec"].log_path
        seen, lines = [], []
        for cls, prompt, temperature in PHASES:
            start = log_end(log_path)
            r = httpx.post(f"{server.url}/completion", timeout=300, headers={"x-llamactl-class": cls}, json={
                "model": "ik", "prompt": prompt, "n_predict": 8, "temperature": temperature, "cache_prompt": False})
            assert r.status_code == 200, r.text
            assert r.headers["x-llamactl-process"] == "ik-spec"
            member, drafting = r.headers["x-llamactl-profile"], r.headers["x-llamactl-drafting"]
            assert (drafting == "on") == (member == "ik-spec"), (cls, member, drafting)
            if drafting == "on":  # its line comes as the request ends (at times just after the response)
                wait_for(lambda: acceptance_lines(log_path, start), timeout_s=30, what="the acceptance line")
            seen.append((cls, member, drafting))
            lines.append(acceptance_lines(log_path, start))
            assert supervisor.running("ik-plain") is None  # the twin never got a process of its own
        # One slot: a request's line is written before the next request runs, so each drafting request has
        # exactly its own line, and a request with drafting off has none (its line would show in the next one's)
        assert [len(found) for found in lines] == [int(d == "on") for _, _, d in seen], (seen, lines)
        assert all(a.generated > 0 for found in lines for a in found)
        assert {member for _, member, _ in seen} == {"ik-spec", "ik-plain"}, seen  # the policy chose both
        assert supervisor.running("ik-spec").pid == engine.pid  # one process throughout, never reloaded
        metrics = httpx.get(f"{server.url}/metrics").text
        off = [line for line in metrics.splitlines() if line.startswith("llamactl_request_choices_total{")
               and 'drafting="off"' in line and 'process="ik-spec"' in line and 'profile="ik-plain"' in line]
        assert off and float(off[0].split()[-1]) == sum(1 for _, m, _ in seen if m == "ik-plain")
        status = next(entry for entry in httpx.get(f"{server.url}/llamactl/status").json()["lanes"]
                      if entry["lane"] == "ik")
        assert status["per_request"] == {"ik-plain": "ik-spec"} and status["loaded"] == ["ik-spec"]
    finally:
        server.stop()
    assert supervisor.running("ik-spec") is None
