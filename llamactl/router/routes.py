"""Which llama-server routes the router relays, what kind of work each is, and how to read `model` from a
request body (JSON, or a multipart form for audio).

Kinds: "generate" (text comes back, measured for tokens / TTFT / tok/s / acceptance and classified),
"embed" and "rerank" (their own traffic class, for profiles with `embeddings` / `reranking`), "utility"
(tokenize, templates, token counts: short, no generation, never counted as a workload for switching).
`api` says which event format a stream uses and which error shape a client expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llamactl.names import shown

Kind = Literal["generate", "embed", "rerank", "utility"]
Api = Literal["openai", "llama", "anthropic", "responses"]


@dataclass(frozen=True)
class RouteInfo:
    path: str
    kind: Kind
    api: Api
    multipart: bool = False

    @property
    def stream_end(self) -> bytes:
        """What ends a stream in this API (the relay appends it after an in-band error)."""
        return b"data: [DONE]\n\n" if self.api == "openai" else b""

    @property
    def fixed_class(self) -> str | None:
        """The traffic class of every request on this route, or None: classify the body."""
        return {"embed": "embedding", "rerank": "rerank", "utility": "utility"}.get(self.kind)


def _routes(kind: Kind, api: Api, *paths: str, multipart: bool = False) -> dict[str, RouteInfo]:
    return {p: RouteInfo(p, kind, api, multipart) for p in paths}


# The pinned llama.cpp's POST routes (tools/server/server.cpp), by kind.
RELAYED: dict[str, RouteInfo] = {
    **_routes("generate", "openai", "/v1/chat/completions", "/chat/completions", "/v1/completions"),
    **_routes("generate", "llama", "/completion", "/completions", "/infill"),
    **_routes("generate", "responses", "/v1/responses", "/responses"),
    **_routes("generate", "anthropic", "/v1/messages"),
    **_routes("generate", "openai", "/v1/audio/transcriptions", "/audio/transcriptions", multipart=True),
    **_routes("embed", "openai", "/v1/embeddings"),
    **_routes("embed", "llama", "/embedding", "/embeddings"),
    **_routes("rerank", "llama", "/v1/rerank", "/rerank", "/reranking", "/v1/reranking"),
    **_routes("utility", "llama", "/tokenize", "/detokenize", "/apply-template"),
    **_routes("utility", "anthropic", "/v1/messages/count_tokens"),
    **_routes("utility", "openai", "/v1/chat/completions/input_tokens", "/chat/completions/input_tokens",
              "/v1/responses/input_tokens", "/responses/input_tokens"),
}
# GET routes answered by one engine, chosen by ?model= (no queue when the engine is up).
ENGINE_GETS = ("/props", "/slots")

MAX_MODEL_NAME = 256  # a longer `model` is refused: it would become a log line and an error message


MAX_BOUNDARY = 70  # RFC 2046


def multipart_field(body: bytes, content_type: str, name: str, limit: int = MAX_MODEL_NAME) -> str | None:
    """The value of one small text field of a multipart/form-data body, or None when it is absent.
    Only the part headers are inspected; the rest of the body (audio) is never copied or decoded.
    A form that cannot be read (no boundary in the Content-Type, or one the body does not use) is a
    ValueError saying so: the field is not merely absent."""
    boundary = None
    for piece in content_type.split(";")[1:]:
        key, _, value = piece.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ValueError("the Content-Type names no boundary: send 'Content-Type: multipart/form-data; "
                         "boundary=...' with the boundary the body's parts are separated by (a client library "
                         "sets it when it builds the form; do not set the header by hand)")
    if len(boundary) > MAX_BOUNDARY:
        raise ValueError(f"the multipart boundary is longer than {MAX_BOUNDARY} characters")
    delimiter = b"--" + boundary.encode("latin-1")
    if not body.startswith(delimiter) and body.find(b"\r\n" + delimiter) < 0:
        raise ValueError(f"the body does not use the boundary its Content-Type names ({shown(boundary)}): no part "
                         f"starts with '--{boundary[:MAX_BOUNDARY]}'; send the form with the boundary it was built with")
    wanted = f'name="{name}"'.encode()
    start = 0
    while True:
        at = body.find(delimiter, start)
        if at < 0:
            return None
        head_start = at + len(delimiter)
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            return None
        headers = body[head_start:head_end]
        if wanted in headers and b"filename=" not in headers:
            value_end = body.find(b"\r\n" + delimiter, head_end + 4)
            if value_end < 0:
                return None
            raw = body[head_end + 4:value_end]
            return raw[: limit + 1].decode("utf-8", "replace")
        start = head_end + 4
