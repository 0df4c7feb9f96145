"""The prompt cache's I/O: an engine's slots saved before a stop llamactl owns, restored after its next start.

`Engine.stop` calls `save` before it signals the process: every idle slot holding at least
`prompt_cache_min_tokens` is saved with `POST /slots/ID?action=save` into the store's directory, the whole save
bounded by `prompt_cache_save_timeout_s` (what was saved by then is kept). `Engine._run_start` calls `restore` after
the engine answers and before it is handed to requests: the files with the engine's key (model, KV layout, engine,
version: llamactl/promptcache.py) go back into their slots, bounded by `prompt_cache_restore_timeout_s`. A restore
that fails is dropped at once; one that does not take (the first request after it reused nothing, reported by the
router through `observed`) is dropped then. Neither is ever an error for a request or a start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llamactl.errors import LlamactlError
from llamactl.profiles import Profile
from llamactl.promptcache import (
    ModelIdentity, Persist, SlotState, cache_key, layout_of, parse_slots, persist_decision, prefill_tok_s,
    restore_taken, unified_kv, worth_saving,
)
from llamactl.promptstore import Entry, PromptStore
from llamactl.settings import Settings
from llamactl.supervisor import ServerRecord

SLOTS_ANSWER_S = 3.0  # how long a stop waits for the engine to list its slots before it saves none
log = logging.getLogger("llamactl.promptcache")

SLOT_SAVE_FLAG = "--slot-save-path"
MAX_PENDING_REQUESTS = 8  # requests after a restore that may say nothing (no timings, a short other prompt)


@dataclass
class ProfileCounts:
    saves: int = 0
    saved_tokens: int = 0
    save_s: float = 0.0
    restores: int = 0
    restored_tokens: int = 0
    restore_s: float = 0.0
    reused_tokens: int = 0  # tokens the first request after a restore did not prefill again
    prefill_saved_s: float = 0.0  # those tokens at the saving engine's prefill speed
    not_taken: int = 0
    failed: int = 0
    last: dict[str, Any] | None = None  # the last restore, as status shows it

    def to_json(self) -> dict[str, Any]:
        return {"saves": self.saves, "saved_tokens": self.saved_tokens, "save_s": round(self.save_s, 3),
                "restores": self.restores, "restored_tokens": self.restored_tokens,
                "restore_s": round(self.restore_s, 3), "reused_tokens": self.reused_tokens,
                "prefill_saved_s": round(self.prefill_saved_s, 3), "not_taken": self.not_taken,
                "failed": self.failed, "last_restore": self.last}


@dataclass
class _Pending:
    """A start's restored slots, waiting for a request to tell whether they took."""

    entries: list[Entry]
    tokens: int
    restore_s: float
    requests_left: int = MAX_PENDING_REQUESTS


