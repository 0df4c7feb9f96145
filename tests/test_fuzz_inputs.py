"""Fuzz every input surface: profile TOML files (with `extends`), the LLAMACTL_* environment, GPU description
files, every HTTP route's body and headers (behind the middleware `serve` uses), the control socket's protocol.
The property everywhere: a clear error or a correct answer, never a traceback, a 500, a hang or unbounded
memory. Example counts keep the whole file to a few tens of seconds on two cores."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from llamactl.daemon import auth
from llamactl.daemon.control import socket_path
from llamactl.errors import ConfigError, ProfileError
from llamactl.gpus import FileProbe, GpuInventory, GpuProbeError
from llamactl.profiles import Profile, load_profile
from llamactl.router import Router, RouterConfig, create_app
from llamactl.settings import Settings, load_settings
from tests.fakes.fast_backend import ServerThread
from tests.router_harness import fake_backends, group_profiles
from tests.test_control import daemon

def fuzz(max_examples: int):
    return hsettings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))

scalars = (st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=30) | st.sampled_from(["../x", "/dev/zero", "builtin:gemma3-270m", "demo", "1e400"]))
json_values = st.recursive(st.none() | scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12)
toml_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(min_size=1, max_size=10), c, max_size=3), max_leaves=10)
PROFILE_KEYS = sorted(Profile.model_fields.keys() - {"name", "source"}) + ["speculation.type",
                                                                           "speculation.draft_model", "rope.scale"]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@fuzz(300)
@given(keys=st.dictionaries(st.sampled_from(PROFILE_KEYS) | st.text(min_size=1, max_size=8), toml_values, max_size=6),
       garbage=st.text(max_size=40), parent=st.sampled_from([None, "demo", "fuzz", "other", "../x"]))
def test_profile_files(home: Path, keys, garbage, parent):
    lines = [f"{json.dumps(k) if '.' not in k else k} = {toml_value(v)}" for k, v in keys.items()]
    if parent:
        lines.insert(0, f'extends = "{parent}"')
    (home / "profiles" / "fuzz.toml").write_text("\n".join(lines) + "\n" + garbage)
    (home / "profiles" / "other.toml").write_text('extends = "fuzz"\nmodel = "/m.gguf"\n')
    settings = Settings()
    try:
        assert isinstance(load_profile("fuzz", settings), Profile)
    except ProfileError as e:
        assert e.message


SETTING_NAMES = sorted(f"LLAMACTL_{name.upper()}" for name in Settings.model_fields if name != "home")


@fuzz(300)
@given(env=st.dictionaries(st.sampled_from(SETTING_NAMES),
                           st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=30)
                           | st.sampled_from(["1e400", "-1", "nan", "true", "auto", "0", "99999999999999999999"]),
                           max_size=4))
def test_settings_environment(home: Path, env):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        try:
            settings = load_settings()
        except ConfigError as e:
            assert "LLAMACTL_" in e.message
            return
        assert isinstance(settings, Settings)
        try:
            auth.middleware(settings)  # what `serve` builds from them
        except ConfigError as e:
            assert e.message
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


gpu_numbers = st.integers(-5, 2**64) | st.floats(allow_nan=True, allow_infinity=True) | st.just(1e400) | \
    st.text(max_size=5) | st.booleans() | st.none()
gpu_objects = st.fixed_dictionaries(
    {"index": gpu_numbers, "name": st.text(max_size=10) | gpu_numbers, "total_mib": gpu_numbers,
     "free_mib": gpu_numbers},
    optional={"used_mib": gpu_numbers, "processes": st.lists(st.dictionaries(st.sampled_from(["pid", "used_mib"]),
                                                                              gpu_numbers), max_size=2) | json_values,
              "utilization_pct": gpu_numbers, "uuid": json_values})


@fuzz(300)
@given(doc=st.lists(gpu_objects, max_size=3) | st.fixed_dictionaries({"gpus": st.lists(gpu_objects, max_size=2)},
       optional={"host": st.dictionaries(st.sampled_from(["total_mib", "free_mib"]), gpu_numbers)}) | json_values,
       raw=st.none() | st.binary(max_size=50) | st.just(b"[" * 50_000))
def test_gpu_files(tmp_path_factory, doc, raw):
    path = tmp_path_factory.mktemp("gpus") / "gpus.json"
    path.write_bytes(raw if raw is not None else json.dumps(doc).replace("Infinity", "1e400").encode())
    try:
        assert isinstance(FileProbe(path).probe(), GpuInventory)
    except GpuProbeError as e:
        assert e.message


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir"])
def test_gpu_file_that_is_not_a_file(tmp_path: Path, special):
    path = {"/dev/zero": Path("/dev/zero"), "dir": tmp_path}.get(special, tmp_path / "fifo")
    if special == "fifo":
        os.mkfifo(path)
    with pytest.raises(GpuProbeError, match="not a regular file|cannot read"):
        FileProbe(path).probe()


# ---------------------------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def http_router():
    profiles = group_profiles("coding")
    backends = fake_backends(profiles)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LLAMACTL_")}
    os.environ["LLAMACTL_MAX_BODY_BYTES"] = "65536"
    try:
        app = create_app(Router(profiles, backends, RouterConfig()), middleware=auth.middleware(Settings()))
    finally:
        os.environ.pop("LLAMACTL_MAX_BODY_BYTES")
        os.environ.update(saved)
    server = ServerThread(app)
    client = httpx.Client(base_url=server.url, timeout=30)
    try:
        yield client
    finally:
        client.close()
        server.stop()
        backends.close()


ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/completion"),
          ("POST", "/llamactl/switch"), ("GET", "/v1/models"), ("GET", "/models"), ("GET", "/health"),
          ("GET", "/metrics"), ("GET", "/llamactl/status"), ("POST", "/no/such/route"), ("DELETE", "/v1/models")]
header_values = st.from_regex(r"[!-~]([ -~]{0,38}[!-~])?", fullmatch=True) | st.sampled_from(
    ["evil.example", "http://evil.example", "null", "text/plain", "application/json; charset=utf-8", "cross-site",
     "localhost", "[::1]:1", "127.0.0.1:0"])
HEADER_NAMES = ["host", "origin", "content-type", "x-llamactl-class", "authorization", "x-api-key",
                "sec-fetch-site", "sec-fetch-mode", "accept", "access-control-request-method"]
bodies = (st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
          | st.fixed_dictionaries({}, optional={"model": json_values | st.sampled_from(["coding", "coding-spec"]),
                                                "group": json_values | st.just("coding"),
                                                "member": json_values | st.sampled_from(["auto", "coding-plain"]),
                                                "timeout_s": json_values, "stream": json_values,
                                                "messages": json_values, "prompt": json_values,
                                                "max_tokens": json_values}).map(lambda v: json.dumps(v).encode())
          | st.integers(1, 3000).map(lambda n: b'{"model": ' + b"[" * n * 10 + b"]" * n * 10 + b"}"))


@fuzz(300)
@given(route=st.sampled_from(ROUTES), body=bodies,
       headers=st.dictionaries(st.sampled_from(HEADER_NAMES), header_values, max_size=4),
       json_type=st.booleans())
def test_every_route_body_and_header(http_router, route, body, headers, json_type):
    method, path = route
    if json_type:
        headers.setdefault("content-type", "application/json")
    r = http_router.request(method, path, content=body if method != "GET" else None, headers=headers)
    assert r.status_code < 500 or r.headers.get("x-llamactl-error-source") == "upstream", (r.status_code, r.text)
    if r.status_code >= 400 and r.status_code != 405:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and len(error["message"]) < 4000


# ------------------------------------------------------------------------------------------ control


@pytest.fixture(scope="module")
def control_daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("control")
    settings = Settings(home=home)
    with daemon(settings):
        yield settings


def _exchange(settings: Settings, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(socket_path(settings)))
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)


@fuzz(300)
@given(request=st.fixed_dictionaries({}, optional={
    "op": st.sampled_from(["up", "down", "switch", "status", "logs-path"]) | json_values,
    "args": st.fixed_dictionaries({}, optional={"profile": json_values | st.sampled_from(["a", "../x"]),
                                                "group": json_values, "member": json_values,
                                                "timeout_s": json_values}) | json_values}).map(json.dumps)
    | st.binary(max_size=100).map(lambda b: b.decode("latin-1"))
    | st.integers(1, 20_000).map(lambda n: "[" * n))
def test_control_protocol(control_daemon, request):
    answer = _exchange(control_daemon, request.encode("utf-8", "surrogatepass").replace(b"\n", b" ") + b"\n")
    assert isinstance(answer["ok"], bool)
    if not answer["ok"]:
        assert answer["error"]["message"] and answer["error"]["type"]


@pytest.fixture(scope="module")
def model_headers(tmp_path_factory) -> list[tuple[Path, bytes, int]]:
    """A small model in one file and the first part of one split in three: (path, bytes, header length)."""
    from llamactl.gguf import read_gguf
    from tests.synth_gguf import write_llama

    folder = tmp_path_factory.mktemp("models")
    small = dict(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=64, n_vocab=300)
    one = write_llama(folder / "one.gguf", **small)
    first = write_llama(folder / "split.gguf", split_max_tensors=8, **small)
    return [(p, p.read_bytes(), read_gguf(p).data_offset) for p in (one, first)]


@fuzz(300)
@given(which=st.integers(0, 1), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                              min_size=1, max_size=8),
       big=st.none() | st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([2**31, 2**40, 2**63 + 5])),
       cut=st.none() | st.floats(0, 1))
def test_model_files(model_headers, tmp_path_factory, which, edits, big, cut):
    """A damaged header (bytes changed, the file cut short): the plan's reader gives a ProfileError naming the
    file, or a model; never a traceback, or memory for a length or a block count the file cannot hold."""
    from llamactl.gguf import clear_header_cache, read_model
    from llamactl.plan.model import spec_from_gguf

    path, data, header = model_headers[which]
    damaged = bytearray(data)
    for where, value in edits:
        damaged[int(where * header)] = value
    if big is not None:  # a length, a count or a block count far past what the file holds, anywhere
        at = int(big[0] * (header - 8))
        damaged[at:at + 8] = big[1].to_bytes(8, "little")
    if cut is not None:
        damaged = damaged[:int(cut * len(damaged))]
    folder = tmp_path_factory.mktemp("damaged")
    for part in path.parent.glob(path.name.replace("00001", "0000?")):  # the split's other parts, as they were
        (folder / part.name).write_bytes(part.read_bytes())
    copy = folder / path.name
    copy.write_bytes(bytes(damaged))
    clear_header_cache()
    try:
        spec = spec_from_gguf(read_model(copy))
    except ProfileError as e:
        assert str(folder) in e.message, e.message
    else:
        assert spec.n_layer <= 512
