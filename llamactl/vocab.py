"""A drafter must speak its target's vocabulary: the check llama.cpp makes when it pairs the two models
(common/speculative.cpp, common_speculative_are_compatible), made before launch from the GGUF headers, so a
mismatch is an error naming both files instead of an engine that dies at load.

Compatible means: the same tokenizer model, the same BOS / EOS (and whether each is added), token counts
within SPEC_VOCAB_MAX_SIZE_DIFFERENCE, and the same token texts from id SPEC_VOCAB_CHECK_START_TOKEN_ID on.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import ProfileError
from llamactl.gguf import GGUF_MAGIC, read_gguf
from llamactl.gguf import _Reader as HeaderReader

SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128  # llama.cpp's limits, common/speculative.cpp
SPEC_VOCAB_CHECK_START_TOKEN_ID = 5
_TOKENS_KEY = "tokenizer.ggml.tokens"
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Vocabulary:
    path: Path
    model: str | None  # tokenizer.ggml.model: llama, gpt2, ...
    tokens: tuple[bytes, ...]
    bos: int | None
    eos: int | None
    add_bos: bool | None
    add_eos: bool | None

    @property
    def digest(self) -> str:
        return hashlib.sha256(b"\0".join(self.tokens)).hexdigest()[:12]

    def describe(self) -> str:
        return (f"{self.model or 'no'} tokenizer, {len(self.tokens)} tokens (sha256 {self.digest}), "
                f"BOS {self.bos}, EOS {self.eos}")


def read_vocabulary(path: Path) -> Vocabulary:
    """The tokenizer facts of a GGUF (its tokens read from the header; the weights are not touched)."""
    meta = read_gguf(path).metadata  # the checked reader: a bad file is a ProfileError naming it
    return Vocabulary(path=Path(path), model=meta.get("tokenizer.ggml.model"), tokens=_read_tokens(Path(path)),
                      bos=meta.get("tokenizer.ggml.bos_token_id"), eos=meta.get("tokenizer.ggml.eos_token_id"),
                      add_bos=meta.get("tokenizer.ggml.add_bos_token"), add_eos=meta.get("tokenizer.ggml.add_eos_token"))


def _read_tokens(path: Path) -> tuple[bytes, ...]:
    with path.open("rb") as f:
        r = HeaderReader(f, os.fstat(f.fileno()).st_size)
        if r.read(4) != GGUF_MAGIC:
            return ()
        r.unpack("<I")
        r.unpack("<Q")
        n_kv = r.unpack("<Q")
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack("<I")
            if key == _TOKENS_KEY and vtype == _ARRAY:
                item_type, count = r.unpack("<I"), r.unpack("<Q")
                if item_type != _STRING:
                    return ()
                start = f.tell()
                r.skip_items(item_type, count)  # leaves the file just after the array
                end = f.tell()
                f.seek(start)
                return _split_strings(f.read(end - start), count)
            r.value(vtype)
    return ()


def _split_strings(raw: bytes, count: int) -> tuple[bytes, ...]:
    out, i, unpack = [], 0, struct.Struct("<Q").unpack_from
    for _ in range(count):
        n = unpack(raw, i)[0]
        out.append(raw[i + 8:i + 8 + n])
        i += 8 + n
    return tuple(out)


def vocabulary_mismatch(target: Vocabulary, draft: Vocabulary) -> str | None:
    """Why the draft cannot draft for the target (as llama.cpp would refuse it), or None."""
    if target.model != draft.model:
        return f"tokenizer models differ ({target.model} vs {draft.model})"
    for name, add_t, add_d, id_t, id_d in (("BOS", target.add_bos, draft.add_bos, target.bos, draft.bos),
                                           ("EOS", target.add_eos, draft.add_eos, target.eos, draft.eos)):
        if bool(add_t) != bool(add_d) or id_t != id_d:
            return f"{name} tokens differ (id {id_t} vs {id_d}, added {bool(add_t)} vs {bool(add_d)})"
    n_t, n_d = len(target.tokens), len(draft.tokens)
    if abs(n_t - n_d) > SPEC_VOCAB_MAX_SIZE_DIFFERENCE:
        return (f"token counts differ by {abs(n_t - n_d)} ({n_t} vs {n_d}; llama.cpp allows "
                f"{SPEC_VOCAB_MAX_SIZE_DIFFERENCE})")
    for i in range(SPEC_VOCAB_CHECK_START_TOKEN_ID, min(n_t, n_d)):
        if target.tokens[i] != draft.tokens[i]:
            return f"token {i} differs ({_shown(target.tokens[i])} vs {_shown(draft.tokens[i])})"
    return None


def _shown(token: bytes) -> str:
    return repr(token[:40].decode("utf-8", errors="replace"))


def check_draft_vocabulary(target_path: Path, draft_path: Path, *, where: str) -> None:
    """Refuse a drafter whose vocabulary is not the target's, naming both files."""
    target, draft = read_vocabulary(target_path), read_vocabulary(draft_path)
    why = vocabulary_mismatch(target, draft)
    if why is not None:
        raise ProfileError(
            f"{where}: the draft model {draft_path} does not speak the vocabulary of the target {target_path}: {why}"
            f"\n  target: {target.describe()}\n  draft:  {draft.describe()}",
            hint="use a draft model of the target's family (the same tokenizer), or an ngram speculation type")
