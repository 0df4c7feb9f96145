"""The prompt cache's files on disk: one directory under the cache dir (0700, files 0600), a manifest of what each
file is (its key, slot, profile, tokens, bytes, when it was saved and last used), and a byte budget for the whole
box, the least recently used files going first.

The engine writes a slot's file itself (`POST /slots/ID?action=save` into this directory, under a temporary name);
`commit` then makes it the key's file for that slot. Everything read back is input: a manifest or file that is
truncated, foreign, a link or not ours is skipped with a warning, never an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("llamactl.promptcache")

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20
MAX_ENTRIES = 4096
FILE_NAME = re.compile(r"^(?P<key>[0-9a-f]{32})-slot(?P<slot>[0-9]{1,3})\.bin$")
TEMP_NAME = re.compile(r"^[0-9a-f]{32}-slot[0-9]{1,3}\.[0-9a-f]{16}\.tmp$")
PROFILE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# llama.cpp's sequence state file: u32 magic 'ggsq', u32 version, u32 token count, the tokens, then the state.
STATE_MAGIC = 0x67677371
HEADER = struct.Struct("<III")


@dataclass(frozen=True)
class Entry:
    file: str
    key: str
    slot: int
    profile: str  # the profile whose engine saved it (a switch group's other member may restore it)
    bytes: int
    tokens: int
    saved_at: float
    used_at: float
    prefill_tok_s: float | None = None  # the saving engine's mean prefill speed: what a restore saves

    @staticmethod
    def parse(raw: Any) -> "Entry | None":
        """An entry from the manifest, or None when anything in it is off (a hand-edited or hostile manifest)."""
        if not isinstance(raw, dict):
            return None
        try:
            entry = Entry(file=raw["file"], key=raw["key"], slot=raw["slot"], profile=raw["profile"],
                          bytes=raw["bytes"], tokens=raw["tokens"], saved_at=float(raw["saved_at"]),
                          used_at=float(raw["used_at"]), prefill_tok_s=_positive_or_none(raw.get("prefill_tok_s")))
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        match = FILE_NAME.match(entry.file) if isinstance(entry.file, str) else None
        ints_ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62
                      for v in (entry.slot, entry.bytes, entry.tokens))
        if (match is None or not ints_ok or match["key"] != entry.key or int(match["slot"]) != entry.slot
                or not isinstance(entry.profile, str) or not PROFILE_NAME.match(entry.profile)):
            return None
        return entry


def _positive_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e12:
        return float(value)
    return None


def read_header(path: Path) -> tuple[int, int] | None:
    """(token count, file size) of a slot file, or None when it is not one (a link, not a regular file, too short,
    another magic, more tokens than bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        head = os.read(fd, HEADER.size)
    finally:
        os.close(fd)
    if len(head) < HEADER.size:
        return None
    magic, _version, n_tokens = HEADER.unpack(head)
    if magic != STATE_MAGIC or HEADER.size + 4 * n_tokens > st.st_size:
        return None
    return n_tokens, st.st_size


class PromptStore:
    """One per daemon (every engine's slots, one budget). Thread-safe: the daemon calls it from worker threads."""

    def __init__(self, directory: Path, *, budget_bytes: int, clock=time.time) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._opened = False

    # -- opening ---------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory (0700) and read the manifest, keeping only entries whose file checks out; files of
        ours the manifest does not know (a crash between a save and its manifest write) and stale temporary files
        are removed; anything else there is left alone, with a warning."""
        with self._lock:
            if self._opened:
                return
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
            for raw in self._read_manifest():
                entry = Entry.parse(raw)
                if entry is None:
                    log.warning("prompt cache: %s: an entry that is not one of ours is ignored", self._manifest_path)
                    continue
                problem = self._file_problem(entry)
                if problem:
                    log.warning("prompt cache: %s: %s; skipped", entry.file, problem)
                    self._unlink(entry.file)
                    continue
                self._entries[entry.file] = entry
            self._sweep_directory()
            self._evict_over_budget(keep=None)
            self._write_manifest()
            self._opened = True

    @property
    def _manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def _read_manifest(self) -> list[Any]:
        path = self._manifest_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning("prompt cache: %s cannot be read (%s); starting empty", path, e.strerror or e)
            return []
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                log.warning("prompt cache: %s is not a regular file; starting empty", path)
                return []
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            log.warning("prompt cache: %s is larger than %d MiB; starting empty", path, MAX_MANIFEST_BYTES >> 20)
            return []
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            log.warning("prompt cache: %s is not JSON; starting empty", path)
            return []
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            log.warning("prompt cache: %s has no entries list; starting empty", path)
            return []
        return entries[:MAX_ENTRIES]

    def _file_problem(self, entry: Entry) -> str | None:
        header = read_header(self.directory / entry.file)
        if header is None:
            return "not a slot file (missing, a link, or another format)"
        n_tokens, size = header
        if size != entry.bytes:
            return f"{size} bytes where {entry.bytes} were saved (truncated or rewritten)"
        return None

    def _sweep_directory(self) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            log.warning("prompt cache: cannot list %s: %s", self.directory, e.strerror or e)
            return
        for name in names:
            if name == MANIFEST or name in self._entries:
                continue
            if name.startswith(MANIFEST + "."):  # a manifest write cut short
                self._unlink(name)
            elif FILE_NAME.match(name) or TEMP_NAME.match(name):
                log.warning("prompt cache: %s is not in the manifest (an interrupted save); removed", name)
                self._unlink(name)
            else:
                log.warning("prompt cache: %s in %s is not ours; ignored", name[:80], self.directory)

    # -- saving ----------------------------------------------------------------------------------------

    def temp_name(self, key: str, slot: int) -> str:
        """A fresh name for the engine to save one slot to (in this directory), before `commit`."""
        return f"{key}-slot{slot}.{secrets.token_hex(8)}.tmp"

    def commit(self, temp: str, *, key: str, slot: int, profile: str, tokens: int,
               prefill_tok_s: float | None = None) -> Entry | None:
        """The engine saved `temp`: make it the key's file for `slot` (0600, replacing an older one), then keep
        the store under its budget. None (and the file removed) when it is not a slot file or alone exceeds
        the budget."""
        with self._lock:
            temp_path = self.directory / temp
            header = read_header(temp_path)
            if header is None:
                log.warning("prompt cache: the engine's save %s is not a slot file; dropped", temp)
                self._unlink(temp)
                return None
            size = header[1]
            if size > self.budget_bytes:
                log.warning("prompt cache: %s slot %d: %d MiB is more than the whole budget (%d MiB); not kept",
                            profile, slot, size >> 20, self.budget_bytes >> 20)
                self._unlink(temp)
                return None
            name = f"{key}-slot{slot}.bin"
            try:
                os.chmod(temp_path, 0o600)
                os.replace(temp_path, self.directory / name)
            except OSError as e:
                log.warning("prompt cache: keeping %s failed: %s", name, e.strerror or e)
                self._unlink(temp)
                return None
            now = self.clock()
            entry = Entry(file=name, key=key, slot=slot, profile=profile, bytes=size, tokens=tokens, saved_at=now,
                          used_at=now, prefill_tok_s=prefill_tok_s)
            self._entries[name] = entry
            self._evict_over_budget(keep=name)
            self._write_manifest()
            return entry

    def discard_temp(self, temp: str) -> None:
        """A save that failed or timed out: its partial file goes."""
        with self._lock:
            if TEMP_NAME.match(temp):
                self._unlink(temp)

    # -- restoring -------------------------------------------------------------------------------------

    def entries_for(self, key: str) -> list[Entry]:
        """The files an engine with this key can restore, one per slot, checked again on disk now (a file
        changed since: skipped with a warning and forgotten)."""
        with self._lock:
            found = []
            for entry in sorted(self._entries.values(), key=lambda e: e.slot):
                if entry.key != key:
                    continue
                problem = self._file_problem(entry)
                if problem:
                    log.warning("prompt cache: %s: %s; dropped", entry.file, problem)
                    self._forget(entry.file)
                    continue
                found.append(entry)
            if len(found) != len([e for e in self._entries.values() if e.key == key]):
                self._write_manifest()
            return found

    def touch(self, entry: Entry) -> None:
        """Restored: it is the most recently used now."""
        with self._lock:
            if entry.file in self._entries:
                self._entries[entry.file] = replace(self._entries[entry.file], used_at=self.clock())
                self._write_manifest()

    def drop(self, entry: Entry, reason: str) -> None:
        with self._lock:
            current = self._entries.get(entry.file)
            if current is None or current.saved_at != entry.saved_at:
                return  # saved again since: the new file is another matter
            log.warning("prompt cache: %s slot %d (%s): %s; file dropped", entry.profile, entry.slot, entry.file,
                        reason)
            self._forget(entry.file)
            self._write_manifest()

    # -- what status shows ---------------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        with self._lock:
            by_profile: dict[str, dict[str, int]] = {}
            for e in self._entries.values():
                row = by_profile.setdefault(e.profile, {"files": 0, "bytes": 0, "tokens": 0})
                row["files"] += 1
                row["bytes"] += e.bytes
                row["tokens"] += e.tokens
            return {"dir": str(self.directory), "budget_bytes": self.budget_bytes,
                    "bytes": sum(e.bytes for e in self._entries.values()), "profiles": by_profile}

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    # -- inside the lock -------------------------------------------------------------------------------

    def _evict_over_budget(self, keep: str | None) -> None:
        total = sum(e.bytes for e in self._entries.values())
        for entry in sorted(self._entries.values(), key=lambda e: e.used_at):
            if total <= self.budget_bytes:
                break
            if entry.file == keep:
                continue
            log.info("prompt cache: %s slot %d (%d MiB, last used %s) evicted: the store is over its budget of %d MiB",
                     entry.profile, entry.slot, entry.bytes >> 20, time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                time.localtime(entry.used_at)),
                     self.budget_bytes >> 20)
            self._forget(entry.file)
            total -= entry.bytes

    def _forget(self, name: str) -> None:
        self._entries.pop(name, None)
        self._unlink(name)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self.directory / name)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("prompt cache: cannot remove %s: %s", name, e.strerror or e)

    def _write_manifest(self) -> None:
        data = {"version": 1, "entries": [asdict(e) for e in self._entries.values()]}
        temp = self.directory / f"{MANIFEST}.{secrets.token_hex(8)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(temp, self._manifest_path)
        except OSError as e:
            log.warning("prompt cache: writing %s failed: %s", self._manifest_path, e.strerror or e)
            try:
                os.unlink(temp)
            except OSError:
                pass
