"""Which HTTP routes a llama-server binary serves: read once from the binary itself, cached by path + mtime.

Route paths are string literals in the server (`ctx_http.post("/v1/messages", ...)`), so they are in the
executable's read-only data. A file without the "/health" literal is not a llama-server executable (a
wrapper script, a launcher): nothing is concluded from it. A path found may still be something else's
string or the tail of a longer one (linkers merge "/responses" into "/v1/responses"), so the probe can
say "served" wrongly, never "missing": the router also reads a 404 from the engine for a relayed route as
"this build lacks it".
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Iterable
from pathlib import Path

PROBE_VERSION = 2
MARKER = b"/health\0"  # every llama-server build serves /health


def routes_in(data: bytes | mmap.mmap, paths: Iterable[str]) -> frozenset[str]:
    """The paths whose literal (NUL-terminated, as C strings are stored) occurs in `data`."""
    return frozenset(p for p in paths if data.find(p.encode() + b"\0") >= 0)


def probe_routes(binary: Path, cache_dir: Path, paths: Iterable[str]) -> frozenset[str] | None:
    """The subset of `paths` the binary serves; None when it cannot be told (unreadable, or not the server
    executable itself)."""
    paths = sorted(set(paths))
    try:
        st = binary.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{binary.resolve()}|{st.st_mtime_ns}|{st.st_size}|{'|'.join(paths)}|{PROBE_VERSION}"
                       .encode()).hexdigest()
    cache_file = cache_dir / "routes" / f"{key}.json"
    try:
        cached = json.loads(cache_file.read_text())["routes"]
        return None if cached is None else frozenset(cached)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        with binary.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found: frozenset[str] | None = routes_in(data, paths) if data.find(MARKER) >= 0 else None
    except (OSError, ValueError):
        return None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"binary": str(binary), "routes": None if found is None else sorted(found)}))
        tmp.replace(cache_file)
    except OSError:
        pass  # an unwritable cache only costs a re-read next time
    return found
