"""A tiny GLM-4.5-style model with one NextN/MTP block, written with the tests' GGUF writer: random weights (so
the MTP head drafts real, if meaningless, tokens), an ASCII vocabulary without byte tokens (every answer is valid
UTF-8: the pinned ik_llama.cpp answers 500 to a completion ending in a lone byte token), about 350 KB.

Architecture `glm4moe`, the one both pinned engines run MTP for (ik_llama.cpp 0.1.5 runs MTP for glm4moe
only; mainline llama.cpp 0.3.36 for glm4moe, the Qwen 3.5 family, DeepSeek and others): `block_count` counts
the NextN block, `nextn_predict_layers = 1` says the last block is it. That block carries a whole decoder layer
(attention with biases, post-attention norm, MoE with a shared expert) plus the NextN tensors: eh_proj
(2 * n_embd -> n_embd), enorm, hnorm and shared_head_norm; embed_tokens and shared_head_head are left out (both
engines then use token_embd and output). Read from llama.cpp src/models/glm4-moe.cpp and ik_llama.cpp
src/llama-load-tensors.cpp (create_glm4_moe_tensors), src/llama-hparams.cpp.
"""

from __future__ import annotations

from pathlib import Path

from tests.synth_gguf import _Model

N_TRUNK = 2  # ordinary blocks; the NextN block is block N_TRUNK
# A larger shape (about 4 MB) for comparing the plan with the engine's buffers: whole MiB of weights and KV.
MTP_BENCH_SHAPE = {"n_embd": 256, "n_head": 4, "head_dim": 64, "n_ff": 512, "n_ff_exp": 128}


def write_glm4moe_mtp(path: Path, *, n_trunk: int = N_TRUNK, n_nextn: int = 1, n_embd: int = 64, n_head: int = 2,
                      n_head_kv: int = 1, head_dim: int = 32, n_ff: int = 128, n_ff_exp: int = 32,
                      n_expert: int = 4, n_expert_used: int = 2, n_vocab: int = 320, ctx_train: int = 4096,
                      seed: int = 25, heads: bool = True) -> Path:
    """`n_nextn = 0` writes the same trunk without the NextN block (a model without MTP heads); `heads=False`
    declares the NextN block and writes it as a plain decoder block, without its nextn.* tensors (a file
    converted trunk-only whose metadata still counts the head)."""
    m = _Model(path, "glm4moe", "synthetic glm4moe" + (" with a NextN block" if n_nextn else ""))
    n_layer = n_trunk + n_nextn
    m.kv("context_length", ctx_train)
    m.kv("embedding_length", n_embd)
    m.kv("block_count", n_layer)
    m.kv("feed_forward_length", n_ff)
    m.kv("expert_feed_forward_length", n_ff_exp)
    m.kv("attention.head_count", n_head)
    m.kv("attention.head_count_kv", n_head_kv)
    m.kv("attention.key_length", head_dim)
    m.kv("attention.value_length", head_dim)
    m.kv("attention.layer_norm_rms_epsilon", 1e-5)
    m.kv("rope.dimension_count", head_dim // 2)  # GLM-4.5 rotates half of each head
    m.kv("rope.freq_base", 1000000.0)
    m.kv("expert_count", n_expert)
    m.kv("expert_used_count", n_expert_used)
    m.kv("expert_shared_count", 1)
    m.kv("leading_dense_block_count", 1)
    m.kv("expert_weights_scale", 1.0)  # ik requires it
    m.kv("expert_weights_norm", True)
    m.kv("expert_gating_func", 2)  # sigmoid
    if n_nextn:
        m.kv("nextn_predict_layers", n_nextn)
    m.t("token_embd.weight", n_embd, n_vocab)
    m.t("output_norm.weight", n_embd)
    m.t("output.weight", n_embd, n_vocab)
    q, kv = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        m.t(f"blk.{i}.attn_norm.weight", n_embd)
        m.t(f"blk.{i}.attn_q.weight", n_embd, q)
        m.t(f"blk.{i}.attn_k.weight", n_embd, kv)
        m.t(f"blk.{i}.attn_v.weight", n_embd, kv)
        m.t(f"blk.{i}.attn_q.bias", q)
        m.t(f"blk.{i}.attn_k.bias", kv)
        m.t(f"blk.{i}.attn_v.bias", kv)
        m.t(f"blk.{i}.attn_output.weight", q, n_embd)
        m.t(f"blk.{i}.post_attention_norm.weight", n_embd)
        if i == 0:  # the leading dense block
            m.swiglu_ffn(i, n_embd, n_ff)
        else:
            m.t(f"blk.{i}.ffn_gate_inp.weight", n_embd, n_expert)
            m.t(f"blk.{i}.exp_probs_b.bias", n_expert)
            m.t(f"blk.{i}.ffn_gate_exps.weight", n_embd, n_ff_exp, n_expert)
            m.t(f"blk.{i}.ffn_up_exps.weight", n_embd, n_ff_exp, n_expert)
            m.t(f"blk.{i}.ffn_down_exps.weight", n_ff_exp, n_embd, n_expert)
            m.t(f"blk.{i}.ffn_gate_shexp.weight", n_embd, n_ff_exp)
            m.t(f"blk.{i}.ffn_up_shexp.weight", n_embd, n_ff_exp)
            m.t(f"blk.{i}.ffn_down_shexp.weight", n_ff_exp, n_embd)
        if i >= n_trunk and heads:
            m.t(f"blk.{i}.nextn.eh_proj.weight", 2 * n_embd, n_embd)
            m.t(f"blk.{i}.nextn.enorm.weight", n_embd)
            m.t(f"blk.{i}.nextn.hnorm.weight", n_embd)
            m.t(f"blk.{i}.nextn.shared_head_norm.weight", n_embd)
    m.write(n_vocab, seed=seed, ascii_vocab=True)
    return path
