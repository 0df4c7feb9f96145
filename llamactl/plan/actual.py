"""The engine's own memory accounting, parsed from llama-server's log (-lv 4 on mainline; ik prints
the same lines unconditionally, its weights as "llm_load_tensors: CPU buffer size = ..."). Pure: lines in, numbers
out. Used to check estimates.

Lines (src/llama-model.cpp, llama-kv-cache.cpp, llama-memory-recurrent.cpp, llama-context.cpp):
  load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
  llama_kv_cache:        CPU KV buffer size =    24.00 MiB
  llama_memory_recurrent:        CPU RS buffer size =     1.50 MiB
  llama_context:        CPU  output buffer size =     4.00 MiB
  sched_reserve:        CPU compute buffer size =    28.27 MiB
The draft model repeats the set after the target's; an MTP context repeats it without the model buffer. On a CUDA build the same lines name CUDA0, CUDA1, ...
and CUDA_Host (pinned host memory: the output buffer, the host side of the compute graph).

At exit (and during --fit's probes) common_memory_breakdown_print adds a table (common/fit.cpp):
  | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
  |   - CUDA0 (NVIDIA H200)  | 143771 = 134112 + ( 9127 =  8137 +    512 +     478) +         532 |
  |   - Host               |                   20 =     8 +       4 +       8                |
where unaccounted = total - free - self: the CUDA context, cuBLAS workspace, pools and other processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE = re.compile(
    r"(?P<what>model buffer size|KV buffer size|RS buffer size|output buffer size|compute buffer size)"
    r"\s*=\s*(?P<mib>[0-9.]+)\s*MiB"
)
# ik_llama.cpp names its weights "llm_load_tensors:        CPU buffer size =     4.14 MiB".
_IK_MODEL = re.compile(r"llm_load_tensors:\s+(?P<dev>\S+) buffer size\s*=\s*(?P<mib>[0-9.]+)\s*MiB")
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
    """Buffers per context in load order: the target first, then the draft model's, or the MTP context's (which
    has no model buffer of its own: it runs on the target's weights). A context ends with its compute buffers; a
    context that reserves its graph again (mainline's MTP context does, at the same size) reports each device's
    compute buffer once, at its largest."""
    models: list[ActualMemory] = []
    current: ActualMemory | None = None
    for line in lines:
        if ik := _IK_MODEL.search(line):
            kind, dev, mib_text = "model", ik.group("dev"), ik.group("mib")
        elif m := _LINE.search(line):
            kind = _KIND[m.group("what")]
            d = _DEVICE.search(line[: m.end()])
            dev, mib_text = (d.group("dev") if d else "?"), m.group("mib")
        else:
            continue
        if current is None or (kind != "compute" and current.compute):
            current = ActualMemory()
            models.append(current)
        bucket = getattr(current, kind)
        mib = float(mib_text)
        bucket[dev] = max(bucket.get(dev, 0.0), mib) if kind == "compute" else bucket.get(dev, 0.0) + mib
    return models


_BREAKDOWN_DEVICE = re.compile(
    r"\|\s*-\s+(?P<name>\S+)(?:\s+\((?P<desc>[^|]*)\))?\s*\|\s*(?P<total>-?\d+)\s*=\s*(?P<free>-?\d+)\s*\+\s*"
    r"\(\s*(?P<self>-?\d+)\s*=\s*(?P<model>-?\d+)\s*\+\s*(?P<context>-?\d+)\s*\+\s*(?P<compute>-?\d+)\s*\)"
    r"\s*\+\s*(?P<unaccounted>-?\d+)\s*\|"
)
_BREAKDOWN_HOST = re.compile(
    r"\|\s*-\s+(?P<name>\S+)\s*\|\s*(?P<self>-?\d+)\s*=\s*(?P<model>-?\d+)\s*\+\s*(?P<context>-?\d+)\s*\+\s*"
    r"(?P<compute>-?\d+)\s*\|"
)


@dataclass(frozen=True)
class BreakdownRow:
    """One device (or the host) of the engine's memory breakdown table, MiB. total / free / unaccounted are
    None for the host row, which the engine prints without them."""

    name: str
    description: str | None
    self_mib: int
    model_mib: int
    context_mib: int
    compute_mib: int
    total_mib: int | None = None
    free_mib: int | None = None
    unaccounted_mib: int | None = None


def parse_memory_breakdown(lines: list[str]) -> list[BreakdownRow]:
    """The rows of the LAST memory breakdown table in the log (the one printed at exit, after the load),
    or [] when the engine printed none."""
    tables: list[list[BreakdownRow]] = []
    for line in lines:
        if "memory breakdown [MiB]" in line:
            tables.append([])
            continue
        if not tables:
            continue
        if m := _BREAKDOWN_DEVICE.search(line):
            tables[-1].append(BreakdownRow(
                name=m.group("name"), description=(m.group("desc") or "").strip() or None,
                self_mib=int(m.group("self")), model_mib=int(m.group("model")),
                context_mib=int(m.group("context")), compute_mib=int(m.group("compute")),
                total_mib=int(m.group("total")), free_mib=int(m.group("free")),
                unaccounted_mib=int(m.group("unaccounted"))))
        elif m := _BREAKDOWN_HOST.search(line):
            tables[-1].append(BreakdownRow(
                name=m.group("name"), description=None, self_mib=int(m.group("self")),
                model_mib=int(m.group("model")), context_mib=int(m.group("context")),
                compute_mib=int(m.group("compute"))))
    return tables[-1] if tables else []
