#!/usr/bin/env python3
"""A stand-in llama-server for faults the real one won't produce on demand.

Behaviour is chosen by FAKE_LLAMA_MODE (set through the profile's `env`):
  normal          loads for FAKE_LOAD_S seconds (503 on /health meanwhile, like mainline), then serves
  crash_on_start  prints FAKE_CRASH_MESSAGE (default: a model-load error) and exits 1
  crash_later     becomes ready, then exits 1 after FAKE_CRASH_AFTER_S seconds
  hang            listens but never answers (ik while loading), forever
  ignore_sigterm  becomes ready and ignores SIGTERM
  port_taken_once first start reports a bind failure (creates FAKE_STATE_FILE), later starts are normal
  port_taken      every start reports a bind failure
  grandchild      becomes ready after starting a grandchild process in the same process group
  hang_later      becomes ready, then after FAKE_HANG_AFTER_S seconds stops answering (process lives)
  oom             prints a CUDA out-of-memory line while loading and exits 1
Slots (with --slot-save-path, as llama-server): GET /slots, POST /slots/N?action=save|restore writing and reading
files with llama.cpp's state header; a request's prompt fills slot 0 (one token per character) and its timings say
how much of it slot 0 held (cache_n). FAKE_SLOTS picks a fault: hang_save (a save never answers),
refuse_restore (every restore fails), not_taken (a restore loads but the next request reuses nothing).
With --api-key-file, every request but /health needs "Authorization: Bearer <key>" (else 401), as in
llama-server. POST requests with "stream": true get SSE chunks (chunked transfer encoding, so a kill
mid-stream is a broken response); a "fake" object in the body sets "tokens" and "delay_s".
Only the standard library is used, so it runs under any python3.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import struct
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HELP = """usage: llama-server [options]
-h,    --help                  print usage and exit
--version                      show version and build info
-m,    --model FNAME           model path
-a,    --alias STRING          model alias
--host HOST                    ip address to listen (default: 127.0.0.1)
--port PORT                    port to listen (default: 8080)
--api-key KEY                  API key
--api-key-file FNAME           path to file containing API keys
-c,    --ctx-size N            size of the prompt context
-np,   --parallel N            number of server slots
-ngl,  --gpu-layers N          max. number of layers to store in VRAM
-ctk,  --cache-type-k TYPE     KV cache data type for K
-ctv,  --cache-type-v TYPE     KV cache data type for V
-fa,   --flash-attn [on|off|auto]
-t,    --threads N
-sm,   --split-mode {none,layer,row}
-ts,   --tensor-split N0,N1
--spec-type [none|draft-simple|ngram-mod]
--metrics                      enable prometheus compatible metrics endpoint
--embedding, --embeddings      restrict to only support embedding use case
--pooling {none,mean,cls,last,rank}
--rerank, --reranking          enable reranking endpoint on server
--slot-save-path PATH          path to save slot kv cache (default: disabled)
--swa-full                     use full-size SWA cache
"""
STATE_HEADER = struct.Struct("<III")  # llama.cpp's sequence state file: magic 'ggsq', version, token count


def arg_value(flag: str, default: str | None = None) -> str | None:
    argv = sys.argv[1:]
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else default


class Handler(BaseHTTPRequestHandler):
    ready = threading.Event()
    hung = threading.Event()
    mode = "normal"
    api_key: str | None = None
    protocol_version = "HTTP/1.1"
    slots: list[int] = [0]  # tokens each slot holds
    slot_dir: str | None = None
    slot_fault = ""

    def _authorised(self) -> bool:
        if self.api_key is None or self.path.startswith("/health"):
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.api_key}":
            return True
        self._json(401, {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}})
        return False

    def log_message(self, fmt: str, *args: object) -> None:
        print("srv  log_server_r: " + fmt % args, flush=True)

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.mode == "hang" or self.hung.is_set():
            time.sleep(3600)
            return
        if not self._authorised():
            return
        if not self.ready.is_set():
            self._json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
        elif self.path.startswith("/health"):
            self._json(200, {"status": "ok"})
        elif self.path.startswith("/v1/models"):
            self._json(200, {"object": "list", "data": [{"id": arg_value("-a", "fake")}]})
        elif self.path.startswith("/slots"):
            n_ctx = int(arg_value("-c", "4096") or 4096)
            self._json(200, [{"id": i, "n_ctx": n_ctx, "is_processing": False, **({"n_prompt_tokens": t} if t else {})}
                             for i, t in enumerate(self.slots)])
        elif self.path.startswith("/metrics"):
            data = b"llamacpp:prompt_tokens_total 1000\nllamacpp:prompt_seconds_total 2\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._json(404, {"error": {"code": 404, "message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        if self.hung.is_set():
            time.sleep(3600)
            return
        if not self._authorised():
            return
        try:
            request = json.loads(raw or b"{}")
        except ValueError:
            request = {}
        if self.path.startswith("/slots/"):
            self._slot_action(request)
            return
        if isinstance(request, dict) and request.get("stream"):
            self._stream(request)
            return
        timings = {"predicted_n": 1}
        prompt = request.get("prompt") if isinstance(request, dict) else None
        if isinstance(prompt, str):
            cached = 0 if self.slot_fault == "not_taken" else min(self.slots[0], len(prompt))
            Handler.slots[0] = len(prompt)
            timings.update(prompt_n=len(prompt) - cached, cache_n=cached)
        self._json(200, {"choices": [{"index": 0, "text": "fake", "message": {"role": "assistant", "content": "fake"}}],
                         "timings": timings})

    def _slot_action(self, request: dict) -> None:
        slot = int(self.path.split("/")[2].split("?")[0])
        action = self.path.split("action=")[-1]
        path = os.path.join(self.slot_dir or "", str(request.get("filename")))
        if action == "save":
            if self.slot_fault == "hang_save":
                time.sleep(3600)
                return
            n = self.slots[slot]
            with open(path, "wb") as f:
                f.write(STATE_HEADER.pack(0x67677371, 3, n) + b"\0" * (4 * n + 64))
            self._json(200, {"id_slot": slot, "n_saved": n, "n_written": os.path.getsize(path)})
            return
        if self.slot_fault == "refuse_restore":
            self._json(400, {"error": {"code": 400, "message": "No available space in KV cache or invalid slot save "
                                                               "file", "type": "invalid_request_error"}})
            return
        with open(path, "rb") as f:
            magic, _version, n = STATE_HEADER.unpack(f.read(STATE_HEADER.size))
        Handler.slots[slot] = n
        self._json(200, {"id_slot": slot, "n_restored": n, "n_read": os.path.getsize(path)})


    def _stream(self, request: dict) -> None:
        fake = request.get("fake") or {}
        tokens, delay = int(fake.get("tokens", 8)), float(fake.get("delay_s", 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        for i in range(tokens):
            payload = {"choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
            chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")
            if delay:
                time.sleep(delay)
        chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main() -> int:
    if "--help" in sys.argv or "-h" in sys.argv:
        print(HELP)
        return 0
    if "--version" in sys.argv:
        print("version: 9999 (fake)", file=sys.stderr)
        return 0
    mode = os.environ.get("FAKE_LLAMA_MODE", "normal")
    port = int(arg_value("--port", "8080"))
    host = arg_value("--host", "127.0.0.1")
    print(f"fake llama-server pid {os.getpid()} mode {mode}", flush=True)

    key_file = arg_value("--api-key-file")
    if key_file:
        Handler.api_key = open(key_file).read().strip()
    if mode == "oom":
        time.sleep(0.2)
        print("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0: "
              "cudaMalloc failed: out of memory", flush=True)
        # what llama-server prints after it, up to the exit (the consequences of the failed allocation)
        print("llama_model_load: error loading model: unable to allocate CUDA0 buffer", flush=True)
        print("llama_model_load_from_file_impl: failed to load model", flush=True)
        print(f"srv    load_model: failed to load model, '{arg_value('-m', 'x.gguf')}'", flush=True)
        print("srv    operator(): operator(): cleaning up before exit...", flush=True)
        print("main: exiting due to model loading error", flush=True)
        return 1
    if mode == "crash_on_start":
        time.sleep(float(os.environ.get("FAKE_CRASH_DELAY_S", "0.2")))
        print(os.environ.get("FAKE_CRASH_MESSAGE", "gguf_init_from_file: failed to open GGUF file 'x.gguf'"),
              flush=True)
        return 1
    state_file = os.environ.get("FAKE_STATE_FILE")
    if mode == "port_taken" or (mode == "port_taken_once" and state_file and not os.path.exists(state_file)):
        if state_file:
            open(state_file, "w").close()
        print(f"srv    operator(): couldn't bind HTTP server socket, hostname: {host}, port: {port}", flush=True)
        return 1
    if mode == "ignore_sigterm":
        signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
    if mode == "grandchild":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        print(f"grandchild pid {child.pid}", flush=True)

    Handler.mode = mode
    Handler.slots = [0] * int(arg_value("-np", "1") or 1)
    Handler.slot_dir = arg_value("--slot-save-path")
    Handler.slot_fault = os.environ.get("FAKE_SLOTS", "")
    server = ThreadingHTTPServer((host, port), Handler)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if mode == "hang":
        while True:
            time.sleep(3600)
    time.sleep(float(os.environ.get("FAKE_LOAD_S", "0")))
    Handler.ready.set()
    print(f"main: server is listening on http://{host}:{port}", flush=True)
    if mode == "hang_later":
        time.sleep(float(os.environ.get("FAKE_HANG_AFTER_S", "1")))
        print("hanging now", flush=True)
        Handler.hung.set()
    if mode == "crash_later":
        time.sleep(float(os.environ.get("FAKE_CRASH_AFTER_S", "1")))
        print("GGML_ASSERT failed: crash", flush=True)
        os._exit(1)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
