"""An rpc-server from another ggml: answers the RPC HELLO with the protocol version given on the command line,
then hangs up. For the one fault a real, matching rpc-server cannot show: a version mismatch.
Usage: fake_rpc_server.py HOST PORT VERSION (e.g. 6.0.0). Prints "listening" once it listens."""

import socket
import struct
import sys

host, port, version = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(".")]
server = socket.create_server((host, port))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        request = b""
        while len(request) < 1 + 8 + 24:
            chunk = conn.recv(64)
            if not chunk:
                break
            request += chunk
        if request[:1] == bytes([14]):
            conn.sendall(struct.pack("<Q", 28) + bytes([*version, 0]) + bytes(24))
