"""What the router learnt, kept across daemon restarts: each member's measured speed and acceptance per class
(the evidence the switching policy reads), each lane's long-run mix of classes and the lengths of its runs of
one class (how long a run is expected to last).

Without it every restart (an upgrade, a reboot, `systemctl restart`) starts from priors, and the policy pays
again, in reloads, to find out what it knew. The file is `<state_dir>/learned.json` (0600, written whole and
renamed into place). A record is restored only for a member whose profile is unchanged (its fingerprint), in
a lane served now, and only as old as the telemetry's memory allows (`Telemetry.memory_s`, counting the time
the daemon was down). The file is llamactl's own, but it is read as untrusted input: a record that does not
check out is skipped, and a file that is not JSON, or too big, is ignored with a warning (the next save
replaces it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamactl.router.runs import Runs
from llamactl.router.telemetry import Sample, Telemetry

log = logging.getLogger("llamactl.router")

FILE_NAME = "learned.json"
VERSION = 1
MAX_BYTES = 4 << 20
MAX_RECORDS = 10000  # of at most ~300 bytes: the file stays under MAX_BYTES
MAX_CLASSES = 64  # per lane: each class restored is a window and a metrics label
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# Profile fields that do not change how fast a member decodes: editing them keeps what it measured.
_NOT_SPEED = {"source", "extends", "description", "load_timeout_s", "stop_timeout_s", "keep"}

Lanes = Mapping[str, Mapping[str, str]]  # lane -> member -> its profile's fingerprint


def fingerprint(profile: Any) -> str:
    """A digest of what a member runs (model, drafter, flags): evidence follows the configuration it measured."""
    text = profile.model_dump_json(exclude=_NOT_SPEED)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def snapshot(telemetry: Telemetry, lanes: Lanes, wall_now: float,
             runs: Mapping[str, Runs] | None = None) -> dict[str, Any]:
    """The evidence of every served lane and member as of now, with each sample's age; the lanes' mixes and,
    given the lanes' `Runs`, their run lengths."""
    now = telemetry.clock()
    records = []
    for (lane, cls, member), samples in telemetry.remembered_samples():
        prints = lanes.get(lane, {})
        if member not in prints:
            continue
        for s in samples:
            if not s.gen_tok_s:
                continue
            records.append({"lane": lane, "member": member, "fingerprint": prints[member], "class": cls,
                            "role": s.role, "tok_s": s.gen_tok_s, "tokens": s.completion_tokens,
                            "draft_n": s.draft_n, "draft_accepted": s.draft_accepted,
                            "age_s": round(max(0.0, now - s.at), 3)})
    mix = {lane: telemetry.mix(lane) for lane in lanes}
    return {"version": VERSION, "saved_at_unix": wall_now, "samples": records[:MAX_RECORDS],
            "mix": {lane: counts for lane, counts in mix.items() if counts},
            "runs": {lane: ended for lane, r in (runs or {}).items() if lane in lanes and (ended := r.export())}}


def restore(telemetry: Telemetry, data: Any, lanes: Lanes, wall_now: float,
            runs: Mapping[str, Runs] | None = None) -> tuple[int, int]:
    """Put a snapshot's evidence back into `telemetry` (and its run lengths into the lanes' `runs`). Returns
    (samples restored, records skipped)."""
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return 0, 0
    saved_at = _number(data.get("saved_at_unix"), 0, math.inf)
    offline = max(0.0, wall_now - saved_at) if saved_at is not None else math.inf
    records = data.get("samples")
    records = records[:MAX_RECORDS] if isinstance(records, list) else []
    now = telemetry.clock()
    samples = [_sample(record, lanes, offline, telemetry.memory_s, now) for record in records]
    classes: dict[str, set[str]] = {}
    restored = 0
    for sample in sorted((s for s in samples if s is not None), key=lambda s: s.at):  # windows are in time order
        seen = classes.setdefault(sample.lane, set())
        if sample.cls not in seen and len(seen) >= MAX_CLASSES:
            continue
        seen.add(sample.cls)
        telemetry.add_evidence(sample)
        restored += 1
    skipped = len(records) - restored
    if offline > telemetry.memory_s:
        return restored, skipped
    for lane, counts in _per_lane(data.get("mix"), lanes):
        clean = {c: n for c, n in counts if _number(n, 0, 1e9) is not None}
        if clean:
            telemetry.restore_mix(lane, clean)
    for lane, lengths in _per_lane(data.get("runs"), lanes):
        if runs is not None and lane in runs:
            clean_runs = {c: [n for n in v[-runs[lane].keep:] if isinstance(n, int) and not isinstance(n, bool)
                              and 0 < n <= 10**6] for c, v in lengths if isinstance(v, list)}
            runs[lane].restore({c: v for c, v in clean_runs.items() if v})
    return restored, skipped


def _per_lane(value: Any, lanes: Lanes):
    """(lane, [(class, value), ...]) for each served lane of a {lane: {class: value}} object, names checked."""
    if not isinstance(value, dict):
        return
    for lane, per_class in value.items():
        if lane in lanes and isinstance(per_class, dict):
            yield lane, [(c, v) for c, v in list(per_class.items())[:MAX_CLASSES]
                         if isinstance(c, str) and _NAME.fullmatch(c)]


