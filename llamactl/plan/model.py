"""ModelSpec: the numbers the planner needs, derived from a GGUF header (pure, no I/O).

Per-layer arrays follow llama.cpp's hparams (src/llama-hparams.cpp, src/llama-model.cpp):
head_count_kv may be a per-layer array (0 = no attention in that layer), sliding-window layers
come from `sliding_window_pattern`, MLA caches only K of width `key_length`, recurrent layers keep
an f32 state independent of the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamactl.errors import ProfileError
from llamactl.gguf import GGUFFile

RECURRENT_ARCHS = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"}
# Hybrid archs whose recurrent layers are the ones with head_count_kv == 0.
HYBRID_BY_KV0 = {"jamba", "granitehybrid", "nemotron_h", "nemotron_h_moe", "bailingmoe3", "plamo2"}
# Hybrid archs where every layer has both (parallel attention + SSM).
HYBRID_ALL = {"falcon-h1"}
# ggml-cpu repacks these weight types into interleaved copies (CPU_REPACK buffer) on AVX2 / NEON.
CPU_REPACK_TYPES = {"Q4_0", "Q4_K", "IQ4_NL"}
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS in both pinned engines: a larger block_count fails their load (GGML_ASSERT)
# Default sliding-window patterns (layer il is SWA iff il % p < p - 1).
DEFAULT_SWA_PATTERN = {"gemma3": 6, "gemma2": 2, "gpt-oss": 2, "cohere2": 4, "gemma3n": 5}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    n_layer: int  # all blocks, including NextN/MTP blocks (llama.cpp n_layer_all)
    n_embd: int
    n_vocab: int
    n_ff: int  # largest feed-forward width (dense or n_expert_used * expert width)
    context_length: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]  # 0 = no KV in that layer
    k_len: tuple[int, ...]  # per layer K row length per head (SWA layers use the _swa value)
    v_len: tuple[int, ...]  # 0 for MLA (V is a view of K)
    swa: tuple[bool, ...]
    n_swa: int
    mla: bool
    recurrent: tuple[bool, ...]
    n_embd_r: int  # recurrent conv state per sequence (f32 elements)
    n_embd_s: int  # recurrent ssm state per sequence (f32 elements)
    ssm_d_inner: int
    layer_bytes: tuple[int, ...]
    layer_expert_bytes: tuple[int, ...]  # part of layer_bytes in *_exps tensors (MoE experts)
    input_bytes: int  # token_embd and other non-layer tensors that stay on the CPU
    output_bytes: int  # output.weight (or the duplicated token_embd) + output_norm, on the last device
    file_size_bytes: int
    tensor_bytes: int  # every tensor once (what a CPU-only run maps)
    cpu_repack_bytes: int = 0  # layer matrices the x86 CPU backend copies into a repacked layout
    layer_repack_bytes: tuple[int, ...] = ()  # the same, per layer (the CPU's layers of a partial offload)
    n_expert: int = 0
    n_expert_used: int = 0
    n_nextn: int = 0  # the last n_nextn blocks are NextN / MTP heads (`nextn_predict_layers`)
    # tensors of a NextN / MTP head in the file (blk.N.nextn.*, mtp.*): a file may declare a head it does not
    # ship (converted trunk-only, or metadata that counts it anyway); None: not read from a file
    nextn_head_tensors: int | None = None

    @property
    def total_weight_bytes(self) -> int:
        """Weights when everything is on one device (tied output counted once)."""
        return self.tensor_bytes

    @property
    def has_swa(self) -> bool:
        return any(self.swa)


def _per_layer(value: Any, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, (list, tuple)):
        vals = [int(v) for v in value]
        if len(vals) < n:
            vals += [vals[-1] if vals else default] * (n - len(vals))
        return tuple(vals[:n])
    return (int(value),) * n


def spec_from_gguf(g: GGUFFile) -> ModelSpec:
    """The model as the plan sees it. A ProfileError naming the file where its header holds what no engine
    loads, or values of the wrong kind (a damaged file)."""
    try:
        spec = _spec_from_gguf(g)
    except (ValueError, TypeError, ArithmeticError, IndexError, KeyError, AttributeError) as e:
        raise ProfileError(f"{g.path}: its header holds values the plan cannot read ({type(e).__name__}: "
                           f"{str(e)[:200]})", hint="the file is damaged, or not a model llama.cpp loads; fetch "
                           "it again") from None
    return spec


def _spec_from_gguf(g: GGUFFile) -> ModelSpec:
    arch = g.architecture
    n_layer = int(g.get("block_count", 0) or 0)
    counted = f"{arch}.block_count = {n_layer}"
    if n_layer <= 0:
        # No block count: count the blk.N tensors.
        layers = {t.layer for t in g.tensors if t.layer is not None}
        n_layer = max(layers) + 1 if layers else 0
        counted = f"its tensors name {n_layer} blocks (blk.N)"
    if n_layer > MAX_LAYERS:
        raise ProfileError(f"{g.path}: {counted}: the engines load at most {MAX_LAYERS} blocks "
                           "(LLAMA_MAX_LAYERS)", hint="the file is damaged, or not a model llama.cpp loads; fetch it "
                           "again")
    n_embd = int(g.get("embedding_length", 0) or 0)
    head_count = g.get("attention.head_count", 0)
    n_head = _per_layer(head_count, n_layer, 0)
    n_head_max = max(n_head) if n_head else 0
    n_head_kv = _per_layer(g.get("attention.head_count_kv"), n_layer, n_head_max)

    default_head = n_embd // n_head_max if n_head_max else 0
    k_full = int(g.get("attention.key_length", default_head) or default_head)
    v_full = int(g.get("attention.value_length", default_head) or default_head)
    k_swa = int(g.get("attention.key_length_swa", k_full) or k_full)
    v_swa = int(g.get("attention.value_length_swa", v_full) or v_full)

    n_swa = int(g.get("attention.sliding_window", 0) or 0)
    pattern = g.get("attention.sliding_window_pattern")
    if n_swa <= 0:
        swa = (False,) * n_layer
    elif isinstance(pattern, (list, tuple)):
        swa = tuple(bool(x) for x in list(pattern)[:n_layer]) + (False,) * max(0, n_layer - len(pattern))
    else:
        p = int(pattern) if pattern is not None else DEFAULT_SWA_PATTERN.get(arch, 0)
        # p == 0 (or unknown arch without a pattern): every layer is SWA, as in llama.cpp's set_swa_pattern.
        swa = tuple(p == 0 or (il % p < p - 1) for il in range(n_layer))

    # MLA: key_length_mla present -> K only, width key_length (kv_lora_rank + rope dim), 1 KV head.
    mla = g.get("attention.key_length_mla") is not None and g.get("attention.kv_lora_rank") is not None

    if arch in RECURRENT_ARCHS:
        recurrent = (True,) * n_layer
        n_head_kv = (0,) * n_layer
    elif arch in HYBRID_BY_KV0:
        recurrent = tuple(h == 0 for h in n_head_kv)
    elif arch in HYBRID_ALL:
        recurrent = (True,) * n_layer
    elif g.get("full_attention_interval") is not None:  # qwen3next / qwen35 style
        interval = int(g.get("full_attention_interval"))
        recurrent = tuple(interval > 0 and il % interval < interval - 1 for il in range(n_layer))
        n_head_kv = tuple(0 if r else h for r, h in zip(recurrent, n_head_kv))
    else:
        recurrent = (False,) * n_layer

    d_conv = int(g.get("ssm.conv_kernel", 0) or 0)
    d_inner = int(g.get("ssm.inner_size", 0) or 0)
    d_state = int(g.get("ssm.state_size", 0) or 0)
    n_group = int(g.get("ssm.group_count", 0) or 0)
    wkv_head = int(g.get("wkv.head_size", 0) or 0)
    shortconv = int(g.get("shortconv.l_cache", 0) or 0)
    if wkv_head:
        token_shift = int(g.get("token_shift_count", 2) or 2)
        n_embd_r, n_embd_s = token_shift * n_embd, n_embd * wkv_head
    elif shortconv:
        n_embd_r, n_embd_s = n_embd * (shortconv - 1), 0
    else:
        n_embd_r = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
        n_embd_s = d_state * d_inner

    layer_bytes = [0] * n_layer
    expert_bytes = [0] * n_layer
    input_bytes = 0
    output_bytes = 0
    has_output = g.tensor("output.weight") is not None
    repack = 0
    layer_repack = [0] * n_layer
    for t in g.tensors:
        il = t.layer
        if il is not None and il < n_layer:
            layer_bytes[il] += t.n_bytes
            if t.type_name in CPU_REPACK_TYPES and len(t.shape) == 2 and t.shape[1] % 8 == 0:
                repack += t.n_bytes
                layer_repack[il] += t.n_bytes
            if "_exps" in t.name:
                expert_bytes[il] += t.n_bytes
        elif t.name.startswith("output"):  # output.weight, output_norm.weight, output.bias
            output_bytes += t.n_bytes
        else:
            input_bytes += t.n_bytes
    if not has_output:
        embd = g.tensor("token_embd.weight")
        if embd is not None:  # tied embeddings: llama.cpp duplicates token_embd as the output layer
            output_bytes += embd.n_bytes

    n_expert = int(g.get("expert_count", 0) or 0)
    n_expert_used = int(g.get("expert_used_count", 0) or 0)
    ff = g.get("feed_forward_length", 0)
    n_ff = max(_per_layer(ff, max(n_layer, 1), 0)) if ff else 0
    if n_expert_used:
        exp_ff = int(g.get("expert_feed_forward_length", n_ff) or n_ff)
        n_ff = max(n_ff, exp_ff * n_expert_used)

    kv_heads = []
    k_lens = []
    v_lens = []
    for il in range(n_layer):
        if mla:
            kv_heads.append(1 if n_head_kv[il] else 0)
            k_lens.append(k_full)
            v_lens.append(0)
        else:
            kv_heads.append(n_head_kv[il])
            k_lens.append(k_swa if swa[il] else k_full)
            v_lens.append(v_swa if swa[il] else v_full)

    return ModelSpec(
        name=g.name,
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=g.n_vocab,
        n_ff=n_ff,
        context_length=int(g.get("context_length", 0) or 0),
        n_head=n_head,
        n_head_kv=tuple(kv_heads),
        k_len=tuple(k_lens),
        v_len=tuple(v_lens),
        swa=swa,
        n_swa=n_swa,
        mla=mla,
        recurrent=recurrent,
        n_embd_r=n_embd_r,
        n_embd_s=n_embd_s,
        ssm_d_inner=d_inner,
        layer_bytes=tuple(layer_bytes),
        layer_expert_bytes=tuple(expert_bytes),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        file_size_bytes=g.file_size_bytes,
        tensor_bytes=g.tensor_bytes,
        cpu_repack_bytes=repack,
        layer_repack_bytes=tuple(layer_repack),
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_nextn=min(int(g.get("nextn_predict_layers", 0) or 0), n_layer),
        nextn_head_tensors=sum(1 for t in g.tensors if ".nextn." in t.name or t.name.startswith("mtp.")),
    )
