"""GGUF header reader: metadata, tensor table, long arrays skipped, errors; checked against gguf.GGUFReader."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from llamactl.errors import ProfileError
from llamactl.gguf import MAX_ARRAY_ITEMS, ArrayLength, read_gguf, read_model_info
from tests.synth_gguf import write_gemma3, write_granitehybrid, write_header_only, write_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("g") / "llama.gguf", n_vocab=MAX_ARRAY_ITEMS + 100)


def test_tensor_table_matches_the_reference_reader(llama: Path) -> None:
    ours = read_gguf(llama)
    ref = GGUFReader(str(llama), "r")
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.shape == tuple(int(x) for x in b.shape)
        assert a.n_bytes == int(b.n_bytes)
        assert a.type_name == b.tensor_type.name
        assert ours.data_offset + a.offset == int(b.data_offset)


def test_data_section_ends_at_file_end(llama: Path) -> None:
    g = read_gguf(llama)
    last = max(g.tensors, key=lambda t: t.offset)
    assert g.data_offset + last.offset + last.n_bytes == g.file_size_bytes


def test_metadata_scalars_and_skipped_long_arrays(llama: Path) -> None:
    g = read_gguf(llama)
    assert g.architecture == "llama"
    assert g.get("block_count") == 4
    assert g.get("attention.head_count_kv") == 2
    tokens = g.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, ArrayLength) and len(tokens) == MAX_ARRAY_ITEMS + 100
    assert g.n_vocab == MAX_ARRAY_ITEMS + 100
    # The key after the skipped string array was still read correctly.
    assert g.metadata["tokenizer.ggml.bos_token_id"] == 1


def test_per_layer_arrays_are_kept(tmp_path: Path) -> None:
    g = read_gguf(write_granitehybrid(tmp_path / "h.gguf", n_layer=6, attn_every=3))
    assert g.get("attention.head_count_kv") == [0, 0, 2, 0, 0, 2]


def test_layer_index_of_tensors(tmp_path: Path) -> None:
    g = read_gguf(write_gemma3(tmp_path / "g.gguf", n_layer=3))
    layers = {t.layer for t in g.tensors}
    assert layers == {None, 0, 1, 2}
    assert g.tensor("output.weight") is None  # tied output


def test_read_model_info_keeps_its_fields(llama: Path) -> None:
    info = read_model_info(llama)
    assert (info.architecture, info.context_length, info.block_count) == ("llama", 524288, 4)
    assert info.file_size_bytes == llama.stat().st_size
    assert info.name == "synthetic llama GQA"


def test_header_only_big_model_is_read_without_the_weights(tmp_path: Path) -> None:
    path = write_header_only(tmp_path / "big.gguf", n_layer=8)
    g = read_gguf(path)
    assert g.data_offset + g.tensor_bytes <= g.file_size_bytes
    assert g.tensor_bytes > 1_000_000_000  # billions of bytes described, a sparse file on disk


@pytest.mark.parametrize("content", [b"", b"GGUF", b"NOPE" + b"\0" * 64, b"GGUF\x09\0\0\0" + b"\0" * 16])
def test_not_a_gguf_is_a_profile_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ProfileError, match="not a readable GGUF"):
        read_gguf(bad)


def test_missing_file_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        read_model_info(tmp_path / "missing.gguf")
