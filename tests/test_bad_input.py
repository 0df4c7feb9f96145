"""Every bad input gets a clear error, never a traceback or a 500: the switch route's body, JSON nested past
the parser's recursion limit (HTTP and the control socket), settings built outside the CLI."""

from __future__ import annotations

import socket

import httpx
import pytest

from llamactl.daemon import auth
from llamactl.daemon.control import socket_path, try_daemon
from llamactl.router import Router, RouterConfig, create_app
from llamactl.settings import Settings
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import fake_backends, group_profiles
from tests.test_control import daemon

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"model": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}"


@pytest.fixture
def router_url(settings: Settings):
    profiles = group_profiles("coding")
    backends = fake_backends(profiles)
    server = ServerThread(create_app(Router(profiles, backends, RouterConfig()), middleware=auth.middleware(settings)))
    try:
        yield server.url
    finally:
        server.stop()
        backends.close()


@pytest.mark.parametrize("body, says", [
    (b"[1]", "must be a JSON object"), (b"null", "must be a JSON object"), (b'"coding"', "must be a JSON object"),
    (b'{"group": "coding", "member": "auto", "timeout_s": "abc"}', "'timeout_s' must be a positive number"),
    (b'{"group": "coding", "member": "auto", "timeout_s": true}', "'timeout_s' must be a positive number"),
    (b'{"group": "coding", "member": "auto", "timeout_s": -1}', "'timeout_s' must be a positive number"),
    (b'{"group": "coding", "member": "auto", "timeout_s": 1e400}', "'timeout_s' must be a positive number"),
    (b'{"group": "coding", "member": "auto", "timeout_s": NaN}', "'timeout_s' must be a positive number"),
    (b'{"group": 1, "member": "auto"}', "'group' must be a switch group name"),
    (b'{"group": "coding", "member": null}', "'member' must be a profile name"),
    (b"{not json", "not valid JSON"), (DEEP, "nested too deeply"),
])
def test_switch_body_errors_are_400_with_the_reason(router_url, body, says):
    r = httpx.post(f"{router_url}/llamactl/switch", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert says in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/completion"])
@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT])
def test_deeply_nested_json_is_a_400_on_the_relayed_routes(router_url, path, body):
    r = httpx.post(router_url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text[:300]


def test_control_socket_answers_deep_json_and_keeps_serving(settings: Settings):
    with daemon(settings):
        for line in (DEEP[:60_000] + b"\n", b'{"op": "up", "args": ' + b"[" * 30_000 + b"\n",
                     b'{"op": ' + b'{"a": ' * 20_000 + b"\n"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(socket_path(settings)))
                s.sendall(line)
                answer = s.recv(65536)
            assert b'"ok": false' in answer and b"bad_request" in answer, answer[:200]
        assert try_daemon(settings).status()  # still serving


def test_every_settings_object_the_product_builds_reports_a_bad_variable(monkeypatch, capsys):
    """scripts/install-engines builds its own Settings: a bad LLAMACTL_* must be a message, not a traceback."""
    from llamactl.engines import install

    monkeypatch.setenv("LLAMACTL_LOG_MAX_BYTES", "lots")
    assert install.main(["llama.cpp"]) == 2
    err = capsys.readouterr().err
    assert "LLAMACTL_LOG_MAX_BYTES" in err and "Traceback" not in err


def test_a_client_chosen_model_name_is_bounded_and_escaped_in_the_error(router_url):
    hostile = "x" * 200_000 + "\n\x1b[31mFAKE LOG LINE"
    r = httpx.post(f"{router_url}/v1/chat/completions", json={"model": hostile, "messages": []}, timeout=30)
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert len(message) < 1000 and "\n" not in message and "\x1b" not in message
    assert message.startswith("unknown model 'xxx") and "valid: coding" in message


def test_a_gpu_file_with_an_overflowing_number_names_the_key(tmp_path):
    from llamactl.gpus import FileProbe, GpuProbeError

    path = tmp_path / "gpus.json"
    path.write_text('[{"index": 0, "name": "g", "total_mib": 1e400, "free_mib": 10}]')
    with pytest.raises(GpuProbeError, match="total_mib: expected a whole number"):
        FileProbe(path).probe()
    path.write_text('{"gpus": [], "host": {"total_mib": "lots"}}')
    with pytest.raises(GpuProbeError, match="host.total_mib"):
        FileProbe(path).probe()
