"""Traffic classes: which kind of work a request is. A small pure function over the request body.

Every API's shape is read the same way: OpenAI chat and completions, Anthropic Messages (`system`, content
blocks), Responses (`input`, `instructions`, `max_output_tokens`), llama.cpp's /completion and /infill.

Order: an explicit class (header X-Llamactl-Class: one of CLASSES or the classes configured with
LLAMACTL_ROUTER_CLASSES; any other value is ignored, since every class is a metrics label) wins, then the
profile alias the client named, then
the request itself: grammar / JSON schema -> "structured"; max_tokens <= 16 -> "short"; temperature
>= 0.9 (or top_p sampling wide at temperature >= 0.7) -> "creative"; greedy-ish (temperature <= 0.3 or
top_k == 1) and a code-like prompt -> "code", greedy-ish otherwise -> "deterministic"; anything else
-> "chat". llama-server's default temperature (0.8) applies when the body has none.
"""

from __future__ import annotations

import re
from typing import Any

CLASSES = ("code", "deterministic", "structured", "short", "chat", "creative")
ENGINE_DEFAULT_TEMPERATURE = 0.8
_VALID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

_CODE_LINE = re.compile(
    r"(^\s*(def |class |import |from \S+ import|return\b|if .*:|for .*:|while .*:|#include|fn |func |"
    r"let |const |var |public |private |function\b|package |using |@\w+)|[{};]\s*$|=>|->|==|!=|\(\)|\[\]|"
    r"^\s{4,}\S|^\t+\S)"
)


def code_likeness(text: str) -> float:
    """Share of non-empty lines that look like source code; fenced blocks count fully. 0.0 .. 1.0."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    in_fence = False
    hits = 0
    for line in lines:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            hits += 1
            continue
        if in_fence or _CODE_LINE.search(line):
            hits += 1
    return hits / len(lines)


def _texts(content: Any) -> list[str]:
    """Text of a message content in any API's shape: a string, or a list of blocks / parts carrying `text`
    (OpenAI parts, Anthropic content blocks, Responses input_text items)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def prompt_text(body: dict[str, Any]) -> str:
    """The text a request asks about: chat messages (OpenAI, Anthropic with its `system`), a Responses
    `input` and `instructions`, a completion `prompt`, an infill's prefix and suffix."""
    parts: list[str] = []
    parts += _texts(body.get("system"))
    if isinstance(body.get("instructions"), str):
        parts.append(body["instructions"])
    for key in ("messages", "input"):
        items = body.get(key)
        if isinstance(items, str):
            parts.append(items)
        elif isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    parts += _texts(item.get("content"))
                elif isinstance(item, str):
                    parts.append(item)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts += [p for p in prompt if isinstance(p, str)]
    for key in ("input_prefix", "input_suffix"):
        if isinstance(body.get(key), str):
            parts.append(body[key])
    return "\n".join(parts)


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def classify(body: dict[str, Any], *, header: str | None = None, alias: str | None = None,
             extra_classes: frozenset[str] = frozenset()) -> str:
    """The traffic class of one request. `alias`: the profile alias the client named, if any (a name from the
    profiles, so bounded); `header` counts only when it names a known class."""
    if header and (header in CLASSES or header in extra_classes):
        return header
    if alias and _VALID.match(alias):
        return alias
    response_format = body.get("response_format")
    if (
        body.get("grammar")
        or body.get("json_schema")
        or (isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"))
    ):
        return "structured"
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens",
                                                  body.get("max_output_tokens", body.get("n_predict"))))
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 < max_tokens <= 16:
        return "short"
    temperature = _number(body.get("temperature"), ENGINE_DEFAULT_TEMPERATURE)
    top_p = _number(body.get("top_p"), 1.0)
    top_k = body.get("top_k")
    greedy = temperature <= 0.3 or top_k == 1
    if not greedy and (temperature >= 0.9 or (temperature >= 0.7 and top_p >= 0.98 and body.get("min_p") == 0)):
        return "creative"
    if greedy:
        return "code" if code_likeness(prompt_text(body)) >= 0.3 else "deterministic"
    return "chat"
