"""No traceback reaches the user: every option and environment value the CLI takes is a sentence naming what
was wrong (exit 2 for a bad option or setting), a missing name lists what exists, and LLAMACTL_DEBUG=1 shows a
developer the traceback. The fuzz runs every command with hostile options and LLAMACTL_* values."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from llamactl.cli import main
from llamactl.settings import Settings

UNWRITABLE = "/sys/llamactl-test-home"  # sysfs refuses mkdir even to root


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def assert_sentence(result, code: int, *words: str):
    assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for word in words:
        assert word in result.output, result.output


def test_a_port_out_of_range_is_a_usage_error_naming_the_option(home):
    assert_sentence(invoke("serve", "--port", "70000"), 2, "--port", "70000")
    assert_sentence(invoke("serve", "--port", "-1"), 2, "--port")


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999", "ftp://x", "localhost:8080", "http://",
                                 "http://a b"])
def test_a_bad_url_is_a_usage_error_naming_the_option(home, url):
    assert_sentence(invoke("top", "--once", "--url", url), 2, "--url")
    assert_sentence(invoke("switch", "g", "m", "--url", url), 2, "--url")


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", "1e400"])
def test_a_bad_timeout_is_a_usage_error(home, value):
    assert_sentence(invoke("switch", "g", "m", "--timeout", value), 2, "--timeout")


@pytest.mark.parametrize("command", ["up", "serve"])
def test_a_state_dir_that_is_a_file_is_a_sentence(home: Path, fake_profile, monkeypatch, command):
    name = fake_profile()
    not_a_dir = home / "plain-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("LLAMACTL_HOME", str(not_a_dir))
    result = invoke(*(["up", name] if command == "up" else ["serve", "--profile", name]))
    assert_sentence(result, 2, f"cannot use {not_a_dir}", "Not a directory", "LLAMACTL_HOME")


@pytest.mark.parametrize("command", ["up", "serve"])
def test_a_state_dir_that_cannot_be_made_is_a_sentence(home: Path, fake_profile, monkeypatch, command):
    name = fake_profile()
    monkeypatch.setenv("LLAMACTL_HOME", UNWRITABLE)
    result = invoke(*(["up", name] if command == "up" else ["serve", "--profile", name]))
    assert_sentence(result, 2, f"cannot use {UNWRITABLE}", "directory is", "LLAMACTL_HOME")


def test_llamactl_debug_shows_the_traceback(home: Path):
    not_a_dir = home / "plain-file"
    not_a_dir.write_text("")
    result = invoke("serve", env={"LLAMACTL_HOME": str(not_a_dir), "LLAMACTL_DEBUG": "1"})
    assert isinstance(result.exception, NotADirectoryError)


def test_a_bug_is_an_internal_error_sentence(home: Path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr("llamactl.daemon.service.serve", broken)
    assert_sentence(invoke("serve"), 70, "internal error: KeyError", "LLAMACTL_DEBUG=1")


def test_a_missing_profile_lists_what_exists_and_the_closest(home: Path, write_profile):
    for name in ("coding", "coding-fast", "creative"):
        write_profile(name, 'model = "/nowhere.gguf"\n')
    result = invoke("up", "codng")
    assert_sentence(result, 2, "no profile named 'codng'", "did you mean 'coding'", "profiles that exist:",
                    "creative", "demo")
    result = invoke("plan", "zzzzz")
    assert_sentence(result, 2, "profiles that exist:", "coding-fast")
    assert "did you mean" not in result.output


# ------------------------------------------------------------------------------------------------ the fuzz

def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


COMMANDS = sorted(_commands(main), key=lambda c: c[0])
hostile = st.one_of(
    st.text(max_size=20), st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["70000", "-1", "0", "nan", "inf", "1e400", "http://[::1", "http://127.0.0.1:1", "ftp://x",
                     "127.0.0.1:99999", "a b", "../x", "-", "%h", "$HOME", "\x00", "nosuch", "--help", ""])
).filter(lambda v: not v.startswith("/"))
# No absolute paths: options that take a path (systemd install --output, worker --cache-dir) write there, and the
# test runs in a directory of its own.
SETTINGS_KEYS = sorted(Settings.model_fields)


def _option_values(command: click.Command):
    """Each of a command's options, given a hostile value (flags are on or off), and hostile arguments."""
    parts = []
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            if param.is_flag:
                parts.append(st.sampled_from([[], [param.opts[0]]]))
            else:
                parts.append(st.one_of(st.just([]), hostile.map(lambda v, o=param.opts[0]: [o, v])))
        elif isinstance(param, click.Argument):
            parts.append(st.lists(hostile.filter(lambda v: not v.startswith("demo")), min_size=0, max_size=2))
    return st.tuples(*parts).map(lambda chosen: [a for part in chosen for a in part]) if parts else st.just([])


@pytest.fixture
def quiet_entry_points(monkeypatch, home: Path):
    """What would run for minutes (the daemon, rpc-server, an engine build, a live screen, a followed log) is
    replaced by a recorder: the fuzz is about what the CLI takes and says, up to the call that does the work."""
    monkeypatch.chdir(home)  # relative paths the fuzz gives land here
    monkeypatch.setattr("llamactl.daemon.service.serve", lambda *a, **k: 0)
    monkeypatch.setattr("llamactl.rpc.runner.WorkerRunner.run", lambda self: 0)
    monkeypatch.setattr("llamactl.rpc.runner.install_signal_handlers", lambda runner: None)
    monkeypatch.setattr("llamactl.engines.install.install", lambda *a, **k: None)
    monkeypatch.setattr("llamactl.top.run_live", lambda *a, **k: None)
    monkeypatch.setattr("llamactl.supervisor.logs.follow", lambda *a, **k: iter(()))
    monkeypatch.setattr("llamactl.daemon.systemd_unit.unit_path", lambda *a, **k: Path("units") / "llamactl.service")


@given(data=st.data())
@hsettings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_every_command_option_and_setting(home: Path, quiet_entry_points, data):
    path, command = data.draw(st.sampled_from(COMMANDS), label="command")
    args = data.draw(_option_values(command), label="args")
    env = data.draw(st.dictionaries(st.sampled_from(SETTINGS_KEYS).map(lambda k: f"LLAMACTL_{k.upper()}"),
                                    hostile.filter(lambda v: "\x00" not in v), max_size=2), label="env")
    result = CliRunner().invoke(main, [*path, *args], env={"LLAMACTL_GPUS_FILE": "", **env})
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{path} {args} {env}: {result.exception!r}\n{result.output}")
    assert result.exit_code != 70, f"{path} {args} {env}:\n{result.output}"


@pytest.mark.parametrize("args", [["top", "--once", "--key-file", "k\x00"], ["plan", "demo", "--gpus", "\x00"],
                                  ["worker", "--binary", "b\x00"], ["systemd", "install", "--output", "\x00u"]])
def test_a_path_option_holding_a_nul_byte_is_a_usage_error_naming_the_option(home, args):
    result = CliRunner().invoke(main, args, env={"LLAMACTL_GPUS_FILE": ""})
    option = next(a for a in args if a.startswith("--") and a != "--once")
    assert result.exit_code == 2 and option in result.output and "NUL" in result.output, result.output
