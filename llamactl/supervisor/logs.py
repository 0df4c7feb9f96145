"""Following a log file as it grows (for `logs -f` and `up --foreground`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

FOLLOW_POLL_S = 0.2


def follow(path: str, keep_going: Callable[[], bool], *, from_end: bool = False) -> Iterator[str]:
    """Yield lines appended to `path` until keep_going() is False (then drain what is left)."""
    with open(path, errors="replace") as f:
        if from_end:
            f.seek(0, 2)
        while True:
            line = f.readline()
            if line:
                yield line
                continue
            if not keep_going():
                yield from f.readlines()
                return
            time.sleep(FOLLOW_POLL_S)
