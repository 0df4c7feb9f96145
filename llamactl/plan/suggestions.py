"""When a plan does not fit: the smallest changes that make it fit, each with the memory it needs."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from llamactl.gpus import Gpu, GpuInventory
from llamactl.plan.model import ModelSpec
from llamactl.plan.placement import CPU
from llamactl.profiles import Profile, Speculation

if TYPE_CHECKING:
    from llamactl.plan.core import Plan, Suggestion

MIN_CTX = 4096


def _try(profile: Profile, update: dict[str, Any], target: ModelSpec, draft: ModelSpec | None,
         inventory: GpuInventory, margin_mib: int, change: str) -> "Suggestion | None":
    from llamactl.plan.core import Suggestion, _mib, plan_profile

    try:
        changed = profile.model_copy(update=update)
        Profile.model_validate(changed.model_dump())  # keep the profile's own rules
    except ValueError:
        return None
    uses_draft = changed.speculation.uses_draft_model
    p = plan_profile(changed, target, inventory, draft if uses_draft else None, margin_mib=margin_mib,
                     suggest=False)
    return Suggestion(
        change=change, update=_plain(update), fits=p.fits,
        needs_mib={u.device.key: _mib(u.total) for u in p.uses if u.total},
        free_mib={u.device.key: u.device.free_mib for u in p.uses},
    )


def _plain(update: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.model_dump(mode="json", exclude_defaults=True) if hasattr(v, "model_dump") else v)
            for k, v in update.items()}


def _on_present_gpus(profile: Profile, inventory: GpuInventory) -> tuple[dict[str, Any], str] | None:
    """(update, words) that keep only the GPUs of `profile.gpus` this box has (all of its GPUs if none,
    the CPU if it has none), or None when every GPU named exists."""
    if not profile.gpus:
        return None
    present = [i for i in profile.gpus if inventory.by_index(i) is not None]
    missing = [i for i in profile.gpus if i not in present]
    if not missing:
        return None
    gpus = present or [g.index for g in inventory.gpus]
    split = "auto" if isinstance(profile.tensor_split, list) and gpus else None
    why = (f"this box has no GPU {', '.join(map(str, missing))}" if inventory.gpus
           else "this box has no NVIDIA GPU: the CPU only")
    return {"gpus": gpus, "tensor_split": split}, f"gpus = {gpus} ({why})"


def suggest_changes(profile: Profile, target: ModelSpec, draft: ModelSpec | None, inventory: GpuInventory,
                    plan: "Plan", margin_mib: int) -> list["Suggestion"]:
    out: list[Suggestion] = []
    args = (target, draft, inventory, margin_mib)

    def add(s: "Suggestion | None") -> None:
        if s is not None:
            out.append(s)

    # 0. GPUs the profile names that this box does not have: first the ones it has, then (if that is not
    # enough) every other change on top of that.
    rebased = _on_present_gpus(profile, inventory)
    if rebased is not None:
        update, change = rebased
        first = _try(profile, update, *args, change=change)
        if first is None or first.fits:
            return [first] if first else []
        from llamactl.plan.core import plan_profile

        fixed = profile.model_copy(update=update)
        fixed_plan = plan_profile(fixed, target, inventory, draft if fixed.speculation.uses_draft_model else None,
                                  margin_mib=margin_mib, suggest=False)
        more = suggest_changes(fixed, target, draft, inventory, fixed_plan, margin_mib)
        return [first] + [replace(s, change=f"{change} and {s.change}", update={**_plain(update), **s.update})
                          for s in more]

    # 1. A smaller context: the largest power of two (or the current size halved) that fits.
    n_ctx = plan.ctx.n_ctx
    ctx = n_ctx // 2
    best_ctx = None
    while ctx >= MIN_CTX:
        s = _try(profile, {"ctx_size": ctx}, *args, change=f"ctx_size = {ctx}")
        if s and s.fits:
            best_ctx = s
            break
        ctx //= 2
    add(best_ctx)

    # 2. A smaller KV cache type.
    if plan.ctx.type_k in ("f16", "bf16", "f32") or plan.ctx.type_v in ("f16", "bf16", "f32"):
        for kv in ("q8_0", "q4_0"):
            update: dict[str, Any] = {"cache_type_k": kv, "cache_type_v": kv}
            change = f"cache_type_k = cache_type_v = '{kv}'"
            if profile.flash_attn == "off":
                update["flash_attn"] = "on"
                change += ", flash_attn = 'on'"
            s = _try(profile, update, *args, change=change)
            if s and s.fits:
                add(s)
                break
        else:
            add(_try(profile, {"cache_type_k": "q4_0", "cache_type_v": "q4_0",
                               **({"flash_attn": "on"} if profile.flash_attn == "off" else {})},
                     *args, change="cache_type_k = cache_type_v = 'q4_0'"))

    # 3. Flash attention (the KQ matrix without it grows with the context).
    if profile.flash_attn == "off":
        add(_try(profile, {"flash_attn": "on"}, *args, change="flash_attn = 'on'"))

    # 4. Fewer slots.
    if plan.ctx.n_seq > 1:
        s = _try(profile, {"parallel": 1}, *args, change="parallel = 1")
        if s and s.fits:
            add(s)

    # 5. MoE experts on the CPU (--n-cpu-moe N for the first N layers).
    if target.n_expert and any(target.layer_expert_bytes) and plan.gpus:
        n_moe = next((i + 1 for i in range(target.n_layer)
                      if _try(profile, {"extra_args": [*profile.extra_args, "--n-cpu-moe", str(i + 1)]},
                              *args, change="").fits), None) if target.n_layer <= 256 else None
        if n_moe is not None:
            add(_try(profile, {"extra_args": [*profile.extra_args, "--n-cpu-moe", str(n_moe)]}, *args,
                     change=f"extra_args += ['--n-cpu-moe', '{n_moe}'] (experts of {n_moe} layers on the CPU)"))

    # 6. Some layers on the CPU.
    if plan.gpus and isinstance(plan.n_gpu_layers, int):
        s = _try(profile, {"n_gpu_layers": "auto"}, *args, change="")
        if s is not None:
            from llamactl.plan.core import plan_profile

            p = plan_profile(profile.model_copy(update={"n_gpu_layers": "auto"}), target, inventory,
                             draft if profile.speculation.uses_draft_model else None,
                             margin_mib=margin_mib, suggest=False)
            if p.fits and p.n_gpu_layers > 0:
                on_cpu = target.n_layer + 1 - p.n_gpu_layers
                add(_try(profile, {"n_gpu_layers": p.n_gpu_layers}, *args,
                         change=f"n_gpu_layers = {p.n_gpu_layers} ({on_cpu} layers on the CPU, slower)"))

    # 7. Another GPU: the GPUs of this box the profile leaves out, or one more like the largest.
    if profile.gpus is not None and inventory.gpus:
        unused = [g.index for g in inventory.gpus if g.index not in profile.gpus]
        if unused:
            add(_try(profile, {"gpus": [*profile.gpus, *unused], "tensor_split": "auto" if
                               isinstance(profile.tensor_split, list) else profile.tensor_split},
                     *args, change=f"gpus = {sorted([*profile.gpus, *unused])}"))
    if inventory.gpus and profile.gpus != []:
        biggest = max(inventory.gpus, key=lambda g: g.total_mib)
        extra = Gpu(index=max(g.index for g in inventory.gpus) + 1, name=f"another {biggest.name}",
                    total_mib=biggest.total_mib, free_mib=biggest.total_mib)

        bigger_box = replace(inventory, gpus=(*inventory.gpus, extra))
        prof = profile if profile.gpus is None else profile.model_copy(
            update={"gpus": [*profile.gpus, extra.index], "tensor_split": None})
        s = _try(prof, {}, target, draft, bigger_box, margin_mib,
                 change=f"one more GPU like {biggest.name} ({biggest.total_mib} MiB)")
        if s and s.fits:
            add(s)
    elif not inventory.gpus:
        need = plan.uses[-1].total
        from llamactl.plan.core import _mib

        free = plan.uses[-1].device.free_mib
        from llamactl.plan.core import Suggestion

        if free is not None and plan.uses[-1].device.key == CPU:
            out.append(Suggestion(change=f"{_mib(need) - free} MiB more free host RAM", update={},
                                  fits=True, needs_mib={CPU: _mib(need)}, free_mib={CPU: free}))

    # 8. Without the draft model.
    if draft is not None and profile.speculation.uses_draft_model:
        add(_try(profile, {"speculation": Speculation()}, *args, change="no draft model (speculation.type = 'none')"))

    fitting = [s for s in out if s.fits]
    if fitting:
        return fitting
    # No single change: the first combination of a smaller KV type / context with CPU offload.
    combos: list[tuple[dict[str, Any], str]] = []
    for kv in ("q8_0", "q4_0"):
        ctx = n_ctx
        while ctx >= MIN_CTX:
            update: dict[str, Any] = {"cache_type_k": kv, "cache_type_v": kv}
            words = [f"cache_type_k = cache_type_v = '{kv}'"]
            if ctx != n_ctx:
                update["ctx_size"] = ctx
                words.append(f"ctx_size = {ctx}")
            if profile.flash_attn == "off":
                update["flash_attn"] = "on"
            combos.append((update, " and ".join(words)))
            ctx //= 2
    for update, words in combos:
        s = _try(profile, update, *args, change=words)
        if s is None:
            continue
        if not s.fits and plan.gpus:
            from llamactl.plan.core import plan_profile

            p = plan_profile(profile.model_copy(update={**update, "n_gpu_layers": "auto"}), target, inventory,
                             draft if profile.speculation.uses_draft_model else None,
                             margin_mib=margin_mib, suggest=False)
            if p.fits and p.n_gpu_layers > 0:
                s = _try(profile, {**update, "n_gpu_layers": p.n_gpu_layers}, *args,
                         change=f"{words} and n_gpu_layers = {p.n_gpu_layers}")
        if s is not None and s.fits:
            return [s]
    return out
