"""Requests that reach one engine outside the lanes' queues: GET /props and /slots by ?model=, and
/upstream/PROFILE/ANY PATH (any method: the engine's web UI, /lora-adapters, /slots/N actions, ...).

The profile is loaded on demand (through its lane, like any request); a running engine is reached at
once, so monitoring never waits behind generation. The router's own auth applies (the middleware runs
before these); the client's credentials are dropped and the engine's per-start key is added here, never
shown to the client.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from llamactl.errors import LlamactlError
from llamactl.router.asgi import read_body, send_error, while_connected
from llamactl.router.errors import BadRequest, EngineUnavailable, Forbidden, ModelNotFound, RouterError, UpstreamError
from llamactl.router.upstream import UpstreamBroken, UpstreamConnectError, UpstreamTimeout

if TYPE_CHECKING:
    from llamactl.router.app import Router

# Not forwarded either way: per-connection headers, and the client's own credentials for the router.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                        "proxy-authorization", "proxy-authenticate", "host", "content-length"})
CLIENT_CREDENTIALS = frozenset({"authorization", "x-api-key", "cookie"})


async def _relay(router: "Router", profile: str, method: str, target: str, scope: Scope, receive: Receive,
                 send: Send) -> None:
    """Send one request to `profile`'s engine and stream its answer back, headers and status as they are."""
    try:
        body = await read_body(receive, router.config.max_body_bytes)
        upstream = await router.upstream_for(profile)
    except RouterError as e:
        await send_error(send, e)
        return
    except LlamactlError as e:
        await send_error(send, EngineUnavailable(str(e), extra={"profile": profile}))
        return
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
               if k.decode("latin-1").lower() not in HOP_BY_HOP | CLIENT_CREDENTIALS}
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    assert router.pool is not None, "Router.running() is not active"

    async def relay() -> None:
        try:
            response = await router.pool.request(upstream.base_url, method, target, headers, body)
        except (UpstreamConnectError, UpstreamBroken, UpstreamTimeout) as e:
            await send_error(send, UpstreamError(f"llama-server for '{profile}' did not answer: {e}",
                                                 extra={"profile": profile}))
            return
        try:
            out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
                   if relayed_response_header(k)]
            out.append((b"x-llamactl-profile", profile.encode()))
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.aiter_body():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (UpstreamBroken, UpstreamTimeout):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    await while_connected(receive, relay())


def relayed_response_header(name: str) -> bool:
    """Whether an engine's response header reaches the client. Not its CORS headers: llama-server echoes any
    Origin with Allow-Credentials, and which pages may read the router's answers is the router's to say
    (web_guard, LLAMACTL_ALLOWED_ORIGINS), never with credentials."""
    return (name not in HOP_BY_HOP or name == "content-length") and not name.startswith("access-control-")


def upstream_target(raw_path: bytes, profile: str) -> bytes | None:
    """The engine's path for /upstream/PROFILE/REST, taken from the raw (still encoded) request path, so REST
    reaches the engine as the client wrote it; None when the raw segment is not PROFILE (encoded otherwise
    than a name can be, e.g. an encoded '/')."""
    prefix = b"/upstream/"
    if not raw_path.startswith(prefix):
        return None
    segment, slash, rest = raw_path[len(prefix):].partition(b"/")
    if unquote(segment.decode("latin-1")) != profile:
        return None
    return b"/" + rest


def slot_action(method: str, target: str) -> bool:
    """Whether a request is a slot action (POST /slots/ID?action=save|restore|erase): those write and read files in
    the engine's slot directory, which is llamactl's prompt cache, so no client may send one. The path is read as
    the engine would (percent-decoded, repeated slashes and dot segments folded)."""
    if method.upper() in ("GET", "HEAD", "OPTIONS"):
        return False
    path = posixpath.normpath("/" + unquote(target.split("?", 1)[0]))
    path = "/" + path.lstrip("/")
    return path == "/slots" or path.startswith("/slots/")


class Passthrough:
    """/upstream/PROFILE/REST -> PROFILE's engine, REST (with the query string) as the path."""

    def __init__(self, router: "Router") -> None:
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        profile = scope["path_params"]["profile"]
        if profile not in self.router.catalog.profiles:
            names = sorted(self.router.catalog.profiles)
            shown = profile if len(profile) <= 80 else profile[:80] + "..."
            await send_error(send, ModelNotFound(f"no profile '{shown}' behind /upstream/; profiles: {', '.join(names)}",
                                                 extra={"valid_profiles": names}))
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        found = upstream_target(raw_path.split(b"?", 1)[0], profile)
        if found is None:
            await send_error(send, BadRequest(f"/upstream/{profile}/...: the profile's name is spelled with escapes "
                                              "that do not decode to it; send /upstream/PROFILE/PATH"))
            return
        target = found.decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        if slot_action(scope["method"], target):
            await send_error(send, Forbidden(
                "slot actions (POST /slots/ID?action=save|restore|erase) are not forwarded: the engine's slot files "
                "are llamactl's prompt cache", hint="llamactl saves long prompts' slots before it stops an engine and "
                "restores them after; [cache] persist in the profile turns that on or off"))
            return
        await _relay(self.router, profile, scope["method"], target, scope, receive, send)


class EngineGet:
    """GET /props or /slots of the engine `?model=` names (the default rules when it names none)."""

    def __init__(self, router: "Router", path: str) -> None:
        self.router, self.path = router, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            route = self.router.catalog.resolve((query.get("model") or [None])[0], self.path)
        except RouterError as e:
            await send_error(send, e)
            return
        profile = route.profile or self.router.lanes[route.lane].active
        target = self.path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        await _relay(self.router, profile, "GET", target, scope, receive, send)


async def redirect_to_slash(request: Request) -> Response:
    """The engine's web UI loads its assets relative to the page: /upstream/P must be /upstream/P/."""
    return RedirectResponse(request.url.path + "/", status_code=307)
