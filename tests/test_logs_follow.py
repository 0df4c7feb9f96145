"""`llamactl logs -f` follows the live log across both rotations llamactl makes, without skipping or
repeating a line: the copy-and-truncate of a running engine's log, and the rename at a restart."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from llamactl.supervisor.logs import follow, rotate_logs


class Follower:
    def __init__(self, path: Path) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self.thread.start()

    def _run(self, path: Path) -> None:
        for line in follow(path, lambda: not self.stop.is_set(), poll_s=0.01):
            self.lines.put(line)

    def until(self, wanted: str) -> None:
        while wanted not in self.seen:
            self.seen.append(self.lines.get(timeout=10).rstrip("\n"))

    def close(self) -> list[str]:
        self.stop.set()
        self.thread.join(10)
        while not self.lines.empty():
            self.seen.append(self.lines.get().rstrip("\n"))
        return self.seen


def append(path: Path, *lines: str) -> None:
    with path.open("a") as f:
        f.writelines(line + "\n" for line in lines)


def test_follow_survives_truncation_and_restart(tmp_path: Path):
    log = tmp_path / "p.log"
    append(log, "a long first line " * 10, "line 2", "line 3")
    follower = Follower(log)
    try:
        follower.until("line 3")
        append(log, "line 4 written just before the rotation " * 3)
        rotate_logs(log, backups=3, in_use=True)  # the daemon's size rotation: copy to p.log.1, truncate
        append(log, "l5")  # shorter than what was read: a follower by offset never sees it
        follower.until("l5")
        append(log, "line 6, the last of this engine")
        rotate_logs(log, backups=3)  # a restart: p.log -> p.log.1, a fresh p.log
        append(log, "line 7 from the restarted engine")
        follower.until("line 7 from the restarted engine")
    finally:
        seen = follower.close()
    assert seen == ["a long first line " * 10, "line 2", "line 3", "line 4 written just before the rotation " * 3,
                    "l5", "line 6, the last of this engine", "line 7 from the restarted engine"]


def test_follow_drains_and_stops(tmp_path: Path):
    log = tmp_path / "p.log"
    append(log, "one")
    with log.open("a") as f:
        f.write("partial")
    assert list(follow(log, lambda: False)) == ["one\n", "partial"]
