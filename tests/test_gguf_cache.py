"""Parsed GGUF headers kept on disk between commands (llamactl/gguf_cache.py): the same header back without a
parse, a changed model parsed again, hostile cache files ignored, nothing kept where no directory was set."""

from __future__ import annotations

import json
import os

import pytest

from llamactl import gguf, gguf_cache


@pytest.fixture
def cache(tmp_path):
    gguf_cache.use(tmp_path / "headers")
    gguf.clear_header_cache()
    yield tmp_path / "headers"
    gguf_cache.use(None)
    gguf.clear_header_cache()


def parses(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = gguf._parse
    monkeypatch.setattr(gguf, "_parse", lambda *a: calls.append(1) or real(*a))
    return calls


def read_fresh(path):
    gguf.clear_header_cache()  # a new process: nothing in memory
    return gguf.read_gguf(path)


def test_a_header_parsed_once_comes_back_equal_without_a_parse(cache, gemma_path, monkeypatch):
    calls = parses(monkeypatch)
    first = read_fresh(gemma_path)
    again = read_fresh(gemma_path)
    assert calls == [1]
    assert again == first and again.tensor_index == first.tensor_index and again.n_vocab == first.n_vocab == 262144
    assert again.model_info() == first.model_info()
    assert [oct(f.stat().st_mode & 0o777) for f in cache.iterdir()] == ["0o600"]


def test_a_model_changed_or_replaced_is_parsed_again(cache, tmp_path, monkeypatch):
    from tests.conftest import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "m.gguf", context_length=4096)
    calls = parses(monkeypatch)
    assert read_fresh(path).model_info().context_length == 4096
    write_tiny_gguf(path, context_length=8192)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert read_fresh(path).model_info().context_length == 8192
    assert len(calls) == 2


@pytest.mark.parametrize("content", [b"not json", b"[]", b'{"format": 1}', b"{" * 100_000,
                                     b"x" * (gguf_cache.MAX_FILE_BYTES + 1), "directory"])
def test_a_hostile_cache_file_is_ignored(cache, tmp_path, content, monkeypatch):
    from tests.conftest import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "m.gguf")
    truth = read_fresh(path)
    (kept,) = cache.iterdir()
    if content == "directory":
        kept.unlink()
        kept.mkdir()
    else:
        kept.write_bytes(content)
    assert read_fresh(path) == truth


def test_a_cache_file_for_another_model_is_not_taken(cache, tmp_path):
    from tests.conftest import write_tiny_gguf

    a = write_tiny_gguf(tmp_path / "a.gguf", context_length=1024)
    b = write_tiny_gguf(tmp_path / "b.gguf", context_length=2048)
    read_fresh(a)
    (kept,) = cache.iterdir()
    st_b = b.stat()
    data = json.loads(kept.read_text())
    kept.rename(gguf_cache._file_for(gguf_cache._identity(b, st_b)))  # a's header under b's name
    assert data["identity"]["path"] == str(a.resolve())
    assert read_fresh(b).model_info().context_length == 2048


def test_nothing_is_kept_where_no_directory_was_set(tmp_path, monkeypatch):
    from tests.conftest import write_tiny_gguf

    gguf_cache.use(None)
    path = write_tiny_gguf(tmp_path / "m.gguf")
    calls = parses(monkeypatch)
    read_fresh(path)
    read_fresh(path)
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
