"""Placement: which GPUs, how many layers on each (whole layers), where the draft goes (pure).

Layer -> device follows llama.cpp (src/llama-model.cpp): with n_gpu_layers = ngl, layers
il >= n_layer + 1 - ngl are offloaded, the output layer counts as layer n_layer, and the device of
offloaded layer il is the first d with cumsplit[d] > (il - i_gpu_start) / ngl. A tensor split given
as per-device layer counts therefore lands exactly those layers on each device.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

from llamactl.plan.estimate import MIB, ContextParams, compute_bytes, layer_costs, output_buffer_bytes
from llamactl.plan.model import ModelSpec

# Per-GPU memory the estimate cannot see: CUDA context, cuBLAS workspace, pools (250-500 MiB measured).
GPU_OVERHEAD_MIB = 512
# Free memory kept on every GPU after the plan.
DEFAULT_MARGIN_MIB = 512
CPU = "CPU"


@dataclass(frozen=True)
class DeviceSlot:
    """A place memory can go. `gpu_index` None = host RAM (the CPU device)."""

    key: str  # "CUDA0" (NVML index), "RPC0" (a worker's device, the engine's name) or "CPU"
    name: str
    gpu_index: int | None
    total_mib: int | None
    free_mib: int | None  # None = unknown (host RAM of a described box)
    remote: str | None = None  # the RPC worker holding it ("gpu-box (10.0.0.2:50052)"); None = this box

    @property
    def is_gpu(self) -> bool:
        """A device layers are offloaded to: a local GPU or an RPC worker's device."""
        return self.gpu_index is not None or self.remote is not None


@dataclass
class DeviceUse:
    device: DeviceSlot
    weights: int = 0
    kv: int = 0
    compute: int = 0
    output: int = 0  # output (logits) buffer, host side
    overhead: int = 0
    draft_weights: int = 0
    draft_kv: int = 0
    draft_compute: int = 0
    prompt_cache: int = 0  # host RAM the engine's prompt cache may grow to (--cache-ram)
    layers: list[int] = field(default_factory=list)  # target layers (n_layer = output layer)
    draft_layers: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (self.weights + self.kv + self.compute + self.output + self.overhead
                + self.draft_weights + self.draft_kv + self.draft_compute + self.prompt_cache)

    def room(self, margin_mib: int) -> int | None:
        """Bytes left after this use and the margin (negative = shortfall); None when unknown."""
        if self.device.free_mib is None:
            return None
        margin = margin_mib * MIB if self.device.is_gpu else 0
        return self.device.free_mib * MIB - margin - self.total


@dataclass(frozen=True)
class ModelLoad:
    """One model (target or draft) with its context, reduced to what placement needs."""

    spec: ModelSpec
    ctx: ContextParams
    layer_cost: tuple[int, ...]  # weights + KV per layer
    layer_weights: tuple[int, ...]
    layer_kv: tuple[int, ...]
    compute_base: int
    compute_output: int
    output_buffer: int
    compute_gpu_extra: int = 0
    cpu_extra_weights: int = 0  # e.g. repacked copies on the CPU backend
    layer_cpu_weights: tuple[int, ...] = ()  # per layer, weights kept on the CPU anyway (MoE experts)
    output_extra: int = 0  # what the search keeps free beside the output layer (the MTP context's compute)

    @classmethod
    def build(cls, spec: ModelSpec, ctx: ContextParams, cpu_extra_weights: int = 0,
              cpu_moe_layers: int = 0) -> "ModelLoad":
        costs = layer_costs(spec, ctx)
        comp = compute_bytes(spec, ctx)
        cpu_part = tuple(spec.layer_expert_bytes[il] if il < cpu_moe_layers else 0 for il in range(spec.n_layer))
        return cls(
            spec=spec, ctx=ctx,
            layer_cost=tuple(c.total - x for c, x in zip(costs, cpu_part)),
            layer_weights=tuple(c.weights - x for c, x in zip(costs, cpu_part)),
            layer_cpu_weights=cpu_part,
            layer_kv=tuple(c.kv for c in costs),
            compute_base=comp.base, compute_output=comp.output, compute_gpu_extra=comp.gpu_extra,
            output_buffer=output_buffer_bytes(spec, ctx),
            cpu_extra_weights=cpu_extra_weights,
        )

    @property
    def n_layer(self) -> int:
        return self.spec.n_layer

    def with_mtp(self, mtp: "ModelLoad") -> "ModelLoad":
        """This target as the placement search sees it beside its MTP context: each NextN layer carries its KV
        there too, the output layer the context's compute (apply_mtp books them)."""
        return replace(self, layer_cost=tuple(c + k for c, k in zip(self.layer_cost, mtp.layer_kv)),
                       output_extra=mtp.compute_base + mtp.compute_output + mtp.compute_gpu_extra)


