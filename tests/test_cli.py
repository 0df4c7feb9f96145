"""The CLI as a user meets it: exit codes, messages, and nothing left running after a refusal."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.supervisor import Supervisor
from tests.conftest import FAKES
from tests.synth_gguf import write_header_only


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(main, list(args))
        assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}"
        return result

    return invoke


def test_up_status_logs_down_with_the_fake_engine(run, settings, fake_profile, monkeypatch):
    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(FAKES / "gpus_cpu.json"))
    name = fake_profile()
    up = run("up", name)
    assert "ready at http://127.0.0.1:" in up.output
    again = run("up", name)
    assert "already running" in again.output
    [row] = json.loads(run("status", "--json").output)["servers"]
    assert row["state"] == "ready" and row["profile"] == name
    assert "PROFILE" in run("status").output
    assert "server is listening" in run("logs", name).output
    assert f"stopped {name}" in run("down", name).output
    assert "was not running" in run("down", name).output
    assert json.loads(run("status", "--json").output)["servers"] == []


def test_start_failure_exits_non_zero_with_cause_and_log_tail(run, settings, fake_profile, monkeypatch):
    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(FAKES / "gpus_cpu.json"))
    name = fake_profile(mode="crash_on_start", FAKE_CRASH_MESSAGE="error: invalid argument: --mlock")
    result = run("up", name, code=4)
    assert "bad flag" in result.output and "last log lines" in result.output and "--mlock" in result.output
    assert Supervisor(settings).status() == []


def huge_profile_on_one_24g_card(write_profile, home, monkeypatch) -> None:
    """Profile `huge`: a 70B-class table (~70 GiB at Q8_0) on a described 1 x 24 GiB box, run by the fake."""
    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(FAKES / "gpus_1x24.json"))
    big = write_header_only(home / "big.gguf", n_layer=80)
    write_profile("huge", f"""
        binary = "{FAKES / 'fake_llama_server.py'}"
        model = "{big}"
        ctx_size = 32768
        gpus = [0]
        n_gpu_layers = "all"
    """)


def test_profile_that_does_not_fit_is_refused_before_anything_starts(run, settings, write_profile, home,
                                                                     monkeypatch):
    huge_profile_on_one_24g_card(write_profile, home, monkeypatch)
    result = run("up", "huge", code=7)
    assert "does not fit" in result.output and "nothing was started" in result.output
    assert Supervisor(settings).status() == []
    assert not (home / "state" / "logs" / "huge.log").exists()


def test_usage_errors(run, settings):
    assert "give a PROFILE or --all" in run("down", code=2).output
    assert "no profile named 'nope'" in run("up", "nope", code=2).output
    assert "has it been started" in run("logs", "nope", code=1).output


def test_a_missing_model_is_named_with_the_profile_file_and_key(run, settings, write_profile, home):
    path = write_profile("lost", 'model = "/models/nowhere.gguf"\n')
    result = run("up", "lost", code=2)
    assert str(path) in result.output and "key model" in result.output
    assert "model file not found: looked at /models/nowhere.gguf" in result.output
    assert Supervisor(settings).status() == []


def test_ignore_fit_starts_anyway_and_down_all_stops_every_server(run, settings, write_profile, fake_profile, home,
                                                                  monkeypatch):
    huge_profile_on_one_24g_card(write_profile, home, monkeypatch)
    run("up", "huge", code=7)
    assert "ready at http://127.0.0.1:" in run("up", "huge", "--ignore-fit").output
    fake_profile("small")
    run("up", "small")
    pids = {s.record.profile: s.record.pid for s in Supervisor(settings).status()}
    assert set(pids) == {"huge", "small"}
    out = run("down", "--all").output
    assert "stopped: huge, small" in out
    assert Supervisor(settings).status() == []
