"""The first message of ggml's RPC protocol (HELLO), to ask a worker which protocol version it speaks.

    request : | command 14 (1 byte) | size 24 (u64 LE) | connection capabilities (24 bytes, zero: none) |
    response: | size 28 (u64 LE) | major | minor | patch | padding | connection capabilities (24 bytes) |

rpc-server serves one client at a time: while a llama-server holds it, a HELLO waits in the listen backlog
(a timeout here says "busy or not answering", not "down").
"""

from __future__ import annotations

import socket
import struct

from llamactl.rpc.errors import WorkerUnreachable
from llamactl.rpc.workers import Worker

HELLO_COMMAND = 14
CAPS_SIZE = 24
RESPONSE_SIZE = 4 + CAPS_SIZE


def hello_request() -> bytes:
    return struct.pack("<BQ", HELLO_COMMAND, CAPS_SIZE) + bytes(CAPS_SIZE)


def parse_hello_response(data: bytes) -> str:
    """The version ("7.0.0") from a full HELLO response; ValueError when it is not one."""
    if len(data) != 8 + RESPONSE_SIZE or struct.unpack("<Q", data[:8])[0] != RESPONSE_SIZE:
        raise ValueError("not a HELLO response")
    major, minor, patch = data[8], data[9], data[10]
    return f"{major}.{minor}.{patch}"


def compatible(ours: str, theirs: str) -> bool:
    """ggml-rpc's own rule: the same major version, and the server's minor not newer than the client's."""
    o, t = [int(x) for x in ours.split(".")], [int(x) for x in theirs.split(".")]
    return o[0] == t[0] and t[1] <= o[1]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def worker_version(worker: Worker, timeout_s: float = 5.0) -> str:
    """Connect, say HELLO, return the worker's protocol version. WorkerUnreachable says what was tried."""
    tried = f"a TCP connection to {worker.endpoint} and ggml-rpc's HELLO"
    try:
        with socket.create_connection((worker.host, worker.port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(hello_request())
            data = _recv_exactly(sock, 8 + RESPONSE_SIZE)
    except TimeoutError:
        raise WorkerUnreachable(
            f"worker {worker.label} did not answer within {timeout_s:g} s (tried {tried})",
            worker=worker.name,
            hint="rpc-server serves one client at a time: is another llama-server using it? Else check that "
                 "`llamactl worker` runs there and the address is right") from None
    except OSError as e:
        raise WorkerUnreachable(
            f"worker {worker.label} is unreachable: {e.strerror or e} (tried {tried})", worker=worker.name,
            hint=f"start it on that host (`llamactl worker --host {worker.host} --port {worker.port}`), "
                 "or fix the address in workers.toml / the profile's rpc") from None
    try:
        return parse_hello_response(data)
    except ValueError:
        raise WorkerUnreachable(
            f"worker {worker.label} answered, but not as an rpc-server ({len(data)} bytes; tried {tried})",
            worker=worker.name, hint="check the port: something else listens there") from None
