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


def test_a_split_gguf_is_read_whole_from_its_first_part(tmp_path: Path) -> None:
    """Published models past 50 GB come split (NAME-00001-of-00004.gguf, ...): the engine loads every part from
    the first, and so must the plan. Read from the first part alone, three of four layers weighed nothing."""
    from llamactl.gguf import read_model
    from llamactl.planning import load_spec

    whole = load_spec(write_llama(tmp_path / "whole.gguf"))
    first = write_llama(tmp_path / "split.gguf", split_max_tensors=12)
    assert first.name == "split-00001-of-00004.gguf"
    split = load_spec(first)
    assert split.layer_bytes == whole.layer_bytes and all(split.layer_bytes)
    assert split.tensor_bytes == whole.tensor_bytes and split.output_bytes == whole.output_bytes
    model = read_model(first)
    assert len(model.parts) == 4 and model.file_size_bytes == sum(
        p.stat().st_size for p in tmp_path.glob("split-0000?-of-00004.gguf"))
    assert read_model_info(first).block_count == 4  # the metadata, all in the first part
    assert read_model(tmp_path / "whole.gguf").parts == ()


def test_a_split_gguf_named_by_another_part_or_missing_one_is_a_profile_error_naming_it(tmp_path: Path) -> None:
    from llamactl.gguf import read_model
    from llamactl.validate import check_gguf_file

    first = write_llama(tmp_path / "m.gguf", split_max_tensors=12)
    with pytest.raises(ProfileError) as e:
        read_model(tmp_path / "m-00002-of-00004.gguf")
    assert "part 2 of 4 of a split GGUF" in e.value.message and "m-00001-of-00004.gguf" in (e.value.hint or "")
    renamed = first.rename(tmp_path / "m-first.gguf")
    with pytest.raises(ProfileError, match="not named as the engine finds the others"):
        read_model(renamed)
    renamed.rename(first)
    third = tmp_path / "m-00003-of-00004.gguf"
    data = third.read_bytes()
    third.write_bytes(data[: len(data) - 100])  # cut off: the part's tensors run past its end
    with pytest.raises(ProfileError, match="m-00003-of-00004.gguf is truncated") as e:
        check_gguf_file(first, "model", "profile 'x'")
    assert e.value.message.startswith("profile 'x': model: ")
    third.unlink()
    with pytest.raises(ProfileError) as e:
        check_gguf_file(first, "model", "profile 'x'")
    assert "part 3 of 4 of this split GGUF is missing" in e.value.message and "llamactl pull" in (e.value.hint or "")


def _patch_after(data: bytes, key: str, skip: int, value: bytes) -> bytes:
    """`data` with `value` written `skip` bytes after metadata key `key`'s name."""
    at = data.index(key.encode()) + len(key) + skip
    return data[:at] + value + data[at + len(value):]


def test_a_block_count_no_engine_loads_is_a_profile_error_not_memory_for_it(tmp_path: Path) -> None:
    """block_count = 2^31 (a damaged header): the plan built per-layer lists of that length (gigabytes); the
    engines load at most 512 blocks (LLAMA_MAX_LAYERS), so it is a ProfileError naming the file."""
    from llamactl.planning import load_spec

    data = write_llama(tmp_path / "m.gguf", n_layer=2).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_patch_after(data, "llama.block_count", 4, (2**31).to_bytes(4, "little")))
    with pytest.raises(ProfileError, match=r"bad.gguf: llama.block_count = 2147483648: the engines load at most 512"):
        load_spec(bad)


def test_a_string_longer_than_the_file_in_a_skipped_array_is_a_profile_error(tmp_path: Path) -> None:
    """A vocabulary past MAX_ARRAY_ITEMS is skipped string by string; a damaged length (2^40) was read in one
    piece (a MemoryError, or an OverflowError past 2^63)."""
    data = write_llama(tmp_path / "m.gguf", n_vocab=MAX_ARRAY_ITEMS + 100).read_bytes()
    for length in (2**40, 2**63 + 5):
        bad = tmp_path / "bad.gguf"
        # after the key: value type (4 bytes), item type (4), count (8), then the first string's length (8)
        bad.write_bytes(_patch_after(data, "tokenizer.ggml.tokens", 16, length.to_bytes(8, "little")))
        with pytest.raises(ProfileError, match="not a readable GGUF model file: string of"):
            read_gguf(bad)


def test_metadata_of_the_wrong_kind_or_nested_too_deep_is_no_traceback(tmp_path: Path) -> None:
    """A vocabulary stored as a number, a context length as text: the model's facts fall back (the embedding's
    rows, no context length) instead of a TypeError wherever they are read. Arrays of arrays 3000 deep (no
    engine reads those): a ProfileError, not a RecursionError."""
    import struct

    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("tokenizer.ggml.tokens", 5)
    w.add_string("llama.context_length", "lots")
    w.add_tensor("token_embd.weight", np.zeros((300, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_model_info(path)
    assert info.n_vocab == 300 and info.context_length is None

    deep = tmp_path / "deep.gguf"
    key = b"x"
    body = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)
    body += struct.pack("<IQ", 9, 1) * 3000 + struct.pack("<IQ", 4, 0)
    deep.write_bytes(body)
    with pytest.raises(ProfileError, match="metadata arrays nested too deep"):
        read_gguf(deep)


def test_the_prompt_cache_keys_a_split_model_on_every_part(tmp_path: Path) -> None:
    """A saved slot is only valid for the model it was computed on: for a split GGUF that is every part (one part
    fetched again changes the model), so the key's files are all of them; a single file is itself."""
    from llamactl.daemon.prompt_cache import _model_files

    first = write_llama(tmp_path / "s.gguf", split_max_tensors=12)
    assert _model_files(str(first)) == tuple(str(tmp_path / f"s-0000{i}-of-00004.gguf") for i in range(1, 5))
    one = write_llama(tmp_path / "one.gguf")
    assert _model_files(str(one)) == (str(one),)
