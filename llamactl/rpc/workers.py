"""Workers by name: `workers.toml` beside the profiles (name = "host:port"), or host:port inline.

    # ~/.config/llamactl/workers.toml
    gpu-box = "10.0.0.2:50052"
    [attic]
    address = "10.0.0.3:50052"
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import ConfigError, ProfileError

DEFAULT_PORT = 50052  # rpc-server's own default


@dataclass(frozen=True)
class Worker:
    name: str  # the workers.toml name, or the host:port itself when given inline
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def label(self) -> str:
        return self.endpoint if self.name == self.endpoint else f"'{self.name}' ({self.endpoint})"


def parse_endpoint(text: str, where: str) -> tuple[str, int]:
    """"host:port" (or "host", port 50052) -> (host, port); a ConfigError naming `where` otherwise."""
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep or (":" in host and not host.startswith("[")):
        host, port_text = value, str(DEFAULT_PORT)
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536 or any(c.isspace() or c in "/,@" for c in host):
        raise ConfigError(f"{where}: {text!r} is not host:port", hint='write it like "10.0.0.2:50052"')
    return host, port


def is_endpoint(text: str) -> bool:
    """Whether a profile's rpc entry is an address (has a port, or is an IP) rather than a worker name."""
    if ":" in text:
        return True
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def workers_files(profile_dirs: list[Path]) -> list[Path]:
    """workers.toml beside each profiles directory (its parent), first listed first."""
    seen: list[Path] = []
    for d in profile_dirs:
        path = d.parent / "workers.toml"
        if path not in seen:
            seen.append(path)
    return seen


def parse_workers(text: str, where: str) -> dict[str, Worker]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from e
    workers: dict[str, Worker] = {}
    for name, value in data.items():
        address = value.get("address") if isinstance(value, dict) else value
        if not isinstance(address, str):
            raise ConfigError(f"{where}: worker {name!r} needs an address",
                              hint=f'{name} = "host:port", or [{name}] with address = "host:port"')
        host, port = parse_endpoint(address, f"{where}: worker {name!r}")
        workers[name] = Worker(name, host, port)
    return workers


def load_workers(profile_dirs: list[Path]) -> dict[str, Worker]:
    """Every named worker; a name in an earlier file wins."""
    workers: dict[str, Worker] = {}
    for path in reversed(workers_files(profile_dirs)):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
        workers.update(parse_workers(text, str(path)))
    return workers


def resolve_workers(entries: list[str], known: dict[str, Worker], where: str) -> list[Worker]:
    """A profile's `rpc` entries (worker names or host:port) -> workers, in order."""
    out: list[Worker] = []
    for entry in entries:
        if entry in known:
            worker = known[entry]
        elif is_endpoint(entry):
            host, port = parse_endpoint(entry, f"{where}, key rpc")
            worker = Worker(entry, host, port)
        else:
            names = ", ".join(sorted(known)) or "none"
            raise ProfileError(f"{where}, key rpc: no worker named {entry!r} (known: {names})",
                               hint=f'add `{entry} = "host:port"` to workers.toml beside the profiles, '
                                    "or write host:port in `rpc`")
        if any(w.endpoint == worker.endpoint for w in out):
            raise ProfileError(f"{where}, key rpc: {worker.label} is listed twice")
        out.append(worker)
    return out


def bind_problem(host: str) -> str | None:
    """Why binding rpc-server to `host` exposes it (it has no authentication), or None when it is private:
    loopback, RFC 1918 / unique-local / link-local addresses, or a name (resolved by the OS, not judged)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None if host == "localhost" else f"{host!r} is a host name; give the private IP address to bind"
    if address.is_unspecified:
        return f"{host} listens on every interface, public ones included"
    if address.is_loopback or address.is_private or address.is_link_local:
        return None
    return f"{host} is a public address"