def layer_devices(n_layer: int, ngl: int, split: list[float]) -> list[int | None]:
    """Device position (index into split) of layers 0..n_layer (n_layer = output); None = CPU."""
    n_dev = len(split)
    if n_dev == 0 or ngl <= 0:
        return [None] * (n_layer + 1)
    total = sum(split)
    if total <= 0:
        split = [1.0] * n_dev
        total = float(n_dev)
    cum = []
    acc = 0.0
    for s in split:
        acc += s
        cum.append(acc / total)
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            out.append(None)
        else:
            d = bisect.bisect_right(cum, (il - i_gpu_start) / act)
            out.append(min(d, n_dev - 1))
    return out


def _tied(spec: ModelSpec) -> bool:
    return spec.input_bytes + sum(spec.layer_bytes) + spec.output_bytes > spec.tensor_bytes


def apply_target(uses: dict[str, DeviceUse], gpus: list[DeviceSlot], load: ModelLoad,
                 assign: list[int | None]) -> None:
    """Add the target's memory to `uses` for a layer -> GPU-position assignment (None = CPU)."""
    _apply(uses, gpus, load, assign, draft=False)


def apply_draft(uses: dict[str, DeviceUse], gpus: list[DeviceSlot], load: ModelLoad,
                assign: list[int | None]) -> None:
    _apply(uses, gpus, load, assign, draft=True)


def _apply(uses: dict[str, DeviceUse], gpus: list[DeviceSlot], load: ModelLoad,
           assign: list[int | None], draft: bool) -> None:
    cpu = uses[CPU]
    spec = load.spec
    n = spec.n_layer
    weights = {key: 0 for key in uses}
    kv = {key: 0 for key in uses}
    layers: dict[str, list[int]] = {key: [] for key in uses}
    weights[CPU] += spec.input_bytes
    for il in range(n + 1):
        key = CPU if assign[il] is None else gpus[assign[il]].key
        layers[key].append(il)
        if il < n:
            weights[key] += load.layer_weights[il]
            kv[key] += load.layer_kv[il]
            if load.layer_cpu_weights:
                weights[CPU] += load.layer_cpu_weights[il]
        elif key != CPU or not _tied(spec):
            weights[key] += spec.output_bytes  # a tied output on the CPU is the mapped token_embd
    if all(a is None for a in assign):
        weights[CPU] += load.cpu_extra_weights
    elif load.cpu_extra_weights and spec.layer_repack_bytes:
        # A partial offload: the layers left on the CPU get their repacked copies (CPU_REPACK) there too.
        weights[CPU] += sum(spec.layer_repack_bytes[il] for il in range(n) if assign[il] is None)
    out_key = CPU if assign[n] is None else gpus[assign[n]].key
    for key, use in uses.items():
        touched = bool(layers[key])
        compute = (load.compute_base + (load.compute_output if key == out_key else 0)) if touched else 0
        if touched and key != CPU:
            compute += load.compute_gpu_extra
        if key == CPU and not touched:
            compute = load.ctx.n_ubatch * spec.n_embd * 4 * 2  # the batch's inputs are built on the host
        if draft:
            use.draft_weights += weights[key]
            use.draft_kv += kv[key]
            use.draft_compute += compute
            use.draft_layers.extend(layers[key])
        else:
            use.weights += weights[key]
            use.kv += kv[key]
            use.compute += compute
            use.layers.extend(layers[key])
    cpu.output += load.output_buffer


