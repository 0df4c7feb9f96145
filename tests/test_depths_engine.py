"""The real ik_llama.cpp and Gemma 3 270M (target and draft): a drafting member with `[speculation] depths` is
served at each depth by its ONE engine, the depth sent per request. Judged from the engine's own acceptance line
per request: at depth 2 it never drafts more than 2 tokens per verification step, at depth 8 it drafts more."""

from __future__ import annotations

import json

import httpx
import pytest

from llamactl.daemon.wiring import build_router, load_profiles
from llamactl.settings import Settings
from llamactl.router import create_app
from tests.conftest import ENGINE_ENV, require_engine
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import wait_for
from tests.test_per_request_engine import CODE, acceptance_lines, log_end

pytestmark = pytest.mark.engine
N_PREDICT = 48


def test_a_member_with_depths_drafts_at_the_depth_chosen_per_request(monkeypatch, write_profile, gemma_path, home):
    monkeypatch.setenv(ENGINE_ENV["ik_llama.cpp"], str(require_engine("ik_llama.cpp")))
    common = (f'engine = "ik_llama.cpp"\nmodel = "{gemma_path}"\nctx_size = 1024\ngpus = []\nthreads = 2\n'
              'load_timeout_s = 180\ngroup = "ik"\n')
    # p_min 0: the engine drafts as deep as it is allowed (the draft model's confidence does not cut a draft short)
    write_profile("ik-spec", common + f'parallel = 1\n[speculation]\ntype = "draft"\ndraft_model = "{gemma_path}"\n'
                  'depths = [2, 8]\np_min = 0.0\n')
    write_profile("ik-plain", common + "parallel = 1\n")
    settings = Settings()
    router = build_router(settings, load_profiles(settings, ["ik-spec"]))
    supervisor = router.backends.supervisor
    server = ServerThread(create_app(router))
    lane = router.lanes["ik"]
    try:
        # A client naming MEMBER@DEPTH first of all, before the engine self-test has answered: the request waits for
        # its verdict (not a 400 saying depths are not chosen per request), then drafts at that depth
        first = httpx.post(f"{server.url}/completion", timeout=400, headers={"x-llamactl-class": "code"}, json={
            "model": "ik-spec@8", "prompt": CODE, "n_predict": 8, "temperature": 0, "cache_prompt": False})
        assert first.status_code == 200, first.text
        assert (first.headers["x-llamactl-drafting"], first.headers["x-llamactl-depth"]) == ("on", "8")
        bad = httpx.post(f"{server.url}/llamactl/switch", json={"group": "ik", "member": "ik-spec@4"}, timeout=30)
        assert bad.status_code == 400 and "its depths: 2, 8" in bad.json()["error"]["message"]
        # The first switch to a depth waits for the engine self-test (a thread; cached per binary).
        r = httpx.post(f"{server.url}/llamactl/switch", json={"group": "ik", "member": "ik-spec@2"}, timeout=400)
        assert r.status_code == 200, r.text
        assert r.json()["depths"] == {"ik-spec": [2, 8]} and r.json()["active"] == "ik-spec@2"
        engine = supervisor.running("ik-spec")
        log_path = lane.upstreams["ik-spec"].log_path
        per_step = {}
        for depth in (2, 8, 2):
            if lane.forced != f"ik-spec@{depth}":
                r = httpx.post(f"{server.url}/llamactl/switch", json={"group": "ik", "member": f"ik-spec@{depth}"},
                               timeout=60)
                assert r.status_code == 200 and r.json()["active"] == f"ik-spec@{depth}", r.text
            start = log_end(log_path)
            r = httpx.post(f"{server.url}/completion", timeout=300, headers={"x-llamactl-class": "code"}, json={
                "model": "ik", "prompt": CODE, "n_predict": N_PREDICT, "temperature": 0, "cache_prompt": False})
            assert r.status_code == 200, r.text
            assert (r.headers["x-llamactl-profile"], r.headers["x-llamactl-process"], r.headers["x-llamactl-drafting"],
                    r.headers["x-llamactl-depth"]) == ("ik-spec", "ik-spec", "on", str(depth))
            wait_for(lambda: acceptance_lines(log_path, start), timeout_s=30, what="the acceptance line")
            [line] = acceptance_lines(log_path, start)
            produced = r.json()["timings"]["predicted_n"]
            # Each verification step yields its accepted drafts and one token of the target's own: the steps are
            # at least the tokens produced less those accepted, and a step drafts at most the depth.
            steps = produced - line.accepted
            assert steps > 0 and line.generated > 0, (depth, produced, line)
            per_step.setdefault(depth, []).append(line.generated / steps)
        assert all(ratio <= 2.0 for ratio in per_step[2]), per_step  # never deeper than 2
        assert min(per_step[8]) > 2.0, per_step  # deeper than depth 2 could ever draft: the depth was honoured
        assert supervisor.running("ik-spec").pid == engine.pid  # one process throughout
        assert supervisor.running("ik-plain") is None
        metrics = httpx.get(f"{server.url}/metrics").text
        chosen: dict[str, float] = {}  # depth -> requests (over every reason: forced, pinned)
        for line in metrics.splitlines():
            if line.startswith("llamactl_request_choices_total{") and 'profile="ik-spec"' in line:
                depth = line.split('depth="')[1].split('"')[0]
                chosen[depth] = chosen.get(depth, 0.0) + float(line.split()[-1])
        assert chosen == {"2": 2.0, "8": 2.0}, chosen  # the pinned first request at 8 among them
        rolling = [line for line in metrics.splitlines() if line.startswith("llamactl_rolling_tokens_per_second{")]
        assert any('profile="ik-spec@2"' in line for line in rolling)  # evidence per (depth choice, class)
        # ... and whatever the group serves at (forced at 2 here)
        r = httpx.post(f"{server.url}/completion", timeout=300, headers={"x-llamactl-class": "code"}, json={
            "model": "ik-spec@8", "prompt": CODE, "n_predict": 8, "temperature": 0, "cache_prompt": False})
        assert r.status_code == 200, r.text
        assert (r.headers["x-llamactl-drafting"], r.headers["x-llamactl-depth"]) == ("on", "8")
        props = httpx.get(f"{server.url}/props", params={"model": "ik-spec@8"}, timeout=30)  # the member's engine
        assert props.status_code == 200 and "ik-spec" in json.dumps(props.json()), props.text
        assert supervisor.running("ik-spec").pid == engine.pid
    finally:
        server.stop()
    assert supervisor.running("ik-spec") is None
