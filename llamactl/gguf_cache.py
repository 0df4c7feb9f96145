"""Parsed GGUF headers kept on disk between commands: `llamactl up` reads a model's header to plan it, and
walking a 262k-token vocabulary to reach the tensor table is a tenth of a second of every start.

One JSON file per model file, named by a hash of the file's identity (real path, device, inode, size,
modification time) and holding that identity, checked on every read: a model replaced or touched is parsed
again. The files are read as untrusted input: anything unexpected (not JSON, another identity, too large, a
directory) is ignored and the header parsed as if there were no cache; writing is best effort and atomic.
Used only where a command has set the directory (`use`): tests and library callers parse as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from llamactl.gguf import ArrayLength, GGUFFile, TensorInfo

FORMAT = 1
MAX_FILE_BYTES = 8 * 1024 * 1024  # a header's JSON: metadata arrays are at most 4096 items each
MAX_FILES = 256

_directory: Path | None = None


def use(directory: Path | None) -> None:
    """Keep parsed headers in `directory` from now on (None: not at all)."""
    global _directory
    _directory = directory


def _identity(path: Path, st: os.stat_result) -> dict[str, Any]:
    return {"path": str(path.resolve()), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _file_for(identity: dict[str, Any]) -> Path | None:
    if _directory is None:
        return None
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return _directory / f"{digest}.json"


def load(path: Path, st: os.stat_result) -> GGUFFile | None:
    identity = _identity(path, st)
    file = _file_for(identity)
    if file is None:
        return None
    try:
        with open(file, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            return None
        data = json.loads(raw, object_hook=_decode_value)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("identity") != identity:
            return None
        return _from_json(path, data["header"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


def save(path: Path, st: os.stat_result, header: GGUFFile) -> None:
    identity = _identity(path, st)
    file = _file_for(identity)
    if file is None:
        return
    try:
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps({"format": FORMAT, "identity": identity, "header": _to_json(header)},
                          default=_encode_value)
        if len(text) > MAX_FILE_BYTES:
            return
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, file)
        _prune(file.parent)
    except (OSError, ValueError, TypeError):
        pass  # a cache: the header was parsed, the command goes on


def _prune(folder: Path) -> None:
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    for old in files[:-MAX_FILES]:
        old.unlink(missing_ok=True)


def _to_json(header: GGUFFile) -> dict[str, Any]:
    return {"version": header.version, "metadata": header.metadata, "alignment": header.alignment,
            "data_offset": header.data_offset, "file_size_bytes": header.file_size_bytes,
            "tensors": [[t.name, t.type_name, list(t.shape), t.n_bytes, t.offset] for t in header.tensors]}


def _from_json(path: Path, data: dict[str, Any]) -> GGUFFile:
    tensors = tuple(TensorInfo(str(name), str(type_name), tuple(int(d) for d in shape), int(n_bytes), int(offset))
                    for name, type_name, shape, n_bytes, offset in data["tensors"])
    metadata = data["metadata"]
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return GGUFFile(path=path, version=int(data["version"]), metadata=metadata, tensors=tensors,
                    alignment=int(data["alignment"]), data_offset=int(data["data_offset"]),
                    file_size_bytes=int(data["file_size_bytes"]), tensor_index={t.name: t for t in tensors})


def _encode_value(value: Any) -> Any:
    if isinstance(value, ArrayLength):
        return {"__array_length__": value.length, "item_type": value.item_type}
    raise TypeError(f"{type(value).__name__} in a GGUF header")


def _decode_value(obj: dict[str, Any]) -> Any:
    if "__array_length__" in obj:
        return ArrayLength(int(obj["__array_length__"]), int(obj["item_type"]))
    return obj
