"""Memory planning before launch: does a profile fit, where, and if not, what would.

Pure parts: model (ModelSpec from a GGUF header), estimate (bytes per component), placement
(layers per device), core (the Plan), suggestions. `plan_for_launch` is the one entry point with
I/O: it reads the GGUF headers and probes the GPUs (or reads a --gpus file).
"""

from __future__ import annotations

from pathlib import Path

from llamactl.gguf import read_gguf
from llamactl.gpus import GpuInventory, GpuProbe, probe_gpus
from llamactl.models import ensure_model
from llamactl.plan.core import Plan, Suggestion, plan_profile, resolve_ctx
from llamactl.plan.estimate import MIB, ContextParams, compute_bytes, estimate_model, kv_bytes_per_layer
from llamactl.plan.model import ModelSpec, spec_from_gguf
from llamactl.plan.placement import DEFAULT_MARGIN_MIB, GPU_OVERHEAD_MIB
from llamactl.profiles import Profile
from llamactl.settings import Settings


def load_spec(path: Path) -> ModelSpec:
    return spec_from_gguf(read_gguf(path))


def plan_for_launch(profile: Profile, settings: Settings, gpus_file: Path | None = None, *,
                    probe: GpuProbe | None = None, margin_mib: int = DEFAULT_MARGIN_MIB,
                    with_argv: bool = True) -> Plan:
    """Read the GGUF header(s), probe the GPUs (gpus_file or settings.gpus_file replaces NVML), plan.

    Plan.argv is the engine argv after applying Plan.launch_overrides(), when the engine binary
    is found (else None, with a note).
    """
    where = f"profile '{profile.name}'" + (f" ({profile.source})" if profile.source else "")
    target = load_spec(ensure_model(profile.model, settings, where=f"{where}, key model"))
    draft = None
    if profile.speculation.uses_draft_model and profile.speculation.draft_model:
        draft = load_spec(ensure_model(profile.speculation.draft_model, settings,
                                       where=f"{where}, key speculation.draft_model"))
    inventory = probe_gpus(gpus_file, settings, probe)
    plan = plan_profile(profile, target, inventory, draft, margin_mib=margin_mib)
    if with_argv:
        plan.argv = engine_argv(plan, settings)
    return plan


class KnownInventory:
    """A probe that answers with an inventory already in hand."""

    def __init__(self, inventory: GpuInventory) -> None:
        self.inventory = inventory

    def probe(self) -> GpuInventory:
        return self.inventory


def fit_together(profiles: list[Profile], settings: Settings, gpus_file: Path | None = None, *,
                 probe: GpuProbe | None = None, margin_mib: int = DEFAULT_MARGIN_MIB
                 ) -> tuple[bool, str, GpuInventory]:
    """Whether all `profiles` can run at once: each is planned on what the ones before it leave free, and
    must keep as many layers on its GPUs as it would alone. Returns (fits, why, the inventory left)."""
    alone = probe_gpus(gpus_file, settings, probe)
    inventory = alone
    placed: list[str] = []
    for profile in profiles:
        plan = plan_for_launch(profile, settings, probe=KnownInventory(inventory), margin_mib=margin_mib,
                               with_argv=False)
        beside = f" beside {', '.join(placed)}" if placed else ""
        if not plan.fits:
            short = ", ".join(f"{u.device.key} short by {-(-plan.shortfall(u) // MIB)} MiB"
                              for u in plan.uses if plan.shortfall(u)) or "; ".join(plan.problems)
            return False, f"'{profile.name}' does not fit{beside} ({short})", inventory
        if placed:
            by_itself = plan_for_launch(profile, settings, probe=KnownInventory(alone), margin_mib=margin_mib,
                                        with_argv=False)
            if plan.n_gpu_layers < by_itself.n_gpu_layers:
                return False, (f"'{profile.name}' would keep {by_itself.n_gpu_layers - plan.n_gpu_layers} more "
                               f"layers on the CPU{beside} than alone"), inventory
        inventory = plan.remaining()
        placed.append(profile.name)
    free = ", ".join(f"{g.free_mib} MiB on CUDA{g.index}" for g in inventory.gpus) or (
        f"{inventory.host_free_mib} MiB of host RAM" if inventory.host_free_mib is not None else "")
    return True, f"{' + '.join(placed)} fit together" + (f" ({free} left)" if free else ""), inventory


def engine_argv(plan: Plan, settings: Settings) -> list[str] | None:
    from llamactl.engines import preview_argv
    from llamactl.engines.common import gpu_env
    from llamactl.errors import LlamactlError

    launched = plan.profile.model_copy(update=plan.launch_overrides())
    plan.env = gpu_env(launched)
    try:
        return preview_argv(launched, settings)
    except LlamactlError as e:
        plan.notes.append(f"engine argv not shown: {e.message}")
        return None


__all__ = [
    "DEFAULT_MARGIN_MIB", "GPU_OVERHEAD_MIB", "ContextParams", "GpuInventory", "KnownInventory", "ModelSpec", "Plan",
    "Suggestion", "compute_bytes", "estimate_model", "fit_together", "kv_bytes_per_layer", "load_spec",
    "plan_for_launch", "plan_profile", "resolve_ctx", "spec_from_gguf",
]
