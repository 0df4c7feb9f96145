"""Synthetic GGUF models written with the `gguf` package: real, loadable by llama-server (zero
weights, small tensors), for checking the planner against the engine on any architecture.

  llama        llama-style GQA (per-layer head_count_kv may be an array)
  gemma3       gemma3-style sliding-window attention (pattern 6) with tied output
  deepseek2    DeepSeek-style MLA (K-only cache of width kv_lora_rank + rope dim)
  granitehybrid  hybrid: Mamba-2 recurrent layers + attention layers (head_count_kv 0 = recurrent)

Also `write_header_only` for planner tests and benchmarks of huge models: the tensor table of an
N-GB model with the data section left sparse (no weights written, the file is a hole).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

F16 = np.float16
F32 = np.float32


FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]  # found by name, as llama.cpp does for Qwen


def _vocab(w: GGUFWriter, n_vocab: int, fim: bool = False) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + (FIM_TOKENS if fim else [])
    types = [2, 3, 3] + [6] * 256 + ([3] * len(FIM_TOKENS) if fim else [])
    types += [1] * max(0, n_vocab - len(types))
    tokens += [f"t{i}" for i in range(n_vocab - len(tokens))]
    tokens = tokens[:n_vocab]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types[:n_vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


def _ascii_vocab(w: GGUFWriter, n_vocab: int) -> None:
    """An SPM vocabulary of text only: the space marker, printable ASCII, newline and tab, then letter pairs. Every
    token decodes to whole UTF-8 (no byte tokens: an engine answering with a lone byte token can fail to encode
    it; the pinned ik_llama.cpp answers 500). ASCII prompts only: a character outside it has no token."""
    import itertools
    import string

    tokens = ["<unk>", "<s>", "</s>", "\u2581", "\n", "\t"] + [chr(c) for c in range(0x21, 0x7F)]
    pairs = ("".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2))
    tokens += list(itertools.islice(pairs, max(0, n_vocab - len(tokens))))
    if len(tokens) < n_vocab:
        raise ValueError(f"an ASCII vocabulary holds at most {len(tokens)} tokens, not {n_vocab}")
    tokens = tokens[:n_vocab]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [-1.0] * (n_vocab - 4))
    w.add_token_types([2, 3, 3] + [1] * (n_vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


class _Model:
    def __init__(self, path: Path, arch: str, name: str, wtype: Any = F16, split_max_tensors: int = 0) -> None:
        """`split_max_tensors`: a split GGUF of parts of at most that many tensors, named as llama.cpp's
        gguf-split names them (NAME-00001-of-0000N.gguf, ...; `path` itself is then not written)."""
        self.w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
        self.arch = arch
        self.w.add_name(name)
        self.wtype = wtype
        self.tensors: list[tuple[str, tuple[int, ...], Any]] = []

    def kv(self, key: str, value: Any) -> None:
        full = f"{self.arch}.{key}"
        if isinstance(value, bool):
            self.w.add_bool(full, value)
        elif isinstance(value, int):
            self.w.add_uint32(full, value)
        elif isinstance(value, float):
            self.w.add_float32(full, value)
        elif isinstance(value, list):
            self.w.add_array(full, value)
        else:
            self.w.add_string(full, value)

    def t(self, name: str, *ne: int, dtype: Any = None) -> None:
        """A tensor with ggml dims ne0, ne1, ... (numpy shape is reversed)."""
        dtype = dtype or (self.wtype if len(ne) > 1 else F32)
        self.tensors.append((name, tuple(ne), dtype))

    def swiglu_ffn(self, i: int, n_embd: int, n_ff: int) -> None:
        """Layer i's gate / up / down feed-forward tensors (llama, gemma3, deepseek2 dense, hybrid)."""
        self.t(f"blk.{i}.ffn_gate.weight", n_embd, n_ff)
        self.t(f"blk.{i}.ffn_up.weight", n_embd, n_ff)
        self.t(f"blk.{i}.ffn_down.weight", n_ff, n_embd)

    def write(self, n_vocab: int, fim: bool = False, seed: int | None = None, ascii_vocab: bool = False) -> None:
        """Zero weights, or with `seed` random ones (norm weights near 1, the rest small): a model whose
        outputs differ from token to token, for engines that must run more than a forward pass of zeros.
        `ascii_vocab`: text tokens only (_ascii_vocab), not the byte tokens."""
        if ascii_vocab:
            _ascii_vocab(self.w, n_vocab)
        else:
            _vocab(self.w, n_vocab, fim)
        rng = None if seed is None else np.random.default_rng(seed)
        for name, ne, dtype in self.tensors:
            shape = tuple(reversed(ne))
            if rng is None:
                data = np.zeros(shape, dtype=dtype)
            elif "norm" in name:
                data = (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
            else:
                data = (0.2 * rng.standard_normal(shape)).astype(dtype)
            self.w.add_tensor(name, data)
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def write_llama(path: Path, *, n_layer: int = 4, n_embd: int = 256, n_head: int = 8,
                n_head_kv: int | list[int] = 2, n_ff: int = 512, n_vocab: int = 4096, ctx_train: int = 524288,
                tied: bool = False, wtype: Any = F16, fim: bool = False, split_max_tensors: int = 0) -> Path:
    """`fim`: FIM prefix / suffix / middle tokens in the vocabulary, so llama-server serves /infill.
    `split_max_tensors`: written as a split GGUF (_Model); the first part's path is returned."""
    m = _Model(path, "llama", "synthetic llama GQA", wtype, split_max_tensors)
    head = n_embd // n_head
    m.kv("context_length", ctx_train)
    m.kv("embedding_length", n_embd)
    m.kv("block_count", n_layer)
    m.kv("feed_forward_length", n_ff)
    m.kv("attention.head_count", n_head)
    m.kv("attention.head_count_kv", n_head_kv)
    m.kv("attention.layer_norm_rms_epsilon", 1e-5)
    m.kv("rope.dimension_count", head)
    m.kv("rope.freq_base", 10000.0)
    kv_heads = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * n_layer
    m.t("token_embd.weight", n_embd, n_vocab)
    m.t("output_norm.weight", n_embd)
    if not tied:
        m.t("output.weight", n_embd, n_vocab)
    for i in range(n_layer):
        m.t(f"blk.{i}.attn_norm.weight", n_embd)
        m.t(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        m.t(f"blk.{i}.attn_k.weight", n_embd, head * kv_heads[i])
        m.t(f"blk.{i}.attn_v.weight", n_embd, head * kv_heads[i])
        m.t(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        m.t(f"blk.{i}.ffn_norm.weight", n_embd)
        m.swiglu_ffn(i, n_embd, n_ff)
    m.write(n_vocab, fim)
    if split_max_tensors:
        return next(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))
    return path


def write_gemma3(path: Path, *, n_layer: int = 12, n_embd: int = 256, n_head: int = 4, n_head_kv: int = 1,
                 head_dim: int = 128, n_ff: int = 512, n_vocab: int = 8192, n_swa: int = 512,
                 ctx_train: int = 131072, wtype: Any = F16) -> Path:
    m = _Model(path, "gemma3", "synthetic gemma3 SWA", wtype)
    m.kv("context_length", ctx_train)
    m.kv("embedding_length", n_embd)
    m.kv("block_count", n_layer)
    m.kv("feed_forward_length", n_ff)
    m.kv("attention.head_count", n_head)
    m.kv("attention.head_count_kv", n_head_kv)
    m.kv("attention.key_length", head_dim)
    m.kv("attention.value_length", head_dim)
    m.kv("attention.sliding_window", n_swa)
    m.kv("attention.layer_norm_rms_epsilon", 1e-6)
    m.kv("rope.freq_base", 1000000.0)
    m.t("token_embd.weight", n_embd, n_vocab)  # tied output, as in Gemma 3
    m.t("output_norm.weight", n_embd)
    for i in range(n_layer):
        m.t(f"blk.{i}.attn_norm.weight", n_embd)
        m.t(f"blk.{i}.attn_q.weight", n_embd, head_dim * n_head)
        m.t(f"blk.{i}.attn_k.weight", n_embd, head_dim * n_head_kv)
        m.t(f"blk.{i}.attn_v.weight", n_embd, head_dim * n_head_kv)
        m.t(f"blk.{i}.attn_output.weight", head_dim * n_head, n_embd)
        m.t(f"blk.{i}.post_attention_norm.weight", n_embd)
        m.t(f"blk.{i}.attn_k_norm.weight", head_dim)
        m.t(f"blk.{i}.attn_q_norm.weight", head_dim)
        m.t(f"blk.{i}.ffn_norm.weight", n_embd)
        m.swiglu_ffn(i, n_embd, n_ff)
        m.t(f"blk.{i}.post_ffw_norm.weight", n_embd)
    m.write(n_vocab)
    return path


def write_deepseek2(path: Path, *, n_layer: int = 4, n_embd: int = 256, n_head: int = 8, kv_lora_rank: int = 128,
                    q_lora_rank: int = 96, rope_dim: int = 32, qk_nope: int = 64, v_head: int = 64,
                    n_ff: int = 512, n_vocab: int = 4096, ctx_train: int = 163840, wtype: Any = F16) -> Path:
    """MLA in the current layout (attn_k_b / attn_v_b): K-only cache of width kv_lora_rank + rope_dim.
    All layers dense (leading_dense_block_count = n_layer) to keep the file small."""
    m = _Model(path, "deepseek2", "synthetic deepseek2 MLA", wtype)
    m.kv("context_length", ctx_train)
    m.kv("embedding_length", n_embd)
    m.kv("block_count", n_layer)
    m.kv("feed_forward_length", n_ff)
    m.kv("attention.head_count", n_head)
    m.kv("attention.head_count_kv", 1)
    m.kv("attention.key_length", kv_lora_rank + rope_dim)
    m.kv("attention.value_length", kv_lora_rank)
    m.kv("attention.key_length_mla", qk_nope + rope_dim)
    m.kv("attention.value_length_mla", v_head)
    m.kv("attention.kv_lora_rank", kv_lora_rank)
    m.kv("attention.q_lora_rank", q_lora_rank)
    m.kv("attention.layer_norm_rms_epsilon", 1e-6)
    m.kv("rope.dimension_count", rope_dim)
    m.kv("rope.freq_base", 10000.0)
    m.kv("leading_dense_block_count", n_layer)
    m.kv("expert_feed_forward_length", n_ff)
    m.kv("expert_shared_count", 1)
    m.kv("expert_count", 0)
    m.kv("expert_used_count", 0)
    m.t("token_embd.weight", n_embd, n_vocab)
    m.t("output_norm.weight", n_embd)
    m.t("output.weight", n_embd, n_vocab)
    for i in range(n_layer):
        m.t(f"blk.{i}.attn_norm.weight", n_embd)
        m.t(f"blk.{i}.attn_q_a_norm.weight", q_lora_rank)
        m.t(f"blk.{i}.attn_kv_a_norm.weight", kv_lora_rank)
        m.t(f"blk.{i}.attn_q_a.weight", n_embd, q_lora_rank)
        m.t(f"blk.{i}.attn_q_b.weight", q_lora_rank, n_head * (qk_nope + rope_dim))
        m.t(f"blk.{i}.attn_kv_a_mqa.weight", n_embd, kv_lora_rank + rope_dim)
        m.t(f"blk.{i}.attn_k_b.weight", qk_nope, kv_lora_rank, n_head)
        m.t(f"blk.{i}.attn_v_b.weight", kv_lora_rank, v_head, n_head)
        m.t(f"blk.{i}.attn_output.weight", n_head * v_head, n_embd)
        m.t(f"blk.{i}.ffn_norm.weight", n_embd)
        m.swiglu_ffn(i, n_embd, n_ff)
    m.write(n_vocab)
    return path


def write_granitehybrid(path: Path, *, n_layer: int = 6, attn_every: int = 3, n_embd: int = 256, n_head: int = 8,
                        n_head_kv: int = 2, n_ff: int = 512, n_vocab: int = 4096, d_state: int = 64,
                        d_conv: int = 4, n_group: int = 1, ssm_heads: int = 8, ctx_train: int = 131072,
                        wtype: Any = F16) -> Path:
    """Hybrid recurrent: Mamba-2 layers, with an attention layer every `attn_every` layers."""
    m = _Model(path, "granitehybrid", "synthetic hybrid mamba2 + attention", wtype)
    d_inner = 2 * n_embd
    head = n_embd // n_head
    kv_heads = [n_head_kv if (i % attn_every == attn_every - 1) else 0 for i in range(n_layer)]
    m.kv("context_length", ctx_train)
    m.kv("embedding_length", n_embd)
    m.kv("block_count", n_layer)
    m.kv("feed_forward_length", n_ff)
    m.kv("attention.head_count", n_head)
    m.kv("attention.head_count_kv", kv_heads)
    m.kv("attention.layer_norm_rms_epsilon", 1e-5)
    m.kv("rope.dimension_count", head)
    m.kv("rope.freq_base", 10000.0)
    m.kv("ssm.conv_kernel", d_conv)
    m.kv("ssm.inner_size", d_inner)
    m.kv("ssm.state_size", d_state)
    m.kv("ssm.time_step_rank", ssm_heads)
    m.kv("ssm.group_count", n_group)
    m.t("token_embd.weight", n_embd, n_vocab)
    m.t("output_norm.weight", n_embd)
    m.t("output.weight", n_embd, n_vocab)
    d_in_proj = 2 * d_inner + 2 * n_group * d_state + ssm_heads
    for i in range(n_layer):
        m.t(f"blk.{i}.attn_norm.weight", n_embd)
        if kv_heads[i] == 0:
            m.t(f"blk.{i}.ssm_in.weight", n_embd, d_in_proj)
            m.t(f"blk.{i}.ssm_conv1d.weight", d_conv, d_inner + 2 * n_group * d_state, dtype=F32)
            m.t(f"blk.{i}.ssm_conv1d.bias", d_inner + 2 * n_group * d_state)
            m.t(f"blk.{i}.ssm_dt.bias", ssm_heads)
            m.t(f"blk.{i}.ssm_a", 1, ssm_heads, dtype=F32)
            m.t(f"blk.{i}.ssm_d", 1, ssm_heads, dtype=F32)
            m.t(f"blk.{i}.ssm_norm.weight", d_inner // n_group, n_group, dtype=F32)
            m.t(f"blk.{i}.ssm_out.weight", d_inner, n_embd)
        else:
            m.t(f"blk.{i}.attn_q.weight", n_embd, n_embd)
            m.t(f"blk.{i}.attn_k.weight", n_embd, head * kv_heads[i])
            m.t(f"blk.{i}.attn_v.weight", n_embd, head * kv_heads[i])
            m.t(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        m.t(f"blk.{i}.ffn_norm.weight", n_embd)
        m.swiglu_ffn(i, n_embd, n_ff)
    m.write(n_vocab)
    return path


def write_header_only(path: Path, *, arch: str = "llama", n_layer: int = 80, n_embd: int = 8192, n_head: int = 64,
                      n_head_kv: int = 8, n_ff: int = 28672, n_vocab: int = 128256, ctx_train: int = 131072,
                      qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
                      n_expert: int = 0, n_expert_used: int = 0, head_dim: int | None = None,
                      extra_kv: dict[str, int] | None = None, tied: bool = False, loadable: bool = False) -> Path:
    """A GGUF whose tensor table describes a big model; the data section is a sparse hole.
    Good for the planner (which never reads weights). With `loadable` (llama architecture) it also carries
    a tokenizer and the keys llama-server requires, so the engine loads it with all-zero weights: a real
    load of a big model (on a GPU, say) without writing its gigabytes."""
    from gguf import GGML_QUANT_SIZES

    w = GGUFWriter(str(path), arch)
    w.add_name(f"header-only {arch} {n_layer}L")
    p = f"{arch}."
    for key, value in (("context_length", ctx_train), ("embedding_length", n_embd), ("block_count", n_layer),
                       ("feed_forward_length", n_ff), ("attention.head_count", n_head),
                       ("attention.head_count_kv", n_head_kv)):
        w.add_uint32(p + key, value)
    if n_expert:
        w.add_uint32(p + "expert_count", n_expert)
        w.add_uint32(p + "expert_used_count", n_expert_used)
    for key, value in (extra_kv or {}).items():
        w.add_uint32(p + key, value)
    head = head_dim or n_embd // n_head
    if loadable:
        _vocab(w, n_vocab)
        w.add_float32(p + "attention.layer_norm_rms_epsilon", 1e-5)
        w.add_uint32(p + "rope.dimension_count", head)
        w.add_float32(p + "rope.freq_base", 500000.0)
    else:
        w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(n_vocab)])
    if head_dim:
        w.add_uint32(p + "attention.key_length", head_dim)
        w.add_uint32(p + "attention.value_length", head_dim)
    block, size = GGML_QUANT_SIZES[qtype]
    shapes: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [
        ("token_embd.weight", (n_embd, n_vocab), qtype), ("output_norm.weight", (n_embd,), GGMLQuantizationType.F32),
        *([] if tied else [("output.weight", (n_embd, n_vocab), qtype)])]
    for i in range(n_layer):
        shapes += [(f"blk.{i}.attn_norm.weight", (n_embd,), GGMLQuantizationType.F32),
                   (f"blk.{i}.attn_q.weight", (n_embd, head * n_head), qtype),
                   (f"blk.{i}.attn_k.weight", (n_embd, head * n_head_kv), qtype),
                   (f"blk.{i}.attn_v.weight", (n_embd, head * n_head_kv), qtype),
                   (f"blk.{i}.attn_output.weight", (head * n_head, n_embd), qtype),
                   (f"blk.{i}.ffn_norm.weight", (n_embd,), GGMLQuantizationType.F32)]
        if n_expert:
            shapes += [(f"blk.{i}.ffn_gate_inp.weight", (n_embd, n_expert), GGMLQuantizationType.F32),
                       (f"blk.{i}.ffn_gate_exps.weight", (n_embd, n_ff, n_expert), qtype),
                       (f"blk.{i}.ffn_up_exps.weight", (n_embd, n_ff, n_expert), qtype),
                       (f"blk.{i}.ffn_down_exps.weight", (n_ff, n_embd, n_expert), qtype)]
        else:
            shapes += [(f"blk.{i}.ffn_gate.weight", (n_embd, n_ff), qtype),
                       (f"blk.{i}.ffn_up.weight", (n_embd, n_ff), qtype),
                       (f"blk.{i}.ffn_down.weight", (n_ff, n_embd), qtype)]
    total = 0
    for name, ne, t in shapes:
        n = 1
        for d in ne:
            n *= d
        b = n // block * size if t != GGMLQuantizationType.F32 else n * 4
        if t == GGMLQuantizationType.F32:
            w.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), b, raw_dtype=t)
        else:  # quantised: the writer takes the byte shape (row length in bytes)
            byte_shape = tuple(reversed(ne[1:])) + (ne[0] // block * size,)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), b, raw_dtype=t)
        total += -(-b // 32) * 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        f.seek(0, 2)
        end = f.tell()
        f.truncate(-(-end // 32) * 32 + total)  # sparse: no bytes written for the weights
    return path


WRITERS = {"llama": write_llama, "gemma3": write_gemma3, "deepseek2": write_deepseek2,
           "granitehybrid": write_granitehybrid}
