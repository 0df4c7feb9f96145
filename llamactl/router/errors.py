"""Router errors and their OpenAI-shaped HTTP form.

Every error body is {"error": {"message", "type", "code", "param", "source", ...}} where `source` says
where it came from: "llamactl" (the router itself: bad request, unknown model, queue full or timed out),
"engine" (a llama-server could not be started), "upstream" (the llama-server answered with an error or
broke the connection).
"""

from __future__ import annotations

import json
from typing import Any

from llamactl.errors import LlamactlError


class RouterError(LlamactlError):
    status = 500
    type = "server_error"
    code = "internal_error"
    source = "llamactl"

    def __init__(self, message: str, *, hint: str | None = None, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, hint=hint)
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(str(self.message), self.type, self.code, self.source, hint=self.hint, **self.extra)


class BadRequest(RouterError):
    status, type, code = 400, "invalid_request_error", "bad_request"


class BodyTooLarge(RouterError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class Forbidden(RouterError):
    status, type, code = 403, "permission_error", "forbidden"


class ModelNotFound(RouterError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class QueueFull(RouterError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class QueueTimeout(RouterError):
    status, type, code = 503, "server_error", "queue_timeout"


class EngineUnavailable(RouterError):
    """The profile's llama-server could not be started (or died and could not be restarted)."""

    status, type, code, source = 503, "server_error", "engine_unavailable", "engine"


class RouteNotServed(RouterError):
    """The engine behind a profile has no such route (an older or forked llama-server)."""

    status, type, code = 501, "not_supported_error", "route_not_served"


class UpstreamError(RouterError):
    status, type, code, source = 502, "upstream_error", "upstream_error", "upstream"


def error_body(message: str, type_: str, code: str | int, source: str, *, hint: str | None = None,
               **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": type_, "code": code, "param": None, "source": source}
    if hint:
        error["hint"] = hint
    error.update(extra)
    return {"error": error}


def upstream_error_body(status: int, raw: bytes, profile: str) -> dict[str, Any]:
    """Wrap a llama-server error answer, keeping its message and type, adding source and profile."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    inner = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(inner, dict):
        message = str(inner.get("message", raw[:500].decode("utf-8", "replace")))
        type_ = str(inner.get("type", "upstream_error"))
    else:
        message = raw[:500].decode("utf-8", "replace") or f"HTTP {status}"
        type_ = "upstream_error"
    return error_body(f"llama-server ({profile}) answered {status}: {message}", type_, status, "upstream",
                      profile=profile)
