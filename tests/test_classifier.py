"""The traffic classifier: a pure function of the request."""

from __future__ import annotations

import pytest

from llamactl.router.classifier import classify, code_likeness, prompt_text

CODE = "def add(a, b):\n    return a + b\n\nclass Foo:\n    x = 1\n"
PROSE = "Tell me a story about a lighthouse keeper who finds a message in a bottle."


def chat(content, **kw):
    return {"messages": [{"role": "user", "content": content}], **kw}


@pytest.mark.parametrize(("body", "expected"), [
    (chat(CODE, temperature=0), "code"),
    (chat(PROSE, temperature=0), "deterministic"),
    (chat(CODE, temperature=1.2), "creative"),
    (chat(PROSE, temperature=0.95), "creative"),
    (chat(PROSE), "chat"),  # engine default temperature 0.8
    (chat(CODE, temperature=0.7, top_k=1), "code"),  # top_k 1 is greedy whatever the temperature
    (chat(PROSE, temperature=0, response_format={"type": "json_object"}), "structured"),
    ({"prompt": CODE, "grammar": "root ::= \"a\""}, "structured"),
    (chat(CODE, temperature=0, max_tokens=8), "short"),
    ({"prompt": "```python\nprint(1)\n```\nFix the bug.", "temperature": 0.1}, "code"),
    ({"prompt": ["x = 1;", "y = 2;"], "temperature": 0}, "code"),
])
def test_classify_from_the_request(body, expected):
    assert classify(body) == expected


def test_header_then_alias_win():
    body = chat(CODE, temperature=0)
    configured = frozenset({"batch-refactor", "batch"})
    assert classify(body, header="batch-refactor", extra_classes=configured) == "batch-refactor"
    assert classify(body, header="creative") == "creative"  # a built-in class
    assert classify(body, alias="poet") == "poet"
    assert classify(body, header="batch", alias="poet", extra_classes=configured) == "batch"
    assert classify(body, header="bad value with spaces") == "code"  # invalid header ignored


def test_a_class_header_a_client_makes_up_is_not_a_new_label():
    """Every class is a Prometheus label: a client-chosen name would be a new series each time, without bound."""
    body = chat(CODE, temperature=0)
    assert classify(body, header="batch-refactor") == "code"
    assert classify(body, header="x" * 60, alias="poet") == "poet"
    assert {classify(body, header=f"client-{i}") for i in range(1000)} == {"code"}


def test_code_likeness_ranges():
    assert code_likeness(CODE) > 0.6
    assert code_likeness(PROSE) == 0.0
    assert code_likeness("") == 0.0


def test_prompt_text_reads_content_parts():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]},
                         {"role": "assistant", "content": "b"}]}
    assert prompt_text(body) == "a\nb"


def test_wrong_types_do_not_crash():
    assert classify({"temperature": "hot", "max_tokens": True, "messages": "nope"}) == "chat"
