"""Engine facts other layers need without building an argv: how many slots a server runs when `parallel` is
unset (llama.cpp: 4 with a unified KV cache; ik_llama.cpp: 1). The one place these live."""

from __future__ import annotations

DEFAULT_SLOTS = {"llama.cpp": 4, "ik_llama.cpp": 1}


def slots(engine: str, parallel: int | None) -> int:
    """The concurrent requests a server of `engine` serves with `parallel` (None: the engine's default)."""
    return parallel or DEFAULT_SLOTS.get(engine, 1)


def unified_kv_by_default(engine: str) -> bool:
    """Whether the engine's default (no -np) shares one KV cache across its slots."""
    return engine == "llama.cpp"
