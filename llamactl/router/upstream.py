"""A small HTTP/1.1 client for the engines behind the router: keep-alive pool, one write per request,
responses parsed by httptools (C), body pieces handed over as they arrive (chunked or sized).

Why not httpx: on the relay's hot path httpx cost more than everything else the router does (URL
objects, cookie extraction, layers of transports); the engines are always llama-server on loopback
speaking plain HTTP/1.1, which is all this needs to speak.

Closing a response before its body is complete closes the connection: that is how a client's
disconnect cancels the engine's generation.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools


WRITE_SLICE_BYTES = 256 * 1024
# A request body: one buffer, or pieces sent one after the other (router/body_fields.py adds fields so).
Body = bytes | bytearray | tuple[bytes | bytearray | memoryview, ...]


def body_length(body: Body) -> int:
    return sum(len(piece) for piece in body) if isinstance(body, tuple) else len(body)


class UpstreamConnectError(Exception):
    """The engine refused the connection (not running, restarting)."""


class UpstreamBroken(Exception):
    """The engine closed the connection or sent something that is not HTTP, mid-response."""


class UpstreamTimeout(Exception):
    pass


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """Status and headers are read; the body is read by aiter_body() / read()."""

    def __init__(self, pool: "UpstreamPool", key: tuple[str, int], conn: _Conn, read_timeout_s: float,
                 method: str = "GET") -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self._head = method == "HEAD"
        self._timeout = read_timeout_s
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: deque[bytes] = deque()
        self._headers_done = False
        self._complete = False
        self._closed = False
        self._got_bytes = False
        self._keep_alive = False
        self.status = 0
        self.headers: dict[str, str] = {}

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self.status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()  # only meaningful while parsing this message
        if self._head or self.status in (204, 304) or 100 <= self.status < 200:
            # No body follows, whatever Content-Length says (the parser does not know the request was HEAD);
            # the connection is not reused, since the parser would wait for that body on the next answer.
            self._complete = True
            self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    async def _feed_once(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._conn.reader.read(65536)
        except TimeoutError:
            raise UpstreamTimeout(f"no data from the engine for {self._timeout:g}s") from None
        except (ConnectionError, OSError) as e:
            raise UpstreamBroken(f"connection to the engine failed: {e}") from None
        if not data:
            if self._headers_done and not self._complete and "content-length" not in self.headers \
                    and "transfer-encoding" not in self.headers:
                self._complete = True  # body delimited by connection close
                return
            raise UpstreamBroken("the engine closed the connection before the response was complete")
        self._got_bytes = True
        if self._complete:
            return  # after a body-less answer (HEAD): nothing more belongs to it
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self._complete or (self._head and self._headers_done):
                # The answer is whole; what came after it (an engine that answered an oversized request with
                # "Connection: close" and then kept writing) is not ours to relay.
                self._keep_alive = False
                return
            raise UpstreamBroken(f"the engine sent an invalid HTTP response: {e}") from None

    async def _read_headers(self) -> None:
        while not self._headers_done:
            await self._feed_once()

    async def aiter_body(self) -> AsyncIterator[bytes]:
        """Body pieces as they arrive (several pieces that arrived together come as one)."""
        while True:
            if self._chunks:
                piece = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                yield piece
                continue
            if self._complete:
                return
            await self._feed_once()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_body()])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._complete and not self._chunks and self._keep_alive:
            self._pool._release(self._key, self._conn)
        else:
            self._conn.close()  # an unfinished response: closing cancels it on the engine


class UpstreamPool:
    def __init__(self, *, connect_timeout_s: float = 10.0, read_timeout_s: float = 600.0,
                 max_idle_per_host: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(*key)
        except TimeoutError:
            raise UpstreamConnectError(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as e:
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: {e.strerror or e}") from None
        return _Conn(reader, writer)

    def _release(self, key: tuple[str, int], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if conn.usable() and len(idle) < self.max_idle_per_host:
            idle.append(conn)
        else:
            conn.close()

    async def _send(self, conn: _Conn, head: bytes, body: Body) -> None:
        """The request, without copying a large body: written a slice at a time, each once the transport has
        room (its buffer would otherwise take a copy of whatever the socket did not accept at once)."""
        pieces = body if isinstance(body, tuple) else (body,)
        if body_length(body) <= WRITE_SLICE_BYTES:
            conn.writer.write(b"".join((head, *pieces)))
            return
        conn.writer.write(head)
        try:
            async with asyncio.timeout(self.read_timeout_s):
                for piece in pieces:
                    with memoryview(piece) as view:
                        for at in range(0, len(view), WRITE_SLICE_BYTES):
                            conn.writer.write(view[at:at + WRITE_SLICE_BYTES])
                            await conn.writer.drain()
        except TimeoutError:
            raise UpstreamTimeout(f"the engine took no data for {self.read_timeout_s:g}s") from None
        except (ConnectionError, OSError) as e:
            raise UpstreamBroken(f"connection to the engine failed while sending the body: {e}") from None

    async def request(self, base_url: str, method: str, path: str, headers: dict[str, str],
                      body: Body) -> UpstreamResponse:
        split = urlsplit(base_url)
        key = (split.hostname or "127.0.0.1", split.port or 80)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {key[0]}:{key[1]}", f"Content-Length: {body_length(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.usable():
                conn.close()
                continue
            response = UpstreamResponse(self, key, conn, self.read_timeout_s, method)
            try:
                await self._send(conn, head, body)
                await response._read_headers()
                return response
            except UpstreamBroken:
                conn.close()
                if response._got_bytes:
                    raise
                # a kept-alive connection the engine had already closed: try another / a new one
            except BaseException:
                conn.close()
                raise
        conn = await self._connect(key)
        response = UpstreamResponse(self, key, conn, self.read_timeout_s, method)
        try:
            await self._send(conn, head, body)
            await response._read_headers()
        except BaseException:
            conn.close()
            raise
        return response

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
