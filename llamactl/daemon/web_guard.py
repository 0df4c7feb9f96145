"""Web pages must not drive a local llamactl: an ASGI middleware in front of every route (auth.middleware).

A page the user visits can send requests to 127.0.0.1 (simple requests need no CORS preflight), and after
DNS rebinding (evil.example resolving to 127.0.0.1) it can read the answers too. Three checks stop both:

- Host: a loopback name (localhost, *.localhost) or address, the address the daemon is bound to (any local
  interface address when bound to 0.0.0.0 / ::), or a name in LLAMACTL_ALLOWED_HOSTS. A rebound name is
  none of these, so it gets 421.
- Origin: a browser request from another origin is refused (403) unless the origin is in
  LLAMACTL_ALLOWED_ORIGINS; then it gets CORS headers (never Allow-Credentials). Same-origin requests (the
  daemon's own pages, e.g. the dashboard) pass. A request from another site without an Origin (a link, an
  iframe, an image: `Sec-Fetch-Site: cross-site` or `same-site`, or a foreign Referer) is refused too, whatever
  its method or mode: a GET can load an engine (/upstream, /props?model=) or hold a stream open (events). The
  one exception is a top-level navigation to the dashboard's page (/ui), which holds no data.
- Content-Type: a request with a body must say application/json (or */*+json), so a cross-site
  `text/plain` form post never parses as JSON (415). multipart/form-data is accepted on the audio
  transcription routes, which llama-server defines that way.

Clients that are not browsers (curl, the openai SDK) send Host = the address they connect to and no
Origin, so they are unaffected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

from llamactl.daemon.auth import ASGIApp, Message, Receive, Scope, Send, is_loopback, send_error
from llamactl.names import shown

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MULTIPART_PATH_SUFFIXES = ("/audio/transcriptions",)
CORS_ALLOW_HEADERS = b"authorization, content-type, x-api-key, x-llamactl-class"
CORS_ALLOW_METHODS = b"GET, POST, OPTIONS"


def split_host(host_header: str) -> tuple[str, int | None]:
    """'Example.COM:8080' -> ('example.com', 8080); '[::1]:80' -> ('::1', 80). A bad port gives -1."""
    host, port = host_header.strip(), None
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        host, port_text = name, rest[1:] if rest.startswith(":") else None
    elif host.count(":") == 1:
        host, port_text = host.split(":")
    else:
        port_text = None
    if port_text is not None:
        port = int(port_text) if port_text.isdigit() and len(port_text) <= 5 else -1
    return host.lower().rstrip("."), port


def split_origin(origin: str) -> tuple[str, str, int | None] | None:
    """'http://127.0.0.1:8080' -> ('http', '127.0.0.1', 8080); None for 'null' or anything malformed."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest:
        return None
    host, port = split_host(rest)
    if port is None:
        port = 443 if scheme.lower() == "https" else 80
    return scheme.lower(), host, port


