"""LLAMACTL_ROUTER_PER_PROCESS_GROUPS: switch groups kept per process (each member its own engine) even where the
drafting member's engine could serve its plain twin per request. The engine self-test's verdict is a recorded
stand-in here (the real one, on ik_llama.cpp, is in tests/test_per_request_engine.py and tests/test_selftest.py)."""

from __future__ import annotations

import logging

import httpx

from llamactl.profiles import Profile, Speculation
from llamactl.router import Router, RouterConfig
from llamactl.router.per_request import PerRequestProbe, per_process_groups
from llamactl.settings import Settings
from tests.router_harness import fake_backends, served, wait_for

MODEL = "/models/fake.gguf"


def twins(group: str) -> list[Profile]:
    return [Profile(name=f"{group}-spec", model=MODEL, group=group, parallel=1,
                    speculation=Speculation(type="draft", draft_model=MODEL)),
            Profile(name=f"{group}-plain", model=MODEL, group=group, parallel=1)]


def test_the_setting_names_groups_or_every_group():
    assert per_process_groups(" kept, other ,,") == {"kept", "other"}
    assert per_process_groups("") == frozenset()
    some = PerRequestProbe(Settings(router_per_process_groups="kept"))
    assert not some.allowed("kept") and some.allowed("shared")
    every = PerRequestProbe(Settings(router_per_process_groups="*"))
    assert not every.allowed("kept") and not every.allowed("shared")
    assert some.unknown(["shared"]) == ["kept"] and every.unknown(["shared"]) == []


def test_a_group_kept_per_process_never_asks_the_self_test_and_runs_its_plain_member_itself(home, monkeypatch):
    monkeypatch.setenv("LLAMACTL_ROUTER_PER_PROCESS_GROUPS", "kept")
    asked: list[str] = []

    def verdict(self, profile: Profile) -> bool:
        asked.append(profile.name)
        return True  # the engine honours a per-request depth

    monkeypatch.setattr(PerRequestProbe, "verdict", verdict)
    profiles = twins("kept") + twins("shared")
    backends = fake_backends(profiles)
    backends.settings = Settings()
    with served(profiles, backends) as (url, router):
        for group in ("kept", "shared"):
            r = httpx.post(f"{url}/llamactl/switch", json={"group": group, "member": f"{group}-plain"}, timeout=10)
            assert r.status_code == 200, r.text
        wait_for(lambda: router.lanes["shared"].hosts == {"shared-plain": "shared-spec"}, what="shared's hosts")
        assert asked == ["shared-spec"]  # kept's drafting member was never self-tested
        assert router.lanes["kept"].hosts == {}
        r = httpx.post(f"{url}/v1/completions", json={"model": "kept", "prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-llamactl-profile"] == "kept-plain" and r.headers["x-llamactl-process"] == "kept-plain"
        assert ("start", "kept-plain") in backends.events


def test_a_name_that_is_no_group_is_warned_about(home, monkeypatch, caplog):
    monkeypatch.setenv("LLAMACTL_ROUTER_PER_PROCESS_GROUPS", "shared,shraed")
    profiles = twins("shared")
    backends = fake_backends(profiles)
    backends.settings = Settings()
    with caplog.at_level(logging.WARNING, logger="llamactl.router"):
        Router(profiles, backends, RouterConfig())
    warned = [r.getMessage() for r in caplog.records if "PER_PROCESS_GROUPS" in r.getMessage()]
    assert len(warned) == 1 and "'shraed'" in warned[0] and "'shared'" not in warned[0]
    backends.close()
