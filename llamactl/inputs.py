"""Client input checked once, the same way on every surface (HTTP routes, the control socket, files):
JSON that cannot exhaust the parser, timeouts that are finite numbers, switch requests with valid names.
Every refusal is a ValueError whose text says what was wrong and what is expected."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from llamactl.names import NAME_RULE, is_profile_name, shown

MAX_TIMEOUT_S = 7 * 86400.0


def parse_json(raw: bytes | bytearray | str, what: str = "request body") -> Any:
    """The JSON document in `raw`, parsed from its bytes as they are: msgspec makes each string straight from
    them, where json.loads first decodes the whole body into a str (and orjson copies it): a large body's
    parse costs one body more, not two. What msgspec refuses goes to json.loads, so that what it accepts (NaN,
    lone surrogates) still parses and a refusal reads as it always has. Nesting too deep for the parser
    (RecursionError) is reported like any other bad JSON."""
    try:
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return json.loads(raw)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def parse_json_object(raw: bytes | str, what: str = "request body") -> dict[str, Any]:
    payload = parse_json(raw, what)
    if not isinstance(payload, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(payload).__name__}")
    return payload


def positive_seconds(value: object, key: str) -> float:
    """A client's timeout: a finite number of seconds in (0, MAX_TIMEOUT_S]; bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"'{key}' must be a positive number of seconds (at most {MAX_TIMEOUT_S:g}), "
                         f"got {shown(value)}")
    return float(value)


def switch_request(payload: dict[str, Any], default_timeout_s: float) -> tuple[str, str, float]:
    """(group, member, timeout_s) of a switch request; member 'auto' hands the group back to the policy."""
    group, member = payload.get("group"), payload.get("member")
    if not is_profile_name(group):
        raise ValueError(f"'group' must be a switch group name ({NAME_RULE}), got {shown(group)}")
    base, _, depth = member.rpartition("@") if isinstance(member, str) and "@" in member else (member, "", "1")
    if member != "auto" and not (is_profile_name(base) and depth.isdigit() and 0 < int(depth) <= 256):
        raise ValueError(f"'member' must be a profile name ({NAME_RULE}), MEMBER@DEPTH (a depth 1..256 of its "
                         f"[speculation] depths) or 'auto', got {shown(member)}")
    timeout_s = positive_seconds(payload.get("timeout_s", default_timeout_s), "timeout_s")
    return group, member, timeout_s  # type: ignore[return-value]
