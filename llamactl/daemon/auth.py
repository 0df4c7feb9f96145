"""Who may talk to the router: API keys, a refusal to bind beyond loopback without them, body limits.

- Keys come from settings: LLAMACTL_API_KEYS (comma-separated) and/or LLAMACTL_API_KEY_FILE (one key per
  line, `#` comments; the file must not be readable by group/others). Compared in constant time.
- A client presents one as "Authorization: Bearer K" or "X-Api-Key: K" (what llama-server and the
  openai clients send). /health stays open so load balancers and systemd checks need no key.
- `ApiKeyMiddleware` and `BodyLimitMiddleware` are plain ASGI classes; pass them to Starlette as
  `Middleware(ApiKeyMiddleware, keys=...)`. Errors have the OpenAI shape.
- Each child llama-server gets its own random key (`new_child_key`), known only to llamactl, and listens
  on 127.0.0.1, so nothing on the machine can reach a child behind the router's back.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Awaitable, Callable

from llamactl.router.asgi import send_json
from llamactl.router.errors import error_body
from llamactl.errors import ConfigError
from llamactl.settings import Settings

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/v1/health"})
MIN_KEY_LENGTH = 16


def new_child_key() -> str:
    """A fresh random key for one start of one child (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def load_keys(settings: Settings) -> tuple[str, ...]:
    """Every accepted key, from LLAMACTL_API_KEYS and LLAMACTL_API_KEY_FILE. Empty: no keys configured."""
    keys = [k.strip() for k in settings.api_keys.split(",") if k.strip()]
    if settings.api_key_file is not None:
        keys += _read_key_file(Path(settings.api_key_file).expanduser())
    for key in keys:
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(f"an API key is shorter than {MIN_KEY_LENGTH} characters",
                              hint="generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return tuple(dict.fromkeys(keys))


def _read_key_file(path: Path) -> list[str]:
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the API key file {path} (LLAMACTL_API_KEY_FILE): {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the API key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o})",
                          hint=f"chmod 600 {path}")
    keys = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [k for k in keys if k]


def presented_key(headers: Mapping[str, str] | Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request carries: "Authorization: Bearer K" first, then "X-Api-Key: K"."""
    if isinstance(headers, Mapping):
        items = [(k.lower(), v) for k, v in headers.items()]
    else:
        items = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]
    for name, value in items:
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    for name, value in items:
        if name == "x-api-key" and value.strip():
            return value.strip()
    return None


def key_ok(presented: str | None, keys: Iterable[str]) -> bool:
    """Constant-time check against every key (no early exit, so timing says nothing about which)."""
    if presented is None:
        return False
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: could resolve to anything


def check_bind(host: str, keys: Iterable[str], allow_insecure: bool) -> None:
    """Refuse to listen beyond loopback without API keys, unless explicitly allowed."""
    if is_loopback(host) or any(True for _ in keys) or allow_insecure:
        return
    raise ConfigError(
        f"refusing to serve on {host} without API keys: anyone who can reach it could use the GPUs",
        hint="set LLAMACTL_API_KEYS (or LLAMACTL_API_KEY_FILE), bind 127.0.0.1, or set "
             "LLAMACTL_ALLOW_INSECURE_BIND=1 if something in front already authenticates")


async def send_error(send: Send, status: int, message: str, code: str,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An error response from a middleware (before any route runs), in the router's own error shape."""
    await send_json(send, status, error_body(message, "invalid_request_error", code, "llamactl"),
                    {k.decode("latin-1"): v.decode("latin-1") for k, v in headers})


class ApiKeyMiddleware:
    """401 for any HTTP request without a valid key, except OPTIONS preflights and `open_paths`."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = tuple(keys)
        self.open_paths = frozenset(open_paths)
        if not self.keys:
            raise ValueError("ApiKeyMiddleware needs at least one key (leave it out when there are none)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope.get("headers", []))
        if key_ok(presented, self.keys):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if presented else
                   "Missing API key: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.")
        await send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`, by Content-Length or by counting a chunked body.

    The body is read (up to the limit) before the app runs, so the app never sees a partial body and
    a refusal never collides with a response already started. Request bodies for an LLM API are JSON
    documents the router parses whole anyway.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, 400, "bad Content-Length", "bad_request")
                    return
                if declared > self.max_bytes:
                    await self._too_large(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a server would

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await send_error(send, 413, f"request body is larger than {self.max_bytes} bytes", "request_too_large")


def middleware(settings: Settings, keys: tuple[str, ...] | None = None, *,
               bound_host: str | None = None) -> list[Any]:
    """The Starlette middleware list for `create_app(router, middleware=...)`, outermost first: keys (when
    configured: an unauthenticated request learns nothing more), the web guard (Host, Origin, Content-Type:
    llamactl/daemon/web_guard.py), the body limit. `bound_host` is the address the daemon listens on
    (default: LLAMACTL_ROUTER_HOST)."""
    from starlette.middleware import Middleware

    from llamactl.daemon.web_guard import WebGuardMiddleware, comma_list

    from llamactl.router.dashboard import UI_PAGES, UI_PATHS  # the page's own files hold no data

    keys = load_keys(settings) if keys is None else keys
    stack = [Middleware(WebGuardMiddleware, bound_host=bound_host or settings.router_host,
                        allowed_hosts=comma_list(settings.allowed_hosts),
                        allowed_origins=comma_list(settings.allowed_origins), page_paths=UI_PAGES),
             Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)]
    if keys:
        stack.insert(0, Middleware(ApiKeyMiddleware, keys=keys, open_paths=OPEN_PATHS | UI_PATHS))  # reject unauthenticated before reading bodies
    return stack
