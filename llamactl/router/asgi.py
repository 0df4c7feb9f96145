"""Small raw-ASGI helpers the router's endpoints share: JSON answers, router errors, a bounded body read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any

from starlette.types import Receive, Send

from llamactl.router.errors import BadRequest, BodyTooLarge, RouterError


async def send_json(send: Send, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: RouterError, *, anthropic: bool = False) -> None:
    """The error in the OpenAI shape; for Anthropic routes also with the top-level "type": "error" that
    Anthropic clients look for (the same object otherwise)."""
    body = error.body()
    if anthropic:
        body = {"type": "error", **body}
    await send_json(send, error.status, body, {"x-llamactl-error-source": error.source, **error.headers})


async def read_body(receive: Receive, max_bytes: int) -> bytes | bytearray:
    """The whole body. A body that comes in one message (the daemon's body-limit middleware hands it over so)
    is returned as it is, not copied: a large body is then held once, however far it travels."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:  # the daemon's body-limit middleware refuses it first, in the same shape
            raise BodyTooLarge(f"request body is larger than {max_bytes} bytes")
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


class DisconnectWatch:
    """Cancels the request's task when the client disconnects (which closes the engine's connection: that
    cancels the generation). The watching task starts only once the request has run `after_s`: a request
    answered sooner costs no task (most non-generating ones), and a disconnect before then is seen at once
    when it starts (the server queues it)."""

    def __init__(self, receive: Receive, after_s: float = 0.02) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._receive, self._task = receive, task
        self.disconnected = False
        self._finished = False
        self._watcher: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(after_s, self._start)

    def _start(self) -> None:
        if not self._finished:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._finished:
            self.disconnected = True
            self._task.cancel()

    def close(self) -> None:
        self._finished = True
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def absorb(self) -> None:
        """In `except CancelledError`: swallow a cancel that this watch caused (re-raise any other)."""
        if not self.disconnected:
            raise
        self._task.uncancel()


async def while_connected(receive: Receive, work: Awaitable[None]) -> None:
    """Await `work` (it answers the client), cancelled if the client disconnects (DisconnectWatch); a client
    gone while the answer is being sent ends it quietly."""
    watch = DisconnectWatch(receive)
    try:
        await work
    except asyncio.CancelledError:
        watch.absorb()
    except OSError:
        pass  # the client went away while we were sending
    finally:
        watch.close()
