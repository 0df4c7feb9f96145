"""The planner: profile + model specs + GPU inventory -> Plan (pure, no I/O).

An explicit placement (n_gpu_layers "all" or a number, a tensor_split list) is placed as given and judged.
Otherwise the planner searches, as llama.cpp's --fit would: the most work on the GPUs that fits (layers,
the output layer, MoE experts moved to the CPU first, the draft's layers), the tensor split balanced on
what each card has free, and an unset ctx_size lowered (never below a floor) when that keeps more on the
GPUs. Suggestions replan through `plan_profile` itself, handed to them as a function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from llamactl.engines import facts as engine_facts
from llamactl.gpus import GpuInventory
from llamactl.plan import mtp, unplanned
from llamactl.plan.estimate import ContextParams
from llamactl.plan.model import ModelSpec
from llamactl.plan.placement import (
    CPU,
    DEFAULT_MARGIN_MIB,
    DeviceSlot,
    DeviceUse,
    ModelLoad,
    apply_draft,
    apply_mtp,
    apply_target,
    auto_counts,
    capacities,
    counts_to_assign,
    fresh_uses,
    layer_devices,
    layers_fit,
    most_layers,
)
from llamactl.plan.result import Plan, Suggestion
from llamactl.plan.suggestions import SuggestionInput, suggest_changes
from llamactl.profiles import Profile
from llamactl.promptcache import persist_decision
from llamactl.units import MIB, mib_ceil

# The least context an unset ctx_size is lowered to (llama.cpp's --fit-ctx default).
DEFAULT_CTX_FLOOR = 4096
# The engine pads the context to this many cells: lowered contexts are multiples of it.
CTX_STEP = 256

__all__ = ["DEFAULT_CTX_FLOOR", "Plan", "Suggestion", "cpu_moe_layers", "plan_profile", "resolve_ctx"]


PROMPT_CACHE_DEFAULT_MAX_MIB = 8192  # llama-server's --cache-ram default
# Default number of drafted tokens per step, by speculation type and engine (sizes the output rows).
SPEC_N_MAX = {"draft": 3, "mtp": 3, "ngram-mod": 64, "ngram-simple": 48, "ngram-map-k": 48,
              "ngram-map-k4v": 48, "ngram-cache": 0, "none": 0}


def _has_flag(profile: Profile, *flags: str) -> bool:
    return any(a.split("=", 1)[0] in flags for a in profile.extra_args)


def resolve_ctx(profile: Profile, spec: ModelSpec, *, draft: bool = False,
                target_swa: bool | None = None) -> ContextParams:
    """The context llama-server will build for this profile (see reference/llama-server.md); `draft`: the draft
    model's, or the MTP context's (speculation.type = 'mtp', `spec` the target). `target_swa`: whether
    the target model has sliding-window layers (for a draft's context; the spec's own otherwise): the prompt
    cache's --swa-full follows the target and applies to both contexts."""
    mainline = profile.engine == "llama.cpp"
    n_ctx = profile.ctx_size or spec.context_length or 4096
    if profile.parallel is None:
        n_seq, unified = engine_facts.slots(profile.engine, None), engine_facts.unified_kv_by_default(profile.engine)
    else:
        n_seq = profile.parallel
        unified = mainline and (_has_flag(profile, "-kvu", "--kv-unified") or n_seq == 1)
    n_batch = profile.batch_size or 2048
    n_ubatch = min(profile.ubatch_size or 512, n_batch)
    sp = profile.speculation
    if draft and sp.type == "mtp" and not engine_facts.mtp_uses_draft_cache_types(profile.engine):
        type_k, type_v = profile.cache_type_k, profile.cache_type_v
        n_outputs = n_seq
    elif draft:
        type_k = sp.draft_cache_type_k or ("f16" if mainline else profile.cache_type_k)
        type_v = sp.draft_cache_type_v or ("f16" if mainline else profile.cache_type_v)
        n_outputs = n_seq
    else:
        type_k, type_v = profile.cache_type_k, profile.cache_type_v
        n_max = sp.n_max if sp.n_max is not None else SPEC_N_MAX.get(sp.type, 0)
        if not mainline and sp.type == "draft" and sp.n_max is None:
            n_max = 16
        n_outputs = min(n_batch, n_seq * (1 + n_max)) if mainline else n_ubatch
    return ContextParams(
        n_ctx=n_ctx, n_seq=n_seq, unified=unified, type_k=type_k, type_v=type_v,
        flash_attn=profile.flash_attn != "off", n_ubatch=n_ubatch, n_batch=n_batch,
        swa_full=swa_full(profile, spec.has_swa if target_swa is None else target_swa), n_outputs=n_outputs,
    )


