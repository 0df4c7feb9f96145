"""systemd units: the committed examples are what the renderer makes, and both they and the unit
rendered for this machine pass `systemd-analyze verify` with no warning; `llamactl systemd install`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from llamactl.cli import main
from llamactl.settings import Settings
from llamactl.daemon.systemd_unit import EXAMPLE_SYSTEM, EXAMPLE_USER, UnitParams, detect_params, render_unit
from llamactl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def systemd_analyze() -> str:
    """The verifier; CI (LLAMACTL_REQUIRE_ENGINES=1, scripts/test installs it) fails instead of skipping."""
    found = shutil.which("systemd-analyze")
    if found is None:
        message = "systemd-analyze not installed (Debian: apt-get install systemd)"
        if os.environ.get("LLAMACTL_REQUIRE_ENGINES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def verify(text: str, tmp_path: Path, *, user: bool, name: str = "llamactl.service") -> str:
    """Run systemd-analyze verify on `text`; return what it printed (empty: no error, no warning)."""
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    path = unit_dir / name
    path.write_text(text)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    cmd = [systemd_analyze(), *(["--user"] if user else []), "verify", str(path)]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    out = (r.stdout + r.stderr).strip()
    # Lines about other units (a container's own half-configured ones) are not ours to judge.
    ours = "\n".join(line for line in out.splitlines() if name in line or str(path) in line or "Failed" in line)
    if r.returncode != 0:
        return ours or out or f"exit code {r.returncode}"
    return ours


def runnable(text: str) -> str:
    """The committed examples name /usr/local/bin/llamactl; verify checks the executable exists."""
    real = shutil.which("llamactl") or str(REPO / ".venv" / "bin" / "llamactl")
    return text.replace("/usr/local/bin/llamactl", real).replace("%h/.local/bin/llamactl", real)


def test_committed_units_are_the_rendered_examples():
    assert (REPO / "systemd" / "llamactl.service").read_text() == render_unit(EXAMPLE_SYSTEM)
    assert (REPO / "systemd" / "llamactl-user.service").read_text() == render_unit(EXAMPLE_USER)


def test_committed_system_unit_passes_verify(tmp_path: Path):
    assert verify(runnable(render_unit(EXAMPLE_SYSTEM)), tmp_path, user=False) == ""


def test_committed_user_unit_passes_verify(tmp_path: Path):
    assert verify(runnable(render_unit(EXAMPLE_USER)), tmp_path, user=True) == ""


def test_unit_rendered_for_this_machine_passes_verify(settings: Settings, tmp_path: Path):
    for user in (False, True):
        text = render_unit(detect_params(settings, user_unit=user))
        assert verify(text, tmp_path, user=user) == "", text


def test_verify_does_catch_mistakes(tmp_path: Path):
    broken = render_unit(EXAMPLE_SYSTEM).replace("Type=notify", "Type=notfy\nWatchdgSec=5")
    assert "notfy" in verify(runnable(broken), tmp_path, user=False)


def test_what_the_system_unit_says(settings: Settings):
    text = render_unit(detect_params(settings, user_unit=False))
    lines = set(text.splitlines())
    for expected in ("Type=notify", "NotifyAccess=main", "WatchdogSec=60", "ExecReload=/bin/kill -HUP $MAINPID",
                     "KillMode=mixed", "TimeoutStopSec=120", "Restart=on-failure", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "PrivateTmp=yes", "DevicePolicy=closed",
                     "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=/dev/nvidia-uvm rw",
                     "DeviceAllow=char-nvidia-frontend rw", "CapabilityBoundingSet=", "WantedBy=multi-user.target"):
        assert expected in lines, expected
    assert f"ReadWritePaths=-{settings.state_dir} -{settings.cache_dir}" in lines
    assert any(line.startswith("ExecStart=") and line.endswith(" serve") for line in lines)
    assert "PrivateDevices=yes" not in lines and "MemoryDenyWriteExecute=yes" not in lines


def test_protect_home_is_read_only_only_when_something_lives_there(settings: Settings, write_profile, monkeypatch):
    monkeypatch.setattr("llamactl.daemon.systemd_unit.llamactl_exec", lambda: ("/usr/local/bin/llamactl", "serve"))
    outside = detect_params(settings, user_unit=False)
    assert outside.protect_home == "yes"
    write_profile("homey", 'model = "/home/someone/models/big.gguf"\n')
    assert detect_params(settings, user_unit=False).protect_home == "read-only"


def test_settings_travel_but_keys_do_not(settings: Settings, monkeypatch):
    monkeypatch.setenv("LLAMACTL_API_KEYS", "s3cret-s3cret-s3cret")
    monkeypatch.setenv("LLAMACTL_ROUTER_PORT", "9000")
    text = render_unit(detect_params(Settings(), user_unit=False))
    assert "Environment=LLAMACTL_ROUTER_PORT=9000" in text
    assert "s3cret" not in text
    assert "EnvironmentFile=-" in text


def test_system_dirs_use_systemd_managed_directories(settings: Settings):
    p = detect_params(settings, user_unit=False, system_dirs=True, service_user="llamactl")
    text = render_unit(p)
    assert "StateDirectory=llamactl" in text and "User=llamactl" in text
    assert "ReadWritePaths=-/var/lib/llamactl -/var/cache/llamactl" in text
    assert "Environment=XDG_STATE_HOME=/var/lib" in text


def test_cli_install_dry_run_and_write(settings: Settings, tmp_path: Path):
    runner = CliRunner()
    r = runner.invoke(main, ["systemd", "install", "--user", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "Type=notify" in r.output and "WantedBy=default.target" in r.output
    out = tmp_path / "llamactl.service"
    r = runner.invoke(main, ["systemd", "install", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text().startswith("# Rendered by `llamactl systemd install`")
    assert f"wrote {out}" in r.output and "systemctl enable --now llamactl" in r.output
    r = runner.invoke(main, ["systemd", "install", "--user", "--system-dirs", "--dry-run"])
    assert r.exit_code != 0 and "--system-dirs and --service-user are for the system unit" in r.output


# ------------------------------------------------------------------------------- hostile paths and values

_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"',
            "'": "'", "s": " "}


def _unspecify(value: str) -> str:
    """systemd.unit(5) specifiers: `%%` is `%`; any other `%x` would be replaced, which our values must not ask for."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "%":
            assert value[i + 1:i + 2] == "%", f"an unescaped specifier in {value!r}"
            out.append("%")
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _words(value: str) -> list[str]:
    """systemd.syntax(7) QUOTING, read independently of the renderer: whitespace-separated items, an item may be
    wrapped in double quotes, C-style escapes."""
    words, i = [], 0
    while i < len(value):
        if value[i] in " \t":
            i += 1
            continue
        quote = value[i] if value[i] in "\"'" else None
        i += 1 if quote else 0
        word = []
        while i < len(value) and (value[i] != quote if quote else value[i] not in " \t"):
            if value[i] == "\\":
                code = value[i + 1]
                if code == "x":
                    word.append(chr(int(value[i + 2:i + 4], 16)))
                    i += 4
                    continue
                word.append(_ESCAPES[code])
                i += 2
                continue
            word.append(value[i])
            i += 1
        i += 1 if quote else 0
        words.append("".join(word))
    return words


