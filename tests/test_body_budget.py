"""Bytes of request bodies held at once are bounded across all requests (LLAMACTL_MAX_BODY_BYTES_IN_FLIGHT):
past the budget a body gets 503 with Retry-After, whatever the mix of sizes and of Content-Length or chunked
bodies (hypothesis); the budget is given back when each request ends, refused, answered or cut; and the body
is read into one buffer that the route gets as it is (no copy on the way)."""

from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, given, settings, strategies as st

from llamactl.daemon.auth import BodyLimitMiddleware
from llamactl.router.asgi import read_body
from llamactl.settings import Settings

LIMIT = 1000


class HeldApp:
    """A route that reads its body and holds the request until released."""

    def __init__(self) -> None:
        self.bodies: list[bytes | bytearray] = []
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        self.bodies.append(await read_body(receive, 10**9))
        self.arrived.set()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app, size: int, chunked: bool, piece: int = 64) -> dict:
    headers = [] if chunked else [(b"content-length", str(size).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    pieces = [b"x" * min(piece, size - at) for at in range(0, size, piece)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    answer: dict = {}

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # no disconnect: the client waits for its answer

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = dict(message["headers"])
        else:
            answer.setdefault("body", b"")
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer


@given(st.lists(st.tuples(st.integers(0, 600), st.booleans()), min_size=1, max_size=8))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CPUs are shared
def test_bodies_held_at_once_never_exceed_the_budget(requests):
    async def run() -> None:
        inner = HeldApp()
        guard = BodyLimitMiddleware(inner, max_bytes=600, in_flight_bytes=LIMIT)
        tasks = []
        for size, chunked in requests:  # one at a time: each reaches the route, or is refused, before the next
            inner.arrived.clear()
            task = asyncio.ensure_future(call(guard, size, chunked))
            tasks.append(task)
            await asyncio.wait([task, asyncio.ensure_future(inner.arrived.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            assert guard.budget.held_bytes <= LIMIT
        admitted = sum(len(b) for b in inner.bodies)
        assert guard.budget.held_bytes == admitted <= LIMIT
        inner.release.set()
        answers = await asyncio.gather(*tasks)
        assert guard.budget.held_bytes == 0
        for (size, _), answer in zip(requests, answers):
            if answer["status"] == 503:
                assert answer["headers"][b"retry-after"] == b"1"
                assert "LLAMACTL_MAX_BODY_BYTES_IN_FLIGHT" in json.loads(answer["body"])["error"]["message"]
            else:
                assert answer["status"] == 200
        assert sum(a["status"] == 200 for a in answers) == len(inner.bodies)

    asyncio.run(run())


def test_a_request_cut_while_held_gives_its_bytes_back():
    async def run() -> None:
        inner = HeldApp()
        guard = BodyLimitMiddleware(inner, max_bytes=600, in_flight_bytes=LIMIT)
        task = asyncio.ensure_future(call(guard, 600, False))
        await inner.arrived.wait()
        assert guard.budget.held_bytes == 600
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert guard.budget.held_bytes == 0

    asyncio.run(run())


def test_the_route_gets_the_one_buffer_the_body_was_read_into():
    async def run() -> None:
        inner = HeldApp()
        inner.release.set()
        guard = BodyLimitMiddleware(inner, max_bytes=10_000)
        assert (await call(guard, 5000, False, piece=100))["status"] == 200
        assert (await call(guard, 5000, True, piece=100))["status"] == 200
        assert all(type(b) is bytearray and len(b) == 5000 for b in inner.bodies)  # not joined into bytes again

    asyncio.run(run())


def test_the_setting_reaches_the_daemons_middleware(monkeypatch, home):
    from llamactl.daemon import auth

    monkeypatch.setenv("LLAMACTL_MAX_BODY_BYTES_IN_FLIGHT", str(64 * 1024 * 1024))
    stack = auth.middleware(Settings(), ())
    limit = next(m for m in stack if m.cls is BodyLimitMiddleware)
    assert limit.kwargs["in_flight_bytes"] == 64 * 1024 * 1024
