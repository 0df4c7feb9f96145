"""A drafter must speak the target's vocabulary: checked from the GGUF headers before anything starts, with
llama.cpp's own rule (common_speculative_are_compatible), for local files and `hf:` ones alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFWriter

from llamactl.cli import main
from llamactl.errors import ProfileError
from llamactl.supervisor import Supervisor
from llamactl.vocab import check_draft_vocabulary, read_vocabulary, vocabulary_mismatch
from tests.conftest import FAKE_SERVER, FAKES
from tests.synth_gguf import write_llama


def write_vocab_gguf(path: Path, tokens: list[str], *, bos: int = 1, eos: int = 2, model: str = "llama") -> Path:
    import numpy as np

    w = GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_block_count(1)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TOKENS = ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(997)]


def test_the_bundled_model_speaks_its_own_vocabulary(gemma_path):
    vocab = read_vocabulary(gemma_path)
    assert len(vocab.tokens) == 262144 and vocab.model == "llama" and vocab.bos == 2 and vocab.eos == 1
    assert vocabulary_mismatch(vocab, read_vocabulary(gemma_path)) is None


def test_the_bundled_model_against_another_vocabulary_names_both_files(gemma_path, tmp_path):
    other = write_llama(tmp_path / "other-vocab.gguf", n_layer=1, n_vocab=4096)
    with pytest.raises(ProfileError) as e:
        check_draft_vocabulary(gemma_path, other, where="profiles/spec.toml")
    text = str(e.value)
    assert str(gemma_path) in text and str(other) in text and "profiles/spec.toml" in text
    assert "BOS tokens differ" in text and "262144 tokens" in text and "4096 tokens" in text


@pytest.mark.parametrize("draft_tokens, kwargs, why", [
    (TOKENS[:7] + ["other"] + TOKENS[8:], {}, "token 7 differs ('tok4' vs 'other')"),
    (TOKENS, {"bos": 0}, "BOS tokens differ"),
    (TOKENS, {"eos": 1}, "EOS tokens differ"),
    (TOKENS, {"model": "gpt2"}, "tokenizer models differ (llama vs gpt2)"),
    (TOKENS + [f"pad{i}" for i in range(129)], {}, "token counts differ by 129"),
])
def test_what_llama_cpp_would_refuse_is_refused(tmp_path, draft_tokens, kwargs, why):
    target = read_vocabulary(write_vocab_gguf(tmp_path / "t.gguf", TOKENS))
    draft = read_vocabulary(write_vocab_gguf(tmp_path / "d.gguf", draft_tokens, **kwargs))
    assert why in (vocabulary_mismatch(target, draft) or "")


def test_what_llama_cpp_accepts_is_accepted(tmp_path):
    """A few padding tokens more (Qwen's 32B and 0.5B differ so) and different special tokens below id 5."""
    target = read_vocabulary(write_vocab_gguf(tmp_path / "t.gguf", TOKENS))
    padded = read_vocabulary(write_vocab_gguf(tmp_path / "d.gguf", ["<pad>"] + TOKENS[1:] + ["x"] * 128))
    assert vocabulary_mismatch(target, padded) is None


def test_up_refuses_a_mismatched_local_drafter_before_spawning(settings, write_profile, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACTL_GPUS_FILE", str(FAKES / "gpus_cpu.json"))
    target = write_vocab_gguf(tmp_path / "target.gguf", TOKENS)
    draft = write_vocab_gguf(tmp_path / "draft.gguf", TOKENS[:7] + ["other"] + TOKENS[8:])
    write_profile("spec", f"""
        binary = "{FAKE_SERVER}"
        model = "{target}"
        [speculation]
        type = "draft"
        draft_model = "{draft}"
    """)
    result = CliRunner().invoke(main, ["up", "spec"])
    assert result.exit_code == 2, result.output
    assert f"the draft model {draft} does not speak the vocabulary of the target {target}" in result.output
    assert "Traceback" not in result.output
    assert Supervisor(settings).status() == []
    validated = CliRunner().invoke(main, ["profiles", "validate", "spec"])
    assert validated.exit_code != 0 and "token 7 differs" in validated.output