def _unvariable(arg: str) -> str:
    """ExecStart= arguments: `$$` is `$`; a lone `$` would expand a variable."""
    assert "$" not in arg.replace("$$", ""), f"an unescaped $ in {arg!r}"
    return arg.replace("$$", "$")


def read_back(text: str) -> dict[str, list[str]]:
    """What systemd makes of the settings we write: ExecStart (argv), Environment (KEY=value items),
    ReadWritePaths, EnvironmentFile (a plain path), User."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", "[")):
            continue
        key, value = line.split("=", 1)
        value = _unspecify(value)
        if key == "ExecStart":
            program, *args = _words(value)
            settings[key] = [program, *(_unvariable(a) for a in args)]
        elif key in ("Environment", "ReadWritePaths"):
            settings.setdefault(key, []).extend(_words(value))
        elif key in ("EnvironmentFile", "User"):
            settings[key] = [value.strip()]
    return settings


_segment = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"), min_size=1,
                   max_size=10).filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)
hostile_names = st.one_of(_segment, st.sampled_from(["url%20enc", "%h", "$HOME", "${HOME}", 'a"  # b', "a b",
                                                     "x\\y", "'q'", "50%", "$$", "a;b", "  # c"]))


@given(name=hostile_names, user_unit=st.booleans())
@hsettings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_hostile_paths_render_units_systemd_accepts_and_reads_back_as_written(tmp_path_factory, name: str,
                                                                               user_unit: bool):
    """Any directory name llamactl may live under (spaces, quotes, `%`, `$`, `#`, unicode) gives a unit that
    `systemd-analyze verify` accepts without a warning (it also checks the program exists: that is systemd
    finding our exact path), and every value reads back as the path we meant."""
    tmp = tmp_path_factory.mktemp("unit")
    base = tmp / name
    program = base / "bin" / "llamactl"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    params = UnitParams(exec_start=(str(program), "serve", "--profile", name), user_unit=user_unit,
                        state_dir=base / "state", cache_dir=base / "cache", config_dir=base / "config",
                        environment=(("LLAMACTL_HOME", str(base)), ("LLAMACTL_PROFILES_DIRS", f"{base}:{name}")))
    if any(c in "\\\"'" for c in name):  # systemd will not run such a program: said, not written
        with pytest.raises(ConfigError, match="ExecStart: systemd cannot run the program"):
            render_unit(params)
        program = tmp / "bin" / "llamactl"
        program.parent.mkdir()
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
        params = dataclasses.replace(params, exec_start=(str(program), *params.exec_start[1:]))
    text = render_unit(params)
    assert verify(text, tmp, user=user_unit) == "", text
    got = read_back(text)
    assert got["ExecStart"] == [str(program), "serve", "--profile", name]
    assert f"LLAMACTL_HOME={base}" in got["Environment"]
    assert f"LLAMACTL_PROFILES_DIRS={base}:{name}" in got["Environment"]
    assert got["EnvironmentFile"] == [f"-{base}/config/service.env"]
    if not user_unit:
        assert got["ReadWritePaths"] == [f"-{base}/state", f"-{base}/cache"]


def test_a_percent_in_llamactl_home_survives_into_the_unit(monkeypatch, home: Path):
    """The instance: LLAMACTL_HOME=/srv/url%20enc made systemd drop the setting ("Failed to resolve specifiers")
    and run with the default directories; %h and $HOME were expanded by systemd."""
    monkeypatch.setenv("LLAMACTL_HOME", "/srv/url%20enc/$HOME/%h")
    r = CliRunner().invoke(main, ["systemd", "install", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "LLAMACTL_HOME=/srv/url%20enc/$HOME/%h" in read_back(r.output)["Environment"]
    assert "-/srv/url%20enc/$HOME/%h/state" in read_back(r.output)["ReadWritePaths"]


def test_a_path_no_unit_can_hold_is_refused_with_a_sentence(home: Path):
    params = UnitParams(exec_start=("/usr/bin/llamactl", "serve"), user_unit=True, state_dir=home / "s",
                        cache_dir=home / "c", config_dir=home / "line\nbreak")
    with pytest.raises(ConfigError, match="EnvironmentFile.*cannot be written into a systemd unit"):
        render_unit(params)


def test_the_committed_user_example_keeps_its_specifiers():
    assert "ExecStart=%h/.local/bin/llamactl serve" in render_unit(EXAMPLE_USER)


def test_install_refuses_an_output_that_is_not_a_regular_file(settings: Settings, tmp_path: Path):
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    r = CliRunner().invoke(main, ["systemd", "install", "--output", str(fifo)])
    assert r.exit_code == 1 and "exists and is not a regular file" in r.output
    assert fifo.is_fifo()
