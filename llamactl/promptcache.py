"""The prompt cache that outlives its engine, as pure logic: whether a profile keeps its slots on disk (and why),
and the key of a saved slot: everything that makes a state file loadable into an engine, so that a changed
profile, model, engine or layout never restores an old file (llama-server checks none of it itself).

No I/O here: the caller stats the model file and asks the running engine for its context and slots.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from llamactl.profiles import Profile

KEY_VERSION = 1  # bump when the meaning of a key's fields changes: every older file is then foreign


@dataclass(frozen=True)
class Persist:
    """Whether a profile's engine saves its slots before llamactl stops it, and restores them after a start."""

    on: bool
    swa_full: bool  # the engine needs --swa-full for a restored slot to take (a sliding-window model)
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"on": self.on, "swa_full": self.swa_full, "reason": self.reason}


def persist_decision(profile: Profile, *, sliding_window: bool) -> Persist:
    """`[cache] persist` as set, else on where it costs no memory. A sliding-window model (Gemma 2/3, gpt-oss)
    keeps only the window of its SWA layers, so a restored slot is useless (the next request re-reads it all)
    unless the engine runs with --swa-full, which holds the full context for those layers too: that costs memory,
    so it is not turned on by itself. Embedding and reranking profiles have no prompt to resume."""
    wanted = profile.cache.persist
    if profile.embeddings or profile.reranking:
        if wanted:
            return Persist(False, False, "embeddings/reranking keep no prompt between requests (persist ignored)")
        return Persist(False, False, "embeddings/reranking keep no prompt between requests")
    if profile.engine != "llama.cpp":
        # The pinned ik_llama.cpp writes each slot's tokens to a FILE.tokens.json beside FILE (and its context
        # checkpoints elsewhere): the store keeps one file per slot, so a restore there would come back without them.
        return Persist(False, False, "not on ik_llama.cpp: its slot files carry sidecar files (FILE.tokens.json) "
                                     "this store does not keep" + ("; [cache] persist = true ignored" if wanted else ""))
    if wanted is False:
        return Persist(False, False, "[cache] persist = false")
    if wanted:
        if sliding_window:
            return Persist(True, True, "[cache] persist = true; a sliding-window model, so --swa-full "
                                       "(the full KV for its SWA layers, counted by the plan)")
        return Persist(True, False, "[cache] persist = true")
    if sliding_window:
        return Persist(False, False, "off by default: a sliding-window model needs --swa-full for a restored slot to "
                                     "take, which costs the full KV of its SWA layers; [cache] persist = true turns "
                                     "it on, and the plan counts that")
    return Persist(True, False, "on by default (costs no memory: slots are saved to disk at a stop)")


@dataclass(frozen=True)
class ModelIdentity:
    """A model file as the filesystem sees it: a file replaced or rewritten in place changes size or mtime."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SlotLayout:
    """What makes a slot file loadable, besides the model: the KV cache's shape and the engine that wrote it."""

    engine: str
    version: str
    n_ctx_slot: int  # the context of one slot, as the running engine reports it
    n_slots: int
    unified_kv: bool
    type_k: str
    type_v: str
    flash_attn: str
    swa_full: bool
    rope: tuple[tuple[str, object], ...] = ()  # K is cached after RoPE: other rope settings mean other keys


def layout_of(profile: Profile, *, engine_version: str, n_ctx_slot: int, n_slots: int, unified_kv: bool,
              swa_full: bool) -> SlotLayout:
    rope = tuple(sorted((k, v) for k, v in profile.rope.model_dump().items() if v is not None))
    return SlotLayout(engine=profile.engine, version=engine_version, n_ctx_slot=n_ctx_slot, n_slots=n_slots,
                      unified_kv=unified_kv, type_k=profile.cache_type_k, type_v=profile.cache_type_v,
                      flash_attn=profile.flash_attn, swa_full=swa_full, rope=rope)


def cache_key(model: ModelIdentity, layout: SlotLayout) -> str:
    """The key of the files saved by an engine of this model and layout: two profiles with the same key (the
    members of a switch group on one target model) can load each other's slots; anything else gives another
    key. Hex, so it is safe in a file name."""
    facts = {"v": KEY_VERSION, "model": asdict(model), "layout": asdict(layout)}
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def worth_saving(n_tokens: int, threshold: int) -> bool:
    """A slot holding fewer tokens than the threshold is cheaper to prefill again than to save and restore."""
    return n_tokens >= threshold


def restore_taken(prompt_n: int | None, cache_n: int | None, restored_tokens: int) -> bool | None:
    """Did a restore take, judged on the first request after it? True: the request reused cached tokens; False:
    it re-read a prompt at least as long as what was restored without reusing any (on a sliding-window model
    without --swa-full the restore loads but keeps nothing usable); None: the request tells nothing (no timings,
    or a short prompt that may just be another conversation)."""
    if cache_n is None or prompt_n is None:
        return None
    if cache_n > 0:
        return True
    if prompt_n >= max(1, restored_tokens // 2):
        return False
    return None


@dataclass(frozen=True)
class SlotState:
    """One slot as GET /slots shows it."""

    id: int
    n_ctx: int
    tokens: int  # what it holds (0: never used since the engine started)
    busy: bool


def parse_slots(payload: object, *, max_slots: int = 256) -> list[SlotState] | None:
    """GET /slots' answer -> the slots, or None when it is not one (an engine without slots, another shape)."""
    if not isinstance(payload, list) or not payload:
        return None
    slots = []
    for raw in payload[:max_slots]:
        if not isinstance(raw, dict):
            return None
        slot_id, n_ctx, tokens = raw.get("id"), raw.get("n_ctx"), raw.get("n_prompt_tokens", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31 for v in (slot_id, n_ctx, tokens)):
            return None
        slots.append(SlotState(id=slot_id, n_ctx=n_ctx, tokens=tokens, busy=bool(raw.get("is_processing"))))
    return slots


def unified_kv(profile: Profile) -> bool:
    """Whether the engine's slots share one KV cache (as the plan counts it: llamactl/plan/core.py resolve_ctx)."""
    from llamactl.engines import facts

    if profile.parallel is None:
        return facts.unified_kv_by_default(profile.engine)
    flags = {a.split("=", 1)[0] for a in profile.extra_args}
    return profile.engine == "llama.cpp" and (bool(flags & {"-kvu", "--kv-unified"}) or profile.parallel == 1)


def prefill_tok_s(metrics: dict[str, float]) -> float | None:
    """The engine's mean prefill speed since it started, from its /metrics counters (what a restore saves)."""
    tokens, seconds = metrics.get("prompt_tokens_total", 0.0), metrics.get("prompt_seconds_total", 0.0)
    return tokens / seconds if tokens > 0 and seconds > 0 else None
