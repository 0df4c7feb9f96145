"""`hf:` references and which repo files they mean: pure, no network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamactl.errors import ProfileError
from llamactl.hf.refs import HfRef, is_safe_repo_path, parse_ref
from llamactl.hf.select import gguf_groups, is_complete, select


@pytest.mark.parametrize("text, ref", [
    ("hf:unsloth/Qwen3-1.7B-GGUF:Q4_K_M", HfRef("unsloth/Qwen3-1.7B-GGUF", quant="Q4_K_M")),
    ("hf:unsloth/Qwen3-1.7B-GGUF:UD-Q4_K_XL@main", HfRef("unsloth/Qwen3-1.7B-GGUF", quant="UD-Q4_K_XL", revision="main")),
    ("hf:acme/m/Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", HfRef("acme/m", path="Q4_K_M/m-Q4_K_M-00001-of-00002.gguf")),
    ("hf:acme/m/m.Q8_0.gguf@refs/pr/1", HfRef("acme/m", path="m.Q8_0.gguf", revision="refs/pr/1")),
])
def test_references_parse(text, ref):
    assert parse_ref(text) == ref
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize("text, why", [
    ("hf:acme/m", "add a quant tag"),
    ("hf:acme/m/../../etc/passwd.gguf", "no '..'"),
    ("hf:acme/m//abs.gguf", "bad part ''"),
    ("hf:acme/m/model.bin", "not a .gguf file"),
    ("hf:../m:Q4_K_M", "not a Hub name"),
    ("hf:acme:Q4_K_M", "not OWNER/REPO"),
    ("hf:acme/m:Q4 K", "quant tag"),
    ("hf:acme/m:Q4_K_M@../x", "revision"),
    ("hf:acme/m:Q4_K_M@", "revision"),
    ("hf:" + "a" * 600, "longer than"),
])
def test_bad_references_say_which_part_and_the_syntax(text, why):
    with pytest.raises(ProfileError) as e:
        parse_ref(text)
    assert why in e.value.message
    assert "hf:OWNER/REPO:QUANT" in (e.value.hint or "")


@given(st.text(max_size=80))
def test_any_text_parses_or_is_refused_and_never_escapes_the_repo(tail):
    try:
        ref = parse_ref("hf:" + tail)
    except ProfileError:
        return
    parts = ref.repo.split("/") + (ref.path.split("/") if ref.path else [])
    assert len(ref.repo.split("/")) == 2
    assert all(part not in ("", ".", "..") and "\\" not in part for part in parts)


QWEN = ["README.md", "Qwen3-1.7B-Q4_K_M.gguf", "Qwen3-1.7B-Q4_K_S.gguf", "Qwen3-1.7B-UD-Q4_K_XL.gguf",
        "Qwen3-1.7B-Q8_0.gguf", "mmproj-Qwen3-Q4_K_M.gguf", "imatrix_unsloth.gguf",
        "Q6_K/Big-Q6_K-00002-of-00003.gguf", "Q6_K/Big-Q6_K-00001-of-00003.gguf", "Q6_K/Big-Q6_K-00003-of-00003.gguf"]


@pytest.mark.parametrize("quant, first", [("Q4_K_M", "Qwen3-1.7B-Q4_K_M.gguf"), ("q4_k_m", "Qwen3-1.7B-Q4_K_M.gguf"),
                                          ("UD-Q4_K_XL", "Qwen3-1.7B-UD-Q4_K_XL.gguf"), ("Q8_0", "Qwen3-1.7B-Q8_0.gguf")])
def test_a_quant_tag_picks_one_model_not_a_projector(quant, first):
    assert select(HfRef("q/w", quant=quant), QWEN, where="p").files == (first,)


def test_a_split_gguf_is_fetched_whole_first_part_first():
    chosen = select(HfRef("q/w", quant="Q6_K"), QWEN, where="p")
    assert chosen.files == tuple(f"Q6_K/Big-Q6_K-0000{i}-of-00003.gguf" for i in (1, 2, 3))
    assert is_complete(chosen)
    by_part = select(HfRef("q/w", path="Q6_K/Big-Q6_K-00002-of-00003.gguf"), QWEN, where="p")
    assert by_part == chosen
    assert not is_complete(gguf_groups(QWEN[:-1])["Q6_K/Big-Q6_K-00001-of-00003.gguf"])


def test_a_quant_tag_matching_none_lists_the_files():
    with pytest.raises(ProfileError) as e:
        select(HfRef("q/w", quant="IQ2_XXS"), QWEN, where="profiles/x.toml, key model")
    assert "profiles/x.toml, key model" in e.value.message and "matches no GGUF" in e.value.message
    assert "Qwen3-1.7B-Q8_0.gguf" in e.value.message and "mmproj" not in e.value.message


def test_a_quant_tag_matching_several_lists_them_and_says_how_to_pick():
    files = ["m-Q4_K_M.gguf", "m-v2-Q4_K_M.gguf", "m-Q8_0.gguf"]
    with pytest.raises(ProfileError) as e:
        select(HfRef("a/m", quant="Q4_K_M"), files, where="p")
    assert "several" in e.value.message and "m-Q4_K_M.gguf, m-v2-Q4_K_M.gguf" in e.value.message
    assert "hf:a/m/m-Q4_K_M.gguf" in (e.value.hint or "")


def test_a_prefix_of_a_tag_is_not_a_match():
    with pytest.raises(ProfileError, match="matches no GGUF"):
        select(HfRef("q/w", quant="Q4_K"), ["m-Q4_K_M.gguf", "m-Q4_K_S.gguf"], where="p")


def test_a_named_file_missing_from_the_repo_is_refused():
    with pytest.raises(ProfileError, match="has no file 'nope.gguf'"):
        select(HfRef("q/w", path="nope.gguf"), QWEN, where="p")


@pytest.mark.parametrize("name, safe", [("a/b.gguf", True), ("../x.gguf", False), ("/abs.gguf", False),
                                        ("a//b", False), ("a/./b", False), ("ok-Q4_K_M.gguf", True)])
def test_listing_names_that_could_escape_the_cache_are_dropped(name, safe):
    assert is_safe_repo_path(name) is safe
