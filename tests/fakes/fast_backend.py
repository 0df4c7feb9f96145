"""A fast fake llama-server (OpenAI + llama.cpp endpoints) for router tests and the proxy benchmark.

A raw ASGI app, so that what a benchmark measures is the proxy, not this fake. Behaviour per backend
(`FakeConfig`) and per request (a "fake" object in the body, which a real server would ignore):
  tokens       completion chunks to produce (default: max_tokens / n_predict, else 8)
  delay_s      sleep between chunks (0: as fast as possible)
  crash_after  break the connection after this many chunks (a crash mid-stream)
  status       answer this HTTP status with a llama-server-shaped error
  hold         wait for FakeBackend.gate (a threading.Event) before answering
Speculative behaviour: with `spec=True`, timings carry draft_n / draft_n_accepted with an acceptance
that depends on temperature (high when greedy, low when sampling), and the reported decode speed
follows the same speed-up model as llamactl.router.policy, so policy tests see the workload effect.
Counters (requests, cancelled, max_concurrent) let tests check that a disconnect cancelled upstream.

Run standalone: python tests/fakes/fast_backend.py --port 0   (prints "PORT <n>" once listening)
As a llama-server binary for llamactl (the proxy benchmark runs `llamactl serve` over it):
  python tests/fakes/fast_backend.py --llama-server [llama-server flags]  (--help / --version / --port, the
  rest ignored; requests are not checked for the per-start key)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import uvicorn


@dataclass
class FakeConfig:
    name: str = "fake"
    spec: bool = False
    base_tok_s: float = 60.0
    greedy_acceptance: float = 0.8
    sampled_acceptance: float = 0.1
    delay_s: float = 0.0
    default_tokens: int = 8
    n_ctx: int = 4096  # like llama-server, generation stops at the context (and -1 means "until then")
    missing_routes: tuple[str, ...] = ()  # POST routes this "build" lacks: 404 File Not Found, as llama-server
    embedding_dim: int = 8


@dataclass
class Counters:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    crashed: int = 0
    concurrent: int = 0
    max_concurrent: int = 0
    temperatures: list[float] = field(default_factory=list)


def _chunk_payload(path: str, i: int, model: str) -> dict[str, Any]:
    text = f"tok{i} "
    if path == "/v1/chat/completions":
        return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    if path == "/v1/completions":
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": None}]}
    return {"content": text, "stop": False, "index": 0}


class FakeBackend:
    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.counters = Counters()
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def timings(self, n: int, temperature: float) -> dict[str, Any]:
        c = self.config
        timings: dict[str, Any] = {"cache_n": 0, "prompt_n": 12, "prompt_ms": 1.0, "prompt_per_second": 12000.0,
                                   "predicted_n": n}
        speed = c.base_tok_s
        if c.spec:
            acceptance = c.greedy_acceptance if temperature <= 0.3 else c.sampled_acceptance
            draft_n = max(1, n)
            timings["draft_n"] = draft_n
            timings["draft_n_accepted"] = round(draft_n * acceptance)
            speed = c.base_tok_s * (0.71 + 0.84 * acceptance)
        timings["predicted_per_second"] = speed
        timings["predicted_ms"] = 1000.0 * n / speed
        return timings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["method"] == "GET":
            if path == "/props" or path == "/slots":
                return await self._json(send, 200, {"fake": path, "name": self.config.name, "n_ctx": self.config.n_ctx,
                                                    "query": scope.get("query_string", b"").decode(),
                                                    "authorization": headers.get("authorization")})
            if path == "/":
                body = b"<!doctype html><title>fake llama-server ui</title>"
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/html"), (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body})
            if path in ("/health", "/v1/health"):
                return await self._json(send, 200, {"status": "ok"})
            if path in ("/v1/models", "/models"):
                return await self._json(send, 200, {"object": "list", "data": [{"id": self.config.name}]})
            if path == "/metrics":
                body = b"llamacpp:requests_processing 0\n"
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
                return await send({"type": "http.response.body", "body": body})
            return await self._json(send, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path in self.config.missing_routes:
            return await self._json(send, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
        if headers.get("content-type", "").startswith("multipart/form-data"):
            with self._lock:
                self.counters.requests += 1
                self.counters.completed += 1
            return await self._json(send, 200, {"text": "fake transcript", "bytes": len(body), "name": self.config.name})
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return await self._json(send, 400, {"error": {"code": 400, "message": "bad json", "type": "invalid_request_error"}})
        with self._lock:
            self.counters.requests += 1
            self.counters.concurrent += 1
            self.counters.max_concurrent = max(self.counters.max_concurrent, self.counters.concurrent)
        try:
            await self._complete(path, request, receive, send)
        finally:
            with self._lock:
                self.counters.concurrent -= 1

    async def _complete(self, path: str, request: dict[str, Any], receive, send) -> None:
        try:  # wrong types get a 400, as llama-server answers them (the fuzz tests send anything)
            fake = request.get("fake") or {}
            temperature = float(request.get("temperature", 0.8))
            with self._lock:
                self.counters.temperatures.append(temperature)
            if fake.get("hold"):
                await asyncio.to_thread(self.gate.wait, 10)
            if "status" in fake:
                status = int(fake["status"])
                return await self._json(send, status, {"error": {"code": status, "message": "fake failure", "type": "server_error"}})
            n = int(fake.get("tokens", request.get("max_tokens", request.get("n_predict", self.config.default_tokens))))
            n = self.config.n_ctx if n < 0 else min(n, self.config.n_ctx)
            delay = float(fake.get("delay_s", self.config.delay_s))
            crash_after = fake.get("crash_after")
        except (TypeError, ValueError, AttributeError, OverflowError) as e:
            return await self._json(send, 400, {"error": {"code": 400, "message": f"bad request: {e}", "type": "invalid_request_error"}})
        model = self.config.name
        timings = self.timings(n, temperature)
        if path in ("/v1/embeddings", "/embedding", "/embeddings"):
            items = request.get("input", request.get("content", ""))
            count = len(items) if isinstance(items, list) else 1
            with self._lock:
                self.counters.completed += 1
            return await self._json(send, 200, {
                "object": "list", "model": model, "usage": {"prompt_tokens": 3 * count, "total_tokens": 3 * count},
                "data": [{"object": "embedding", "index": i, "embedding": [0.125] * self.config.embedding_dim}
                         for i in range(count)]})
        if path in ("/tokenize", "/detokenize", "/apply-template", "/v1/messages/count_tokens") or \
                path.endswith("/input_tokens") or "rerank" in path:
            with self._lock:
                self.counters.completed += 1
            return await self._json(send, 200, {"fake": path, "tokens": [1, 2, 3], "input_tokens": 3})
        if path == "/v1/messages":
            return await self._anthropic(request, n, delay, crash_after, receive, send)
        if not request.get("stream"):
            if delay:
                await asyncio.sleep(delay * n)
            text = "".join(f"tok{i} " for i in range(n))
            if path == "/v1/chat/completions":
                payload = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                           "system_fingerprint": model,
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}, "timings": timings}
            elif path == "/v1/completions":
                payload = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
                           "system_fingerprint": model,
                           "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}, "timings": timings}
            else:
                payload = {"content": text, "stop": True, "tokens_predicted": n, "model": model, "timings": timings}
            with self._lock:
                self.counters.completed += 1
            return await self._json(send, 200, payload)

        disconnected = asyncio.Event()

        async def watch() -> None:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"x-fake-backend", model.encode())]})
        try:
            for i in range(n):
                if self._stream_ends(i, crash_after, disconnected):
                    return
                data = json.dumps(_chunk_payload(path, i, model)).encode()
                await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})
                if delay:
                    try:
                        await asyncio.wait_for(disconnected.wait(), delay)
                    except TimeoutError:
                        pass
            last = _chunk_payload(path, n, model)
            if "choices" in last:
                last["choices"][0]["finish_reason"] = "length"
                if path == "/v1/chat/completions":
                    last["choices"][0]["delta"] = {}
                else:
                    last["choices"][0]["text"] = ""
            else:
                last.update({"content": "", "stop": True, "tokens_predicted": n})
            last["timings"] = timings
            tail = b"data: " + json.dumps(last).encode() + b"\n\n"
            if path.startswith("/v1/"):
                tail += b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            with self._lock:
                self.counters.completed += 1
        finally:
            watcher.cancel()

    def _stream_ends(self, i: int, crash_after, disconnected: asyncio.Event) -> bool:
        """Before streaming piece i: crash (raises) where told to, or end (True) if the client has gone."""
        if crash_after is not None and i >= int(crash_after):
            with self._lock:
                self.counters.crashed += 1
            raise RuntimeError("fake backend crashed mid-stream")
        if disconnected.is_set():
            with self._lock:
                self.counters.cancelled += 1
            return True
        return False

    async def _anthropic(self, request: dict[str, Any], n: int, delay: float, crash_after, receive, send) -> None:
        """llama-server's Anthropic Messages shapes (server-task.cpp to_json_anthropic*): usage in
        message_start (output_tokens 0) and message_delta (the real count), no [DONE]."""
        model = self.config.name
        usage = {"cache_read_input_tokens": 0, "input_tokens": 12, "output_tokens": n}
        if not request.get("stream"):
            if delay:
                await asyncio.sleep(delay * n)
            with self._lock:
                self.counters.completed += 1
            return await self._json(send, 200, {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "".join(f"tok{i} " for i in range(n))}],
                "stop_reason": "max_tokens", "stop_sequence": None, "usage": usage})
        disconnected = asyncio.Event()

        async def watch() -> None:
            if (await receive())["type"] == "http.disconnect":
                disconnected.set()

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        try:
            start = {"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
                     "content": [], "model": model, "stop_reason": None, "stop_sequence": None,
                     "usage": {**usage, "output_tokens": 0}}}
            head = event("message_start", start) + event("content_block_start", {
                "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            await send({"type": "http.response.body", "body": head, "more_body": True})
            for i in range(n):
                if self._stream_ends(i, crash_after, disconnected):
                    return
                await send({"type": "http.response.body", "more_body": True, "body": event("content_block_delta", {
                    "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"tok{i} "}})})
                if delay:
                    try:
                        await asyncio.wait_for(disconnected.wait(), delay)
                    except TimeoutError:
                        pass
            tail = event("content_block_stop", {"type": "content_block_stop", "index": 0})
            tail += event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens",
                                                                              "stop_sequence": None},
                                            "usage": {"output_tokens": n}})
            tail += event("message_stop", {"type": "message_stop"})
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            with self._lock:
                self.counters.completed += 1
        finally:
            watcher.cancel()

    @staticmethod
    async def _json(send, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a free port (port 0): connections queue until the server accepts them.
    Created with proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    a response written in two parts waits for the client's delayed ACK (~40 ms)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, started: threading.Event) -> None:
        super().__init__(config)
        self._started_event = started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self._started_event.set()

    def install_signal_handlers(self) -> None:  # not the main thread
        pass


class ServerThread:
    """Any ASGI app served by uvicorn in a thread, on a loopback port chosen by the kernel."""

    def __init__(self, app, *, lifespan: str = "on") -> None:
        self.sock = bound_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        started = threading.Event()
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, access_log=False,
                                timeout_graceful_shutdown=5)
        self.server = _Server(config, started)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        if not started.wait(30):
            raise RuntimeError("server thread did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_engine = "--llama-server" in argv
    if as_engine:
        from fake_llama_server import HELP  # this directory is sys.path[0] when run as a script

        if "--help" in argv:
            print(HELP)
            return 0
        if "--version" in argv:
            print("version: 9999 (fast fake)", file=sys.stderr)
            return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", "-a", "--alias", default="fake")
    parser.add_argument("--spec", action="store_true")
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--llama-server", action="store_true")
    parser.add_argument("--embedding-dim", type=int, default=768)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not as_engine:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    app = FakeBackend(FakeConfig(name=args.name, spec=args.spec, delay_s=args.delay_s,
                                 embedding_dim=args.embedding_dim))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())


class FakeBackends:
    """llamactl.router.Backends over FakeBackend servers in threads: one per profile, started on demand.

    `fail`: profiles whose start raises StartError. `room`: how many servers fit at once (a start beyond it
    fails with out of memory). `events` logs ("start"|"stop", profile) in order; `max_running` is the most
    servers that were up at once (1 for a hard switch)."""

    def __init__(self, configs: dict[str, FakeConfig], *, fail: set[str] | None = None,
                 room: int | None = None, api_key: str | None = None) -> None:
        self.room = room
        self.api_key = api_key
        self.backends = {name: FakeBackend(cfg) for name, cfg in configs.items()}
        self.servers: dict[str, ServerThread] = {}
        self.fail = set(fail or ())
        self.events: list[tuple[str, str]] = []
        self.max_running = 0

    async def ensure_ready(self, profile_name: str):
        from llamactl.errors import StartError
        from llamactl.router.backends import Upstream

        full = self.room is not None and profile_name not in self.servers and len(self.servers) >= self.room
        if profile_name in self.fail or full:
            raise StartError(f"{profile_name}: llama-server exited with code 1 while starting: out of memory",
                             cause="out of memory", log_tail=["fake: out of memory"])
        if profile_name not in self.servers:
            self.servers[profile_name] = await asyncio.to_thread(ServerThread, self.backends[profile_name])
            self.events.append(("start", profile_name))
            self.max_running = max(self.max_running, len(self.servers))
        return Upstream(self.servers[profile_name].url, api_key=self.api_key)

    async def stop(self, profile_name: str) -> None:
        server = self.servers.pop(profile_name, None)
        if server is not None:
            await asyncio.to_thread(server.stop)
            self.events.append(("stop", profile_name))

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
