"""systemd units: the committed examples are what the renderer makes, and both they and the unit
rendered for this machine pass `systemd-analyze verify` with no warning; `llamactl systemd install`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamactl.cli import main
from llamactl.settings import Settings
from llamactl.daemon.systemd_unit import EXAMPLE_SYSTEM, EXAMPLE_USER, detect_params, render_unit

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
