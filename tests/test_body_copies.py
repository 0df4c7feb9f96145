"""A large request body is held once on its way to the engine: parsed from its bytes without a decoded copy, and
sent with the router's fields added as one more piece, not re-serialised (what the engine receives is the body
with the fields set, whatever the body's spacing and keys: hypothesis)."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

from hypothesis import given, settings, strategies as st

from llamactl.inputs import parse_json_object
from llamactl.router.body_fields import with_fields
from llamactl.router.upstream import WRITE_SLICE_BYTES, UpstreamPool

MIB = 1024 * 1024
DRAFTING_OFF = {"speculative.n_max": 0}


def big_body(mib: int) -> bytearray:
    return bytearray(json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x" * (mib * MIB)}]}),
                     "ascii")


def test_parsing_a_large_body_makes_no_decoded_copy_of_it():
    body = big_body(16)
    tracemalloc.start()
    try:
        payload = parse_json_object(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(payload["messages"][0]["content"]) == 16 * MIB
    # the parsed document is itself one body large (its one big string); a str of the whole body made first
    # (json.loads on bytes decodes them) would take the peak past two bodies
    assert peak < 1.2 * len(body), f"parsing took {peak / len(body):.2f}x the body"


def test_bad_json_reads_as_before_and_what_json_accepts_still_parses():
    for raw, words in ((b'{"a": 1', "not valid JSON"), (b"[" * 100_000, "nested too deeply"),
                       (b"\xff", "not valid JSON")):
        try:
            parse_json_object(raw)
        except ValueError as e:
            assert words in str(e)
        else:
            raise AssertionError(f"{raw[:10]!r} parsed")
    assert parse_json_object(b'{"t": NaN, "s": "\\ud800"}')["s"] == "\ud800"


def test_fields_are_added_without_copying_the_body():
    body = big_body(4)
    pieces = with_fields(body, DRAFTING_OFF)
    assert [p.obj for p in pieces if isinstance(p, memoryview)] == [body, body]  # views of the one buffer
    assert sum(len(p) for p in pieces if not isinstance(p, memoryview)) < 64
    sent = json.loads(b"".join(pieces))
    assert sent["speculative.n_max"] == 0 and len(sent["messages"][0]["content"]) == 4 * MIB


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=8)
spacing = st.sampled_from(["", " ", "\n", "\t\r\n "])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "speculative.n_max", "speculative", "n_max", "prompt", "é"]) |
                       st.text(max_size=6), json_values, max_size=4),
       spacing, spacing, st.booleans(), st.dictionaries(st.sampled_from(["speculative.n_max", "speculative.n_min"]),
                                                        st.integers(0, 16), min_size=1))
def test_the_body_sent_is_the_body_with_the_fields_set(payload, before, after, ascii_only, fields):
    raw = (before + json.dumps(payload, ensure_ascii=ascii_only, indent=None if before else 1) + after).encode()
    for body in (raw, bytearray(raw)):
        sent = b"".join(bytes(p) for p in with_fields(body, fields))
        objects: list[list] = []  # every object's pairs, the outermost last
        assert json.loads(sent, object_pairs_hook=lambda pairs: objects.append(pairs) or dict(pairs)) == {
            **payload, **fields}
        keys = [k for k, _ in objects[-1]]
        assert all(keys.count(k) == 1 for k in fields)  # a key the body named is not sent twice


def test_the_engine_receives_every_piece_in_order():
    """Through the real client, to a loopback server: a small body in one write, a large one in slices."""
    async def run() -> None:
        received: list[bytes] = []

        async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            received.append(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

        server = await asyncio.start_server(engine, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        try:
            for size in (100, 3 * WRITE_SLICE_BYTES + 7):
                body = bytearray(json.dumps({"prompt": "y" * size}), "ascii")
                response = await pool.request(f"http://127.0.0.1:{port}", "POST", "/completion", {},
                                              with_fields(body, DRAFTING_OFF))
                assert [piece async for piece in response.aiter_body()] == [b"ok"]
                assert json.loads(received[-1]) == {"prompt": "y" * size, **DRAFTING_OFF}
        finally:
            await pool.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(run())