@dataclass
class PromptCache:
    """One per daemon, shared by its engines (one store, one budget)."""

    store: PromptStore
    settings: Settings
    publish: Callable[[str, dict[str, Any]], None] = lambda what, data: None
    counts: dict[str, ProfileCounts] = field(default_factory=dict)
    persist: dict[str, Persist] = field(default_factory=dict)  # per profile, as its last start decided
    _pending: dict[str, _Pending] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> "PromptCache | None":
        if settings.prompt_cache_mib <= 0:
            return None
        store = PromptStore(settings.prompt_cache_dir, budget_bytes=settings.prompt_cache_mib << 20)
        return cls(store, settings)

    def _counts(self, profile: str) -> ProfileCounts:
        return self.counts.setdefault(profile, ProfileCounts())

    async def slot_dir(self) -> Path | None:
        """The directory engines save slots to (created, 0700, its manifest read), for --slot-save-path; None when
        it cannot be made (the engine then starts without the cache: never a failed start)."""
        try:
            await asyncio.to_thread(self.store.open)
        except OSError as e:
            log.warning("prompt cache: %s is unusable (%s); engines start without it", self.store.directory,
                        e.strerror or e)
            return None
        return self.store.directory

    # -- the key of a running engine ---------------------------------------------------------------------

    @staticmethod
    def enabled(record: ServerRecord) -> bool:
        """The engine was started with the store as its slot directory (persist was on for its start)."""
        return SLOT_SAVE_FLAG in record.cmdline

    @staticmethod
    def _key(profile: Profile, record: ServerRecord, slots: list[SlotState]) -> str:
        stats = [os.stat(part) for part in _model_files(record.model)]  # a split model: every part it loads
        model = ModelIdentity(path=os.path.realpath(record.model), size=sum(st.st_size for st in stats),
                              mtime_ns=max(st.st_mtime_ns for st in stats))
        layout = layout_of(profile, engine_version=record.version, n_ctx_slot=slots[0].n_ctx, n_slots=len(slots),
                           unified_kv=unified_kv(profile), swa_full="--swa-full" in record.cmdline)
        return cache_key(model, layout)

    @staticmethod
    def _decision(profile: Profile, record: ServerRecord) -> Persist:
        from llamactl.gguf import read_model_info

        try:
            decision = persist_decision(profile, sliding_window=read_model_info(Path(record.model)).has_sliding_window)
        except LlamactlError as e:
            return Persist(False, False, f"the model cannot be read ({e.message})")
        if decision.on and not PromptCache.enabled(record):
            return Persist(False, False, f"this {record.engine} build has no --slot-save-path")
        return decision

    @staticmethod
    def _client(record: ServerRecord) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {record.api_key}"} if record.api_key else {}
        return httpx.AsyncClient(base_url=record.url, headers=headers, timeout=None)

    @staticmethod
    async def _slots(client: httpx.AsyncClient) -> list[SlotState] | None:
        response = await client.get("/slots")
        return parse_slots(response.json()) if response.status_code == 200 else None

    # -- save --------------------------------------------------------------------------------------------

    async def save(self, name: str, profile: Profile, record: ServerRecord) -> int:
        """Save the engine's slots worth keeping; returns how many were saved. Never raises (but a cancel)."""
        if not self.enabled(record):
            return 0
        timeout_s = self.settings.prompt_cache_save_timeout_s
        started, saved, temp = time.monotonic(), 0, None
        try:
            async with asyncio.timeout(timeout_s), self._client(record) as client:
                # A hung engine (the reason for many a stop) does not answer this: give up quickly, the stop
                # must still meet its own timeout.
                async with asyncio.timeout(SLOTS_ANSWER_S):
                    slots = await self._slots(client)
                if not slots:
                    return 0
                keep = [s for s in slots if not s.busy and worth_saving(s.tokens, self.settings.prompt_cache_min_tokens)]
                if not keep:
                    return 0
                key = await asyncio.to_thread(self._key, profile, record, slots)
                speed = await self._prefill_speed(client)
                for slot in keep:
                    temp = self.store.temp_name(key, slot.id)
                    t0 = time.monotonic()
                    response = await client.post(f"/slots/{slot.id}", params={"action": "save"},
                                                 json={"filename": temp})
                    if response.status_code != 200:
                        log.warning("%s: saving slot %d failed: HTTP %d %s", name, slot.id, response.status_code,
                                    response.text[:200])
                        await asyncio.to_thread(self.store.discard_temp, temp)
                        temp = None
                        continue
                    tokens = _int(response.json(), "n_saved") or slot.tokens
                    entry = await asyncio.to_thread(self.store.commit, temp, key=key, slot=slot.id, profile=name,
                                                    tokens=tokens, prefill_tok_s=speed)
                    temp = None
                    if entry is None:
                        continue
                    saved += 1
                    counts = self._counts(name)
                    counts.saves += 1
                    counts.saved_tokens += tokens
                    counts.save_s += time.monotonic() - t0
                    log.info("%s: slot %d saved (%d tokens, %.1f MiB, %.2f s)", name, slot.id, tokens,
                             entry.bytes / 2**20, time.monotonic() - t0)
                    self.publish("saved", {"profile": name, "slot": slot.id, "tokens": tokens, "bytes": entry.bytes,
                                           "seconds": round(time.monotonic() - t0, 3)})
        except TimeoutError:
            log.warning("%s: saving its slots took over %.0f s (prompt_cache_save_timeout_s); stopping it with %d "
                        "saved", name, timeout_s, saved)
        except (httpx.HTTPError, ValueError, OSError) as e:
            log.warning("%s: saving its slots failed (%s: %s); %d saved", name, type(e).__name__, e, saved)
        finally:
            if temp is not None:
                await asyncio.shield(asyncio.to_thread(self.store.discard_temp, temp))
        if saved:
            log.info("%s: %d slot(s) saved in %.2f s", name, saved, time.monotonic() - started)
        return saved

    @staticmethod
    async def _prefill_speed(client: httpx.AsyncClient) -> float | None:
        from llamactl.router.telemetry import parse_engine_metrics

        try:
            response = await client.get("/metrics")
        except httpx.HTTPError:
            return None
        return prefill_tok_s(parse_engine_metrics(response.text)) if response.status_code == 200 else None

    # -- restore -----------------------------------------------------------------------------------------

    async def restore(self, name: str, profile: Profile, record: ServerRecord) -> int:
        """Put the saved slots of this engine's key back; returns the tokens restored. Never raises (but a
        cancel: a stop during a start)."""
        self._pending.pop(name, None)
        self.persist[name] = await asyncio.to_thread(self._decision, profile, record)
        if not self.enabled(record):
            return 0
        timeout_s = self.settings.prompt_cache_restore_timeout_s
        started, restored, tokens = time.monotonic(), [], 0
        try:
            async with asyncio.timeout(timeout_s), self._client(record) as client:
                slots = await self._slots(client)
                if not slots:
                    return 0
                key = await asyncio.to_thread(self._key, profile, record, slots)
                entries = await asyncio.to_thread(self.store.entries_for, key)
                by_id = {s.id: s for s in slots}
                for entry in entries:
                    slot = by_id.get(entry.slot)
                    if slot is None or slot.tokens or slot.busy:
                        continue  # not a slot of this engine, or one in use: never overwritten
                    t0 = time.monotonic()
                    response = await client.post(f"/slots/{entry.slot}", params={"action": "restore"},
                                                 json={"filename": entry.file})
                    n = _int(response.json(), "n_restored") if response.status_code == 200 else None
                    if not n:
                        self._counts(name).failed += 1
                        why = f"HTTP {response.status_code} {response.text[:200]}" if n is None else "nothing restored"
                        await asyncio.to_thread(self.store.drop, entry, f"restore failed ({why})")
                        self.publish("restore_failed", {"profile": name, "slot": entry.slot, "reason": why})
                        continue
                    await asyncio.to_thread(self.store.touch, entry)
                    restored.append(entry)
                    tokens += n
                    log.info("%s: slot %d restored (%d tokens saved by %s, %.2f s)", name, entry.slot, n,
                             entry.profile, time.monotonic() - t0)
        except TimeoutError:
            log.warning("%s: restoring its slots took over %.0f s (prompt_cache_restore_timeout_s); serving with %d "
                        "restored", name, timeout_s, len(restored))
        except (httpx.HTTPError, ValueError, OSError) as e:
            log.warning("%s: restoring its slots failed (%s: %s); serving with %d restored", name,
                        type(e).__name__, e, len(restored))
        if not restored:
            return 0
        elapsed = time.monotonic() - started
        counts = self._counts(name)
        counts.restores += len(restored)
        counts.restored_tokens += tokens
        counts.restore_s += elapsed
        self._pending[name] = _Pending(restored, tokens, elapsed)
        self.publish("restored", {"profile": name, "slots": [e.slot for e in restored], "tokens": tokens,
                                  "seconds": round(elapsed, 3), "saved_by": sorted({e.profile for e in restored})})
        return tokens

    def observed(self, name: str, prompt_n: int | None, cache_n: int | None) -> None:
        """A request to `name` finished with these timings: the first telling one after a restore judges it."""
        pending = self._pending.get(name)
        if pending is None:
            return
        verdict = restore_taken(prompt_n, cache_n, pending.tokens)
        if verdict is None:
            pending.requests_left -= 1
            if pending.requests_left <= 0:
                del self._pending[name]
            return
        del self._pending[name]
        counts = self._counts(name)
        if verdict:
            speed = max((e.prefill_tok_s or 0.0 for e in pending.entries), default=0.0)
            saved_s = (cache_n or 0) / speed if speed else None
            counts.reused_tokens += cache_n or 0
            counts.prefill_saved_s += saved_s or 0.0
            counts.last = {"at": time.time(), "tokens": pending.tokens, "reused_tokens": cache_n,
                           "prompt_n": prompt_n, "restore_s": round(pending.restore_s, 3),
                           "prefill_saved_s": None if saved_s is None else round(saved_s, 3)}
            log.info("%s: the restored slots took: %d tokens reused, %d prefilled (restore %.2f s%s)", name, cache_n,
                     prompt_n, pending.restore_s, "" if saved_s is None else f" vs about {saved_s:.2f} s of prefill")
            self.publish("restore_taken", {"profile": name, **counts.last})
            return
        counts.not_taken += 1
        log.warning("%s: the restored slots did not take (the next request re-read %d tokens, reused none)", name,
                    prompt_n)
        for entry in pending.entries:
            self.store.drop(entry, "restored but not reused by the next request")
        self.publish("restore_not_taken", {"profile": name, "prompt_n": prompt_n})

    # -- what status and metrics show ------------------------------------------------------------------------

    def status(self, name: str | None = None) -> dict[str, Any]:
        usage = self.store.usage()
        names = set(self.counts) | set(usage["profiles"]) | set(self.persist)
        profiles = {p: {**usage["profiles"].get(p, {"files": 0, "bytes": 0, "tokens": 0}),
                        **self.counts.get(p, ProfileCounts()).to_json(),
                        "persist": self.persist[p].to_json() if p in self.persist else None}
                    for p in sorted(names)}
        if name is not None:
            return profiles.get(name, {"files": 0, "bytes": 0, "tokens": 0, **ProfileCounts().to_json(),
                                       "persist": None})
        return {"dir": usage["dir"], "budget_bytes": usage["budget_bytes"], "bytes": usage["bytes"],
                "profiles": profiles}


