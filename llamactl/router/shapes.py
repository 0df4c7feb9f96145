"""What each relayed route needs in its JSON body, checked before the request is queued or an engine loaded.

llama-server answers some client mistakes with a 500 (an uncaught JSON type error: `/tokenize` with
`content: 12`, `/detokenize` with `[-1]`, which shows `vector::_M_range_check`; `/v1/messages/count_tokens`
without `messages`; embeddings with `input: {}`), and some after loading the model or queueing behind
generation. Here each route's required fields and their types are one table, checked by one pure function;
a mistake is a 400 naming the field (`param`), what it must be, and what came. Only the shape is checked:
what a field means (a role, a template) stays the engine's to judge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamactl.names import shown

MAX_TOKEN_ID = 2**31 - 1  # an int32 llama_token; the model's vocabulary is smaller, when it is known


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) for t in value)


def _mixed_prompt(value: Any) -> bool:
    """llama.cpp's prompt: a string, token ids, or a list of strings / token ids / lists of either."""
    if isinstance(value, str) or _token_ids(value):
        return True
    if not isinstance(value, list):
        return False
    return all(isinstance(v, str) or _is_int(v) or (isinstance(v, list) and all(isinstance(x, str) or _is_int(x)
                                                                                for x in v)) for v in value)


def _objects(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


@dataclass(frozen=True)
class Field:
    names: tuple[str, ...]  # the first one present is checked (`input` or `content` for embeddings)
    ok: Callable[[Any], bool]
    must_be: str
    required: bool = True
    non_empty: bool = False


MESSAGES = Field(("messages",), _objects, "a list of message objects")
MESSAGES_NON_EMPTY = Field(("messages",), _objects, "a list of message objects", non_empty=True)
PROMPT = Field(("prompt",), _mixed_prompt, "a string, a list of token ids, or a list of strings / token ids")
EMBED_INPUT = Field(("input", "content"), _mixed_prompt,
                    "a string, a list of strings, a list of token ids, or a list of lists of token ids", non_empty=True)

SHAPES: dict[str, tuple[Field, ...]] = {
    **{p: (MESSAGES_NON_EMPTY,) for p in ("/v1/chat/completions", "/chat/completions", "/v1/messages",
                                           "/v1/messages/count_tokens")},
    **{p: (MESSAGES,) for p in ("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens",
                                "/apply-template")},
    **{p: (PROMPT,) for p in ("/v1/completions", "/completion", "/completions")},
    "/infill": (Field(("input_prefix",), lambda v: isinstance(v, str), "a string", required=False),
                Field(("input_suffix",), lambda v: isinstance(v, str), "a string", required=False),
                Field(("input_extra",), _objects, "a list of objects ({\"filename\", \"text\"})", required=False),
                Field(("prompt",), lambda v: isinstance(v, str), "a string", required=False)),
    **{p: (Field(("input",), lambda v: isinstance(v, str) or _objects(v), "a string or a list of input items"),)
       for p in ("/v1/responses", "/responses", "/v1/responses/input_tokens", "/responses/input_tokens")},
    **{p: (EMBED_INPUT,) for p in ("/v1/embeddings", "/embedding", "/embeddings")},
    **{p: (Field(("query",), lambda v: isinstance(v, str), "a string"),
           Field(("documents", "texts"), _strings, "a list of strings", non_empty=True))
       for p in ("/v1/rerank", "/rerank", "/reranking", "/v1/reranking")},
    "/tokenize": (Field(("content",), lambda v: isinstance(v, str) or _mixed_prompt(v),
                        "a string (or a list of strings and token ids)", required=False),),
    "/detokenize": (Field(("tokens",), _token_ids, "a list of token ids (whole numbers)", required=False),),
}


class ShapeError(ValueError):
    def __init__(self, path: str, field: str, message: str) -> None:
        super().__init__(message)
        self.path, self.field = path, field


def check_shape(path: str, payload: dict[str, Any], n_vocab: int | None = None) -> None:
    """Raise ShapeError naming the first field of `payload` that `path` cannot take. `n_vocab`: the size of
    the model's vocabulary where it is known (token ids must be below it)."""
    for spec in SHAPES.get(path, ()):
        name = next((n for n in spec.names if n in payload), None)
        if name is None:
            if spec.required:
                wanted = " or ".join(f"'{n}'" for n in spec.names)
                raise ShapeError(path, spec.names[0], f"{path} needs {wanted}: {spec.must_be}")
            continue
        value = payload[name]
        if not spec.ok(value):
            raise ShapeError(path, name, f"{path}: '{name}' must be {spec.must_be}, got {_kind(value)}")
        if spec.non_empty and not value:
            raise ShapeError(path, name, f"{path}: '{name}' must not be empty ({spec.must_be})")
        _check_token_ids(path, name, value, n_vocab)


def _check_token_ids(path: str, name: str, value: Any, n_vocab: int | None) -> None:
    limit = n_vocab if n_vocab else MAX_TOKEN_ID + 1
    items = value if isinstance(value, list) else [value]
    for item in items:
        for token in (item if isinstance(item, list) else [item]):
            if _is_int(token) and not 0 <= token < limit:
                within = f"the model's vocabulary has {n_vocab} tokens" if n_vocab else "token ids are 32-bit"
                raise ShapeError(path, name, f"{path}: '{name}' holds token id {shown(token)}, which no token has "
                                             f"(0 to {limit - 1}: {within})")


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    described = names.get(type(value), type(value).__name__)
    if isinstance(value, list) and value:
        inner = {names.get(type(v), type(v).__name__) for v in value[:50]}
        described += " of " + " / ".join(sorted(inner))
    return f"{described} {shown(value, 40)}"
