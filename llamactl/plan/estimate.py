"""Memory estimate: weights, KV / recurrent state, output and compute buffers (pure functions).

Formulas: llama.cpp src/llama-kv-cache.cpp, llama-kv-cache-iswa.cpp, llama-memory-recurrent.cpp,
llama-context.cpp (see docs/memory-accuracy.md for how they compare with the engine's own numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

from llamactl.plan.model import ModelSpec
from llamactl.units import MIB

# Bytes per element of a KV row, by cache type (ggml block size / type size).
KV_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32,
    "q6_0": 26 / 32, "q8_KV": 1.0,  # ik_llama.cpp only (q8_KV: 1 byte + a per-row scale, rounded up below)
}
KV_BLOCK = {"q8_0": 32, "q5_1": 32, "q5_0": 32, "q4_1": 32, "q4_0": 32, "iq4_nl": 32, "q6_0": 32}
KV_TYPE_SIZE = {"q8_0": 34, "q5_1": 24, "q5_0": 22, "q4_1": 20, "q4_0": 18, "iq4_nl": 18, "q6_0": 26}


def pad(n: int, to: int) -> int:
    return -(-n // to) * to


def row_bytes(type_name: str, n: int) -> int:
    """Bytes of one row of n elements of a cache type (ggml_row_size)."""
    if type_name in KV_BLOCK:
        return -(-n // KV_BLOCK[type_name]) * KV_TYPE_SIZE[type_name]
    if type_name == "q8_KV":
        return n + 8
    return int(n * KV_TYPE_BYTES[type_name])


@dataclass(frozen=True)
class ContextParams:
    """The context the engine will build. Use `context_for(...)` to derive it from a profile."""

    n_ctx: int  # requested total context (already resolved: never 0)
    n_seq: int = 4  # slots (n_seq_max)
    unified: bool = True  # one KV stream shared by all slots
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    n_ubatch: int = 512
    n_batch: int = 2048
    swa_full: bool = False
    n_outputs: int = 4  # rows of logits in the reserved graph (mainline: n_seq * (1 + drafted tokens))

    @property
    def n_ctx_padded(self) -> int:
        return pad(self.n_ctx, 256)

    @property
    def n_stream(self) -> int:
        return 1 if self.unified else self.n_seq

    @property
    def cells(self) -> int:
        """KV cells per stream for full-attention layers."""
        n_ctx = self.n_ctx_padded
        if self.unified:
            return n_ctx
        return pad(n_ctx // self.n_seq, 256)

    def swa_cells(self, n_swa: int) -> int:
        if self.swa_full:
            return self.cells
        return min(self.cells, pad(n_swa * (self.n_seq if self.unified else 1) + self.n_ubatch, 256))


@dataclass(frozen=True)
class LayerCost:
    weights: int
    kv: int  # KV cache or recurrent state bytes (what the engine calls context)

    @property
    def total(self) -> int:
        return self.weights + self.kv


def kv_bytes_per_layer(spec: ModelSpec, ctx: ContextParams) -> tuple[int, ...]:
    """KV cache (or recurrent state) bytes of each layer."""
    out = []
    for il in range(spec.n_layer):
        b = 0
        h = spec.n_head_kv[il]
        if h:
            cells = ctx.swa_cells(spec.n_swa) if spec.swa[il] else ctx.cells
            rows = cells * ctx.n_stream
            b += rows * row_bytes(ctx.type_k, h * spec.k_len[il])
            if spec.v_len[il]:
                b += rows * row_bytes(ctx.type_v, h * spec.v_len[il])
        if spec.recurrent[il]:
            b += (spec.n_embd_r + spec.n_embd_s) * 4 * max(1, ctx.n_seq)
        out.append(b)
    return tuple(out)


def layer_costs(spec: ModelSpec, ctx: ContextParams) -> tuple[LayerCost, ...]:
    kv = kv_bytes_per_layer(spec, ctx)
    return tuple(LayerCost(w, k) for w, k in zip(spec.layer_bytes, kv))


def output_buffer_bytes(spec: ModelSpec, ctx: ContextParams) -> int:
    """Host-side logits buffer reserved at start: n_vocab * n_seq floats (llama_context::output_reserve)."""
    return spec.n_vocab * max(1, ctx.n_seq) * 4


@dataclass(frozen=True)
class ComputeEstimate:
    """Compute buffer of one device: `base` for any device holding layers, `output` extra on the
    device holding the output layer (the logits)."""

    base: int
    output: int
    gpu_extra: int = 0  # on GPU devices only


def compute_bytes(spec: ModelSpec, ctx: ContextParams) -> ComputeEstimate:
    """Worst-case graph (one ubatch of prompt) reserved by the scheduler, per device.

    An upper-bound model of ggml-alloc's peak: the inputs and masks live for the whole graph;
    inside a layer the largest of attention and feed-forward intermediates is live at once.
    """
    u = ctx.n_ubatch
    n_kv = ctx.cells * ctx.n_stream if ctx.unified else ctx.cells
    n_kv_swa = ctx.swa_cells(spec.n_swa) if spec.has_swa else 0
    n_head = max(spec.n_head) if spec.n_head else 0
    k_len = max(spec.k_len) if spec.k_len else 0
    v_len = max(max(spec.v_len), k_len if spec.mla else 0) if spec.v_len else 0
    attn_layers = any(spec.n_head_kv)
    f32 = 4

    # Masks (f16 with flash attention, f32 without), one per cache kind, padded to 64 rows.
    mask_el = 2 if ctx.flash_attn else 4
    masks = 0
    if attn_layers:
        masks = n_kv * pad(u, 64) * mask_el
        if spec.has_swa:
            masks += n_kv_swa * pad(u, 64) * mask_el
    # Residual stream, layer input/output, norms, positions and ids (measured headroom: 5 rows of
    # n_embd floats per token plus 1 MiB).
    stream = 5 * u * spec.n_embd * f32 + MIB
    # Attention intermediates: Q, K, V, attention output (f32); without flash attention the KQ
    # matrix over all cells (softmax is in place).
    attn = 0
    gpu_extra = 0
    if attn_layers:
        attn = u * n_head * (2 * k_len + v_len) * f32 + u * max(spec.n_head_kv) * (k_len + v_len) * f32
        if not ctx.flash_attn:
            attn += n_kv * u * n_head * f32
        elif ctx.type_k != "f16" or ctx.type_v != "f16":
            # CUDA's flash attention converts one layer's quantised K/V to f16 (the CPU kernel does not).
            gpu_extra = n_kv * max(spec.n_head_kv) * (k_len + v_len) * 2
    ffn = 3 * u * spec.n_ff * f32
    ssm = 0
    if any(spec.recurrent):
        d_inner = spec.ssm_d_inner or 2 * spec.n_embd
        ssm = 8 * u * d_inner * f32 + 2 * (spec.n_embd_r + spec.n_embd_s) * f32 * max(1, ctx.n_seq)
    base = masks + stream + max(attn, ffn, ssm)
    n_out = min(ctx.n_outputs, u)
    logits = spec.n_vocab * n_out * f32 + n_out * spec.n_embd * f32
    return ComputeEstimate(base=base, output=logits, gpu_extra=gpu_extra)


@dataclass(frozen=True)
class ModelEstimate:
    """Whole-model totals for one context (no placement)."""

    weights: int
    kv: int
    compute: int
    output_buffer: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output_buffer


def estimate_model(spec: ModelSpec, ctx: ContextParams) -> ModelEstimate:
    """Everything on one device (the CPU-only case, or one GPU holding it all)."""
    comp = compute_bytes(spec, ctx)
    return ModelEstimate(
        weights=spec.total_weight_bytes,
        kv=sum(kv_bytes_per_layer(spec, ctx)),
        compute=comp.base + comp.output,
        output_buffer=output_buffer_bytes(spec, ctx),
    )
