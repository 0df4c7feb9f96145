"""KV / state / compute formulas against published numbers (reference/memory.md) and llama.cpp's rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llamactl.gguf import GGUFFile
from llamactl.plan.estimate import ContextParams, compute_bytes, kv_bytes_per_layer, pad, row_bytes
from llamactl.plan.model import spec_from_gguf

KIB, MIB, GIB = 1024, 1024**2, 1024**3


def spec(arch: str, **md: Any):
    meta = {"general.architecture": arch, "general.name": arch}
    meta.update({f"{arch}.{k}": v for k, v in md.items()})
    return spec_from_gguf(GGUFFile(path=Path(f"{arch}.gguf"), version=3, metadata=meta, tensors=(), alignment=32,
                                   data_offset=0, file_size_bytes=0))


LLAMA_8B = dict(block_count=32, embedding_length=4096, feed_forward_length=14336, context_length=131072,
                **{"attention.head_count": 32, "attention.head_count_kv": 8})


@pytest.mark.parametrize("kv,expected_gib", [("f16", 64), ("q8_0", 34), ("q4_0", 18)])
def test_llama31_8b_kv_at_524288(kv: str, expected_gib: int) -> None:
    s = spec("llama", **LLAMA_8B)
    ctx = ContextParams(n_ctx=524288, n_seq=1, type_k=kv, type_v=kv)
    assert sum(kv_bytes_per_layer(s, ctx)) == expected_gib * GIB


def test_llama31_8b_is_128_kib_per_token() -> None:
    s = spec("llama", **LLAMA_8B)
    a = sum(kv_bytes_per_layer(s, ContextParams(n_ctx=4096, n_seq=1)))
    b = sum(kv_bytes_per_layer(s, ContextParams(n_ctx=8192, n_seq=1)))
    assert (b - a) // 4096 == 128 * KIB


def test_gemma3_27b_full_and_sliding_layers() -> None:
    s = spec("gemma3", block_count=62, embedding_length=5376, context_length=131072,
             **{"attention.head_count": 32, "attention.head_count_kv": 16, "attention.key_length": 128,
                "attention.value_length": 128, "attention.sliding_window": 1024})
    assert sum(s.swa) == 52 and sum(not x for x in s.swa) == 10
    ctx = ContextParams(n_ctx=131072, n_seq=1)
    per_layer = kv_bytes_per_layer(s, ctx)
    full = sum(b for b, w in zip(per_layer, s.swa) if not w)
    swa = sum(b for b, w in zip(per_layer, s.swa) if w)
    assert full == 131072 * 80 * KIB  # 10 full layers at 80 KiB / token
    assert swa == 52 * pad(1024 + 512, 256) * 16 * 128 * 2 * 2  # about 0.6 GiB whatever the context
    assert 0.55 * GIB < swa < 0.7 * GIB


def test_swa_cells_grow_with_unified_slots_and_swa_full() -> None:
    ctx4 = ContextParams(n_ctx=131072, n_seq=4, unified=True)
    assert ctx4.swa_cells(1024) == pad(4 * 1024 + 512, 256)
    assert ContextParams(n_ctx=131072, n_seq=4, unified=False).swa_cells(1024) == pad(1024 + 512, 256)
    assert ContextParams(n_ctx=131072, n_seq=4, swa_full=True).swa_cells(1024) == 131072
    assert ContextParams(n_ctx=1024, n_seq=1).swa_cells(4096) == 1024  # never more than the full cache


def test_deepseek_v3_mla_is_k_only() -> None:
    s = spec("deepseek2", block_count=61, embedding_length=7168, context_length=163840,
             **{"attention.head_count": 128, "attention.head_count_kv": 1, "attention.key_length": 576,
                "attention.value_length": 512, "attention.key_length_mla": 192, "attention.value_length_mla": 128,
                "attention.kv_lora_rank": 512})
    assert s.mla and set(s.v_len) == {0}
    per_token = sum(kv_bytes_per_layer(s, ContextParams(n_ctx=512, n_seq=1))) // 512
    assert per_token == 61 * 576 * 2  # about 68.6 KiB


def test_recurrent_state_does_not_grow_with_context() -> None:
    s = spec("mamba2", block_count=4, embedding_length=256,
             **{"ssm.conv_kernel": 4, "ssm.inner_size": 512, "ssm.state_size": 64, "ssm.group_count": 1})
    a = kv_bytes_per_layer(s, ContextParams(n_ctx=4096, n_seq=2))
    b = kv_bytes_per_layer(s, ContextParams(n_ctx=524288, n_seq=2))
    assert a == b
    n_embd_r = 3 * (512 + 2 * 64)
    n_embd_s = 64 * 512
    assert a[0] == (n_embd_r + n_embd_s) * 4 * 2


def test_qwen3_next_hybrid_by_full_attention_interval() -> None:
    s = spec("qwen3next", block_count=48, embedding_length=2048, full_attention_interval=4,
             **{"attention.head_count": 16, "attention.head_count_kv": 2, "attention.key_length": 256,
                "attention.value_length": 256})
    assert sum(s.recurrent) == 36 and sum(1 for h in s.n_head_kv if h) == 12
    per_token = (sum(kv_bytes_per_layer(s, ContextParams(n_ctx=8192, n_seq=1)))
                 - sum(kv_bytes_per_layer(s, ContextParams(n_ctx=4096, n_seq=1)))) // 4096
    assert per_token == 12 * 2 * 256 * 2 * 2  # 24 KiB / token


def test_per_layer_head_count_kv_array_with_zeros() -> None:
    s = spec("llama", block_count=4, embedding_length=512,
             **{"attention.head_count": 8, "attention.head_count_kv": [2, 0, 4, 2]})
    per_layer = kv_bytes_per_layer(s, ContextParams(n_ctx=256, n_seq=1))
    assert per_layer[1] == 0
    assert per_layer[2] == 2 * per_layer[0] == 2 * per_layer[3]


def test_explicit_slots_split_the_context_and_pad_each() -> None:
    ctx = ContextParams(n_ctx=10000, n_seq=3, unified=False)
    assert ctx.cells == pad(pad(10000, 256) // 3, 256)
    assert ctx.n_stream == 3
    assert ContextParams(n_ctx=10000, n_seq=3, unified=True).cells == pad(10000, 256)


@pytest.mark.parametrize("kv,n,expected", [("f16", 128, 256), ("q8_0", 128, 136), ("q4_0", 128, 72),
                                           ("q5_1", 64, 48), ("iq4_nl", 32, 18), ("f32", 3, 12)])
def test_row_bytes_by_cache_type(kv: str, n: int, expected: int) -> None:
    assert row_bytes(kv, n) == expected


def test_flash_attention_is_what_makes_long_context_possible() -> None:
    s = spec("llama", **LLAMA_8B)
    on = compute_bytes(s, ContextParams(n_ctx=524288, n_seq=1, flash_attn=True))
    off = compute_bytes(s, ContextParams(n_ctx=524288, n_seq=1, flash_attn=False))
    assert on.base >= 524288 * 512 * 2  # the f16 mask
    assert off.base >= 524288 * 512 * 32 * 4  # the KQ matrix: 32 GiB
    assert off.base > 30 * on.base


def test_quantised_kv_needs_a_gpu_f16_scratch_only() -> None:
    s = spec("llama", **LLAMA_8B)
    f16 = compute_bytes(s, ContextParams(n_ctx=65536, n_seq=1))
    q8 = compute_bytes(s, ContextParams(n_ctx=65536, n_seq=1, type_k="q8_0", type_v="q8_0"))
    assert f16.gpu_extra == 0 and q8.gpu_extra == 65536 * 8 * 256 * 2
    assert q8.base == f16.base


def test_logits_rows_follow_outputs_not_ubatch() -> None:
    s = spec("llama", **LLAMA_8B)
    s = s.__class__(**{**s.__dict__, "n_vocab": 128256})
    few = compute_bytes(s, ContextParams(n_ctx=4096, n_seq=4, n_outputs=4))
    many = compute_bytes(s, ContextParams(n_ctx=4096, n_seq=4, n_outputs=260))
    assert many.output - few.output == 256 * (128256 + 4096) * 4
