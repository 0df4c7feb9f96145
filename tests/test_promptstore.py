"""The prompt cache's store on disk: files 0600 in a 0700 directory, a byte budget with the least recently used out
first, and everything read back treated as input (a truncated, foreign, linked or hostile file or manifest is
skipped with a warning, never an error)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamactl.promptstore import HEADER, MANIFEST, STATE_MAGIC, PromptStore

KEY_A, KEY_B = "a" * 32, "b" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def engine_save(store: PromptStore, key: str, slot: int, tokens: int, extra: int = 0) -> str:
    """What llama-server does on POST /slots/N?action=save: a state file under the name llamactl gave it."""
    temp = store.temp_name(key, slot)
    (store.directory / temp).write_bytes(HEADER.pack(STATE_MAGIC, 3, tokens) + b"\0" * (4 * tokens + extra))
    return temp


def new_store(tmp_path: Path, budget: int = 1 << 20) -> PromptStore:
    store = PromptStore(tmp_path / "prompts", budget_bytes=budget, clock=Clock())
    store.open()
    return store


def test_a_saved_slot_is_kept_private_and_found_by_its_key(tmp_path):
    store = new_store(tmp_path)
    entry = store.commit(engine_save(store, KEY_A, 0, 100), key=KEY_A, slot=0, profile="p", tokens=100,
                         prefill_tok_s=500.0)
    assert entry is not None and entry.bytes == 12 + 400
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.directory / entry.file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.directory / MANIFEST).st_mode) == 0o600
    assert store.entries_for(KEY_A) == [entry] and store.entries_for(KEY_B) == []
    reopened = PromptStore(store.directory, budget_bytes=1 << 20)
    reopened.open()
    assert reopened.entries_for(KEY_A) == [entry]  # the manifest outlives the daemon
    assert reopened.usage()["profiles"] == {"p": {"files": 1, "bytes": 412, "tokens": 100}}


def test_the_budget_evicts_the_least_recently_used_first(tmp_path):
    store = new_store(tmp_path, budget=3000)
    first = store.commit(engine_save(store, KEY_A, 0, 300), key=KEY_A, slot=0, profile="a", tokens=300)
    second = store.commit(engine_save(store, KEY_B, 0, 300), key=KEY_B, slot=0, profile="b", tokens=300)
    assert first and second
    store.touch(first)  # restored since: now the most recent
    third = store.commit(engine_save(store, KEY_B, 1, 300), key=KEY_B, slot=1, profile="b", tokens=300)
    assert third is not None
    kept = {e.file for e in store.entries()}
    assert kept == {first.file, third.file}  # `second`, the least recently used, went
    assert not (store.directory / second.file).exists()
    assert sum(e.bytes for e in store.entries()) <= 3000


def test_a_file_larger_than_the_whole_budget_is_not_kept(tmp_path, caplog):
    store = new_store(tmp_path, budget=1000)
    temp = engine_save(store, KEY_A, 0, 1000)
    assert store.commit(temp, key=KEY_A, slot=0, profile="p", tokens=1000) is None
    assert not (store.directory / temp).exists() and store.entries() == []
    assert "more than the whole budget" in caplog.text


def test_a_newer_save_of_a_slot_replaces_the_older(tmp_path):
    store = new_store(tmp_path)
    old = store.commit(engine_save(store, KEY_A, 0, 10), key=KEY_A, slot=0, profile="p", tokens=10)
    new = store.commit(engine_save(store, KEY_A, 0, 20), key=KEY_A, slot=0, profile="p-spec", tokens=20)
    assert old and new and store.entries_for(KEY_A) == [new]
    store.drop(old, "stale")  # dropping what was replaced leaves the new file alone
    assert store.entries_for(KEY_A) == [new]


def test_truncated_foreign_and_linked_files_are_skipped_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    store = new_store(tmp_path)
    kept = [store.commit(engine_save(store, KEY_A, i, 50), key=KEY_A, slot=i, profile="p", tokens=50)
            for i in range(4)]
    d = store.directory
    with open(d / kept[0].file, "r+b") as f:  # truncated
        f.truncate(30)
    (d / kept[1].file).write_bytes(b"GGUF" + b"\0" * 208)  # foreign (same size, not a state file)
    os.unlink(d / kept[2].file)
    os.symlink("/etc/passwd", d / kept[2].file)  # a link put in its place
    (d / "notes.txt").write_text("mine")  # not ours: left alone
    reopened = PromptStore(d, budget_bytes=1 << 20)
    reopened.open()
    assert reopened.entries_for(KEY_A) == [kept[3]]
    assert (d / "notes.txt").exists() and not (d / kept[2].file).exists()
    assert caplog.text.count("skipped") == 3 and "not ours" in caplog.text


def test_a_file_changed_after_opening_is_dropped_when_restored(tmp_path, caplog):
    store = new_store(tmp_path)
    entry = store.commit(engine_save(store, KEY_A, 0, 50), key=KEY_A, slot=0, profile="p", tokens=50)
    assert entry is not None
    with open(store.directory / entry.file, "ab") as f:
        f.write(b"more")
    assert store.entries_for(KEY_A) == [] and "rewritten" in caplog.text


def test_an_interrupted_save_leaves_nothing_behind_at_the_next_open(tmp_path, caplog):
    store = new_store(tmp_path)
    temp = engine_save(store, KEY_A, 0, 50)  # the daemon died before `commit`
    orphan = store.directory / f"{KEY_B}-slot0.bin"
    orphan.write_bytes(HEADER.pack(STATE_MAGIC, 3, 1) + b"\0" * 4)  # saved, manifest not written
    (store.directory / f"{MANIFEST}.0123456789abcdef").write_text("{")
    PromptStore(store.directory, budget_bytes=1 << 20).open()
    assert sorted(os.listdir(store.directory)) == [MANIFEST]
    assert not (store.directory / temp).exists() and "interrupted save" in caplog.text


def test_a_manifest_that_is_not_ours_starts_an_empty_store(tmp_path, caplog):
    d = tmp_path / "prompts"
    d.mkdir()
    for text in ("not json", "[]", '{"entries": 5}', json.dumps({"entries": [{"file": "../../etc/passwd"}]}),
                 "[" * 100000):
        (d / MANIFEST).write_text(text)
        store = PromptStore(d, budget_bytes=1 << 20)
        store.open()
        assert store.entries() == []
    fifo = d / MANIFEST
    fifo.unlink()
    os.mkfifo(fifo)
    store = PromptStore(d, budget_bytes=1 << 20)
    store.open()  # a FIFO does not block the open
    assert store.entries() == [] and "not a regular file" in caplog.text


ENTRY_FIELDS = st.fixed_dictionaries({}, optional={
    "file": st.sampled_from([f"{KEY_A}-slot0.bin", "../x", f"{KEY_A}-slot0.bin/../../y", "", f"{KEY_B}-slot9.bin"]),
    "key": st.sampled_from([KEY_A, KEY_B, "zz", 3]),
    "slot": st.integers(-2, 2) | st.text(max_size=2) | st.booleans(),
    "profile": st.sampled_from(["p", "../p", "a" * 100, "", None]),
    "bytes": st.integers(-1, 1 << 70) | st.floats(allow_nan=True),
    "tokens": st.integers(-1, 100),
    "saved_at": st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=3),
    "used_at": st.floats(allow_nan=True) | st.none(),
    "prefill_tok_s": st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=2),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(ENTRY_FIELDS | st.integers() | st.none(), max_size=5))
def test_any_manifest_entries_open_without_an_error_and_only_checked_files_are_kept(tmp_path, entries):
    d = tmp_path / "fuzz"
    d.mkdir(exist_ok=True)
    for name in os.listdir(d):
        os.unlink(d / name)
    (d / MANIFEST).write_text(json.dumps({"entries": entries}, default=str))
    store = PromptStore(d, budget_bytes=1 << 20)
    store.open()
    assert store.entries() == []  # no file on disk matches any of them
    assert os.listdir(d) == [MANIFEST]
