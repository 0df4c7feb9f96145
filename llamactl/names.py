"""Profile names are file stems (profiles/NAME.toml, state/servers/NAME.json, logs/NAME.log, locks, keys):
one check, applied where a name enters llamactl (CLI arguments, the control socket, HTTP, profile files),
so no name can reach outside the directory it names a file in."""

from __future__ import annotations

import re

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
