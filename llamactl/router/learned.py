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
import tempfile
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
MAX_RECORDS = 20000
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Profile fields that do not change how fast a member decodes: editing them keeps what it measured.
_NOT_SPEED = {"source", "extends", "description", "load_timeout_s", "stop_timeout_s"}

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
    restored = skipped = 0
    now = telemetry.clock()
    for record in records:
        sample = _sample(record, lanes, offline, telemetry.memory_s, now)
        if sample is None:
            skipped += 1
            continue
        telemetry.restore(sample)
        restored += 1
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
            yield lane, [(c, v) for c, v in list(per_class.items())[:256] if isinstance(c, str) and _NAME.match(c)]


def _sample(record: Any, lanes: Lanes, offline: float, memory_s: float, now: float) -> Sample | None:
    if not isinstance(record, dict):
        return None
    lane, member, cls, role = record.get("lane"), record.get("member"), record.get("class"), record.get("role")
    if not (isinstance(lane, str) and isinstance(member, str) and isinstance(cls, str) and _NAME.match(cls)):
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if low <= value <= high else None


def _count(value: Any) -> int | None | bool:
    """A token count: None where absent, False where it is not a sane count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**8:
        return False
    return value


def served(router: Any) -> dict[str, dict[str, str]]:
    """lane -> member -> fingerprint, for the router's lanes as they are now."""
    return {name: {m: fingerprint(router.profiles[m]) for m in lane.spec.members if m in router.profiles}
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
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("%s: not read (%s); starting without what was learnt before", path, e.strerror or e)
        return None
    if len(raw) > MAX_BYTES:
        log.warning("%s: over %d MiB, ignored; it is replaced at the next save", path, MAX_BYTES >> 20)
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        log.warning("%s: not JSON (%s), ignored; it is replaced at the next save", path, e)
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
    snapshot is taken on the event loop (the telemetry's owner); the write runs in a thread, one at a time and
    in order, so the last snapshot taken is the one left on disk even when a periodic write is in flight at
    the stop. A failed write is a warning: the figures stay in memory until the next save."""

    def __init__(self, router: Any, path: Path) -> None:
        self.router, self.path = router, path
        self._writing: asyncio.Future[None] | None = None

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.save()

    async def save(self) -> None:
        if self._writing is not None:
            await asyncio.shield(self._writing)  # the write before this one lands first
        data = snapshot(self.router.telemetry, served(self.router), time.time(), runs_of(self.router))
        self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, data))
        await asyncio.shield(self._writing)  # a cancelled caller does not cut a write short

    def _write(self, data: Mapping[str, Any]) -> None:
        try:
            write(self.path, data)
        except OSError as e:
            log.warning("%s: not saved (%s); what the router learnt is kept in memory until the next save",
                        self.path, e.strerror or e)