def _int(payload: Any, key: str) -> int | None:
    value = payload.get(key) if isinstance(payload, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class PromptCacheCollector:
    """The prompt cache in the router's /metrics: bytes stored, saves, restores, their tokens and seconds."""

    def __init__(self, cache: PromptCache) -> None:
        self.cache = cache

    def collect(self):
        status = self.cache.status()
        stored = GaugeMetricFamily("llamactl_prompt_cache_bytes", "Bytes of saved slots on disk, per profile",
                                   labels=["profile"])
        budget = GaugeMetricFamily("llamactl_prompt_cache_budget_bytes", "The prompt cache's byte budget for the box")
        budget.add_metric([], status["budget_bytes"])
        counters = {
            "saves": ("llamactl_prompt_cache_saves", "Slots saved before a stop"),
            "saved_tokens": ("llamactl_prompt_cache_saved_tokens", "Tokens in the slots saved"),
            "restores": ("llamactl_prompt_cache_restores", "Slots restored after a start"),
            "restored_tokens": ("llamactl_prompt_cache_restored_tokens", "Tokens restored"),
            "restore_s": ("llamactl_prompt_cache_restore_seconds", "Seconds spent restoring slots"),
            "reused_tokens": ("llamactl_prompt_cache_reused_tokens", "Restored tokens the next request did not prefill"),
            "prefill_saved_s": ("llamactl_prompt_cache_prefill_saved_seconds",
                                "Prefill those tokens would have taken, at the saving engine's speed"),
            "not_taken": ("llamactl_prompt_cache_not_taken", "Restores the next request did not reuse (dropped)"),
            "failed": ("llamactl_prompt_cache_restore_failures", "Restores the engine refused (dropped)"),
        }
        families = {k: CounterMetricFamily(n, h, labels=["profile"]) for k, (n, h) in counters.items()}
        for profile, row in status["profiles"].items():
            stored.add_metric([profile], row.get("bytes", 0))
            for k, family in families.items():
                family.add_metric([profile], row.get(k, 0))
        yield stored
        yield budget
        yield from families.values()


def _model_files(model: str) -> tuple[str, ...]:
    """The files the engine loads for `model`: every part of a split GGUF (a part re-downloaded changes what a
    saved slot was computed on), else the file itself."""
    from llamactl.errors import ProfileError
    from llamactl.gguf import read_gguf, split_part_paths

    try:
        return tuple(str(p) for p in split_part_paths(Path(model), read_gguf(Path(model))))
    except ProfileError:
        return (model,)