def swa_full(profile: Profile, target_swa: bool) -> bool:
    """Whether the engine runs with --swa-full: set in extra_args, or added for the prompt cache's restores."""
    return _has_flag(profile, "--swa-full") or persist_decision(profile, sliding_window=target_swa).swa_full


def has_cpu_moe_flag(profile: Profile) -> bool:
    return _has_flag(profile, "-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe")


def cpu_moe_layers(profile: Profile, n_layer: int) -> int:
    """Layers whose MoE experts extra_args keeps on the CPU (-cmoe / --n-cpu-moe N)."""
    args = profile.extra_args
    n = 0
    for i, a in enumerate(args):
        flag, _, inline = a.partition("=")
        if flag in ("-cmoe", "--cpu-moe"):
            n = n_layer
        elif flag in ("-ncmoe", "--n-cpu-moe"):
            value = inline or (args[i + 1] if i + 1 < len(args) else "0")
            try:
                n = max(n, int(value))
            except ValueError:
                pass
    return min(n, n_layer)


@dataclass(frozen=True)
class Knobs:
    """What the search sets in place of the profile's own value (None: the profile's)."""

    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    cpu_moe: int | None = None
    draft_n_gpu_layers: int | None = None


Place = Callable[[Knobs], Plan]


def _slots(inventory: GpuInventory) -> tuple[list[DeviceSlot], DeviceSlot]:
    gpus = [DeviceSlot(key=f"CUDA{g.index}", name=g.name, gpu_index=g.index, total_mib=g.total_mib,
                       free_mib=g.free_mib) for g in inventory.gpus]
    host = DeviceSlot(key=CPU, name="host RAM", gpu_index=None, total_mib=inventory.host_total_mib,
                      free_mib=inventory.host_free_mib)
    return gpus, host


def _remote_slots(inventory: GpuInventory) -> list[DeviceSlot]:
    """The RPC workers' devices. They come first, in the engine's RPC order, and all stay in the device list
    (-dev RPC0..RPCk-1, then the local GPUs; as llama.cpp orders them itself: fewer network transfers)."""
    slots = []
    for d in inventory.remote:
        worker = d.worker if d.worker == d.endpoint else f"{d.worker} ({d.endpoint})"
        slots.append(DeviceSlot(key=d.name, name=f"on {worker}", gpu_index=None, total_mib=d.total_mib,
                                free_mib=d.free_mib, remote=worker))
    return slots


def _offloads(profile: Profile, inventory: GpuInventory) -> bool:
    """Whether any device can take layers: a local GPU the profile may use, or an RPC worker's device."""
    return bool(inventory.remote) or (bool(inventory.gpus) and profile.gpus != [])


def _layer_count(value: Any, n_layer: int) -> int | None:
    """Profile n_gpu_layers -> int, or None for unset / 'auto' (search)."""
    if value is None or value == "auto":
        return None
    if value == "all":
        return n_layer + 1
    return max(0, min(int(value), n_layer + 1))


def places_automatically(profile: Profile) -> bool:
    """Whether the planner chooses the layers (n_gpu_layers unset or "auto", no explicit tensor_split)."""
    return profile.n_gpu_layers in (None, "auto") and not isinstance(profile.tensor_split, list)


def plan_profile(profile: Profile, target: ModelSpec, inventory: GpuInventory, draft: ModelSpec | None = None,
                 *, margin_mib: int = DEFAULT_MARGIN_MIB, suggest: bool = True,
                 ctx_floor: int = DEFAULT_CTX_FLOOR) -> Plan:
    """Plan one profile on one box. Pure: everything comes in as data."""
    plan = _search(profile, target, draft, inventory, margin_mib, ctx_floor)
    if suggest and not plan.fits:
        def replan(changed: Profile, box: GpuInventory) -> Plan:
            return plan_profile(changed, target, box, draft if changed.speculation.uses_draft_model else None,
                                margin_mib=margin_mib, suggest=False, ctx_floor=ctx_floor)

        plan.suggestions = suggest_changes(
            SuggestionInput(profile=profile, target=target, draft=draft, inventory=inventory, plan=plan,
                            ctx_floor=ctx_floor), replan)
    return plan


