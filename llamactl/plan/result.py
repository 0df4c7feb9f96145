"""The result of planning: where everything goes (Plan) and the changes that would make it fit (Suggestion).
Pure data and its words; no planning here."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from typing import Any

from llamactl.engines.common import gpu_env
from llamactl.gpus import GpuInventory
from llamactl.plan.estimate import ContextParams
from llamactl.plan.model import ModelSpec
from llamactl.plan.placement import CPU, GPU_OVERHEAD_MIB, DeviceUse
from llamactl.profiles import Profile
from llamactl.promptcache import Persist, persist_decision
from llamactl.units import mib_ceil as _mib


@dataclass(frozen=True)
class Suggestion:
    change: str  # human words, e.g. "ctx_size = 65536"
    update: dict[str, Any]  # profile fields to change (extra_args as the full new list)
    fits: bool
    needs_mib: dict[str, int]  # device key -> planned total MiB after the change
    free_mib: dict[str, int | None]
    cost: str | None = None  # what the replanned placement gives up (layers on the CPU, a shorter context)

    def text(self) -> str:
        needs = ", ".join(
            f"{k} {v} MiB" + (f" of {self.free_mib[k]} free" if self.free_mib.get(k) is not None else "")
            for k, v in self.needs_mib.items() if v
        )
        return (f"{self.change}: needs {needs}" + ("" if self.fits else " (still does not fit)")
                + (f"\n        then: {self.cost}" if self.cost else ""))

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "update": self.update, "fits": self.fits, "needs_mib": self.needs_mib,
                "cost": self.cost}


@dataclass
class Plan:
    profile: Profile
    target: ModelSpec
    draft: ModelSpec | None
    ctx: ContextParams
    draft_ctx: ContextParams | None  # the draft model's context, or the MTP context's
    uses: list[DeviceUse]
    margin_mib: int
    n_gpu_layers: int
    gpus: list[int]  # NVML indices the engine will see (CUDA_VISIBLE_DEVICES order)
    tensor_split: list[int] | None  # whole layers per device: remote_devices, then `gpus` (output included)
    draft_gpus: list[int] | None
    draft_n_gpu_layers: int | None
    inventory: GpuInventory
    problems: list[str] = field(default_factory=list)  # explicit choices that cannot work
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    argv: list[str] | None = None  # filled by the caller that finds the engine binary (llamactl.planning)
    cpu_moe: int = 0  # layers whose MoE experts stay on the CPU (from extra_args, or chosen)
    cpu_moe_chosen: bool = False  # the planner chose cpu_moe (launch adds --n-cpu-moe)
    ctx_lowered_from: int | None = None  # the unset ctx_size the planner lowered to fit
    cost: str | None = None  # what an automatic placement gives up, in words (None: nothing)
    remote_devices: list[str] = field(default_factory=list)  # RPC workers' devices in the -dev list (RPC0, ..)

    @property
    def offloads(self) -> bool:
        """Layers can go to a device: a local GPU or an RPC worker's."""
        return bool(self.gpus or self.remote_devices)

    @property
    def devices(self) -> list[str]:
        """The engine's device list for this plan (-dev): RPC devices first, then the local GPUs as the
        engine numbers them under CUDA_VISIBLE_DEVICES."""
        return [*self.remote_devices, *(f"CUDA{i}" for i in range(len(self.gpus)))]

    # -------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The GPU selection the engine child gets."""
        return gpu_env(self.profile.model_copy(update={"gpus": list(self.gpus)}))

    @property
    def work(self) -> tuple[int, int, int]:
        """How much runs on the GPUs, to compare placements: layers, then experts, then the draft's layers."""
        on = self.offloads
        return (self.n_gpu_layers if on else 0, -self.cpu_moe if on else -self.target.n_layer,
                (self.draft_n_gpu_layers or 0) if self.gpus else 0)

    @property
    def prompt_cache_mib(self) -> int:
        """The host RAM planned for the engine's prompt cache (--cache-ram), MiB."""
        return sum(_mib(u.prompt_cache) for u in self.uses)

    @property
    def persist(self) -> Persist:
        """Whether the engine's slots are kept on disk across its stops (the prompt cache that outlives it)."""
        return persist_decision(self.profile, sliding_window=self.target.has_swa)

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
        over: dict[str, Any] = {"gpus": list(self.gpus), "n_gpu_layers": self.n_gpu_layers,
                                "cache_ram_mib": self.prompt_cache_mib}
        if self.profile.ctx_size == 0:
            over["ctx_size"] = self.ctx.n_ctx
        if self.cpu_moe_chosen and self.cpu_moe:
            over["extra_args"] = [*self.profile.extra_args, "--n-cpu-moe", str(self.cpu_moe)]
        if self.remote_devices:  # --rpc the workers, -dev and -ts over every device in the plan's order
            over["rpc"] = list(dict.fromkeys(d.endpoint for d in self.inventory.remote))
            over["tensor_split"] = [float(c) for c in (self.tensor_split or [])]
        elif len(self.gpus) > 1:
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
        remote = tuple(replace(d, free_mib=max(0, d.free_mib - used.get(d.name, 0))) for d in inv.remote)
        host_free = None if inv.host_free_mib is None else max(0, inv.host_free_mib - used.get(CPU, 0))
        return replace(inv, gpus=gpus, remote=remote, host_free_mib=host_free)

    # -------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        devices = []
        for u in self.uses:
            free = u.device.free_mib
            devices.append({
                "key": u.device.key,
                "name": u.device.name,
                "gpu_index": u.device.gpu_index,
                "worker": u.device.remote,
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
                "prompt_cache_mib": _mib(u.prompt_cache),
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
                      "n_layer": self.target.n_layer, "n_nextn": self.target.n_nextn,
                      "file_mib": _mib(self.target.file_size_bytes)},
            "mtp": None if self.profile.speculation.type != "mtp" or self.draft_ctx is None else {
                "n_nextn": self.target.n_nextn, "type_k": self.draft_ctx.type_k, "type_v": self.draft_ctx.type_v},
            "draft_model": None if self.draft is None else {
                "name": self.draft.name, "architecture": self.draft.architecture,
                "n_layer": self.draft.n_layer, "file_mib": _mib(self.draft.file_size_bytes)},
            "context": {"n_ctx": c.n_ctx, "n_seq": c.n_seq, "unified": c.unified, "cells": c.cells,
                        "type_k": c.type_k, "type_v": c.type_v, "flash_attn": c.flash_attn,
                        "n_ubatch": c.n_ubatch, "swa_full": c.swa_full},
            "persist": self.persist.to_json(),
            "margin_mib": self.margin_mib,
            "gpu_overhead_mib": GPU_OVERHEAD_MIB,
            "devices": devices,
            "gpus": self.gpus,
            "remote_devices": self.remote_devices,
            "n_gpu_layers": self.n_gpu_layers,
            "n_cpu_moe": self.cpu_moe,
            "ctx_lowered_from": self.ctx_lowered_from,
            "placement_cost": self.cost,
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
        if self.profile.speculation.type == "mtp" and t.n_nextn and self.draft_ctx is not None:
            d = self.draft_ctx
            lines.append(f"  MTP: the model's {t.n_nextn} NextN layer{'s' if t.n_nextn > 1 else ''} draft (weights "
                         f"with the target's), in a context of their own with KV {d.type_k}/{d.type_v} "
                         "(the 'draft' column)")
        elif t.n_nextn:
            lines.append(f"  MTP: off; the engine skips the model's {t.n_nextn} NextN layer"
                         f"{'s' if t.n_nextn > 1 else ''} (speculation.type = 'mtp' drafts with them)")
        slots = f"{c.n_seq} slots, " + ("unified KV" if c.unified else "KV split per slot")
        lines.append(f"  context: {c.n_ctx} tokens ({slots}), KV {c.type_k}/{c.type_v}, "
                     f"flash attention {'on' if c.flash_attn else 'off'}, ubatch {c.n_ubatch}")
        header = ("device", "layers", "weights", "KV", "compute", "draft", "other", "total", "free", "free after")
        rows = [header]
        for u in self.uses:
            free = u.device.free_mib
            label = u.device.key if not u.device.is_gpu else f"{u.device.key} {u.device.name}"
            rows.append((
                label[:60] if u.device.remote else label[:40],
                _ranges(u.layers, t.n_layer) or "-",
                f"{_mib(u.weights)}", f"{_mib(u.kv)}", f"{_mib(u.compute)}",
                f"{_mib(u.draft_weights + u.draft_kv + u.draft_compute)}",
                f"{_mib(u.output + u.overhead + u.prompt_cache)}",
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
                     f"{GPU_OVERHEAD_MIB} MiB + the host's prompt cache; each GPU keeps a {self.margin_mib} MiB margin)")
        cache = self.prompt_cache_mib
        lines.append(f"  prompt cache: {cache} MiB of host RAM (--cache-ram {cache}"
                     + (", set by cache_ram_mib)" if self.profile.cache_ram_mib is not None else
                        ": twice the KV cache, at most 8192 MiB; cache_ram_mib sets it, 0 turns it off)"))
        persist = self.persist
        lines.append(f"  prompt cache on disk: {'on' if persist.on else 'off'} ({persist.reason})"
                     + (", KV planned with --swa-full" if c.swa_full and self.target.has_swa else ""))
        if self.remote_devices:
            lines.append(f"  devices {','.join(self.devices)} (RPC workers first), n_gpu_layers {self.n_gpu_layers}, "
                         f"tensor split {self.tensor_split}")
            if self.draft is not None:
                lines.append(f"  draft on GPUs {self.draft_gpus}, draft n_gpu_layers {self.draft_n_gpu_layers}")
        elif self.gpus:
            split = f", tensor split {self.tensor_split}" if self.tensor_split and len(self.gpus) > 1 else ""
            lines.append(f"  GPUs {self.gpus}, n_gpu_layers {self.n_gpu_layers}{split}")
            if self.draft is not None:
                lines.append(f"  draft on GPUs {self.draft_gpus}, draft n_gpu_layers {self.draft_n_gpu_layers}")
        else:
            lines.append("  CPU only (n_gpu_layers 0)")
        if self.cost:
            lines.append(f"  placement: {self.cost}")
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
                if not short:
                    continue
                where = f" {u.device.name}" if u.device.remote else ""
                lines.append(f"  {u.device.key}{where}: short by {_mib(short)} MiB "
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
            lines.append("engine argv: " + (env + " " if env else "") + " ".join(shlex.quote(a) for a in self.argv))
        return "\n".join(lines)


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
