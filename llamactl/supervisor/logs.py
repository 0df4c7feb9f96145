"""An engine's log file: rotate it, read its last lines, follow it as it grows, relay it to the daemon's log.

One module for every reader and writer of the logs: `llamactl logs [-f]`, `up --foreground`, the start
error's last lines, and the daemon (which rotates running engines' logs and relays their lines).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

FOLLOW_POLL_S = 0.2


def rotate_logs(path: Path, backups: int, *, in_use: bool = False) -> None:
    """Keep the previous `backups` logs as path.1 (newest) .. path.N.

    At each start the old file is renamed. A log `in_use` by a running child is copied and then
    truncated instead: the child appends (O_APPEND), so its next line lands at the new start.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        return
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    first = path.with_name(f"{path.name}.1")
    if in_use:
        if backups > 0:
            shutil.copyfile(path, first)
        os.truncate(path, 0)
    elif backups > 0:
        path.replace(first)
    else:
        path.unlink()


def rotate_if_large(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate a running child's log once it passes max_bytes; True if it did."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    rotate_logs(path, backups, in_use=True)
    return True


def tail_lines(path: Path, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    if n <= 0:
        return []  # [-0:] would be every line
    return [line for line in data.splitlines() if line.strip()][-n:]


def follow(path: str | Path, keep_going: Callable[[], bool], *, from_end: bool = False,
           poll_s: float = FOLLOW_POLL_S) -> Iterator[str]:
    """Yield whole lines appended to `path` until keep_going() is False (then drain what is left).

    Follows the log by name across both rotations llamactl makes: at a restart the file is renamed to
    path.1 and a new one started (the old file is read to its end, then the new one from its start); while
    the engine runs it is copied to path.1 and truncated (the lines between the last one read and the copy's
    end are read from path.1, then the new file from its start). Nothing is skipped or repeated.
    """
    path = str(path)
    f = _open_waiting(path, keep_going, poll_s)
    if f is None:
        return
    try:
        if from_end:
            f.seek(0, os.SEEK_END)
        pending = b""
        while True:
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith(b"\n"):
                    yield pending.decode(errors="replace")
                    pending = b""
                continue
            position = f.tell()
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None  # between a rename and the new file: wait for it
            if st is not None and st.st_ino != os.fstat(f.fileno()).st_ino:
                f.close()  # renamed away and fully read: continue in the new file
                f = open(path, "rb")
                continue
            if st is not None and st.st_size < position:
                # Copied to path.1 and truncated: what we had not read yet is at the end of the copy.
                yield from _lines_from(path + ".1", position, pending)
                pending = b""
                f.seek(0)
                continue
            if not keep_going():
                rest = pending + f.read()
                if rest:
                    yield rest.decode(errors="replace")
                return
            time.sleep(poll_s)
    finally:
        f.close()


def _open_waiting(path: str, keep_going: Callable[[], bool], poll_s: float):
    while True:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            if not keep_going():
                return None
            time.sleep(poll_s)


def _lines_from(path: str, offset: int, pending: bytes) -> Iterator[str]:
    try:
        with open(path, "rb") as backup:
            if os.fstat(backup.fileno()).st_size < offset:
                return
            backup.seek(offset)
            data = pending + backup.read()
    except FileNotFoundError:
        return
    for line in data.splitlines(keepends=True):
        yield line.decode(errors="replace")


async def relay_log(name: str, path: Path, from_end: bool, poll_s: float = 0.5) -> None:
    """Copy a child's log lines into the daemon's log as `llamactl[NAME]: line` (journald-friendly)."""
    from asyncio import sleep  # here, not at the top: `llamactl up` imports this module and needs no event loop

    logger = logging.getLogger(f"llamactl[{name}]")
    pos: int | None = None
    pending = b""
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if pos is None:
            pos = size if from_end else 0
        if size < pos:  # rotated or truncated
            pos, pending = 0, b""
        if size > pos:
            with path.open("rb") as f:
                f.seek(pos)
                data = f.read(min(size - pos, 1 << 20))
            pos += len(data)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if line.strip():
                    logger.info("%s", line.decode(errors="replace").rstrip())
            if len(pending) > 65536:
                logger.info("%s", pending.decode(errors="replace"))
                pending = b""
        await sleep(poll_s)


async def follow_lines(path: Path, lines: int, follow: bool, poll_s: float = 0.25,
                       max_line_bytes: int = 65536,
                       keep_going: Callable[[], bool] = lambda: True) -> AsyncIterator[str]:
    """The last `lines` lines of a log (none for 0), then (with `follow`) each line appended to it, as the event
    stream of /llamactl/logs shows them. A rotation (the file shrinks or is replaced) continues from the new start."""
    from asyncio import sleep

    for line in tail_lines(path, lines):
        yield line.rstrip("\n")
    if not follow:
        return
    try:
        st = path.stat()
        pos, inode = st.st_size, st.st_ino
    except FileNotFoundError:
        pos, inode = 0, None
    pending = b""
    while keep_going():
        await sleep(poll_s)
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_ino != inode or st.st_size < pos:  # rotated or truncated
            pos, inode, pending = 0, st.st_ino, b""
        if st.st_size <= pos:
            continue
        with path.open("rb") as f:
            f.seek(pos)
            data = f.read(min(st.st_size - pos, 1 << 20))
        pos += len(data)
        *complete, pending = (pending + data).split(b"\n")
        if len(pending) > max_line_bytes:
            complete.append(pending)
            pending = b""
        for line in complete:
            if line.strip():
                yield line[:max_line_bytes].decode(errors="replace").rstrip()


def last_line(path: Path, max_bytes: int = 4096) -> str | None:
    """The last non-empty line of a log (an engine's load progress while it starts)."""
    found = tail_lines(path, 1, max_bytes)
    return found[-1][:300] if found else None
