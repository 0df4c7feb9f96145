"""`llamactl switch` against a running router, and the status lines `llamactl status` can show."""

from __future__ import annotations

import httpx
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.cli.serve import router_status_lines
from tests.router_harness import fake_backends, group_profiles, served


def test_switch_command_forces_a_member_and_back_to_auto(settings):
    profiles = group_profiles("coding")
    backends = fake_backends(profiles)
    with served(profiles, backends) as (url, _):
        runner = CliRunner()
        result = runner.invoke(main, ["switch", "coding", "coding-plain", "--url", url])
        assert result.exit_code == 0, result.output
        assert "coding: active coding-plain (ready, forced to coding-plain)" in result.output
        assert ("start", "coding-plain") in backends.events

        lines = router_status_lines(httpx.get(f"{url}/llamactl/status", timeout=5).json())
        assert lines[0].startswith("coding: active coding-plain [ready, forced coding-plain]")

        result = runner.invoke(main, ["switch", "coding", "auto", "--url", url])
        assert result.exit_code == 0 and "automatic" in result.output

        result = runner.invoke(main, ["switch", "coding", "nope", "--url", url])
        assert result.exit_code == 1 and "not a member of 'coding'" in result.output


def test_switch_without_a_running_serve_says_so(settings):
    result = CliRunner().invoke(main, ["switch", "g", "m", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 5
    assert "cannot reach llamactl serve" in result.output


def test_status_lines_show_the_model_map_and_the_problems():
    lines = router_status_lines({"lanes": [], "model_map": {"claude-*": "coding"}, "default_model": "coding",
                                 "problems": ["name 'x' is used twice"]})
    assert lines == ["model names: claude-* -> coding", "requests without a model: coding",
                     "problem: name 'x' is used twice"]


def test_status_lines_say_which_member_is_passed_over_and_why():
    lane = {"lane": "coding", "active": "coding-plain", "state": "ready", "forced": None, "queue_depth": 0,
            "in_flight": 0, "group": True, "keep_both_warm": False, "warm_reason": "", "last_decision": None,
            "passed_over": {"coding-spec": {"for_s": 599.6, "reason": "draft model not found"}}}
    assert "  coding-spec passed over for 600s more: it failed to start: draft model not found" in \
        router_status_lines({"lanes": [lane]})
