"""Engine facts other layers need without building an argv: how many slots a server runs when `parallel` is
unset (llama.cpp: 4 with a unified KV cache; ik_llama.cpp: 1), where each puts the KV of MTP layers. The one place
these live."""

from __future__ import annotations

DEFAULT_SLOTS = {"llama.cpp": 4, "ik_llama.cpp": 1}


def slots(engine: str, parallel: int | None) -> int:
    """The concurrent requests a server of `engine` serves with `parallel` (None: the engine's default)."""
    return parallel or DEFAULT_SLOTS.get(engine, 1)


def unified_kv_by_default(engine: str) -> bool:
    """Whether the engine's default (no -np) shares one KV cache across its slots."""
    return engine == "llama.cpp"


def mtp_kv_in_target_context(engine: str) -> bool:
    """With MTP on, whether the target's own context also caches the NextN layers' KV (beside the MTP context's).
    ik_llama.cpp sizes its target cache over every block when MTP is on (src/llama.cpp kv_cache_init:
    `model.mtp ? n_layer : n_layer - nextn_predict_layers`); mainline filters the NextN layers out of it."""
    return engine == "ik_llama.cpp"


def mtp_uses_draft_cache_types(engine: str) -> bool:
    """Whether the MTP context's KV takes the draft cache types (mainline -ctkd/-ctvd, f16 unless set); ik builds
    the MTP context from the target's context parameters (server-context.cpp), so its KV takes -ctk/-ctv."""
    return engine == "llama.cpp"
