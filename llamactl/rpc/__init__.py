"""llama.cpp RPC workers: `rpc-server` on other boxes, used by a profile's `rpc = [...]`.

llama.cpp's RPC backend is the engine: llamactl only names the workers (workers.py), asks them what they
have (probe.py: the protocol handshake in hello.py, the devices through the engine's --list-devices in
devices.py), plans layers on their devices like on local GPUs (llamactl.plan) and runs rpc-server on a worker
host (runner.py, `llamactl worker`). rpc-server has no authentication and no encryption: private networks or
a tunnel only.
"""

from llamactl.rpc.errors import WorkerError, WorkerUnreachable, WorkerVersionMismatch
from llamactl.rpc.workers import Worker, load_workers, resolve_workers

__all__ = ["Worker", "WorkerError", "WorkerUnreachable", "WorkerVersionMismatch", "load_workers",
           "resolve_workers"]
