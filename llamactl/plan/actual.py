"""The engine's own memory accounting, parsed from llama-server's log (-lv 4 on mainline; ik prints
the same lines unconditionally). Pure: lines in, numbers out. Used to check estimates.

Lines (src/llama-model.cpp, llama-kv-cache.cpp, llama-memory-recurrent.cpp, llama-context.cpp):
  load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
  llama_kv_cache:        CPU KV buffer size =    24.00 MiB
  llama_memory_recurrent:        CPU RS buffer size =     1.50 MiB
  llama_context:        CPU  output buffer size =     4.00 MiB
  sched_reserve:        CPU compute buffer size =    28.27 MiB
The draft model repeats the set after the target's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE = re.compile(
    r"(?P<what>model buffer size|KV buffer size|RS buffer size|output buffer size|compute buffer size)"
    r"\s*=\s*(?P<mib>[0-9.]+)\s*MiB"
)
_DEVICE = re.compile(r":\s+(?P<dev>\S+)\s+(?:model|KV|RS|output|compute|buffer)")
_KIND = {"model buffer size": "model", "KV buffer size": "kv", "RS buffer size": "kv",
         "output buffer size": "output", "compute buffer size": "compute"}


@dataclass
class ActualMemory:
    """One model's buffers, MiB per component and per device name (CPU, CPU_Mapped, CUDA0, ...)."""

    model: dict[str, float] = field(default_factory=dict)
    kv: dict[str, float] = field(default_factory=dict)
    output: dict[str, float] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)

    def total(self, kind: str) -> float:
        return sum(getattr(self, kind).values())

    @property
    def grand_total(self) -> float:
        return sum(self.total(k) for k in ("model", "kv", "output", "compute"))


def parse_memory_log(lines: list[str]) -> list[ActualMemory]:
    """Buffers per model in load order (target first, then the draft)."""
    models: list[ActualMemory] = []
    current: ActualMemory | None = None
    for line in lines:
        m = _LINE.search(line)
        if not m:
            continue
        kind = _KIND[m.group("what")]
        d = _DEVICE.search(line[: m.end()])
        dev = d.group("dev") if d else "?"
        if current is None or (kind == "model" and current.compute):
            current = ActualMemory()
            models.append(current)
        bucket = getattr(current, kind)
        bucket[dev] = bucket.get(dev, 0.0) + float(m.group("mib"))
    return models
