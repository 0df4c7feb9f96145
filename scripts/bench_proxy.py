#!/usr/bin/env python3
"""What `llamactl serve` costs per request, beside nginx as the reference reverse proxy.

`llamactl serve` runs as users run it (its own process, the daemon's middleware: API keys and the body
limit, engines started and supervised by it), over tests/fakes/fast_backend.py standing in for
llama-server (so that the proxy is what is measured): one chat profile and one embeddings profile.
nginx (Debian's package; `proxy_buffering off`, upstream keepalive) proxies to the same two engines.
Measured, each direct to the engine, through llamactl and through nginx, interleaved so all three see the
same background load:
  latency   sequential non-streamed requests of 1 token: /v1/chat/completions, /v1/messages (Anthropic),
            /v1/embeddings (one input, a 768-float answer); p50 / p99, added = proxy - direct, and the
            proxy's CPU time per request (user + system of its processes over the run)
  ttfb      a streamed request whose engine waits 50 ms between 5 chunks: time to the first chunk
  streams   1 and 64 concurrent streams of 400 chunks each, as fast as the engine sends: events/s
Usage: .venv/bin/python scripts/bench_proxy.py [--requests 1000] [--json out.json]   (needs `nginx`)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEY = "bench-key-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORKLOADS = {
    "chat": ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 1, "fake": {"tokens": 1}}),
    "messages": ("/v1/messages", {"model": "fake", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}],
                                  "fake": {"tokens": 1}}),
    "embeddings": ("/v1/embeddings", {"model": "fake-embed", "input": "a sentence to embed"}),
}
CHAT_STREAM = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
# Without TCP_NODELAY the sync client's separate header/body writes meet delayed ACKs (~40 ms each).
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body; proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fcgi; uwsgi_temp_path {tmp}/nginx-uwsgi; scgi_temp_path {tmp}/nginx-scgi;
  client_max_body_size 16m;
  upstream chat {{ server 127.0.0.1:{chat}; keepalive 256; }}
  upstream embed {{ server 127.0.0.1:{embed}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    location = /v1/embeddings {{ proxy_pass http://embed; }}
    location / {{ proxy_pass http://chat; }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers=AUTH, transport=httpx.HTTPTransport(socket_options=NODELAY))


def start_llamactl(tmp: Path) -> tuple[subprocess.Popen, str, dict[str, int]]:
    """`llamactl serve` with a chat and an embeddings profile on the fast fake engine; returns the process,
    its URL and each engine's port (from the daemon's state records)."""
    from tests.conftest import write_tiny_gguf

    home = tmp / "home"
    profiles = home / "config" / "profiles"
    profiles.mkdir(parents=True)
    engine = tmp / "fast-llama-server"
    # Not `exec`: llamactl checks that the pid it started still runs the command line it started.
    engine.write_text(f"#!/bin/sh\n'{sys.executable}' '{ROOT / 'tests/fakes/fast_backend.py'}' --llama-server \"$@\"\n")
    engine.chmod(0o755)
    model = write_tiny_gguf(tmp / "model.gguf")
    common = f'binary = "{engine}"\nmodel = "{model}"\ngpus = []\nparallel = 256\nload_timeout_s = 60\n'
    (profiles / "fake.toml").write_text(common)
    (profiles / "fake-embed.toml").write_text(common + "embeddings = true\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMACTL_")}
    env.update(LLAMACTL_HOME=str(home), LLAMACTL_PROFILES_DIRS=str(profiles), LLAMACTL_API_KEYS=KEY,
               LLAMACTL_ETC_PROFILES_DIR=str(tmp / "no-etc"), LLAMACTL_ROUTER_MAX_QUEUE="4096",
               LLAMACTL_RELAY_CHILD_LOGS="false")
    port = free_port()
    profile_to = os.environ.get("BENCH_CPROFILE")  # a file: run the daemon under cProfile (slower; to look)
    wrap = [sys.executable, "-m", "cProfile", "-o", profile_to] if profile_to else []
    proc = subprocess.Popen([*wrap, str(Path(sys.executable).parent / "llamactl"), "serve", "--port", str(port), "--log-level",
                             os.environ.get("BENCH_LOG_LEVEL", "warning"), "--profile", "fake", "--profile", "fake-embed", "--preload", "fake",
                             "--preload", "fake-embed"], cwd=tmp, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            lanes = httpx.get(f"{url}/llamactl/status", headers=AUTH, timeout=2).json()["lanes"]
            if all(lane["state"] == "ready" for lane in lanes) and len(lanes) == 2:
                break
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("llamactl serve did not become ready")
        time.sleep(0.2)
    ports = {name: json.loads((home / "state" / "servers" / f"{name}.json").read_text())["port"]
             for name in ("fake", "fake-embed")}
    return proc, url, ports


def start_nginx(tmp: Path, ports: dict[str, int]) -> tuple[subprocess.Popen, str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        raise SystemExit("nginx is not installed: apt-get install nginx (Debian's package is the reference)")
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, chat=ports["fake"], embed=ports["fake-embed"], port=port))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "nginx-error.log")])
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/health", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not start")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(urls: dict[str, str], path: str, body: dict, n: int, cpu_pids: dict[str, list[int]]) -> dict:
    """Sequential requests, round-robin direct / llamactl / nginx so all see the same background load."""
    out: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: sync_client(url) for name, url in urls.items()}
    try:
        for client in clients.values():
            for _ in range(50):  # warm the connections
                r = client.post(path, json=body)
                assert r.status_code == 200, f"{client.base_url}{path}: {r.status_code} {r.text[:300]}"
        cpu: dict[str, float] = {}
        for name, pids in cpu_pids.items():
            cpu[name] = cpu_seconds(pids)
        spent = {name: 0.0 for name in urls}
        for _ in range(n):
            for name, client in clients.items():
                t = time.perf_counter()
                r = client.post(path, json=body)
                spent[name] += time.perf_counter() - t
                out[name].append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
        cpu = {name: (cpu_seconds(pids) - cpu[name]) / n * 1e3 for name, pids in cpu_pids.items()}
    finally:
        for client in clients.values():
            client.close()
    result: dict = {}
    for name in urls:
        result[name] = {"p50_ms": percentile(out[name], 0.5) * 1e3, "p99_ms": percentile(out[name], 0.99) * 1e3}
    for name in urls:
        if name == "direct":
            continue
        paired = sorted(v - d for v, d in zip(out[name], out["direct"]))
        result[name].update({
            "added_p50_ms": result[name]["p50_ms"] - result["direct"]["p50_ms"],
            "added_p99_ms": result[name]["p99_ms"] - result["direct"]["p99_ms"],
            "paired_added_p50_ms": percentile(paired, 0.5) * 1e3,
            "cpu_ms_per_request": cpu.get(name),
        })
    return result


def ttfb(urls: dict[str, str], n: int = 9) -> dict[str, float]:
    body = {**CHAT_STREAM, "fake": {"tokens": 5, "delay_s": 0.05}}
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
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


async def streams(url: str, concurrency: int, chunks: int) -> float:
    body = {**CHAT_STREAM, "fake": {"tokens": chunks}}
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=AUTH) as client:
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
    return sum(counts) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                     "requests": args.requests, "chunks_per_stream": args.chunks}
    keep = os.environ.get("BENCH_KEEP_DIR")  # a directory to keep the daemon's state and logs in (to look)
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="llamactl-bench-")) as tmp_name:
        tmp = Path(tmp_name)
        serve, via, ports = start_llamactl(tmp)
        nginx = None
        try:
            nginx, nginx_url = start_nginx(tmp, ports)
            serve_pids = [serve.pid]  # the engines are its children but not part of its CPU time
            nginx_pids = [nginx.pid] + [c.pid for c in psutil.Process(nginx.pid).children()]
            for name, (path, body) in WORKLOADS.items():
                engine = ports["fake-embed" if name == "embeddings" else "fake"]
                urls = {"direct": f"http://127.0.0.1:{engine}", "llamactl": via, "nginx": nginx_url}
                results[f"latency_{name}"] = latency(urls, path, body, args.requests,
                                                     {"llamactl": serve_pids, "nginx": nginx_pids})
            urls = {"direct": f"http://127.0.0.1:{ports['fake']}", "llamactl": via, "nginx": nginx_url}
            results["first_chunk_ms_engine_50ms_per_chunk"] = ttfb(urls)
            for concurrency in (1, 64):
                results[f"streams_{concurrency}_events_per_s"] = {
                    name: asyncio.run(streams(url, concurrency, args.chunks)) for name, url in urls.items()}
        finally:
            for proc in (nginx, serve):
                if proc is not None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
