"""Profile names are file stems (profiles/NAME.toml, state/servers/NAME.json, logs/NAME.log, locks, keys):
one check, applied where a name enters llamactl (CLI arguments, the control socket, HTTP, profile files),
so no name can reach outside the directory it names a file in."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from llamactl.errors import ProfileError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '_', '.', '-', starting with a letter or digit"


class BadProfileName(ProfileError):
    """A profile (or switch group) name that cannot be a file stem."""


def shown(value: object, limit: int = 80) -> str:
    """A client-supplied value as it may appear in a message or a log line: repr-escaped, bounded."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def is_profile_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and not name.endswith(".")


def check_profile_name(name: object, what: str = "profile name") -> str:
    """`name` unchanged when it is a valid profile name; BadProfileName naming the rule otherwise."""
    if not is_profile_name(name):
        raise BadProfileName(f"{shown(name)} is not a valid {what}", hint=f"a profile name is {NAME_RULE}")
    return name  # type: ignore[return-value]


def closest_names(name: str, known: Iterable[str], *, noun: str = "profiles", limit: int = 12) -> str:
    """A hint for a name that is not there: the closest ones first ("did you mean ...?"), then the ones that
    exist (bounded: a long list is cut with a count)."""
    names = sorted(set(known))
    if not names:
        return f"no {noun} exist yet"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    listed = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    prefix = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{prefix}{noun} that exist: {listed}"