def _sample(record: Any, lanes: Lanes, offline: float, memory_s: float, now: float) -> Sample | None:
    if not isinstance(record, dict):
        return None
    lane, member, cls, role = record.get("lane"), record.get("member"), record.get("class"), record.get("role")
    if not (isinstance(lane, str) and isinstance(member, str) and isinstance(cls, str) and _NAME.fullmatch(cls)):
        return None
    if lanes.get(lane, {}).get(member) != record.get("fingerprint") or role not in ("spec", "plain"):
        return None
    tok_s = _number(record.get("tok_s"), 1e-6, 1e6)
    age = _number(record.get("age_s"), 0, math.inf)
    tokens = _count(record.get("tokens"))
    drafted, accepted = _count(record.get("draft_n")), _count(record.get("draft_accepted"))
    if tok_s is None or age is None or age + offline > memory_s or tokens is False or drafted is False \
            or accepted is False or (drafted is None) != (accepted is None) or (drafted or 0) < (accepted or 0):
        return None
    return Sample(lane=lane, profile=member, role=role, cls=cls, endpoint="restored", status=200, gen_tok_s=tok_s,
                  completion_tokens=tokens, draft_n=drafted, draft_accepted=accepted, at=now - age - offline)


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and abs(value) > 2**53:  # float() of a 400-digit integer overflows
        return None
    return float(value) if math.isfinite(value) and low <= value <= high else None


def _count(value: Any) -> int | None | bool:
    """A token count: None where absent, False where it is not a sane count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**8:
        return False
    return value


def served(router: Any) -> dict[str, dict[str, str]]:
    """lane -> member -> fingerprint, for the router's lanes as they are now (a member's depth choices, MEMBER@DEPTH,
    under its own profile's fingerprint: what they measured is kept too)."""
    def choices(lane: Any) -> dict[str, str]:
        every = {m: m for m in lane.spec.members}
        every.update({f"{m}@{d}": m for m, depths in getattr(lane.spec, "choice_depths", {}).items()
                      for d in depths})
        return every

    return {name: {c: fingerprint(router.profiles[m]) for c, m in choices(lane).items() if m in router.profiles}
            for name, lane in router.lanes.items()}


def load_into(router: Any, data: Any, path: Path, wall_now: float) -> int:
    """Restore what the file at `path` held (`read`) into the router's telemetry; returns the samples restored."""
    if data is None:
        return 0
    restored, skipped = restore(router.telemetry, data, served(router), wall_now, runs_of(router))
    log.info("%s: restored %d measurements of the members served%s", path, restored,
             f" ({skipped} skipped: changed profiles, lanes not served, or older than the memory)" if skipped else "")
    return restored


def runs_of(router: Any) -> dict[str, Runs]:
    return {name: lane.runs for name, lane in router.lanes.items()}


# ------------------------------------------------------------------------------------------ the file


def path_in(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def read(path: Path) -> Any:
    """The file's JSON, or None where there is none or it cannot be used (a warning says why)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO there must not block the start
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("%s: not read (%s); starting without what was learnt before", path, e.strerror or e)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory naming only the fd
        os.close(fd)
        log.warning("%s: not a regular file, ignored; starting without what was learnt before", path)
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MAX_BYTES + 1)
        except OSError as e:
            log.warning("%s: not read (%s); starting without what was learnt before", path, e.strerror or e)
            return None
    if len(raw) > MAX_BYTES:
        log.warning("%s: over %d MiB, ignored; it is replaced at the next save", path, MAX_BYTES >> 20)
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        log.warning("%s: not JSON (%s), ignored; it is replaced at the next save", path,
                    "nested too deep" if isinstance(e, RecursionError) else e)
        return None


def write(path: Path, data: Mapping[str, Any]) -> None:
    """Write the whole file under a temporary name of its own (0600), then rename it into place: never half a
    file, whoever else writes."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


class Saver:
    """Saves a router's learned.json: every `every_s` (`run`), and once more at a clean stop (`save`). The
    snapshot is taken on the event loop (the telemetry's owner); the write runs in a thread of its own, one
    save at a time and each after the one before, so the last snapshot taken is the one left on disk even when
    a periodic write is in flight at the stop. Saving never raises: what fails is a warning, and the figures
    stay in memory until the next save. The thread is a daemon thread: a stalled disk cannot hold the process
    at exit (the file is renamed into place whole, so what is on disk stays whole)."""

    def __init__(self, router: Any, path: Path) -> None:
        self.router, self.path = router, path
        self._lock = asyncio.Lock()
        self._writing: asyncio.Future[bool] | None = None

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.save()

    async def save(self, timeout_s: float | None = None) -> bool:
        """True once this snapshot is on disk; False where it is not (a warning says why)."""
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                if self._writing is not None:
                    await asyncio.shield(self._writing)  # the write before this one lands first
                data = snapshot(self.router.telemetry, served(self.router), time.time(), runs_of(self.router))
                self._writing = self._in_thread(data)
                return await asyncio.shield(self._writing)  # a cancelled caller does not cut a write short
        except TimeoutError:
            log.warning("%s: still being written after %.0f s; left to finish in the background", self.path,
                        timeout_s)
        except Exception as e:  # noqa: BLE001 - keeping what was learnt must never take the daemon down
            log.warning("%s: not saved (%s: %s)", self.path, type(e).__name__, e)
        return False

    def _in_thread(self, data: Mapping[str, Any]) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def work() -> None:
            ok = self._write(data)
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile: nobody waits
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(ok))

        threading.Thread(target=work, name="learned.json", daemon=True).start()
        return done

    def _write(self, data: Mapping[str, Any]) -> bool:
        try:
            write(self.path, data)
            return True
        except Exception as e:  # noqa: BLE001 - an OSError, or a value json cannot write: a warning either way
            log.warning("%s: not saved (%s); what the router learnt is kept in memory until the next save",
                        self.path, getattr(e, "strerror", None) or e)
            return False
