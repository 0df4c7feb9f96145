"""One event stream for everything llamactl decides (GET /llamactl/events, the /ui page, `llamactl top`).

`EventHub.publish(kind, **data)` is O(1) per subscriber and never awaits: it appends the event to each
subscriber's bounded buffer and wakes it. A subscriber whose buffer is full (a slow or stuck client) is
dropped there and then, never waited for: the relay and the lanes are never slowed by a reader. The hub also
keeps the last few events of each kind, so a new subscriber starts with recent activity.

Events are plain JSON-able dicts: {"type": kind, "at": unix seconds, ...data}. Kinds: "lane" (a lane's
state changes: loading, ready, switched, failed, unloaded, hard switching), "engine" (an engine's state,
with the reason of a failure and load progress), "request" (a finished request), "alert" (acceptance
alerts raised or cleared), "memory" (device memory samples).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

SUBSCRIBER_BUFFER = 512  # events held for one subscriber before it counts as stuck and is dropped
RECENT_PER_KIND = {"request": 100, "lane": 50, "engine": 50, "alert": 20, "memory": 1, "prompt_cache": 20}
KEEPALIVE_S = 15.0
LIVE_MARK = b": live\n\n"


class Subscription:
    """One reader's bounded buffer. `dropped` once the hub gave up on it (the stream then ends)."""

    __slots__ = ("buffer", "limit", "wake", "dropped", "closed")

    def __init__(self, limit: int) -> None:
        self.buffer: deque[dict[str, Any]] = deque()
        self.limit = limit
        self.wake = asyncio.Event()
        self.dropped = False
        self.closed = False  # the daemon is stopping: the stream ends once its buffer is read

    def offer(self, event: dict[str, Any]) -> bool:
        if len(self.buffer) >= self.limit:
            return False
        self.buffer.append(event)
        self.wake.set()
        return True

    async def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next event; None after `timeout_s` without one (time for a keep-alive). Raises EOFError
        once the hub dropped this subscriber and its buffer is read."""
        while not self.buffer:
            if self.dropped or self.closed:
                raise EOFError
            self.wake.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self.wake.wait()
            except TimeoutError:
                return None
        return self.buffer.popleft()


class EventHub:
    def __init__(self, *, buffer: int = SUBSCRIBER_BUFFER) -> None:
        self.buffer = buffer
        self.subscribers: set[Subscription] = set()
        self.recent: dict[str, deque[dict[str, Any]]] = {kind: deque(maxlen=n) for kind, n in RECENT_PER_KIND.items()}
        self.published = 0
        self.dropped = 0  # subscribers dropped for not keeping up
        self.closing = False  # the daemon is stopping: streams of its own (events, log tails) end

    def publish(self, kind: str, **data: Any) -> dict[str, Any]:
        """Hand `data` to every subscriber (never blocks; a full subscriber is dropped)."""
        event = {"type": kind, "at": round(time.time(), 3), **data}
        self.published += 1
        recent = self.recent.get(kind)
        if recent is not None:
            recent.append(event)
        stuck = [sub for sub in self.subscribers if not sub.offer(event)]
        for sub in stuck:
            self._drop(sub)
        return event

    def subscribe(self) -> Subscription:
        sub = Subscription(self.buffer)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def _drop(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)
        sub.dropped = True
        sub.buffer.clear()  # its memory goes now, not when the stuck client finally leaves
        sub.wake.set()
        self.dropped += 1

    def close(self) -> None:
        """The daemon is stopping: every stream ends (an open page must not hold up the drain)."""
        self.closing = True
        for sub in list(self.subscribers):
            sub.closed = True
            sub.wake.set()

    def backlog(self) -> list[dict[str, Any]]:
        """The recent events of every kind, oldest first (a new subscriber's starting point)."""
        events = [e for recent in self.recent.values() for e in recent]
        return sorted(events, key=lambda e: e["at"])


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


async def stream(hub: EventHub, *, backlog: bool = True, keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[bytes]:
    """An SSE body for one subscriber: the backlog, then live events, a comment line as keep-alive."""
    sub = hub.subscribe()
    try:
        yield b": llamactl events\n\n"
        if backlog:
            for event in hub.backlog():
                yield sse(event)
        yield LIVE_MARK  # what follows happens now (`llamactl top --once` reads up to here)
        while True:
            try:
                event = await sub.next(keepalive_s)
            except EOFError:
                if sub.closed:
                    yield b"event: closed\ndata: {\"type\":\"closed\",\"reason\":\"llamactl is stopping\"}\n\n"
                else:
                    yield b"event: dropped\ndata: {\"type\":\"dropped\",\"reason\":\"too slow\"}\n\n"
                return
            yield b": keep-alive\n\n" if event is None else sse(event)
    finally:
        hub.unsubscribe(sub)
