"""Memory planning before launch: does a profile fit, where, and if not, what would. Pure: no I/O.

model (ModelSpec from a GGUF header already read), estimate (bytes per component), placement (layers per
device), core (the search: plan_profile), result (Plan, Suggestion), suggestions. The caller reads the
files and probes the GPUs: llamactl.planning does that for `up`, `plan` and `serve`.
"""

from __future__ import annotations

from llamactl.gpus import GpuInventory
from llamactl.plan.core import DEFAULT_CTX_FLOOR, plan_profile, resolve_ctx
from llamactl.plan.estimate import ContextParams, compute_bytes, estimate_model, kv_bytes_per_layer
from llamactl.plan.model import ModelSpec, spec_from_gguf
from llamactl.plan.placement import DEFAULT_MARGIN_MIB, GPU_OVERHEAD_MIB
from llamactl.plan.result import Plan, Suggestion
from llamactl.units import MIB

__all__ = [
    "DEFAULT_CTX_FLOOR", "DEFAULT_MARGIN_MIB", "GPU_OVERHEAD_MIB", "MIB", "ContextParams", "GpuInventory",
    "ModelSpec", "Plan", "Suggestion", "compute_bytes", "estimate_model", "kv_bytes_per_layer", "plan_profile",
    "resolve_ctx", "spec_from_gguf",
]
