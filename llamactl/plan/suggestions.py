"""When a plan does not fit: the changes that make it fit, found by exact searches and each replanned.

Pure. The caller hands in `replan` (profile, box) -> Plan, so this module needs nothing from the planner
itself. Every suggestion is the profile with one change (or one combination) planned again: one that
says it fits, fits. Ranked by what stays on the GPUs (the speed the user keeps); changes to the hardware
come last, and only when nothing else fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any

from llamactl.gpus import Gpu, GpuInventory
from llamactl.plan.model import ModelSpec
from llamactl.plan.placement import CPU
from llamactl.plan.result import Plan, Suggestion
from llamactl.profiles import Profile, Speculation
from llamactl.units import mib_ceil

Replan = Callable[[Profile, GpuInventory], Plan]
CTX_STEP = 256
KV_TYPES = ("q8_0", "q4_0")
# Up to this many GPUs every subset is tried; above it, the k roomiest for each k.
ALL_SUBSETS_UP_TO = 4


@dataclass(frozen=True)
class SuggestionInput:
    profile: Profile
    target: ModelSpec
    draft: ModelSpec | None
    inventory: GpuInventory
    plan: Plan  # the plan that does not fit
    ctx_floor: int


@dataclass(frozen=True)
class Tried:
    suggestion: Suggestion
    plan: Plan


class Trials:
    """Apply a change to the profile, replan, and keep the result with its plan."""

    def __init__(self, given: SuggestionInput, replan: Replan) -> None:
        self.given = given
        self.replan = replan

    def changed(self, update: dict[str, Any]) -> Profile | None:
        try:
            changed = self.given.profile.model_copy(update=update)
            Profile.model_validate(changed.model_dump())  # keep the profile's own rules
        except ValueError:
            return None
        return changed

    def run(self, update: dict[str, Any], change: str, box: GpuInventory | None = None) -> Tried | None:
        changed = self.changed(update)
        if changed is None:
            return None
        p = self.replan(changed, box or self.given.inventory)
        return Tried(Suggestion(change=change, update=_plain(update), fits=p.fits,
                                needs_mib={u.device.key: mib_ceil(u.total) for u in p.uses if u.total},
                                free_mib={u.device.key: u.device.free_mib for u in p.uses},
                                cost=p.cost if p.fits else None), p)

    def fits(self, update: dict[str, Any]) -> bool:
        changed = self.changed(update)
        return changed is not None and self.replan(changed, self.given.inventory).fits


def _plain(update: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.model_dump(mode="json", exclude_defaults=True) if hasattr(v, "model_dump") else v)
            for k, v in update.items()}


def suggest_changes(given: SuggestionInput, replan: Replan) -> list[Suggestion]:
    trials = Trials(given, replan)
    rebased = _on_present_gpus(given.profile, given.inventory)
    if rebased is not None:
        return _after_rebasing(given, replan, trials, *rebased)
    tried = [t for t in _single_changes(given, trials) if t is not None]
    fitting = [t for t in tried if t.suggestion.fits]
    if fitting:
        return [t.suggestion for t in _ranked(fitting)]
    combined = _combination(given, trials)
    if combined is not None:
        return [combined.suggestion]
    hardware = [t for t in _hardware(given, trials) if t is not None]
    return [t.suggestion for t in _ranked([t for t in hardware if t.suggestion.fits])] + [
        t.suggestion for t in tried + [t for t in hardware if not t.suggestion.fits]]


def _ranked(tried: list[Tried]) -> list[Tried]:
    """More work on the GPUs first (layers, experts, draft layers), then the larger context; stable."""
    return sorted(tried, key=lambda t: (tuple(-w for w in t.plan.work), -t.plan.ctx.n_ctx))


def _after_rebasing(given: SuggestionInput, replan: Replan, trials: Trials, update: dict[str, Any],
                    change: str) -> list[Suggestion]:
    """The profile names GPUs this box does not have: first the ones it has, then (if that is not enough)
    every other change on top of that."""
    first = trials.run(update, change)
    if first is None or first.suggestion.fits:
        return [first.suggestion] if first else []
    fixed = given.profile.model_copy(update=update)
    more = suggest_changes(replace(given, profile=fixed, plan=first.plan), replan)
    return [first.suggestion] + [replace(s, change=f"{change} and {s.change}", update={**_plain(update), **s.update})
                                 for s in more]


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


# --- one change at a time -----------------------------------------------------------------------


def _single_changes(given: SuggestionInput, trials: Trials) -> Iterator[Tried | None]:
    yield _largest_ctx(given, trials)
    yield from _kv_types(given, trials)
    if given.profile.flash_attn == "off":
        yield trials.run({"flash_attn": "on"}, "flash_attn = 'on'")
    if given.plan.ctx.n_seq > 1:
        yield _if_fits(trials.run({"parallel": 1}, "parallel = 1"))
    yield _fewest_cpu_moe(given, trials)
    yield _most_gpu_layers(given, trials)
    if isinstance(given.profile.tensor_split, list):
        yield _if_fits(trials.run({"tensor_split": "auto"}, "tensor_split = 'auto'"))
    yield _best_gpu_subset(given, trials)
    if given.profile.gpus != [] and given.inventory.gpus:
        yield _if_fits(trials.run(_cpu_only(given.profile), "gpus = [] (the CPU only)"))
    if given.draft is not None and given.profile.speculation.uses_draft_model:
        yield trials.run({"speculation": Speculation()}, "no draft model (speculation.type = 'none')")
    if given.profile.speculation.type == "mtp":
        yield trials.run({"speculation": Speculation()}, "no MTP (speculation.type = 'none')")


def _if_fits(t: Tried | None) -> Tried | None:
    return t if t is not None and t.suggestion.fits else None


def _cpu_only(profile: Profile) -> dict[str, Any]:
    update: dict[str, Any] = {"gpus": []}
    if isinstance(profile.tensor_split, list):
        update["tensor_split"] = None
    if profile.speculation.draft_gpus is not None:
        update["speculation"] = profile.speculation.model_copy(update={"draft_gpus": None})
    return update


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The largest i in lo..hi with ok(i) (ok monotone: true, then false), or None when not even ok(lo)."""
    if lo > hi or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _smallest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The smallest i in lo..hi with ok(i), given ok(hi) (ok monotone: false, then true)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _largest_ctx(given: SuggestionInput, trials: Trials) -> Tried | None:
    """The largest context (in the engine's steps of 256, not below the floor) that fits."""
    n_ctx = given.plan.ctx.n_ctx
    lo = -(-given.ctx_floor // CTX_STEP)
    hi = (n_ctx - 1) // CTX_STEP
    k = _largest(lo, hi, lambda k: trials.fits({"ctx_size": k * CTX_STEP}))
    return None if k is None else trials.run({"ctx_size": k * CTX_STEP}, f"ctx_size = {k * CTX_STEP}")


def _kv_types(given: SuggestionInput, trials: Trials) -> Iterator[Tried | None]:
    """The first smaller KV cache type that fits, else the smallest (as the closest)."""
    ctx = given.plan.ctx
    if not ({ctx.type_k, ctx.type_v} & {"f16", "bf16", "f32"}):
        return
    last = None
    for kv in KV_TYPES:
        update: dict[str, Any] = {"cache_type_k": kv, "cache_type_v": kv}
        change = f"cache_type_k = cache_type_v = '{kv}'"
        if given.profile.flash_attn == "off":
            update["flash_attn"] = "on"
            change += ", flash_attn = 'on'"
        last = trials.run(update, change)
        if last is not None and last.suggestion.fits:
            break
    yield last


def _fewest_cpu_moe(given: SuggestionInput, trials: Trials) -> Tried | None:
    """The fewest layers whose MoE experts go to the CPU (--n-cpu-moe N) for it to fit."""
    target, profile = given.target, given.profile
    if not (target.n_expert and any(target.layer_expert_bytes)) or profile.gpus == [] or not given.inventory.gpus:
        return None

    def update(m: int) -> dict[str, Any]:
        return {"extra_args": [*profile.extra_args, "--n-cpu-moe", str(m)]}

    if not trials.fits(update(target.n_layer)):
        return None
    m = _smallest(1, target.n_layer, lambda m: trials.fits(update(m)))
    return trials.run(update(m), f"extra_args += ['--n-cpu-moe', '{m}'] (experts of {m} layers on the CPU)")


def _most_gpu_layers(given: SuggestionInput, trials: Trials) -> Tried | None:
    """The largest explicit n_gpu_layers that fits (when the profile sets one)."""
    profile, plan, n = given.profile, given.plan, given.target.n_layer
    if profile.n_gpu_layers in (None, "auto") and not isinstance(profile.tensor_split, list):
        return None  # the plan already has the most layers that fit
    if profile.gpus == [] or not given.inventory.gpus:
        return None
    ngl = _largest(1, max(1, plan.n_gpu_layers - 1), lambda k: trials.fits({"n_gpu_layers": k}))
    if ngl is None:
        return None
    return trials.run({"n_gpu_layers": ngl}, f"n_gpu_layers = {ngl} ({n + 1 - ngl} layers on the CPU, slower)")


def _gpu_subsets(given: SuggestionInput) -> list[list[int]]:
    present = [g.index for g in given.inventory.gpus]
    current = sorted(given.profile.gpus if given.profile.gpus is not None else present)
    if len(present) <= ALL_SUBSETS_UP_TO:
        sets = [sorted(c) for k in range(1, len(present) + 1) for c in combinations(present, k)]
    else:
        roomiest = sorted(present, key=lambda i: -given.inventory.by_index(i).free_mib)
        sets = [sorted(roomiest[:k]) for k in range(1, len(present) + 1)]
    return [s for s in sets if s != current]


def _best_gpu_subset(given: SuggestionInput, trials: Trials) -> Tried | None:
    """The set of this box's GPUs (fewer, or more than the profile lists) that fits with the most on them."""
    if given.profile.gpus == [] or not given.inventory.gpus:
        return None
    split = "auto" if isinstance(given.profile.tensor_split, list) else given.profile.tensor_split
    best: Tried | None = None
    for gpus in _gpu_subsets(given):
        t = trials.run({"gpus": gpus, "tensor_split": split}, f"gpus = {gpus}")
        if t is not None and t.suggestion.fits and (best is None or t.plan.work > best.plan.work):
            best = t
    return best


# --- when no single change fits -----------------------------------------------------------------


def _combination(given: SuggestionInput, trials: Trials) -> Tried | None:
    """The first combination of a smaller KV type and context, with layers on the CPU if need be."""
    n_ctx, profile = given.plan.ctx.n_ctx, given.profile
    for kv in KV_TYPES:
        ctx = n_ctx
        while ctx >= min(given.ctx_floor, n_ctx):
            update: dict[str, Any] = {"cache_type_k": kv, "cache_type_v": kv}
            words = [f"cache_type_k = cache_type_v = '{kv}'"]
            if ctx != n_ctx:
                update["ctx_size"] = ctx
                words.append(f"ctx_size = {ctx}")
            if profile.flash_attn == "off":
                update["flash_attn"] = "on"
            t = trials.run(update, " and ".join(words))
            if t is not None and not t.suggestion.fits and profile.gpus != [] and given.inventory.gpus:
                auto = trials.changed({**update, "n_gpu_layers": "auto"})
                p = trials.replan(auto, given.inventory) if auto is not None else None
                if p is not None and p.fits and p.n_gpu_layers > 0:
                    t = trials.run({**update, "n_gpu_layers": p.n_gpu_layers},
                                   f"{' and '.join(words)} and n_gpu_layers = {p.n_gpu_layers}")
            if t is not None and t.suggestion.fits:
                return t
            ctx //= 2
    return None


def _hardware(given: SuggestionInput, trials: Trials) -> Iterator[Tried | None]:
    """One more GPU like the largest, or the host RAM the CPU part is short of."""
    inventory, profile, plan = given.inventory, given.profile, given.plan
    if inventory.gpus and profile.gpus != []:
        biggest = max(inventory.gpus, key=lambda g: g.total_mib)
        extra = Gpu(index=max(g.index for g in inventory.gpus) + 1, name=f"another {biggest.name}",
                    total_mib=biggest.total_mib, free_mib=biggest.total_mib)
        update = {} if profile.gpus is None else {"gpus": [*profile.gpus, extra.index], "tensor_split": None}
        t = trials.run(update, f"one more GPU like {biggest.name} ({biggest.total_mib} MiB)",
                       box=replace(inventory, gpus=(*inventory.gpus, extra)))
        yield _if_fits(t)
    cpu = plan.uses[-1]
    if not plan.gpus and cpu.device.key == CPU and cpu.device.free_mib is not None and plan.shortfall(cpu):
        need = mib_ceil(cpu.total)
        yield Tried(Suggestion(change=f"{need - cpu.device.free_mib} MiB more free host RAM", update={}, fits=True,
                               needs_mib={CPU: need}, free_mib={CPU: cpu.device.free_mib}), plan)
