"""Option types that check a value where it enters, so a bad one is a usage error naming the option (exit 2),
never a traceback from the code that would have used it."""

from __future__ import annotations

import math

import click

PORT = click.IntRange(0, 65535)  # 0: a free port the system picks


class HttpUrl(click.ParamType):
    """http(s)://host[:port][/path] of a running `llamactl serve`."""

    name = "URL"

    def convert(self, value, param, ctx):
        from urllib.parse import urlsplit

        text = str(value)
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        except ValueError as e:
            self.fail(f"{text[:200]!r} is not a URL ({e})", param, ctx)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(f"{text[:200]!r} is not an http(s)://HOST[:PORT] URL", param, ctx)
        if any(c.isspace() or ord(c) < 0x20 for c in text):
            self.fail(f"{text[:200]!r} holds whitespace or control characters", param, ctx)
        return text.rstrip("/")


class Seconds(click.ParamType):
    """A finite, positive number of seconds (at most a day)."""

    name = "SECONDS"

    def __init__(self, max_s: float = 86400.0) -> None:
        self.max_s = max_s

    def convert(self, value, param, ctx):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)[:100]!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or not 0 < seconds <= self.max_s:
            self.fail(f"{str(value)[:100]!r} must be more than 0 and at most {self.max_s:g} seconds", param, ctx)
        return seconds


HTTP_URL = HttpUrl()


class FsPath(click.Path):
    """click.Path that also refuses what no file system path can hold (a NUL byte), as a usage error."""

    def convert(self, value, param, ctx):
        if "\x00" in str(value):
            self.fail(f"{str(value)[:200]!r} holds a NUL byte, which no path can", param, ctx)
        return super().convert(value, param, ctx)
