"""The event stream: publishing never waits for a subscriber, a stuck one is dropped with its buffer, and
GET /llamactl/events over real HTTP shows finished requests and lane changes while a client that never reads
neither slows requests nor holds memory."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from llamactl.router.alerts import AcceptanceAlerts, AlertConfig
from llamactl.router.events import EventHub
from prometheus_client import CollectorRegistry
from tests.router_harness import fake_backends, group_profiles, served, wait_for


def test_a_subscriber_that_never_reads_is_dropped_and_its_buffer_freed():
    async def main():
        hub = EventHub(buffer=16)
        stuck, live = hub.subscribe(), hub.subscribe()
        for i in range(10_000):
            hub.publish("request", n=i)
            if i % 8 == 0:  # the live reader keeps up
                while live.buffer:
                    await live.next(0)
        assert stuck.dropped and not stuck.buffer and stuck not in hub.subscribers
        assert not live.dropped and live in hub.subscribers
        assert hub.dropped == 1
        with pytest.raises(EOFError):
            await stuck.next(0)
        assert len(hub.recent["request"]) == 100  # the backlog is bounded too

    asyncio.run(main())


def test_alerts_raise_once_per_episode_and_clear_with_hysteresis():
    changes = []
    alerts = AcceptanceAlerts(CollectorRegistry(), AlertConfig(below=0.6, min_drafted=100, hysteresis=0.05, window_n=10),
                              on_change=changes.append)
    alerts.observe("g", "code", 50, 10)  # 0.2 but only 50 drafted: not yet
    assert changes == []
    for _ in range(5):
        alerts.observe("g", "code", 50, 10)
    assert [c["active"] for c in changes] == [True]  # once, not per request
    assert alerts.active()[0]["class"] == "code" and "g/code" in alerts.summary()
    for _ in range(10):
        alerts.observe("g", "code", 50, 31)  # 0.62: above the threshold, not above it plus the hysteresis
    assert [c["active"] for c in changes] == [True]
    for _ in range(10):
        alerts.observe("g", "code", 50, 40)
    assert [c["active"] for c in changes] == [True, False] and alerts.summary() == ""


def _stuck_subscriber(url: str) -> socket.socket:
    """GET /llamactl/events on a socket with a tiny receive buffer that is never read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /llamactl/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def test_event_stream_over_http_and_a_stuck_client_does_not_slow_requests():
    profiles = group_profiles("g")
    with served(profiles, fake_backends(profiles)) as (url, router):
        router.events.buffer = 32
        body = {"model": "g", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=10) as client:
            # A reader that keeps up sees the lane load and the finished request.
            with client.stream("GET", f"{url}/llamactl/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                assert client.post(f"{url}/v1/chat/completions", json=body).status_code == 200
                seen = []
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        seen.append(json.loads(line[5:]))
                        if seen[-1]["type"] == "request":
                            break
                request = seen[-1]
                assert request["lane"] == "g" and request["status"] == 200 and request["class"]
                assert {"member", "queue_wait_s", "ttft_s", "tok_s", "completion_tokens", "drafted"} <= set(request)
                assert any(e["type"] == "lane" and e["what"] == "ready" for e in seen)

            stuck = _stuck_subscriber(url)
            try:
                wait_for(lambda: len(router.events.subscribers) == 1, what="the stuck subscriber")
                # Big events fill the kernel's socket buffers quickly (they grow to megabytes on loopback);
                # published on the router's own loop, as the lanes and the relay publish.
                loop = next(iter(router._dispatchers.values())).get_loop()
                filler = "x" * 65536

                def publish_filler() -> None:
                    for _ in range(16):
                        router.events.publish("memory", devices=[], error=filler)

                latencies = []
                for _ in range(500):
                    loop.call_soon_threadsafe(publish_filler)
                    started = time.perf_counter()
                    assert client.post(f"{url}/v1/chat/completions", json=body).status_code == 200
                    latencies.append(time.perf_counter() - started)
                    if router.events.dropped:
                        break
                assert router.events.dropped == 1, "the stuck subscriber was never dropped"
                assert not router.events.subscribers
                assert max(latencies) < 2.0, f"a request waited {max(latencies):.2f}s behind the stuck subscriber"
                assert client.post(f"{url}/v1/chat/completions", json=body).status_code == 200
            finally:
                stuck.close()