# =============================================================================================
# The search (automatic placement)


def _search(profile: Profile, target: ModelSpec, draft: ModelSpec | None, inventory: GpuInventory,
            margin_mib: int, ctx_floor: int) -> Plan:
    def place(knobs: Knobs) -> Plan:
        return _place(profile, target, draft, inventory, margin_mib, knobs)

    best = _best_at(place, profile, target, draft, None)
    knobs = _full_knobs(profile, target, draft)
    full = best if knobs == _as_given(profile, target, draft) else place(knobs)
    if profile.ctx_size == 0 and not _complete(best, full):
        best = _lower_ctx(place, profile, target, draft, best, full, ctx_floor)
    best.cost = _cost_words(best, full, profile)
    return best


def _as_given(profile: Profile, target: ModelSpec, draft: ModelSpec | None) -> Knobs:
    """The knobs of an explicit profile (the first placement tried is then everything on the GPUs)."""
    return Knobs(n_gpu_layers=_layer_count(profile.n_gpu_layers, target.n_layer),
                 draft_n_gpu_layers=None if draft is None else
                 _layer_count(profile.speculation.draft_n_gpu_layers, draft.n_layer))


def _full_knobs(profile: Profile, target: ModelSpec, draft: ModelSpec | None) -> Knobs:
    """Everything on the GPUs: all layers, the profile's own expert setting, all the draft's layers."""
    explicit = _layer_count(profile.n_gpu_layers, target.n_layer)
    d_explicit = _layer_count(profile.speculation.draft_n_gpu_layers, draft.n_layer) if draft else None
    return Knobs(n_gpu_layers=target.n_layer + 1 if explicit is None else explicit,
                 draft_n_gpu_layers=None if draft is None or d_explicit is not None else draft.n_layer + 1)


def _complete(plan: Plan, full: Plan) -> bool:
    """It fits with as much on the GPUs as the profile could have."""
    return plan.fits and plan.work >= full.work


def _better(a: Plan, b: Plan) -> bool:
    """a fits where b does not, or both fit and a keeps more on the GPUs."""
    return a.fits and (not b.fits or a.work > b.work)


def _best_at(place: Place, profile: Profile, target: ModelSpec, draft: ModelSpec | None,
             n_ctx: int | None) -> Plan:
    """The placement with the most work on the GPUs at this context: layers (inside _place), then MoE
    experts moved to the CPU first, then the draft's layers."""
    plan = place(Knobs(n_ctx=n_ctx))
    if not places_automatically(profile) or not _offloads(profile, plan.inventory):
        return plan
    if plan.fits and plan.n_gpu_layers == target.n_layer + 1 and plan.draft_n_gpu_layers in (
            None, (draft.n_layer + 1) if draft else None):
        return plan
    plan = _experts_to_cpu(place, profile, target, n_ctx, plan)
    if draft is not None and profile.speculation.draft_n_gpu_layers in (None, "auto"):
        plan = _draft_layers(place, draft, n_ctx, plan)
    return plan


def _experts_to_cpu(place: Place, profile: Profile, target: ModelSpec, n_ctx: int | None, plan: Plan) -> Plan:
    """The fewest layers whose MoE experts go to the CPU (--n-cpu-moe) for the most layers on the GPUs."""
    if profile.engine != "llama.cpp" or has_cpu_moe_flag(profile) or not any(target.layer_expert_bytes):
        return plan
    n = target.n_layer
    all_out = place(Knobs(n_ctx=n_ctx, cpu_moe=n))
    if not _better(all_out, plan):
        return plan
    level = all_out.n_gpu_layers

    def enough(m: int) -> Plan | None:
        p = place(Knobs(n_ctx=n_ctx, cpu_moe=m))
        return p if p.fits and p.n_gpu_layers >= level else None

    m = _smallest(0, n, enough)
    return enough(m) or all_out


