"""Units shared by the GPU probe and the planner."""

from __future__ import annotations

MIB = 1024 * 1024


def mib_ceil(n_bytes: int) -> int:
    """Bytes -> MiB, rounded up (0 for nothing)."""
    return -(-n_bytes // MIB) if n_bytes > 0 else 0
