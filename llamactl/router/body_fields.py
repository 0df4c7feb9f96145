"""A request body with a few fields set by the router (a drafting engine told not to draft for a plain member),
without parsing or copying the body: the fields go in as one more piece before its closing brace, and the
pieces are written to the engine one after the other (upstream.Body). Pure, no I/O.

Added last: where a client's body already names the key, the engine's JSON parser (nlohmann::json, in both
forks) keeps the last of duplicate keys. A body that names a key literally is re-serialised instead, so that
the result does not depend on that; so is anything not shaped as one plain object (it is rare: a body the
router parsed is a JSON object, and clients send it without a byte order mark).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llamactl.inputs import parse_json_object

Piece = bytes | bytearray | memoryview
JSON_WHITESPACE = b" \t\r\n"


def with_fields(body: bytes | bytearray, fields: Mapping[str, Any]) -> tuple[Piece, ...]:
    """`body` (a JSON object) with `fields` set, as the pieces to send."""
    if not fields:
        return (body,)
    start, end = 0, len(body)
    while start < end and body[start] in JSON_WHITESPACE:
        start += 1
    while end > start and body[end - 1] in JSON_WHITESPACE:
        end -= 1
    encoded = {json.dumps(key).encode(): json.dumps(value) for key, value in fields.items()}
    if end - start < 2 or body[start] != ord("{") or body[end - 1] != ord("}") or any(k in body for k in encoded):
        return (json.dumps({**parse_json_object(body), **fields}).encode(),)
    first = start + 1
    while first < end - 1 and body[first] in JSON_WHITESPACE:
        first += 1
    members = ",".join(f"{key.decode()}:{value}" for key, value in encoded.items()).encode()
    insert = members if first == end - 1 else b"," + members  # `{}`: no comma before the first member
    view = memoryview(body)
    return view[:end - 1], insert, view[end - 1:]