def _draft_layers(place: Place, draft: ModelSpec, n_ctx: int | None, plan: Plan) -> Plan:
    """The most draft layers on the GPUs that keep the target's placement, when fewer give the target more."""
    moe = plan.cpu_moe if plan.cpu_moe_chosen else None
    none_on_gpu = place(Knobs(n_ctx=n_ctx, cpu_moe=moe, draft_n_gpu_layers=0))
    if not (none_on_gpu.fits and (not plan.fits or none_on_gpu.work[:2] > plan.work[:2])):
        return plan
    level = none_on_gpu.work[:2]

    def keeps(d: int) -> Plan | None:
        p = place(Knobs(n_ctx=n_ctx, cpu_moe=moe, draft_n_gpu_layers=d))
        return p if p.fits and p.work[:2] >= level else None

    d = _largest(0, draft.n_layer + 1, keeps)
    return keeps(d) or none_on_gpu


def _lower_ctx(place: Place, profile: Profile, target: ModelSpec, draft: ModelSpec | None, best: Plan,
               full: Plan, ctx_floor: int) -> Plan:
    """An unset ctx_size: the largest context (in the engine's steps, not below the floor) that keeps the
    most on the GPUs, when a shorter context keeps more than the model's own."""
    n_ctx = best.ctx.n_ctx
    floor = min(ctx_floor, n_ctx)
    if floor >= n_ctx:
        return best
    at_floor = _best_at(place, profile, target, draft, floor)
    if not _better(at_floor, best):
        return best
    steps = [floor] + [k * CTX_STEP for k in range(floor // CTX_STEP + 1, -(-n_ctx // CTX_STEP))]

    def keeps(i: int) -> Plan | None:
        p = at_floor if i == 0 else _best_at(place, profile, target, draft, steps[i])
        return p if p.fits and p.work >= at_floor.work else None

    chosen = keeps(_largest(0, len(steps) - 1, keeps)) or at_floor
    chosen.ctx_lowered_from = n_ctx
    chosen.notes.append(f"ctx_size is unset: {chosen.ctx.n_ctx} tokens instead of the model's {n_ctx}, "
                        f"to keep {'everything' if chosen.work >= full.work else 'more'} on the GPUs "
                        f"(never below {floor})")
    return chosen


def _largest(lo: int, hi: int, ok: Callable[[int], Any]) -> int:
    """The largest i in lo..hi with ok(i), given ok(lo) and that ok is monotone (true, then false)."""
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _smallest(lo: int, hi: int, ok: Callable[[int], Any]) -> int:
    """The smallest i in lo..hi with ok(i), given ok(hi) and that ok is monotone (false, then true)."""
    if ok(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _cost_words(plan: Plan, full: Plan, profile: Profile) -> str | None:
    """What an automatic placement gives up, and the free memory that would put everything on the GPUs."""
    n = plan.target.n_layer
    parts = []
    slower = False
    if places_automatically(profile) and _offloads(profile, plan.inventory):
        gpu_uses = [u for u in plan.uses if u.device.is_gpu]
        on_gpu = sum(1 for u in gpu_uses for il in u.layers if il < n)
        output = any(n in u.layers for u in gpu_uses)
        keys = ", ".join(u.device.key for u in gpu_uses if u.layers) or "the GPUs"
        if on_gpu == 0 and not output:
            parts.append(f"all {n} layers and the output on the CPU")
            slower = True
        elif plan.n_gpu_layers < n + 1:
            parts.append(f"{on_gpu} of {n} layers{' and the output' if output else ''} on {keys}, "
                         f"{n - on_gpu} on the CPU")
            slower = True
        if plan.cpu_moe_chosen and plan.cpu_moe:
            parts.append(f"the MoE experts of {plan.cpu_moe} of {n} layers on the CPU (--n-cpu-moe {plan.cpu_moe})")
            slower = True
    if (plan.draft is not None and profile.speculation.draft_n_gpu_layers in (None, "auto") and plan.gpus
            and (plan.draft_n_gpu_layers or 0) < plan.draft.n_layer + 1):
        parts.append(f"{plan.draft_n_gpu_layers} of {plan.draft.n_layer + 1} draft layers on the GPUs")
        slower = True
    if plan.ctx_lowered_from:
        parts.append(f"context {plan.ctx.n_ctx} tokens, not the model's {plan.ctx_lowered_from}")
    if not parts:
        return None
    short = [(u.device.key, mib_ceil(full.shortfall(u))) for u in full.uses if u.device.is_gpu and full.shortfall(u)]
    words = "; ".join(parts) + (": slower" if slower else "")
    if short:
        words += "; free " + " and ".join(f"{m} MiB on {k}" for k, m in short) + " for all"
    return words


# =============================================================================================
# One placement


def _place(profile: Profile, target: ModelSpec, draft: ModelSpec | None, inventory: GpuInventory,
           margin_mib: int, knobs: Knobs = Knobs()) -> Plan:
    all_gpus, host = _slots(inventory)
    problems: list[str] = []
    notes: list[str] = []
    if why := mtp.problem(profile, target):
        problems.append(why)
    mspec = mtp.context_spec(target) if mtp.is_on(profile) and target.n_nextn else None
    if why := mtp.ignored_keys(profile):
        notes.append(why)
    notes.extend(unplanned.notes(profile))
    target = mtp.target_view(target, profile)
    ctx = resolve_ctx(profile, target)
    dctx = resolve_ctx(profile, draft, draft=True, target_swa=target.has_swa) if draft is not None else None
    if knobs.n_ctx is not None:
        ctx = replace(ctx, n_ctx=knobs.n_ctx)
    if dctx is not None:
        dctx = replace(dctx, n_ctx=ctx.n_ctx)  # the draft's context is the target's (mainline has no -cd)
    cpu_moe = cpu_moe_layers(profile, target.n_layer) if knobs.cpu_moe is None else knobs.cpu_moe
    tload = ModelLoad.build(target, ctx, cpu_extra_weights=target.cpu_repack_bytes, cpu_moe_layers=cpu_moe)
    dload = ModelLoad.build(draft, dctx, cpu_extra_weights=draft.cpu_repack_bytes) if draft and dctx else None
    mload = None
    if mspec is not None:
        mload = ModelLoad.build(mspec, replace(resolve_ctx(profile, mspec, draft=True), n_ctx=ctx.n_ctx))
        tload = tload.with_mtp(mload)
    if inventory.note:
        notes.append(inventory.note)

    # Candidate GPUs.
    explicit_gpus = profile.gpus is not None
    remotes = _remote_slots(inventory)
    if profile.gpus is None:
        cands = list(all_gpus)
    else:
        by_index = {g.gpu_index: g for g in all_gpus}
        missing = [i for i in profile.gpus if i not in by_index]
        if missing:
            have = [g.gpu_index for g in all_gpus]
            problems.append(f"gpus = {profile.gpus}: GPU {missing} does not exist on this box (GPUs: {have})")
        cands = [by_index[i] for i in profile.gpus if i in by_index]
    if profile.split_mode == "none" and len(cands) > 1 and not remotes:
        main = profile.main_gpu or 0
        cands = [cands[min(main, len(cands) - 1)]]
        notes.append(f"split_mode = 'none': everything on {cands[0].key}")
    cands = remotes + cands
    if profile.split_mode in ("row", "tensor", "graph", "attn"):
        notes.append(f"split_mode = '{profile.split_mode}' is planned as a layer split (same totals, "
                     "per-device numbers approximate)")

    n = target.n_layer
    ngl_req = knobs.n_gpu_layers if knobs.n_gpu_layers is not None else _layer_count(profile.n_gpu_layers, n)
    if ngl_req is None and isinstance(profile.tensor_split, list):
        ngl_req = n + 1  # an explicit split is placed as given
    if not cands:
        ngl_req = 0

    # Draft devices: explicit, or each candidate in order of free memory.
    draft_options: list[list[DeviceSlot]] = [[]]
    dngl = 0
    if dload is not None and cands:
        dngl_req = (knobs.draft_n_gpu_layers if knobs.draft_n_gpu_layers is not None
                    else _layer_count(profile.speculation.draft_n_gpu_layers, draft.n_layer))
        dngl = draft.n_layer + 1 if dngl_req is None else dngl_req
        if profile.speculation.draft_gpus is not None:
            by_index = {g.gpu_index: g for g in all_gpus}
            bad = [i for i in profile.speculation.draft_gpus if i not in by_index
                   or (explicit_gpus and i not in (profile.gpus or []))]
            if bad:
                problems.append(f"speculation.draft_gpus = {profile.speculation.draft_gpus}: GPU {bad} is not "
                                "available (it must exist and be listed in gpus)")
            chosen = [by_index[i] for i in profile.speculation.draft_gpus if i in by_index and i not in bad]
            draft_options = [chosen or cands[:1]]
        else:
            draft_options = [[g] for g in sorted(cands, key=lambda g: -(g.free_mib or 0)) if g.gpu_index is not None]
        draft_options = draft_options or [[]]

    best: Plan | None = None
    for dgpus in draft_options:
        candidate = _place_target(profile, tload, dload, cands, dgpus, dngl if dgpus else 0, ngl_req, host,
                                  margin_mib, explicit_gpus, inventory, ctx, dctx, mload)
        candidate.problems[:0] = problems
        candidate.notes[:0] = notes
        if best is None or _better(candidate, best):
            best = candidate
        if candidate.fits and candidate.n_gpu_layers == n + 1:
            break
    assert best is not None
    best.cpu_moe = cpu_moe if best.offloads else 0
    best.cpu_moe_chosen = knobs.cpu_moe is not None and best.offloads
    for use in best.uses:
        if not use.device.is_gpu and not use.device.remote:
            use.prompt_cache = prompt_cache_bytes(profile, best.uses)
    return best


def prompt_cache_bytes(profile: Profile, uses: list[DeviceUse]) -> int:
    """Host RAM the engine's prompt cache (--cache-ram) may grow to: the profile's cache_ram_mib, else twice the KV
    cache (a saved prompt is at most one slot's KV, so this keeps the prompts of every slot twice over), at most
    the engine's own default of 8192 MiB."""
    if profile.cache_ram_mib is not None:
        return profile.cache_ram_mib * MIB
    kv = sum(u.kv for u in uses)
    return min(PROMPT_CACHE_DEFAULT_MAX_MIB * MIB, -(-2 * kv // MIB) * MIB)


def _draft_reserved(dload: ModelLoad | None, dgpus: list[DeviceSlot], dngl: int, host: DeviceSlot,
                    ) -> tuple[dict[str, int], list[int | None]]:
    if dload is None:
        return {}, []
    if not dgpus:
        return {}, [None] * (dload.n_layer + 1)
    split = [float(g.free_mib or 0) for g in dgpus]  # llama.cpp splits a multi-device draft by free memory
    assign = layer_devices(dload.n_layer, dngl, split)
    uses = fresh_uses(dgpus, host)
    apply_draft(uses, dgpus, dload, assign)
    return {g.key: uses[g.key].draft_weights + uses[g.key].draft_kv + uses[g.key].draft_compute
            for g in dgpus}, assign


def _orders(gpus: list[DeviceSlot], caps: list[int]) -> list[list[int]]:
    """Device orders to try (positions into gpus): as listed, then each other GPU moved last, the roomiest
    first (the last device holds the output layer, usually the largest single piece). With RPC devices
    only the engine's order (workers first) is tried: -dev names them by position."""
    orders = [list(range(len(gpus)))]
    if any(g.remote for g in gpus):
        return orders
    for last in sorted(range(len(gpus) - 1), key=lambda i: -caps[i]):
        orders.append([i for i in range(len(gpus)) if i != last] + [last])
    return orders


def _choose_order(tload: ModelLoad, gpus: list[DeviceSlot], caps: list[int], ngl_req: int | None
                  ) -> tuple[list[int], int]:
    """(device order, n_gpu_layers): the order that holds the most layers (auto) or that fits ngl_req."""
    orders = _orders(gpus, caps)
    if ngl_req is not None:
        for order in orders:
            if layers_fit(tload, [caps[i] for i in order], ngl_req):
                return order, ngl_req
    if ngl_req is not None:  # does not fit: report it with the output layer on the roomiest card
        return max(orders, key=lambda order: caps[order[-1]]), ngl_req
    best: tuple[list[int], int] | None = None
    for order in orders:
        ngl = most_layers(tload, [caps[i] for i in order])
        if best is None or ngl > best[1]:
            best = (order, ngl)
        if ngl == tload.n_layer + 1:
            break
    assert best is not None
    return best


def _place_target(profile: Profile, tload: ModelLoad, dload: ModelLoad | None, cands: list[DeviceSlot],
                  dgpus: list[DeviceSlot], dngl: int, ngl_req: int | None, host: DeviceSlot, margin_mib: int,
                  explicit_gpus: bool, inventory: GpuInventory, ctx: ContextParams,
                  dctx: ContextParams | None, mload: ModelLoad | None = None) -> Plan:
    n = tload.n_layer
    auto = places_automatically(profile)
    if not dngl:
        dgpus = []  # the draft all on the CPU needs no GPU of its own
    reserved, dassign_local = _draft_reserved(dload, dgpus, dngl, host)
    gpus = list(cands)
    counts: list[int] | None = None
    explicit_split = isinstance(profile.tensor_split, list)

    if not gpus:
        ngl = 0
        assign: list[int | None] = [None] * (n + 1)
    elif explicit_split:
        ngl = n + 1 if ngl_req is None else ngl_req
        shares = list(profile.tensor_split or [])
        if len(shares) != len(gpus):
            shares = (shares + [0.0] * len(gpus))[: len(gpus)]
        assign = layer_devices(n, ngl, shares)
    else:
        caps = capacities(gpus, reserved, margin_mib)
        order, ngl = _choose_order(tload, gpus, caps, ngl_req)
        gpus, caps = [gpus[i] for i in order], [caps[i] for i in order]
        # Prefer one GPU when the whole thing fits on it and the user did not list GPUs.
        single = None
        if not explicit_gpus and len(gpus) > 1 and not any(g.remote for g in gpus):
            for i in sorted(range(len(gpus)), key=lambda i: -caps[i]):
                if dgpus and gpus[i] not in dgpus and len(dgpus) == 1:
                    continue
                if auto_counts(tload, [gpus[i]], [caps[i]], ngl) is not None:
                    single = i
                    break
        if single is not None:
            gpus = [gpus[single]]
            counts = [min(ngl, n + 1)]
        else:
            counts = auto_counts(tload, gpus, caps, ngl) if ngl else None
            if counts is None and ngl:
                # Does not fit: split in proportion to capacity for the report.
                total_cap = sum(max(c, 0) for c in caps) or 1
                shares = [max(c, 0) / total_cap for c in caps]
                assign = layer_devices(n, ngl, shares if any(shares) else [1.0] * len(gpus))
                counts = [sum(1 for a in assign if a == d) for d in range(len(gpus))]
        counts = counts or [0] * len(gpus)
        assign = counts_to_assign(n, counts, ngl)

    # Drop GPUs that hold nothing (keeps CUDA_VISIBLE_DEVICES minimal): the ones chosen automatically, and
    # any of the listed ones when the planner chooses the layers.
    if gpus and (not explicit_gpus or auto):
        used_pos = {a for a in assign if a is not None}
        keep = [i for i, g in enumerate(gpus) if i in used_pos or (g in dgpus and dngl) or g.remote]
        if len(keep) < len(gpus):
            remap = {old: new for new, old in enumerate(keep)}
            assign = [None if a is None else remap[a] for a in assign]
            gpus = [gpus[i] for i in keep]
    # The draft's GPUs must be visible to the engine too (after the target's: the output stays where it is).
    gpus += [g for g in dgpus if g not in gpus]
    if gpus:
        counts = [sum(1 for a in assign if a == d) for d in range(len(gpus))]

    uses_map = fresh_uses(gpus, host)
    apply_target(uses_map, gpus, tload, assign)
    if mload is not None:
        apply_mtp(uses_map, gpus, mload, assign)
    draft_gpu_ids: list[int] | None = None
    if dload is not None:
        dpos = {g.key: i for i, g in enumerate(gpus)}
        dassign = [None if a is None else dpos[dgpus[a].key] for a in dassign_local] if dgpus else dassign_local
        apply_draft(uses_map, gpus, dload, dassign)
        draft_gpu_ids = [g.gpu_index for g in dgpus if g.gpu_index is not None]
    uses = [uses_map[g.key] for g in gpus] + [uses_map[CPU]]
    if host.free_mib is None and (not gpus or ngl < n + 1):
        notes = ["host RAM is unknown for this box: the CPU part is not checked"]
    else:
        notes = []

    return Plan(
        profile=profile, target=tload.spec, draft=None if dload is None else dload.spec, ctx=ctx,
        draft_ctx=mload.ctx if mload is not None else dctx,
        uses=uses, margin_mib=margin_mib, n_gpu_layers=ngl if gpus else 0,
        gpus=[g.gpu_index for g in gpus if g.gpu_index is not None],
        tensor_split=counts if gpus and (len(gpus) > 1 or gpus[0].remote) else None,
        remote_devices=[g.key for g in gpus if g.remote],
        draft_gpus=draft_gpu_ids, draft_n_gpu_layers=(dngl if gpus and dgpus else 0) if dload is not None else None,
        inventory=inventory, notes=notes,
    )
