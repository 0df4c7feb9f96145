"""The planner: profile + model specs + GPU inventory -> Plan (pure, no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from llamactl.gpus import GpuInventory
from llamactl.plan.estimate import MIB, ContextParams
from llamactl.plan.model import ModelSpec
from llamactl.plan.placement import (
    CPU,
    DEFAULT_MARGIN_MIB,
    GPU_OVERHEAD_MIB,
    DeviceSlot,
    DeviceUse,
    ModelLoad,
    apply_draft,
    apply_target,
    auto_counts,
    capacities,
    counts_to_assign,
    fresh_uses,
    layer_devices,
)
from llamactl.profiles import QUANTISED_KV, Profile

# Default number of drafted tokens per step, by speculation type and engine (sizes the output rows).
SPEC_N_MAX = {"draft": 3, "mtp": 3, "ngram-mod": 64, "ngram-simple": 48, "ngram-map-k": 48,
              "ngram-map-k4v": 48, "ngram-cache": 0, "none": 0}


def _has_flag(profile: Profile, *flags: str) -> bool:
    return any(a.split("=", 1)[0] in flags for a in profile.extra_args)


def resolve_ctx(profile: Profile, spec: ModelSpec, *, draft: bool = False) -> ContextParams:
    """The context llama-server will build for this profile (see reference/llama-server.md)."""
    mainline = profile.engine == "llama.cpp"
    n_ctx = profile.ctx_size or spec.context_length or 4096
    if profile.parallel is None:
        n_seq, unified = (4, True) if mainline else (1, False)
    else:
        n_seq = profile.parallel
        unified = mainline and (_has_flag(profile, "-kvu", "--kv-unified") or n_seq == 1)
    n_batch = profile.batch_size or 2048
    n_ubatch = min(profile.ubatch_size or 512, n_batch)
    sp = profile.speculation
    if draft:
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
        swa_full=_has_flag(profile, "--swa-full"), n_outputs=n_outputs,
    )


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
class Suggestion:
    change: str  # human words, e.g. "ctx_size = 65536"
    update: dict[str, Any]  # profile fields to change (extra_args as the full new list)
    fits: bool
    needs_mib: dict[str, int]  # device key -> planned total MiB after the change
    free_mib: dict[str, int | None]

    def text(self) -> str:
        needs = ", ".join(
            f"{k} {v} MiB" + (f" of {self.free_mib[k]} free" if self.free_mib.get(k) is not None else "")
            for k, v in self.needs_mib.items() if v
        )
        return f"{self.change}: needs {needs}" + ("" if self.fits else " (still does not fit)")

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "update": self.update, "fits": self.fits, "needs_mib": self.needs_mib}


@dataclass
class Plan:
    profile: Profile
    target: ModelSpec
    draft: ModelSpec | None
    ctx: ContextParams
    draft_ctx: ContextParams | None
    uses: list[DeviceUse]
    margin_mib: int
    n_gpu_layers: int
    gpus: list[int]  # NVML indices the engine will see (CUDA_VISIBLE_DEVICES order)
    tensor_split: list[int] | None  # whole layers per GPU in `gpus` order (output layer included)
    draft_gpus: list[int] | None
    draft_n_gpu_layers: int | None
    inventory: GpuInventory
    problems: list[str] = field(default_factory=list)  # explicit choices that cannot work
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)  # GPU selection the engine child gets

    # -------------------------------------------------------------------------------------------
    @property
    def fits(self) -> bool:
        return not self.problems and all(self.shortfall(u) == 0 for u in self.uses)

    def shortfall(self, use: DeviceUse) -> int:
        room = use.room(self.margin_mib)
        return 0 if room is None or room >= 0 else -room

    def device_totals_mib(self) -> dict[str, int]:
        return {u.device.key: _mib(u.total) for u in self.uses}

    def launch_overrides(self) -> dict[str, Any]:
        """Profile field updates for `profile.model_copy(update=...)` before building argv."""
        over: dict[str, Any] = {"gpus": list(self.gpus), "n_gpu_layers": self.n_gpu_layers}
        if self.profile.ctx_size == 0:
            over["ctx_size"] = self.ctx.n_ctx
        if len(self.gpus) > 1:
            if self.profile.split_mode in (None, "layer"):
                over["tensor_split"] = [float(c) for c in (self.tensor_split or [])]
        else:
            over["tensor_split"] = None
        if self.profile.main_gpu is not None and self.profile.main_gpu not in range(len(self.gpus)):
            over["main_gpu"] = None
        if self.draft is not None:
            over["speculation"] = self.profile.speculation.model_copy(update={
                "draft_gpus": list(self.draft_gpus or []) if self.gpus else None,
                "draft_n_gpu_layers": self.draft_n_gpu_layers if self.gpus else 0,
            })
        return over

    def remaining(self) -> GpuInventory:
        """The inventory as it would be with this plan running: each device's free memory less its use."""
        used = self.device_totals_mib()
        inv = self.inventory
        gpus = tuple(replace(g, free_mib=max(0, g.free_mib - used.get(f"CUDA{g.index}", 0))) for g in inv.gpus)
        host_free = None if inv.host_free_mib is None else max(0, inv.host_free_mib - used.get(CPU, 0))
        return replace(inv, gpus=gpus, host_free_mib=host_free)

    # -------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        devices = []
        for u in self.uses:
            free = u.device.free_mib
            devices.append({
                "key": u.device.key,
                "name": u.device.name,
                "gpu_index": u.device.gpu_index,
                "layers": _ranges(u.layers, self.target.n_layer),
                "n_layers": len([i for i in u.layers if i < self.target.n_layer]),
                "weights_mib": _mib(u.weights),
                "kv_mib": _mib(u.kv),
                "compute_mib": _mib(u.compute),
                "output_mib": _mib(u.output),
                "overhead_mib": _mib(u.overhead),
                "draft_mib": _mib(u.draft_weights + u.draft_kv + u.draft_compute),
                "draft_weights_mib": _mib(u.draft_weights),
                "draft_kv_mib": _mib(u.draft_kv),
                "draft_compute_mib": _mib(u.draft_compute),
                "total_mib": _mib(u.total),
                "free_mib": free,
                "free_after_mib": None if free is None else free - _mib(u.total),
                "shortfall_mib": _mib(self.shortfall(u)),
            })
        c = self.ctx
        return {
            "profile": self.profile.name,
            "engine": self.profile.engine,
            "fits": self.fits,
            "model": {"name": self.target.name, "architecture": self.target.architecture,
                      "n_layer": self.target.n_layer, "file_mib": _mib(self.target.file_size_bytes)},
            "draft_model": None if self.draft is None else {
                "name": self.draft.name, "architecture": self.draft.architecture,
                "n_layer": self.draft.n_layer, "file_mib": _mib(self.draft.file_size_bytes)},
            "context": {"n_ctx": c.n_ctx, "n_seq": c.n_seq, "unified": c.unified, "cells": c.cells,
                        "type_k": c.type_k, "type_v": c.type_v, "flash_attn": c.flash_attn,
                        "n_ubatch": c.n_ubatch},
            "margin_mib": self.margin_mib,
            "gpu_overhead_mib": GPU_OVERHEAD_MIB,
            "devices": devices,
            "gpus": self.gpus,
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_split": self.tensor_split,
            "draft_gpus": self.draft_gpus,
            "draft_n_gpu_layers": self.draft_n_gpu_layers,
            "problems": self.problems,
            "notes": self.notes,
            "suggestions": [s.to_json() for s in self.suggestions],
            "overrides": _jsonable(self.launch_overrides()),
            "gpu_source": self.inventory.source,
            "argv": self.argv,
            "env": self.env,
        }

    def text(self) -> str:
        t, c = self.target, self.ctx
        lines = [f"plan for profile '{self.profile.name}' ({self.profile.engine}), GPUs from {self.inventory.source}"]
        lines.append(f"  model: {t.name} ({t.architecture}, {t.n_layer} layers, {_mib(t.file_size_bytes)} MiB)")
        if self.draft is not None:
            lines.append(f"  draft: {self.draft.name} ({self.draft.architecture}, {self.draft.n_layer} layers, "
                         f"{_mib(self.draft.file_size_bytes)} MiB)")
        slots = f"{c.n_seq} slots, " + ("unified KV" if c.unified else "KV split per slot")
        lines.append(f"  context: {c.n_ctx} tokens ({slots}), KV {c.type_k}/{c.type_v}, "
                     f"flash attention {'on' if c.flash_attn else 'off'}, ubatch {c.n_ubatch}")
        header = ("device", "layers", "weights", "KV", "compute", "draft", "other", "total", "free", "free after")
        rows = [header]
        for u in self.uses:
            free = u.device.free_mib
            label = u.device.key if not u.device.is_gpu else f"{u.device.key} {u.device.name}"
            rows.append((
                label[:40],
                _ranges(u.layers, t.n_layer) or "-",
                f"{_mib(u.weights)}", f"{_mib(u.kv)}", f"{_mib(u.compute)}",
                f"{_mib(u.draft_weights + u.draft_kv + u.draft_compute)}",
                f"{_mib(u.output + u.overhead)}",
                f"{_mib(u.total)}",
                "?" if free is None else f"{free}",
                "?" if free is None else f"{free - _mib(u.total)}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for i, r in enumerate(rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [x.rjust(w) for x, w in zip(r[2:], widths[2:])]
            lines.append("  " + "  ".join(cells))
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append("  (MiB; 'other' = output buffer + per-GPU overhead "
                     f"{GPU_OVERHEAD_MIB} MiB; each GPU keeps a {self.margin_mib} MiB margin)")
        if self.gpus:
            split = f", tensor split {self.tensor_split}" if self.tensor_split and len(self.gpus) > 1 else ""
            lines.append(f"  GPUs {self.gpus}, n_gpu_layers {self.n_gpu_layers}{split}")
            if self.draft is not None:
                lines.append(f"  draft on GPUs {self.draft_gpus}, draft n_gpu_layers {self.draft_n_gpu_layers}")
        else:
            lines.append("  CPU only (n_gpu_layers 0)")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.fits:
            lines.append("fits: yes")
        else:
            lines.append("fits: NO")
            for p in self.problems:
                lines.append(f"  problem: {p}")
            for u in self.uses:
                short = self.shortfall(u)
                if short:
                    lines.append(f"  {u.device.key}: short by {_mib(short)} MiB "
                                 f"(needs {_mib(u.total)} MiB"
                                 + (f" + {self.margin_mib} MiB margin" if u.device.is_gpu else "")
                                 + f", {u.device.free_mib} MiB free)")
            if self.suggestions:
                lines.append("  changes that would make it fit:" if any(s.fits for s in self.suggestions)
                             else "  no single change makes it fit; closest:")
                for s in self.suggestions:
                    lines.append(f"    - {s.text()}")
        if self.argv:
            env = " ".join(f"{k}={v}" for k, v in self.env.items())
            lines.append("engine argv: " + (env + " " if env else "") + " ".join(_quote(a) for a in self.argv))
        return "\n".join(lines)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _mib(b: int) -> int:
    return math.ceil(b / MIB) if b > 0 else 0


def _ranges(layers: list[int], n_layer: int) -> str:
    xs = sorted(i for i in layers if i < n_layer)
    parts = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(f"{xs[i]}" if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    if n_layer in layers:
        parts.append("out")
    return ",".join(parts)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# =============================================================================================
# Placement search


def _slots(inventory: GpuInventory) -> tuple[list[DeviceSlot], DeviceSlot]:
    gpus = [DeviceSlot(key=f"CUDA{g.index}", name=g.name, gpu_index=g.index, total_mib=g.total_mib,
                       free_mib=g.free_mib) for g in inventory.gpus]
    host = DeviceSlot(key=CPU, name="host RAM", gpu_index=None, total_mib=inventory.host_total_mib,
                      free_mib=inventory.host_free_mib)
    return gpus, host


def _layer_count(value: Any, n_layer: int) -> int | None:
    """Profile n_gpu_layers -> int, or None for 'auto' (search)."""
    if value == "auto":
        return None
    if value is None or value == "all":
        return n_layer + 1
    return max(0, min(int(value), n_layer + 1))


def plan_profile(profile: Profile, target: ModelSpec, inventory: GpuInventory, draft: ModelSpec | None = None,
                 *, margin_mib: int = DEFAULT_MARGIN_MIB, suggest: bool = True) -> Plan:
    """Plan one profile on one box. Pure: everything comes in as data."""
    plan = _place(profile, target, draft, inventory, margin_mib)
    if suggest and not plan.fits:
        from llamactl.plan.suggestions import suggest_changes

        plan.suggestions = suggest_changes(profile, target, draft, inventory, plan, margin_mib)
    return plan


def _place(profile: Profile, target: ModelSpec, draft: ModelSpec | None, inventory: GpuInventory,
           margin_mib: int) -> Plan:
    all_gpus, host = _slots(inventory)
    problems: list[str] = []
    notes: list[str] = []
    ctx = resolve_ctx(profile, target)
    dctx = resolve_ctx(profile, draft, draft=True) if draft is not None else None
    tload = ModelLoad.build(target, ctx, cpu_extra_weights=target.cpu_repack_bytes,
                            cpu_moe_layers=cpu_moe_layers(profile, target.n_layer))
    dload = ModelLoad.build(draft, dctx, cpu_extra_weights=draft.cpu_repack_bytes) if draft and dctx else None
    if inventory.note:
        notes.append(inventory.note)

    # Candidate GPUs.
    explicit_gpus = profile.gpus is not None
    if profile.gpus is None:
        cands = list(all_gpus)
    else:
        by_index = {g.gpu_index: g for g in all_gpus}
        missing = [i for i in profile.gpus if i not in by_index]
        if missing:
            have = [g.gpu_index for g in all_gpus]
            problems.append(f"gpus = {profile.gpus}: GPU {missing} does not exist on this box (GPUs: {have})")
        cands = [by_index[i] for i in profile.gpus if i in by_index]
    if profile.split_mode == "none" and len(cands) > 1:
        main = profile.main_gpu or 0
        cands = [cands[min(main, len(cands) - 1)]]
        notes.append(f"split_mode = 'none': everything on {cands[0].key}")
    if profile.split_mode in ("row", "tensor", "graph", "attn"):
        notes.append(f"split_mode = '{profile.split_mode}' is planned as a layer split (same totals, "
                     "per-device numbers approximate)")

    n = target.n_layer
    ngl_req = _layer_count(profile.n_gpu_layers, n) if cands else 0
    if not cands:
        ngl_req = 0

    # Draft devices: explicit, or each candidate in order of free memory.
    draft_options: list[list[DeviceSlot]] = [[]]
    dngl = 0
    if dload is not None and cands:
        dngl_req = _layer_count(profile.speculation.draft_n_gpu_layers, draft.n_layer)
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
            draft_options = [[g] for g in sorted(cands, key=lambda g: -(g.free_mib or 0))]

    best: Plan | None = None
    for dgpus in draft_options:
        candidate = _place_target(profile, tload, dload, cands, dgpus, dngl, ngl_req, host, margin_mib,
                                  explicit_gpus, inventory, ctx, dctx)
        candidate.problems[:0] = problems
        candidate.notes[:0] = notes
        if best is None or (candidate.fits and not best.fits):
            best = candidate
        if candidate.fits:
            break
    assert best is not None
    return best


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


def _place_target(profile: Profile, tload: ModelLoad, dload: ModelLoad | None, cands: list[DeviceSlot],
                  dgpus: list[DeviceSlot], dngl: int, ngl_req: int | None, host: DeviceSlot, margin_mib: int,
                  explicit_gpus: bool, inventory: GpuInventory, ctx: ContextParams,
                  dctx: ContextParams | None) -> Plan:
    n = tload.n_layer
    reserved, dassign_local = _draft_reserved(dload, dgpus, dngl, host)
    notes: list[str] = []
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
        if ngl_req is None:  # "auto": the most layers that fit, the rest on the CPU
            lo, hi = 0, n + 1
            if auto_counts(tload, gpus, caps, hi) is not None:
                lo = hi
            else:
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if auto_counts(tload, gpus, caps, mid) is not None:
                        lo = mid
                    else:
                        hi = mid
            ngl = lo
            if ngl < n + 1:
                notes.append(f"n_gpu_layers = 'auto': {n + 1 - ngl} of {n + 1} layers stay on the CPU")
        else:
            ngl = ngl_req
        # Prefer one GPU when the whole thing fits on it and the user did not list GPUs.
        single = None
        if not explicit_gpus and len(gpus) > 1:
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

    # Drop auto-chosen GPUs that hold nothing (keeps CUDA_VISIBLE_DEVICES minimal).
    if gpus and not explicit_gpus:
        used_pos = {a for a in assign if a is not None}
        keep = [i for i, g in enumerate(gpus) if i in used_pos or g in dgpus]
        if len(keep) < len(gpus):
            remap = {old: new for new, old in enumerate(keep)}
            assign = [None if a is None else remap[a] for a in assign]
            gpus = [gpus[i] for i in keep]
    # The draft's GPUs must be visible to the engine too.
    missing = [g for g in dgpus if g not in gpus]
    if missing:
        merged = sorted([*gpus, *missing], key=lambda g: g.gpu_index if g.gpu_index is not None else -1)
        remap = {i: merged.index(g) for i, g in enumerate(gpus)}
        assign = [None if a is None else remap[a] for a in assign]
        gpus = merged
    if gpus:
        counts = [sum(1 for a in assign if a == d) for d in range(len(gpus))]

    uses_map = fresh_uses(gpus, host)
    apply_target(uses_map, gpus, tload, assign)
    draft_gpu_ids: list[int] | None = None
    if dload is not None:
        dpos = {g.key: i for i, g in enumerate(gpus)}
        dassign = [None if a is None else dpos[dgpus[a].key] for a in dassign_local] if dgpus else dassign_local
        apply_draft(uses_map, gpus, dload, dassign)
        draft_gpu_ids = [g.gpu_index for g in dgpus if g.gpu_index is not None]
    uses = [uses_map[g.key] for g in gpus] + [uses_map[CPU]]
    if host.free_mib is None and (not gpus or ngl < n + 1):
        notes.append("host RAM is unknown for this box: the CPU part is not checked")

    return Plan(
        profile=profile, target=tload.spec, draft=None if dload is None else dload.spec, ctx=ctx, draft_ctx=dctx,
        uses=uses, margin_mib=margin_mib, n_gpu_layers=ngl,
        gpus=[g.gpu_index for g in gpus if g.gpu_index is not None],
        tensor_split=counts if gpus and len(gpus) > 1 else None,
        draft_gpus=draft_gpu_ids, draft_n_gpu_layers=(dngl if gpus else 0) if dload is not None else None,
        inventory=inventory, notes=notes,
    )
