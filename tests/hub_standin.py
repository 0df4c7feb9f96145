"""A stand-in for the Hugging Face Hub on loopback: what huggingface_hub's model info and downloads use.

    GET  /api/models/OWNER/REPO[/revision/REV]   model info: sha (the commit), siblings with sizes
    HEAD /OWNER/REPO/resolve/REV/PATH            ETag, X-Repo-Commit, Content-Length (what the client checks)
    GET  /OWNER/REPO/resolve/REV/PATH            the bytes, with Range (206 + Content-Range) for a resume

Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which the client
maps to its exceptions. Faults a test asks for: a gated repo (a token is needed), a download cut after N bytes
(every try, until cleared). Every request is recorded, so a test can say what was (not) fetched.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

GOOD_TOKEN = "hf_standin_good_token"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")


@dataclass
class StandinRepo:
    files: dict[str, Path]  # path in the repo -> the file served for it
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    claimed_sizes: dict[str, int] = field(default_factory=dict)  # listing sizes that differ from the file's


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


class HubStandin:
    def __init__(self) -> None:
        self.repos: dict[str, StandinRepo] = {}
        self.requests: list[Request] = []
        self.cut_after: dict[str, int] = {}  # path in a repo -> where every download of it is dropped
        self.gates: dict[str, threading.Event] = {}  # path in a repo -> its bytes wait until the event is set
        self.cut_once: dict[str, int] = {}  # the same for the first download only (a resume gets through)
        self._lock = threading.Lock()
        self._connections: set = set()  # kept-alive client connections: stop() drops them too
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStandin:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The Hub is gone: no new connections, and the kept-alive ones are dropped."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                for connection in self._connections:
                    with contextlib.suppress(OSError):
                        connection.shutdown(socket.SHUT_RDWR)
                self._connections.clear()
            assert self._thread is not None
            self._thread.join()
            self._server = None

    def track(self, connection, alive: bool) -> None:
        with self._lock:
            (self._connections.add if alive else self._connections.discard)(connection)

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def downloads(self) -> list[Request]:
        """The GETs of file bytes (not HEADs, not model info)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path]


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: HubStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.hub.track(self.connection, True)

    def finish(self) -> None:
        self.hub.track(self.connection, False)
        super().finish()

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        self.hub.record(Request(self.command, path, self.headers.get("Range")))
        info = _INFO.match(path)
        if info:
            return self._info(info["repo"], info["rev"])
        resolve = _RESOLVE.match(path)
        if resolve:
            return self._resolve(resolve["repo"], resolve["rev"], resolve["path"], body=body)
        self._error(404, "RepoNotFound")

    def _repo(self, name: str, rev: str | None) -> StandinRepo | None:
        repo = self.hub.repos.get(name)
        if repo is None:
            self._error(401, "RepoNotFound")  # the Hub answers 401 for a repo it will not show
            return None
        if rev not in (None, "main", repo.commit):
            self._error(404, "RevisionNotFound")
            return None
        return repo

    def _info(self, name: str, rev: str | None) -> None:
        repo = self._repo(name, rev)
        if repo is None:
            return
        siblings = [{"rfilename": p, "size": repo.claimed_sizes.get(p, f.stat().st_size)} for p, f in repo.files.items()]
        siblings.append({"rfilename": "README.md", "size": 10})
        self._json({"id": name, "sha": repo.commit, "private": False, "gated": "auto" if repo.gated else False,
                    "siblings": siblings})

    def _resolve(self, name: str, rev: str, file: str, *, body: bool) -> None:
        repo = self._repo(name, rev)
        if repo is None:
            return
        if repo.gated and self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
            return self._error(403 if self.headers.get("Authorization") else 401, "GatedRepo")
        source = repo.files.get(file)
        if source is None:
            return self._error(404, "EntryNotFound")
        size = source.stat().st_size
        start = 0
        wanted = self.headers.get("Range")
        if wanted:
            start = int(re.match(r"bytes=(\d+)-", wanted)[1])
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{_etag(source)}"')
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if not body:
            return
        gate = self.hub.gates.get(file)
        if gate is not None:
            gate.wait(60)  # a test holds the download here while it looks at the progress
        cut = self.hub.cut_after.get(file)
        if cut is None and not wanted:
            cut = self.hub.cut_once.pop(file, None)
        with source.open("rb") as f:
            f.seek(start)
            sent = start
            while chunk := f.read(1 << 20):
                if cut is not None and sent + len(chunk) > cut:
                    chunk = chunk[:max(0, cut - sent)]
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the network went away mid-file
                    return
                self.wfile.write(chunk)
                sent += len(chunk)

    def _json(self, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _error(self, status: int, code: str) -> None:
        raw = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)