def local_addresses() -> frozenset[str]:
    """Every address of this machine's interfaces (for a daemon bound to 0.0.0.0 or ::)."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            text = address.address.split("%", 1)[0]
            try:
                found.add(str(ipaddress.ip_address(text)))
            except ValueError:
                continue  # a MAC address
    return frozenset(found)


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def comma_list(value: str) -> frozenset[str]:
    return frozenset(part.strip().lower().rstrip("/") for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Verdict:
    """What the guard decides about one request: let it through (status None, with CORS headers for an
    allowed origin), answer a preflight (204), or refuse it (status, a sentence, an error code)."""
    status: int | None = None
    message: str = ""
    code: str = ""
    cors_origin: str | None = None

    @property
    def refused(self) -> bool:
        return self.status is not None and self.status >= 400


@dataclass(frozen=True)
class GuardPolicy:
    """Which Host names and browser origins the daemon answers (from the settings and its bound address)."""
    bound_addresses: frozenset[str]
    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    page_paths: frozenset[str] = frozenset()  # the dashboard's page: the one thing another site may link to

    def host_allowed(self, host: str) -> bool:
        if "*" in self.allowed_hosts or host in self.allowed_hosts:
            return True
        if is_loopback(host) or host.endswith(".localhost"):
            return True
        return (_ip(host) or host) in self.bound_addresses

    def origin_allowed(self, origin: str) -> bool:
        return origin.strip().lower().rstrip("/") in self.allowed_origins


CROSS_SITE = frozenset({"cross-site", "same-site"})


def verdict(policy: GuardPolicy, method: str, path: str, headers: Mapping[str, str]) -> Verdict:
    """The guard's decision for one request (pure: `headers` has lower-case names, first value of each).

    A request from another site, of any method or mode, is refused (so no page can load, switch, evict or
    hold a stream open), unless its Origin is configured; the only exception is a top-level navigation
    (a link, typed or followed) to the dashboard's own page, which holds no data and acts only on the
    user's clicks. "From another site" is what the browser says: Origin when it sends one, else
    Sec-Fetch-Site, else (browsers without Fetch Metadata) a Referer from another origin."""
    host_header = headers.get("host")
    if host_header is not None and not policy.host_allowed(split_host(host_header)[0]):
        return Verdict(421, f"Host {shown(host_header)} is not served here (a web page after DNS rebinding, or a "
                       "name llamactl was not told about); use 127.0.0.1, or add the name to LLAMACTL_ALLOWED_HOSTS",
                       "host_not_allowed")
    origin = headers.get("origin")
    cors_origin = None
    if origin is not None and not same_origin(origin, host_header):
        if not policy.origin_allowed(origin):
            return Verdict(403, f"cross-origin request from {shown(origin)} refused; a web page may not use "
                           "llamactl unless its origin is in LLAMACTL_ALLOWED_ORIGINS", "origin_not_allowed")
        cors_origin = origin.strip()
    elif origin is None and _from_another_site(headers, host_header) and not _page_navigation(
            policy, method, path, headers):
        return Verdict(403, f"{method} {shown(path)} from another site refused (the browser says Sec-Fetch-Site: "
                       f"{shown(headers.get('sec-fetch-site', 'cross-site (Referer)'))}); a web page may not use "
                       "llamactl unless its origin is in LLAMACTL_ALLOWED_ORIGINS; only the dashboard's page "
                       "(/ui) may be opened from a link", "origin_not_allowed")
    if method == "OPTIONS" and cors_origin is not None and "access-control-request-method" in headers:
        return Verdict(204, cors_origin=cors_origin)
    if method in BODY_METHODS and _has_body(headers) and not _content_type_ok(headers, path):
        got = headers.get("content-type")
        takes = ("a multipart/form-data body (the audio file and its fields): send 'Content-Type: "
                 "multipart/form-data; boundary=...'" if path.endswith(MULTIPART_PATH_SUFFIXES) else
                 "a JSON body: send 'Content-Type: application/json'")
        return Verdict(415, f"{shown(path)} takes {takes} (got {shown(got) if got is not None else 'no Content-Type'})",
                       "unsupported_media_type")
    return Verdict(cors_origin=cors_origin)


def _from_another_site(headers: Mapping[str, str], host_header: str | None) -> bool:
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() in CROSS_SITE
    referer = headers.get("referer")
    if referer is None:
        return False
    scheme, sep, rest = referer.strip().partition("://")
    return not same_origin(f"{scheme}://{rest.split('/', 1)[0]}" if sep else referer, host_header)


def _page_navigation(policy: GuardPolicy, method: str, path: str, headers: Mapping[str, str]) -> bool:
    return (method in ("GET", "HEAD") and path in policy.page_paths
            and headers.get("sec-fetch-mode", "navigate") == "navigate"
            and headers.get("sec-fetch-dest", "document") == "document")


def same_origin(origin: str, host_header: str | None) -> bool:
    parsed = split_origin(origin)
    if parsed is None or host_header is None:
        return False
    scheme, host, port = parsed
    own_host, own_port = split_host(host_header)
    if own_port is None:
        own_port = 443 if scheme == "https" else 80
    return (host, port) == (own_host, own_port)


class WebGuardMiddleware:
    def __init__(self, app: ASGIApp, *, bound_host: str, allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = (), page_paths: Iterable[str] = ()) -> None:
        self.app = app
        bound = _ip(bound_host.strip("[]"))
        if bound is not None and ipaddress.ip_address(bound).is_unspecified:
            bound_addresses = local_addresses()
        else:
            bound_addresses = frozenset({bound or bound_host.lower()})
        self.policy = GuardPolicy(bound_addresses, frozenset(h.lower().rstrip(".") for h in allowed_hosts),
                                  frozenset(o.lower().rstrip("/") for o in allowed_origins), frozenset(page_paths))

    def host_allowed(self, host: str) -> bool:
        return self.policy.host_allowed(host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        decided = verdict(self.policy, scope["method"], scope["path"], headers)
        if decided.refused:
            await send_error(send, decided.status, decided.message, decided.code)
            return
        cors_origin = decided.cors_origin
        if decided.status == 204 and cors_origin is not None:
            await send({"type": "http.response.start", "status": 204, "headers": [
                *self._cors_headers(cors_origin), (b"access-control-allow-methods", CORS_ALLOW_METHODS),
                (b"access-control-allow-headers", CORS_ALLOW_HEADERS), (b"access-control-max-age", b"600")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if cors_origin is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self._cors_headers(cors_origin)]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


def _has_body(headers: dict[str, str]) -> bool:
    length = headers.get("content-length")
    if length is not None:
        return length.strip() != "0"
    return "transfer-encoding" in headers


def _content_type_ok(headers: dict[str, str], path: str) -> bool:
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return True
    return media == "multipart/form-data" and path.endswith(MULTIPART_PATH_SUFFIXES)
