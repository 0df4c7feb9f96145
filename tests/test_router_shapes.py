"""Client mistakes in a body's shape are a 400 naming the field, before anything is queued or loaded (the
engine answered some with a 500, e.g. `vector::_M_range_check`): the pure check over every route and any JSON
value (hypothesis), the issue's instances over HTTP with fake engines, and multipart forms that cannot be read."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llamactl.router.routes import RELAYED
from llamactl.router.shapes import SHAPES, ShapeError, check_shape
from tests.test_router_routes import mixed, model_for  # noqa: F401 - the fixture

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=5), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
FIELDS = sorted({name for fields in SHAPES.values() for spec in fields for name in spec.names})
GOOD = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi", "query": "q",
        "documents": ["d"], "content": "hi", "tokens": [1, 2]}


def test_every_json_route_has_a_shape():
    assert {p for p, info in RELAYED.items() if not info.multipart} == set(SHAPES)


@given(st.sampled_from(sorted(SHAPES)), st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4),
       st.none() | st.integers(1, 300_000))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CPUs are shared
def test_any_body_passes_or_names_one_of_the_routes_fields(path, payload, n_vocab):
    try:
        check_shape(path, payload, n_vocab)
    except ShapeError as e:
        names = {n for spec in SHAPES[path] for n in spec.names}
        assert e.field in names and f"'{e.field}'" in str(e) and path in str(e)


@pytest.mark.parametrize("path", sorted(SHAPES))
def test_a_well_formed_body_passes(path):
    check_shape(path, dict(GOOD), 262144)


@pytest.mark.parametrize(("path", "payload", "field"), [
    ("/v1/messages/count_tokens", {}, "messages"),  # the engine: 500 "'messages' is required"
    ("/v1/messages", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),  # the engine generates to the context's end
    ("/tokenize", {"content": 12}, "content"),
    ("/tokenize", {"content": [{}]}, "content"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),  # the engine: vector::_M_range_check
    ("/detokenize", {"tokens": [262144]}, "tokens"),
    ("/detokenize", {"tokens": 5}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
    ("/v1/embeddings", {"input": {}}, "input"),
    ("/embedding", {"content": 5}, "content"),
    ("/v1/rerank", {"query": 5, "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
])
def test_the_engines_500s_for_client_mistakes(path, payload, field):
    with pytest.raises(ShapeError) as raised:
        check_shape(path, payload, 262144)
    assert raised.value.field == field


@pytest.mark.parametrize(("path", "payload", "field"), [
    ("/v1/messages/count_tokens", {}, "messages"),
    ("/tokenize", {"content": 12}, "content"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/v1/embeddings", {"input": {}}, "input"),
    ("/v1/chat/completions/input_tokens", {"messages": "hi"}, "messages"),
])
def test_over_http_a_400_naming_the_field_and_nothing_started(mixed, path, payload, field):  # noqa: F811
    url, _router, backends = mixed
    r = httpx.post(f"{url}{path}", json={"model": model_for(path), **payload}, timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and f"'{field}'" in error["message"] and error["source"] == "llamactl"
    assert backends.events == []  # refused before any engine was loaded


def test_a_multipart_form_that_cannot_be_read_says_why(mixed):  # noqa: F811
    url, _router, backends = mixed
    form = b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nchat\r\n--XyZ--\r\n'
    for content_type, words in (("multipart/form-data", "names no boundary"),
                                ("multipart/form-data; boundary=Other", "does not use the boundary")):
        r = httpx.post(f"{url}/v1/audio/transcriptions", content=form, headers={"content-type": content_type},
                       timeout=10)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert words in message and "no 'model'" not in message
    assert backends.events == []
