"""Two "hosts" on one machine: a main and a worker network namespace joined by a veth pair.

Names carry the pid (and a counter), addresses are a private /30 inside the pair, and `close()` kills what
runs inside the namespaces and deletes them (which deletes the veth pair too). Needs root and iproute2
(scripts/test installs it)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

_counter = itertools.count()


def available() -> str | None:
    """Why two namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed: scripts/test installs it"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class HostPair:
    main_ns: str
    worker_ns: str
    main_ip: str
    worker_ip: str
    created: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> "HostPair":
        n = next(_counter)
        tag = f"{os.getpid()}{n}"[-9:]
        subnet = (os.getpid() * 7 + n) % 16000
        base = f"10.213.{subnet // 64}.{(subnet % 64) * 4}"
        prefix, last = base.rsplit(".", 1)
        pair = cls(main_ns=f"llm{tag}", worker_ns=f"llw{tag}", main_ip=f"{prefix}.{int(last) + 1}",
                   worker_ip=f"{prefix}.{int(last) + 2}")
        try:
            pair._build(f"lvm{tag}", f"lvw{tag}")
        except Exception:
            pair.close()
            raise
        return pair

    def _build(self, main_if: str, worker_if: str) -> None:
        for ns in (self.main_ns, self.worker_ns):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", main_if, "type", "veth", "peer", "name", worker_if)
        try:
            _ip("link", "set", main_if, "netns", self.main_ns)
            _ip("link", "set", worker_if, "netns", self.worker_ns)
        except Exception:
            subprocess.run(["ip", "link", "del", main_if], capture_output=True)
            raise
        for ns, dev, ip in ((self.main_ns, main_if, self.main_ip), (self.worker_ns, worker_if, self.worker_ip)):
            _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")

    def in_ns(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def main(self, argv: list[str]) -> list[str]:
        return self.in_ns(self.main_ns, argv)

    def worker(self, argv: list[str]) -> list[str]:
        return self.in_ns(self.worker_ns, argv)

    def pids(self, ns: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
        return [int(p) for p in done.stdout.split()]

    def close(self) -> None:
        """Kill everything running in our namespaces (only our test's processes are there), delete them."""
        for ns in self.created:
            for pid in self.pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.created.clear()
