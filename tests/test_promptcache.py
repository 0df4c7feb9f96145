"""The prompt cache's pure logic: when persist is on and why, the key of a slot file (what changes it, what does not),
reading GET /slots, and whether a restore took."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamactl.profiles import Profile, Rope, Speculation
from llamactl.promptcache import (
    ModelIdentity, cache_key, layout_of, parse_slots, persist_decision, restore_taken, unified_kv,
)


def profile(**fields) -> Profile:
    return Profile(name="p", model="/models/m.gguf", **fields)


@pytest.mark.parametrize("fields, sliding, on, swa_full, words", [
    ({}, False, True, False, "costs no memory"),
    ({}, True, False, False, "needs --swa-full"),
    ({"cache": {"persist": True}}, True, True, True, "--swa-full"),
    ({"cache": {"persist": True}}, False, True, False, "persist = true"),
    ({"cache": {"persist": False}}, False, False, False, "persist = false"),
    ({"engine": "ik_llama.cpp"}, False, False, False, "ik_llama.cpp"),
    ({"engine": "ik_llama.cpp", "cache": {"persist": True}}, True, False, False, "persist = true ignored"),
    ({"embeddings": True}, False, False, False, "embeddings"),
    ({"embeddings": True, "cache": {"persist": True}}, True, False, False, "embeddings"),
])
def test_persist_is_on_where_it_costs_nothing_and_says_why(fields, sliding, on, swa_full, words):
    decision = persist_decision(profile(**fields), sliding_window=sliding)
    assert (decision.on, decision.swa_full) == (on, swa_full)
    assert words in decision.reason


MODEL = ModelIdentity(path="/models/m.gguf", size=253_000_000, mtime_ns=1)


def key_for(p: Profile, model: ModelIdentity = MODEL, **layout) -> str:
    args = {"engine_version": "b1", "n_ctx_slot": 4096, "n_slots": 1, "unified_kv": unified_kv(p), "swa_full": True}
    return cache_key(model, layout_of(p, **{**args, **layout}))


def test_the_key_changes_with_everything_that_makes_a_file_loadable():
    base = profile(parallel=1, cache={"persist": True})
    key = key_for(base)
    changed = [
        key_for(base, dataclasses.replace(MODEL, size=MODEL.size + 1)),
        key_for(base, dataclasses.replace(MODEL, mtime_ns=2)),
        key_for(base, dataclasses.replace(MODEL, path="/models/other.gguf")),
        key_for(base.model_copy(update={"cache_type_k": "q8_0"})),
        key_for(base.model_copy(update={"cache_type_v": "q8_0"})),
        key_for(base.model_copy(update={"flash_attn": "off"})),
        key_for(base.model_copy(update={"engine": "ik_llama.cpp"})),
        key_for(base.model_copy(update={"rope": Rope(freq_base=20000.0)})),
        key_for(base, engine_version="b2"),
        key_for(base, n_ctx_slot=8192),
        key_for(base, n_slots=2),
        key_for(base, unified_kv=False),
        key_for(base, swa_full=False),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)


def test_switch_group_members_on_one_model_and_layout_share_a_key():
    plain = profile(parallel=1, group="g")
    spec = plain.model_copy(update={"name": "p-spec", "speculation": Speculation(type="ngram-mod"), "description": "x",
                                    "alias": "other", "threads": 4})
    assert key_for(plain) == key_for(spec)


def test_unified_kv_follows_the_plan():
    assert unified_kv(profile()) is True  # mainline's default: 4 slots sharing one cache
    assert unified_kv(profile(parallel=1)) is True
    assert unified_kv(profile(parallel=2)) is False
    assert unified_kv(profile(parallel=2, extra_args=["-kvu"])) is True
    assert unified_kv(profile(engine="ik_llama.cpp")) is False


def test_slots_are_read_from_the_engines_answer():
    slots = parse_slots([{"id": 0, "n_ctx": 4096, "is_processing": False, "n_prompt_tokens": 3000},
                         {"id": 1, "n_ctx": 4096, "is_processing": True}])
    assert slots is not None and [(s.id, s.tokens, s.busy) for s in slots] == [(0, 3000, False), (1, 0, True)]
    for bad in (None, [], {"id": 0}, [{"id": "0", "n_ctx": 1}], [{"id": 0, "n_ctx": -1}], [1], [{"id": True, "n_ctx": 1}]):
        assert parse_slots(bad) is None


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20))
def test_any_json_as_slots_is_a_list_of_slots_or_none(payload):
    slots = parse_slots(payload)
    assert slots is None or all(isinstance(s.id, int) and s.tokens >= 0 for s in slots)


def test_a_restore_took_when_the_next_request_reused_tokens():
    assert restore_taken(prompt_n=12, cache_n=3000, restored_tokens=3000) is True
    assert restore_taken(prompt_n=3012, cache_n=0, restored_tokens=3000) is False  # re-read all of it
    assert restore_taken(prompt_n=20, cache_n=0, restored_tokens=3000) is None  # a short other prompt: no verdict
    assert restore_taken(prompt_n=None, cache_n=None, restored_tokens=3000) is None
