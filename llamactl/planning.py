"""Planning with I/O: read the GGUF headers, probe the GPUs, find the engine binary, then hand the data to
the pure planner (llamactl.plan). The entry points `llamactl up`, `plan` and `serve` use."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from llamactl.errors import LlamactlError
from llamactl.gguf import read_model
from llamactl.gpus import GpuInventory, GpuProbe, probe_gpus
from llamactl.models import ensure_model
from llamactl.plan import DEFAULT_MARGIN_MIB, ModelSpec, Plan, plan_profile, spec_from_gguf
from llamactl.profiles import Profile
from llamactl.settings import Settings
from llamactl.units import mib_ceil


def load_spec(path: Path) -> ModelSpec:
    return spec_from_gguf(read_model(path))


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
    inventory = with_workers(profile, settings, probe_gpus(gpus_file, settings, probe))
    plan = plan_profile(profile, target, inventory, draft, margin_mib=margin_mib, ctx_floor=settings.fit_ctx_min)
    if with_argv:
        plan.argv, why_not = engine_preview(plan, settings)
        if why_not:
            plan.notes.append(why_not)
    return plan


def with_workers(profile: Profile, settings: Settings, inventory: GpuInventory) -> GpuInventory:
    """The inventory plus the devices of the profile's RPC workers (asked now: version, devices, free memory).
    A worker that does not answer is a WorkerError naming it: nothing is started."""
    if not profile.rpc or inventory.remote:
        return inventory
    from llamactl.engines.binaries import find_binary
    from llamactl.rpc.probe import probe_remote_devices

    binary = find_binary(profile.engine, settings, profile.binary).path
    return replace(inventory, remote=probe_remote_devices(profile, settings, binary))


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
    must keep as many layers on its GPUs (and as much context) as it would alone. Returns (fits, why, the
    inventory left)."""
    alone = probe_gpus(gpus_file, settings, probe)
    inventory = alone
    placed: list[str] = []
    for profile in profiles:
        plan = plan_for_launch(profile, settings, probe=KnownInventory(inventory), margin_mib=margin_mib,
                               with_argv=False)
        beside = f" beside {', '.join(placed)}" if placed else ""
        if not plan.fits:
            short = ", ".join(f"{u.device.key} short by {mib_ceil(plan.shortfall(u))} MiB"
                              for u in plan.uses if plan.shortfall(u)) or "; ".join(plan.problems)
            return False, f"'{profile.name}' does not fit{beside} ({short})", inventory
        if placed:
            by_itself = plan_for_launch(profile, settings, probe=KnownInventory(alone), margin_mib=margin_mib,
                                        with_argv=False)
            worse = worse_beside(plan, by_itself)
            if worse:
                return False, f"'{profile.name}' would keep {worse}{beside} than alone", inventory
        inventory = plan.remaining()
        placed.append(profile.name)
    free = ", ".join(f"{g.free_mib} MiB on CUDA{g.index}" for g in inventory.gpus) or (
        f"{inventory.host_free_mib} MiB of host RAM" if inventory.host_free_mib is not None else "")
    return True, f"{' + '.join(placed)} fit together" + (f" ({free} left)" if free else ""), inventory


def worse_beside(beside: Plan, alone: Plan) -> str | None:
    """What a profile loses planned beside others, in words, or None."""
    if beside.n_gpu_layers < alone.n_gpu_layers:
        return f"{alone.n_gpu_layers - beside.n_gpu_layers} more layers on the CPU"
    if beside.work < alone.work:
        return "more of its model on the CPU"
    if beside.ctx.n_ctx < alone.ctx.n_ctx:
        return f"a shorter context ({beside.ctx.n_ctx} tokens, not {alone.ctx.n_ctx})"
    return None


def engine_preview(plan: Plan, settings: Settings) -> tuple[list[str] | None, str | None]:
    """(the engine argv for this plan's placement, None), or (None, why not) when the binary is not found."""
    from llamactl.engines import preview_argv

    launched = plan.profile.model_copy(update=plan.launch_overrides())
    try:
        return preview_argv(launched, settings), None
    except LlamactlError as e:
        return None, f"engine argv not shown: {e.message}"


def engine_argv(plan: Plan, settings: Settings) -> list[str] | None:
    """The engine argv for this plan's placement (None when the binary is not found). No side effects."""
    return engine_preview(plan, settings)[0]


__all__ = ["KnownInventory", "engine_argv", "engine_preview", "fit_together", "load_spec", "plan_for_launch",
           "worse_beside"]
