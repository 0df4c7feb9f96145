"""The pure pieces behind the new routes: multipart `model`, telemetry from answers without parsing them
whole, every API's shape in the classifier, the routing settings, the profile keys for embeddings and
reranking and their flags, the binary route probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamactl.engines.capabilities import parse_capabilities
from llamactl.engines.common import LaunchInputs
from llamactl.engines import mainline
from llamactl.engines.routes import probe_routes, routes_in
from llamactl.errors import ConfigError, ProfileError, UnsupportedFlag
from llamactl.profiles import parse_profile
from llamactl.router.classifier import classify, prompt_text
from llamactl.router.config_from_settings import routing_from_settings
from llamactl.router.routes import multipart_field
from llamactl.router.telemetry import Sample, SSEScanner, scan_body
from llamactl.settings import Settings


def sample() -> Sample:
    return Sample(lane="l", profile="p", role="plain", cls="chat", endpoint="/x", status=200)


def test_multipart_model_field_is_found_without_touching_the_file_part():
    body = (b'--b0\r\nContent-Disposition: form-data; name="file"; filename="model.wav"\r\n\r\n'
            b'name="model"\r\n\r\nnot this\r\n'
            b'--b0\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--b0--\r\n')
    assert multipart_field(body, 'multipart/form-data; boundary="b0"', "model") == "whisper"
    assert multipart_field(body, "multipart/form-data; boundary=b0", "language") is None
    with pytest.raises(ValueError, match="names no boundary"):
        multipart_field(body, "multipart/form-data", "model")
    with pytest.raises(ValueError, match="does not use the boundary"):
        multipart_field(body, "multipart/form-data; boundary=other", "model")
    huge = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + b"m" * 10_000 + b"\r\n--b--\r\n"
    assert len(multipart_field(huge, "multipart/form-data; boundary=b", "model")) == 257  # bounded


def test_scan_body_reads_timings_and_usage_after_the_text_only():
    text = 'he said \\"usage\\": {\\"completion_tokens\\": 999}'
    raw = json.dumps({"choices": [{"message": {"content": text}}], "timings": {"predicted_n": 7,
                      "predicted_per_second": 50.0, "draft_n": 4, "draft_n_accepted": 3},
                      "usage": {"completion_tokens": 7, "prompt_tokens": 5}}).encode()
    s = sample()
    scan_body(s, raw)
    assert (s.completion_tokens, s.prompt_tokens, s.gen_tok_s, s.draft_n, s.draft_accepted) == (7, 5, 50.0, 4, 3)
    s = sample()  # the escaped key inside the content is not taken for the real one
    scan_body(s, json.dumps({"content": text}).encode())
    assert s.completion_tokens is None
    s = sample()  # Anthropic: input = uncached + cache read
    scan_body(s, json.dumps({"type": "message", "usage": {"cache_read_input_tokens": 2, "input_tokens": 3,
                                                           "output_tokens": 4}}).encode())
    assert (s.prompt_tokens, s.completion_tokens) == (5, 4)
    s = sample()  # an embeddings answer: only the usage at its end is decoded
    embedding = {"data": [{"embedding": [0.5] * 50_000}], "usage": {"prompt_tokens": 9, "total_tokens": 9}}
    scan_body(s, json.dumps(embedding).encode())
    assert s.prompt_tokens == 9
    scan_body(sample(), b'{"usage": {"prompt_tokens": ')  # truncated: ignored, no exception


def test_stream_usage_last_one_wins_and_responses_completed_is_read():
    s = sample()
    scanner = SSEScanner(s)
    scanner.feed(b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":3,'
                 b'"output_tokens":0}},"usage":{"input_tokens":3,"output_tokens":0}}\n\n')
    scanner.feed(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":12}}\n\n')
    assert s.completion_tokens == 12
    s = sample()
    scanner = SSEScanner(s)
    scanner.feed(b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
                 b'{"input_tokens":4,"output_tokens":6}},"timings":{"predicted_n":6,"draft_n":5,"draft_n_accepted":2}}\n\n')
    assert (s.completion_tokens, s.draft_n, s.draft_accepted, s.prompt_tokens) == (6, 5, 2, 4)


CODE = "def add(a, b):\n    return a + b\n\nfor x in y:\n    print(x)\n"


@pytest.mark.parametrize("body", [
    {"system": "Be brief.", "messages": [{"role": "user", "content": [{"type": "text", "text": CODE}]}]},
    {"instructions": "Edit.", "input": [{"role": "user", "content": [{"type": "input_text", "text": CODE}]}]},
    {"input": CODE},
    {"input_prefix": CODE, "input_suffix": "\n"},
])
def test_classifier_reads_every_apis_shape(body):
    assert CODE in prompt_text(body)
    assert classify({**body, "temperature": 0}) == "code"


def test_classifier_short_for_responses_max_output_tokens():
    assert classify({"input": "hi", "max_output_tokens": 8}) == "short"


def test_routing_settings_parse_and_refuse_bad_entries(home):
    routing = routing_from_settings(Settings(model_map="claude-haiku-*=fast, claude-*=coding", default_model="chat",
                                             route_default_models="/infill=coder"))
    assert routing.model_map == (("claude-haiku-*", "fast"), ("claude-*", "coding"))
    assert routing.default_model == "chat" and dict(routing.route_defaults) == {"/infill": "coder"}
    with pytest.raises(ConfigError, match="'claude-\\*' is not NAME=PROFILE"):
        routing_from_settings(Settings(model_map="claude-*"))
    with pytest.raises(ConfigError, match="no relayed route /infil"):
        routing_from_settings(Settings(route_default_models="/infil=coder"))


def test_embedding_profile_keys_are_checked():
    assert parse_profile("e", {"model": "/m.gguf", "embeddings": True, "pooling": "cls"}, None).pooling == "cls"
    with pytest.raises(ProfileError, match="pooling = 'mean' applies to embeddings"):
        parse_profile("e", {"model": "/m.gguf", "pooling": "mean"}, None)
    with pytest.raises(ProfileError, match="remove `group`"):
        parse_profile("e", {"model": "/m.gguf", "embeddings": True, "group": "g"}, None)
    with pytest.raises(ProfileError, match="speculation has nothing to speed up"):
        parse_profile("r", {"model": "/m.gguf", "reranking": True, "speculation": {"type": "ngram-mod"}}, None)


HELP = """-m, --model FNAME
-a, --alias STRING
--host HOST
--port PORT
-c, --ctx-size N
-ctk, --cache-type-k TYPE
-ctv, --cache-type-v TYPE
-fa, --flash-attn [on|off|auto]
--embedding, --embeddings   restrict to only support embedding use case
--pooling {none,mean,cls,last,rank}   pooling type for embeddings
"""


def test_embedding_flags_are_spelled_for_the_binary_and_refused_when_missing():
    caps = parse_capabilities("llama-server", HELP, "version: 1")
    inputs = LaunchInputs(binary=Path("llama-server"), model_path=Path("/m.gguf"), port=1)
    profile = parse_profile("e", {"model": "/m.gguf", "embeddings": True, "pooling": "mean"}, None)
    argv = mainline.build_argv(profile, caps, inputs)
    assert "--embeddings" in argv and argv[argv.index("--pooling") + 1] == "mean"
    reranker = parse_profile("r", {"model": "/m.gguf", "reranking": True}, None)
    with pytest.raises(UnsupportedFlag, match="sets reranking, which needs --reranking / --rerank"):
        mainline.build_argv(reranker, caps, inputs)


def test_route_probe_reads_literals_and_ignores_files_that_are_not_a_server(tmp_path):
    assert routes_in(b"\0/health\0/v1/messages\0/v1/responses\0", ["/v1/messages", "/infill", "/responses"]) == \
        {"/v1/messages", "/responses"}  # a tail of a longer literal counts: "served" may be wrong, "missing" not
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"\x7fELF....\0/health\0/tokenize\0")
    assert probe_routes(binary, tmp_path / "cache", ["/tokenize", "/infill"]) == {"/tokenize"}
    binary.write_bytes(b"\x7fELF....\0/health\0/tokenize\0/infill\0")  # a new build: new mtime / size
    assert probe_routes(binary, tmp_path / "cache", ["/tokenize", "/infill"]) == {"/tokenize", "/infill"}
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text("#!/bin/sh\nexec llama-server \"$@\"\n")
    assert probe_routes(wrapper, tmp_path / "cache", ["/tokenize"]) is None
    assert probe_routes(tmp_path / "missing", tmp_path / "cache", ["/tokenize"]) is None
