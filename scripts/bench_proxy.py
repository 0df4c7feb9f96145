#!/usr/bin/env python3
"""What the router costs: added latency and streaming throughput, router vs a direct connection.

The backend is tests/fakes/fast_backend.py (a fast fake llama-server in its own process) so that the
proxy is what is measured. The router runs in its own process too (uvicorn, as `llamactl serve` runs
it), with a static Backends that points at the fake. Measured, each direct and through the router:
  latency   sequential non-streamed /v1/chat/completions of 1 token: p50 / p99, added = router - direct
  ttfb      streamed request whose backend waits 50 ms between 5 chunks: time to the first chunk
            (a buffering proxy would deliver it only after the whole stream, ~250 ms)
  streams   1 and 64 concurrent streams of 400 chunks each as fast as the backend sends: chunks/s
Usage: .venv/bin/python scripts/bench_proxy.py [--requests 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import socket

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
# Without TCP_NODELAY the sync client's separate header/body writes meet delayed ACKs (~40 ms each).
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def sync_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(socket_options=NODELAY))


def spawn(args: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc, int(line.split()[1])


def serve_router(backend_url: str) -> None:
    """Child mode: the router in front of one fake backend, on a free port printed as PORT n."""
    import uvicorn

    from llamactl.profiles import Profile
    from llamactl.router import LaneConfig, Router, RouterConfig, Upstream, create_app

    class Static:
        async def ensure_ready(self, profile_name: str) -> Upstream:
            return Upstream(backend_url)

        async def stop(self, profile_name: str) -> None:
            return None

    profile = Profile(name="fake", model="/models/fake.gguf", parallel=256)
    router = Router([profile], Static(), RouterConfig(lane=LaneConfig(max_queue=4096)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto TCP: asyncio sets TCP_NODELAY
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(router), log_level="warning", access_log=False)).run(sockets=[sock])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(urls: dict[str, str], n: int) -> dict[str, list[float]]:
    """Sequential 1-token requests, alternating direct / router so both see the same background load."""
    body = {**CHAT, "max_tokens": 1, "fake": {"tokens": 1}}
    out: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: sync_client(url) for name, url in urls.items()}
    try:
        for client in clients.values():
            for _ in range(50):  # warm the connections
                client.post("/v1/chat/completions", json=body)
        for _ in range(n):
            for name, client in clients.items():
                t = time.perf_counter()
                r = client.post("/v1/chat/completions", json=body)
                out[name].append(time.perf_counter() - t)
                assert r.status_code == 200
    finally:
        for client in clients.values():
            client.close()
    return out


def ttfb(urls: dict[str, str], n: int = 9) -> dict[str, float]:
    body = {**CHAT, "stream": True, "fake": {"tokens": 5, "delay_s": 0.05}}
    times: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: sync_client(url) for name, url in urls.items()}
    try:
        for _ in range(n):
            for name, client in clients.items():
                t = time.perf_counter()
                with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    for _chunk in r.iter_raw():
                        times[name].append(time.perf_counter() - t)
                        break
    finally:
        for client in clients.values():
            client.close()
    return {name: statistics.median(values) for name, values in times.items()}


async def streams(url: str, concurrency: int, chunks: int) -> dict[str, float]:
    body = {**CHAT, "stream": True, "fake": {"tokens": chunks}}
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one() -> int:
            events = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events += 1
            return events

        await asyncio.gather(*(one() for _ in range(min(concurrency, 4))))  # warm-up
        t = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t
    expected = chunks + 2  # the chunks, the final timings event, [DONE]
    assert all(c == expected for c in counts), f"lost events: {counts[:5]}..."
    return {"chunks_per_s": sum(counts) / elapsed, "seconds": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-router", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_router:
        serve_router(args.serve_router)
        return 0
    backend, backend_port = spawn([str(ROOT / "tests/fakes/fast_backend.py"), "--port", "0"])
    direct = f"http://127.0.0.1:{backend_port}"
    router, router_port = spawn([str(Path(__file__).resolve()), "--serve-router", direct])
    via = f"http://127.0.0.1:{router_port}"
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                     "requests": args.requests, "chunks_per_stream": args.chunks}
    try:
        urls = {"direct": direct, "router": via}
        lat = latency(urls, args.requests)
        for q in ("p50", "p99"):
            frac = 0.5 if q == "p50" else 0.99
            d, r = percentile(lat["direct"], frac), percentile(lat["router"], frac)
            results[f"latency_{q}_ms"] = {"direct": d * 1e3, "router": r * 1e3, "added": (r - d) * 1e3}
        added = sorted(r - d for d, r in zip(lat["direct"], lat["router"]))
        results["added_latency_paired_ms"] = {"p50": percentile(added, 0.5) * 1e3, "p99": percentile(added, 0.99) * 1e3}
        results["first_chunk_ms_backend_50ms_per_chunk"] = {k: v * 1e3 for k, v in ttfb(urls).items()}
        for concurrency in (1, 64):
            results[f"streams_{concurrency}"] = {
                name: asyncio.run(streams(url, concurrency, args.chunks)) for name, url in (("direct", direct), ("router", via))}
    finally:
        for proc in (router, backend):
            proc.terminate()
            proc.wait(10)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
