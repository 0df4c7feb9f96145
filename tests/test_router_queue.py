"""The lane queue: slots, FIFO, 429 + Retry-After, swap on demand, idle TTL, switches that lose nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from llamactl.router.policy import PolicyConfig
from llamactl.router import LaneConfig, RouterConfig
from tests.router_harness import fake_backends, group_profiles, lane_status, profile, served, wait_for


def post(url: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def test_concurrency_is_the_profile_slots():
    profiles = [profile("solo", parallel=2)]
    backends = fake_backends(profiles)
    backend = backends.backends["solo"]
    with served(profiles, backends) as (url, _):
        backend.gate.clear()
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, url, {"model": "solo", "prompt": "x", "fake": {"hold": True}})
                       for _ in range(6)]
            wait_for(lambda: lane_status(url, "solo")["queue_depth"] == 4, what="4 queued behind 2 slots")
            assert lane_status(url, "solo")["in_flight"] == 2
            backend.gate.set()
            assert [f.result().status_code for f in futures] == [200] * 6
        assert backend.counters.max_concurrent == 2


def test_queue_is_fifo():
    profiles = [profile("solo", parallel=1)]
    backends = fake_backends(profiles)
    backend = backends.backends["solo"]
    with served(profiles, backends) as (url, _):
        backend.gate.clear()
        with ThreadPoolExecutor(6) as pool:
            futures = []
            for i in range(5):  # one at a time, so the arrival order is known
                futures.append(pool.submit(post, url, {"model": "solo", "prompt": "x", "temperature": float(i),
                                                       "fake": {"hold": True}}))
                wait_for(lambda: lane_status(url, "solo")["queue_depth"] == i, what=f"request {i} queued")
            backend.gate.set()
            assert [f.result().status_code for f in futures] == [200] * 5
        assert backend.counters.temperatures == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_full_queue_gets_429_with_retry_after():
    profiles = [profile("solo", parallel=1)]
    backends = fake_backends(profiles)
    backend = backends.backends["solo"]
    config = RouterConfig(lane=LaneConfig(max_queue=2))
    with served(profiles, backends, config) as (url, _):
        backend.gate.clear()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, url, {"model": "solo", "prompt": "x", "fake": {"hold": True}})]
            wait_for(lambda: lane_status(url, "solo")["in_flight"] == 1, what="slot taken")
            futures += [pool.submit(post, url, {"model": "solo", "prompt": "x", "fake": {"hold": True}})
                        for _ in range(2)]
            wait_for(lambda: lane_status(url, "solo")["queue_depth"] == 2, what="queue full")
            r = post(url, {"model": "solo", "prompt": "overflow"})
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["source"] == "llamactl"
            backend.gate.set()
            assert [f.result().status_code for f in futures] == [200, 200, 200]
        assert 'llamactl_rejected_requests_total{lane="solo",reason="queue_full"} 1.0' in httpx.get(f"{url}/metrics").text


def test_queue_timeout_is_a_clear_503():
    profiles = [profile("solo", parallel=1)]
    backends = fake_backends(profiles)
    backend = backends.backends["solo"]
    config = RouterConfig(lane=LaneConfig(queue_timeout_s=0.3))
    with served(profiles, backends, config) as (url, _):
        backend.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(post, url, {"model": "solo", "prompt": "x", "fake": {"hold": True}})
            wait_for(lambda: lane_status(url, "solo")["in_flight"] == 1, what="slot taken")
            r = post(url, {"model": "solo", "prompt": "late"})
            backend.gate.set()
            assert held.result().status_code == 200
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_timeout"
        assert "in the queue of 'solo'" in r.json()["error"]["message"]


def test_swap_on_demand_and_idle_ttl_unload():
    profiles = [profile("a"), profile("b")]
    backends = fake_backends(profiles)
    config = RouterConfig(lane=LaneConfig(idle_ttl_s=0.2))
    with served(profiles, backends, config) as (url, _):
        assert backends.servers == {}
        assert post(url, {"model": "a", "prompt": "x"}).status_code == 200
        assert ("start", "a") in backends.events
        wait_for(lambda: ("stop", "a") in backends.events, what="idle unload of a")
        assert lane_status(url, "a")["state"] == "unloaded"
        assert post(url, {"model": "a", "prompt": "x"}).status_code == 200  # loads again on demand
        assert backends.events.count(("start", "a")) == 2
        assert ("start", "b") not in backends.events


def test_forced_switch_mid_burst_loses_no_request():
    """A queued burst on the speculative member; `llamactl switch` to plain in the middle: every request
    is answered, the ones after the switch by the plain member, and only one member ran at a time."""
    profiles = group_profiles("coding", parallel=1)
    backends = fake_backends(profiles)
    spec_backend = backends.backends["coding-spec"]
    with served(profiles, backends) as (url, _):
        assert httpx.post(f"{url}/llamactl/switch", json={"group": "coding", "member": "coding-spec"}).status_code == 200
        spec_backend.gate.clear()
        body = {"model": "coding", "prompt": "def f():\n    return 1\n", "temperature": 0, "fake": {"hold": True}}
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(post, url, body) for _ in range(10)]
            wait_for(lambda: lane_status(url, "coding")["queue_depth"] == 9, what="burst queued")
            switch = pool.submit(httpx.post, f"{url}/llamactl/switch",
                                 json={"group": "coding", "member": "coding-plain"}, timeout=30)
            wait_for(lambda: lane_status(url, "coding")["state"] == "draining", what="draining")
            spec_backend.gate.set()
            responses = [f.result() for f in futures]
            assert switch.result().status_code == 200
        assert [r.status_code for r in responses] == [200] * 10
        served_by = [r.headers["x-llamactl-profile"] for r in responses]
        assert served_by.count("coding-spec") == 1 and served_by.count("coding-plain") == 9
        assert backends.events[-2:] == [("stop", "coding-spec"), ("start", "coding-plain")]
        assert backends.max_running == 1
        status = lane_status(url, "coding")
        assert status["active"] == "coding-plain" and status["forced"] == "coding-plain"
        assert status["recent_switches"][-1]["trigger"] == "forced"


def test_policy_follows_the_workload_phases():
    """Greedy code bursts go to the speculative member, creative bursts to the plain one. Each burst is
    queued behind one held request first, so the policy sees the whole burst (as with real engines)."""
    profiles = group_profiles("coding", parallel=1)
    backends = fake_backends(profiles)
    config = RouterConfig(lane=LaneConfig(policy=PolicyConfig(min_dwell_s=0, min_samples=1)))
    with served(profiles, backends, config) as (url, _):
        code = {"model": "coding", "prompt": "def f(x):\n    return x + 1\n", "temperature": 0, "max_tokens": 40}
        creative = {"model": "coding", "prompt": "Write a poem about the sea.", "temperature": 1.2, "max_tokens": 40}

        def burst(body: dict, n: int = 6) -> list[str]:
            for backend in backends.backends.values():
                backend.gate.clear()
            held = {**body, "fake": {"hold": True}}
            with ThreadPoolExecutor(n) as pool:
                futures = [pool.submit(post, url, held)]
                wait_for(lambda: lane_status(url, "coding")["in_flight"] == 1, what="first request in flight")
                futures += [pool.submit(post, url, body) for _ in range(n - 1)]
                wait_for(lambda: lane_status(url, "coding")["queue_depth"] == n - 1, what="burst queued")
                for backend in backends.backends.values():
                    backend.gate.set()
                return [f.result().headers["x-llamactl-profile"] for f in futures]

        assert burst(code).count("coding-spec") == 6
        assert burst(creative)[1:] == ["coding-plain"] * 5  # the held one was already on spec
        assert burst(code)[1:] == ["coding-spec"] * 5
        status = lane_status(url, "coding")
        assert [s["to"] for s in status["recent_switches"]] == ["coding-plain", "coding-spec"]
        assert all(s["trigger"] == "policy" for s in status["recent_switches"])
        assert backends.max_running == 1


def test_pinned_member_name_is_served_by_that_member():
    profiles = group_profiles("coding", parallel=1)
    backends = fake_backends(profiles)
    with served(profiles, backends) as (url, _):
        r = post(url, {"model": "coding-plain", "prompt": "x", "temperature": 0})
        assert r.headers["x-llamactl-profile"] == "coding-plain"
        r = post(url, {"model": "coding-spec", "prompt": "x", "temperature": 1.5})
        assert r.headers["x-llamactl-profile"] == "coding-spec"


def test_switch_endpoint_rejects_unknown_member():
    profiles = group_profiles("coding")
    backends = fake_backends(profiles)
    with served(profiles, backends) as (url, _):
        r = httpx.post(f"{url}/llamactl/switch", json={"group": "coding", "member": "nope"})
        assert r.status_code == 400 and "members" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/llamactl/switch", json={"group": "nope", "member": "x"})
        assert r.status_code == 404


def test_without_a_memory_plan_a_group_switches_hard(settings):
    """`auto` keeps both members loaded only on the plan's word; no plan (here: no model file) means the
    safe hard switch, and status says why."""
    from llamactl.daemon.wiring import build_router

    profiles = {p.name: p for p in group_profiles("coding")}
    router = build_router(settings, profiles, fake_backends(list(profiles.values())))
    lane = router.lanes["coding"]
    assert lane.keep_both_warm is False
    assert lane.warm_reason.startswith("no memory plan (") and "fake.gguf" in lane.warm_reason


def test_keep_both_warm_loads_the_other_member_and_a_switch_is_a_drain():
    profiles = group_profiles("coding", parallel=1)
    backends = fake_backends(profiles)
    config = RouterConfig(lane=LaneConfig(keep_both_warm=True))
    with served(profiles, backends, config) as (url, router):
        body = {"model": "coding", "prompt": "def f():\n    return 1\n", "temperature": 0}
        assert post(url, body).headers["x-llamactl-profile"] == "coding-spec"
        wait_for(lambda: lane_status(url, "coding")["loaded"] == ["coding-plain", "coding-spec"],
                 what="the plain member loaded in the background")
        starts = backends.events.count(("start", "coding-plain"))
        r = httpx.post(f"{url}/llamactl/switch", json={"group": "coding", "member": "coding-plain"}, timeout=30)
        assert r.status_code == 200 and r.json()["active"] == "coding-plain"
        assert backends.events.count(("start", "coding-plain")) == starts == 1  # no restart: a drain
        assert ("stop", "coding-spec") not in backends.events
        assert post(url, body).headers["x-llamactl-profile"] == "coding-plain"
        assert r.json()["recent_switches"][-1]["trigger"] == "forced"
        assert backends.max_running == 2
    assert {("stop", "coding-spec"), ("stop", "coding-plain")} <= set(backends.events)  # shutdown stops both


def test_a_member_that_does_not_load_beside_the_other_turns_the_lane_to_hard_switches():
    """The plan said both fit, the box disagrees (room for one server): the background warm-up fails, the
    lane says why and switches hard; a warm switch that fails to start stops the other member and retries."""
    profiles = group_profiles("coding", parallel=1)
    backends = fake_backends(profiles, room=1)
    config = RouterConfig(lane=LaneConfig(keep_both_warm=True))
    with served(profiles, backends, config) as (url, router):
        body = {"model": "coding", "prompt": "def f():\n    return 1\n", "temperature": 0}
        assert post(url, body).status_code == 200
        wait_for(lambda: lane_status(url, "coding")["keep_both_warm"] is False, what="the warm-up to fail")
        assert lane_status(url, "coding")["warm_reason"].startswith("loading coding-plain beside coding-spec failed")
        r = httpx.post(f"{url}/llamactl/switch", json={"group": "coding", "member": "coding-plain"}, timeout=30)
        assert r.status_code == 200 and r.json()["loaded"] == ["coding-plain"]

        router.lanes["coding"].keep_both_warm = True  # a lane that still believes both fit
        r = httpx.post(f"{url}/llamactl/switch", json={"group": "coding", "member": "coding-spec"}, timeout=30)
        assert r.status_code == 200 and r.json()["loaded"] == ["coding-spec"]
        assert r.json()["keep_both_warm"] is False and "loading coding-spec beside coding-plain" in r.json()["warm_reason"]
        assert post(url, body).headers["x-llamactl-profile"] == "coding-spec"
        assert backends.max_running == 1


def test_a_group_member_that_cannot_start_is_passed_over_over_http():
    """Through the router: the drafter of the group cannot start. A code request (which the policy sends to the
    drafter) is answered by the plain member, not with a 503; status says why the drafter is passed over."""
    profiles = group_profiles("coding")
    backends = fake_backends(profiles, fail={"coding-spec"})
    with served(profiles, backends) as (url, _):
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "coding", "messages": [
            {"role": "user", "content": "def f(x):\n    return x"}]}, headers={"X-Llamactl-Class": "code"}, timeout=30)
        assert r.status_code == 200, r.text
        status = lane_status(url, "coding")
        assert status["active"] == "coding-plain" and "out of memory" in status["passed_over"]["coding-spec"]["reason"]
        assert [e for e in backends.events if e[0] == "start"] == [("start", "coding-plain")]
