"""Names are not paths: a profile name reaches the state dir (records, locks, keys, logs) only after one
check, at every entry: the CLI, the control socket, HTTP, and `extends` in a profile file."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from llamactl.cli import main
from llamactl.daemon import auth
from llamactl.daemon.control import DaemonError, try_daemon
from llamactl.errors import ProfileError
from llamactl.names import BadProfileName, check_profile_name, is_profile_name
from llamactl.profiles import load_profile
from llamactl.router import Router, RouterConfig, create_app
from llamactl.settings import Settings
from llamactl.supervisor import Supervisor
from llamactl.supervisor.state import StateStore
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import fake_backends, group_profiles
from tests.test_control import FakeHandler, daemon

HOSTILE = ["../../../x/rec", "../x", "/etc/passwd", "a/b", ".hidden", "..", "", "x" * 65, "nul\0byte", "new\nline",
           "-rf", "demo.", " demo"]


def test_the_rule():
    for good in ("demo", "demo-draft", "coding_2", "Qwen3.5-27B", "a" * 64):
        assert check_profile_name(good) == good
    for bad in HOSTILE + [None, 3, ["demo"]]:
        with pytest.raises(BadProfileName, match="is not a valid profile name"):
            check_profile_name(bad)


@hsettings(max_examples=300, deadline=None)
@given(name=st.text(max_size=80))
def test_an_accepted_name_is_one_file_in_its_directory(name):
    if not is_profile_name(name):
        return
    base = Path("/state/servers")
    assert (base / f"{name}.json").parent == base and "/" not in name and name not in (".", "..")


def record_outside(home: Path) -> Path:
    """A file shaped like a server record, outside the state dir: what `down ../../../x/rec` used to delete."""
    target = home / "x" / "rec.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"profile": "rec", "pid": 1}))
    return target


@pytest.mark.parametrize("args", [["down", "../../x/rec"], ["up", "../../x/rec"], ["logs", "../../x/rec"],
                                  ["logs", "-f", "../x"], ["plan", "../x"], ["profiles", "validate", "../x"],
                                  ["switch", "../x", "auto"]])
def test_cli_refuses_a_path_as_a_profile_name(home: Path, args):
    target = record_outside(home)
    before = sorted(p for p in home.rglob("*"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "is not a valid profile name" in result.output
    assert target.exists()
    assert sorted(p for p in home.rglob("*")) == before  # no lock, key or log file anywhere


def test_state_store_and_supervisor_refuse_too(settings: Settings):
    store = StateStore(settings.state_dir)
    for call in (lambda: store.read("../x"), lambda: store.remove("../../x/rec"), lambda: store.key_path("../k"),
                 lambda: store.lock("../l").__enter__(), lambda: Supervisor(settings).log_path("../../etc/x"),
                 lambda: Supervisor(settings).stop("../../x/rec")):
        with pytest.raises(BadProfileName):
            call()
    assert not (settings.state_dir / "locks").exists()


def test_extends_cannot_reach_outside_the_search_path(write_profile, home: Path, settings: Settings):
    (home / "outside.toml").write_text('model = "/m.gguf"\n')
    write_profile("child", 'extends = "../outside"\n')
    with pytest.raises(ProfileError, match="not a valid profile name"):
        load_profile("child", settings)


def test_control_socket_refuses_a_path_as_a_name(settings: Settings):
    handler = FakeHandler()
    with daemon(settings, handler):
        client = try_daemon(settings)
        for op, args in (("logs-path", {"profile": "../../etc/passwd"}), ("down", {"profile": "../x/rec"}),
                         ("up", {"profile": "a/b"}), ("switch", {"group": "../g", "member": "auto"}),
                         ("switch", {"group": "g", "member": "../m"})):
            with pytest.raises(DaemonError) as e:
                client.request(op, args)
            assert "name" in e.value.message and e.value.type in ("BadProfileName", "bad_request"), e.value.message
        assert handler.calls == []  # refused before the handler saw it


def test_http_switch_refuses_a_path_as_a_name(settings: Settings):
    profiles = group_profiles("coding")
    backends = fake_backends(profiles)
    server = ServerThread(create_app(Router(profiles, backends, RouterConfig()), middleware=auth.middleware(settings)))
    try:
        for body in ({"group": "../coding", "member": "auto"}, {"group": "coding", "member": "../../x"}):
            r = httpx.post(f"{server.url}/llamactl/switch", json=body)
            assert r.status_code == 400 and "name" in r.json()["error"]["message"], r.text
    finally:
        server.stop()
        backends.close()