def apply_mtp(uses: dict[str, DeviceUse], gpus: list[DeviceSlot], load: ModelLoad,
              assign: list[int | None]) -> None:
    """Add the MTP context (`load`: plan.mtp.context_spec and its context) for the target's layer assignment, as
    draft memory: the NextN layers' KV on their devices, its compute where its graph runs (those layers' devices
    and the output layer's, which computes its logits; the host builds the inputs), its logits buffer on the host."""
    spec = load.spec
    n = spec.n_layer

    def key(il: int) -> str:
        return CPU if assign[il] is None else gpus[assign[il]].key

    nextn = range(n - spec.n_nextn, n)
    for il in nextn:
        uses[key(il)].draft_kv += load.layer_kv[il]
    out_key = key(n)
    graph = {key(il) for il in nextn} | {out_key}
    for k in graph:
        uses[k].draft_compute += (load.compute_base + (load.compute_output if k == out_key else 0)
                                  + (load.compute_gpu_extra if k != CPU else 0))
    if CPU not in graph:
        uses[CPU].draft_compute += load.ctx.n_ubatch * spec.n_embd * 4 * 2
    uses[CPU].output += load.output_buffer


def fresh_uses(gpus: list[DeviceSlot], host: DeviceSlot) -> dict[str, DeviceUse]:
    uses = {g.key: DeviceUse(g, overhead=GPU_OVERHEAD_MIB * MIB) for g in gpus}
    uses[CPU] = DeviceUse(host)
    return uses


def counts_to_assign(n_layer: int, counts: list[int], ngl: int) -> list[int | None]:
    """Layer counts per GPU (covering the last `ngl` of layers 0..n_layer) -> assignment."""
    return layer_devices(n_layer, ngl, [float(c) for c in counts])


def capacities(gpus: list[DeviceSlot], reserved: dict[str, int], margin_mib: int) -> list[int]:
    return [g.free_mib * MIB - margin_mib * MIB - GPU_OVERHEAD_MIB * MIB - reserved.get(g.key, 0)
            for g in gpus]


def _gpu_costs(load: ModelLoad, ngl: int) -> tuple[list[int], int]:
    """Cost of each of the last `ngl` layers (the output layer last, with its logits) and the compute every
    GPU holding layers pays."""
    n = load.n_layer
    first = max(n + 1 - ngl, 0)
    costs = [load.layer_cost[il] for il in range(first, n)] + [
        load.spec.output_bytes + load.compute_output + load.output_extra]
    return costs, load.compute_base + load.compute_gpu_extra


def _fill(costs: list[int], base: int, caps: list[int], r: float) -> list[int] | None:
    """Fill each GPU in order up to r * its capacity with whole layers; the last takes the rest (the output
    layer is always on the last). None when the rest does not fit the last."""
    counts = []
    i = 0
    for d, cap in enumerate(caps):
        if d == len(caps) - 1:
            rest = costs[i:]
            if sum(rest) + base > r * cap:
                return None
            counts.append(len(rest))
            return counts
        used = base
        c = 0
        limit = r * cap
        while i < len(costs) - 1 and used + costs[i] <= limit:
            used += costs[i]
            i += 1
            c += 1
        counts.append(c)
    return None


def layers_fit(load: ModelLoad, caps: list[int], ngl: int) -> bool:
    """Whether the last `ngl` layers fit these GPUs' capacities, in this order, in whole layers."""
    if ngl <= 0:
        return True
    if not caps:
        return False
    costs, base = _gpu_costs(load, ngl)
    return _fill(costs, base, caps, 1.0) is not None


def most_layers(load: ModelLoad, caps: list[int]) -> int:
    """The largest n_gpu_layers (0..n_layer + 1) that fits these GPUs in this order (fitting is monotone:
    one layer less never needs more memory on any GPU)."""
    lo, hi = 0, load.n_layer + 1
    if layers_fit(load, caps, hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if layers_fit(load, caps, mid):
            lo = mid
        else:
            hi = mid
    return lo


def auto_counts(load: ModelLoad, gpus: list[DeviceSlot], caps: list[int], ngl: int) -> list[int] | None:
    """Whole-layer counts per GPU for the last `ngl` layers (output included), balancing headroom:
    the smallest fill ratio r such that filling each GPU in order up to r * capacity leaves a rest
    that also fits in r * capacity of the last one. None if even r = 1 does not fit."""
    if not gpus:
        return None
    costs, base = _gpu_costs(load, ngl)
    if _fill(costs, base, caps, 1.0) is None:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(24):
        mid = (lo + hi) / 2
        if _fill(costs, base, caps, mid) is None:
            lo = mid
        else:
            hi = mid
    return _fill(costs, base, caps, hi)
