"""GGUF metadata and tensor table reader: never reads the weights.

The type tables (value types, quantisation block sizes) come from the `gguf` package. The header is
walked with a small streaming parser instead of `gguf.GGUFReader`, which memory-maps the file and
builds a numpy view per array element: 20+ s for a 262k-token vocabulary versus ~0.2 s here.
Large arrays (the tokenizer's tokens, scores, merges) are skipped and only their length is kept.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from llamactl.errors import ProfileError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Arrays longer than this are not materialised (their length is kept in ArrayLength).
MAX_ARRAY_ITEMS = 4096

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArrayLength:
    """A long metadata array that was skipped: only its length and item type are known."""

    length: int
    item_type: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # ggml type name, e.g. "Q4_K", "F16"
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first
    n_bytes: int
    offset: int  # relative to the start of the data section

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def layer(self) -> int | None:
        """Block index for `blk.N.*` tensors, else None (token_embd, output, output_norm, ...)."""
        if self.name.startswith("blk."):
            part = self.name.split(".", 2)[1]
            if part.isdigit():
                return int(part)
        return None


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    architecture: str
    name: str
    context_length: int | None
    block_count: int | None
    file_size_bytes: int
    sliding_window: int = 0  # tokens in a sliding-window attention layer's window (0: no such layers)
    n_vocab: int | None = None

    @property
    def has_sliding_window(self) -> bool:
        return self.sliding_window > 0


# llama.cpp's names for the parts of a split GGUF (llama_split_path): STEM-00001-of-00003.gguf, ...
SPLIT_PART_NAME = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFFile:
    """Everything llamactl knows about a GGUF without reading its weights. For a split GGUF read whole
    (`read_model`), the tensors of every part, their sizes summed, and each part's own header in `parts`."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size_bytes: int
    tensor_index: dict[str, TensorInfo] = field(default_factory=dict, repr=False, compare=False)
    parts: tuple["GGUFFile", ...] = ()  # a split GGUF's parts, the first first; () for one file

    @property
    def split_count(self) -> int:
        """How many files the model is split into (1: not split), as this file's header says."""
        value = self.metadata.get("split.count")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture") or "unknown")

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    def get(self, key: str, default: Any = None) -> Any:
        """Architecture-relative key: get('block_count') reads '{arch}.block_count'."""
        value = self.metadata.get(f"{self.architecture}.{key}")
        return default if value is None else value

    def tensor(self, name: str) -> TensorInfo | None:
        return self.tensor_index.get(name)

    @cached_property
    def n_vocab(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, (list, ArrayLength)):  # anything else is a damaged header: the embedding says
            return len(tokens)
        embd = self.tensor("token_embd.weight")
        return embd.shape[1] if embd and len(embd.shape) > 1 else 0

    @property
    def data_end(self) -> int:
        """Where the last tensor's data ends: a file shorter than this is truncated (of one file: each part of a
        split model read whole says its own, in `parts`)."""
        return self.data_offset + max((t.offset + t.n_bytes for t in self.tensors), default=0)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def model_info(self) -> ModelInfo:
        arch = self.architecture
        return ModelInfo(
            path=self.path,
            architecture=arch,
            name=self.name,
            context_length=_int_or_zero(self.metadata.get(f"{arch}.context_length")) or None,
            block_count=_int_or_zero(self.metadata.get(f"{arch}.block_count")) or None,
            file_size_bytes=self.file_size_bytes,
            sliding_window=_int_or_zero(self.metadata.get(f"{arch}.attention.sliding_window")),
            n_vocab=self.n_vocab or None,
        )


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.pos = 0
        self.size = size  # the file's: no string of a sound header is longer, so none is read (or buffered) past it

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError(f"file ends at byte {self.pos + len(data)} inside the GGUF header")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        self.f.seek(n, 1)
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.read(size))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > min(1 << 30, self.size):
            raise ValueError(f"string of {n} bytes at byte {self.pos}: corrupt header")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            if count > MAX_ARRAY_ITEMS:
                self.skip_items(item_type, count)
                return ArrayLength(count, item_type)
            return [self.value(item_type) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        return self.unpack(fmt)

    def skip_items(self, item_type: int, count: int) -> None:
        if item_type in _SCALAR_FORMATS:
            self.skip(struct.calcsize(_SCALAR_FORMATS[item_type]) * count)
        elif item_type == _STRING:
            # Walk the lengths through a buffer instead of one read per string.
            unpack_len = struct.Struct("<Q").unpack_from
            buf, i, remaining = b"", 0, count
            while remaining:
                if i + 8 <= len(buf):
                    n = unpack_len(buf, i)[0]
                    if n > self.size:
                        raise ValueError(f"string of {n} bytes in an array near byte {self.pos + i}: corrupt header")
                    end = i + 8 + n
                    if end <= len(buf):
                        i = end
                        remaining -= 1
                        continue
                    need = end - len(buf)
                else:
                    need = 8
                chunk = self.f.read(max(1 << 20, need))
                if not chunk:
                    raise ValueError("file ends inside a string array")
                buf = buf[i:] + chunk
                self.pos += i
                i = 0
            self.pos += i
            self.f.seek(i - len(buf), 1)
        else:
            for _ in range(count):
                self.value(item_type)


def _type_tables() -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    constants = _gguf_constants()
    sizes = {int(k): v for k, v in constants.GGML_QUANT_SIZES.items()}
    names = {int(t): t.name for t in constants.GGMLQuantizationType}
    return sizes, names


def _gguf_constants():
    """The `gguf` package's constants module (the type tables). Loaded by itself when the package is not yet
    imported: `import gguf` runs the package's __init__, which imports its reader, writer and numpy (~0.25 s of
    `llamactl up`), while gguf/constants.py needs only enum and typing."""
    import importlib.util
    import sys

    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    package = importlib.util.find_spec("gguf")
    locations = list(package.submodule_search_locations or []) if package else []
    spec = importlib.util.spec_from_file_location("llamactl._gguf_constants", Path(locations[0]) / "constants.py") \
        if locations else None
    if spec is None or spec.loader is None or not Path(spec.origin or "").is_file():
        import gguf.constants  # an unusual install (a zip, a namespace package): the ordinary import

        return gguf.constants
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_gguf(path: Path) -> GGUFFile:
    """Parse the GGUF header: metadata (long arrays skipped) and the tensor table.

    Raises ProfileError if the file is missing or not a GGUF. Cached per (path, mtime, size, inode): one
    `llamactl up` reads a header for the context check and again for the plan; and on disk between commands
    where the command set a directory for it (llamactl/gguf_cache.py).
    """
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a directory, a device (/dev/zero) or a FIFO (opening it would block)
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ProfileError(f"{path}: {kind}, not a model file", hint="point `model` at a .gguf file")
        return _read_cached(path, st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError as e:
        raise ProfileError(f"{path}: cannot read model file: {e.strerror}",
                           hint="check the path, or re-download the model") from e
    except RecursionError:  # arrays nested past Python's stack (no engine reads arrays of arrays)
        raise ProfileError(f"{path}: not a readable GGUF model file: metadata arrays nested too deep",
                           hint="check the path, or re-download the model") from None
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not a readable GGUF model file: {e}",
                           hint="check the path, or re-download the model") from e


def clear_header_cache() -> None:
    """Forget parsed headers (benchmarks time cold reads with it)."""
    _read_cached.cache_clear()


@functools.lru_cache(maxsize=16)
def _read_cached(path: Path, mtime_ns: int, size: int, inode: int) -> GGUFFile:
    from llamactl import gguf_cache  # headers kept between commands, where a command asked for it

    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        kept = gguf_cache.load(path, st)
        if kept is not None:
            return kept
        header = _parse(path, f, size)
    gguf_cache.save(path, st, header)
    return header


def _parse(path: Path, f: BinaryIO, size: int) -> GGUFFile:
    r = _Reader(f, size)
    magic = r.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"bad magic {magic!r} (expected b'GGUF')")
    version = r.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors = r.unpack("<Q")
    n_kv = r.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.unpack("<I")
        metadata[key] = r.value(vtype)
    alignment = int(metadata.get("general.alignment") or DEFAULT_ALIGNMENT)
    sizes, names = _type_tables()
    raw = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("<I")
        shape = tuple(r.unpack("<Q") for _ in range(n_dims))
        ttype = r.unpack("<I")
        offset = r.unpack("<Q")
        raw.append((name, shape, ttype, offset))
    data_offset = -(-r.pos // alignment) * alignment
    tensors = []
    for name, shape, ttype, offset in raw:
        if ttype not in sizes:
            raise ValueError(f"tensor {name}: unknown ggml type {ttype}")
        block, type_size = sizes[ttype]
        n = 1
        for d in shape:
            n *= d
        tensors.append(TensorInfo(name, names.get(ttype, str(ttype)), shape, n // block * type_size, offset))
    tensors_t = tuple(tensors)
    return GGUFFile(
        path=path, version=version, metadata=metadata, tensors=tensors_t, alignment=alignment,
        data_offset=data_offset, file_size_bytes=size, tensor_index={t.name: t for t in tensors_t},
    )


def split_part_paths(path: Path, first: GGUFFile) -> tuple[Path, ...]:
    """Every file of the model whose first file is `path` (its header: `first`), as llama.cpp finds them from
    the first part's name; (path,) for a model in one file. A ProfileError for a part other than the first, or
    a first part not named as the engine looks for the others."""
    count = first.split_count
    if count == 1:
        return (path,)
    number = first.metadata.get("split.no")
    named = SPLIT_PART_NAME.match(path.name)
    if isinstance(number, int) and number != 0:
        first_name = f"{named['stem']}-00001-of-{count:05d}.gguf" if named else "its first part"
        raise ProfileError(f"{path}: part {number + 1} of {count} of a split GGUF; the engine loads a split model "
                           "from its first part", hint=f"point `model` at {first_name}")
    if named is None or int(named["total"]) != count or int(named["part"]) != 1:
        raise ProfileError(f"{path}: the first of {count} parts of a split GGUF, not named as the engine finds the "
                           f"others (NAME-00001-of-{count:05d}.gguf, NAME-00002-of-{count:05d}.gguf, ...)",
                           hint="keep the parts' names as they were published")
    return tuple(path.with_name(f"{named['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))


def read_model(path: Path) -> GGUFFile:
    """The model that `path` starts: its header, or for the first part of a split GGUF every part's tensors
    (what the engine loads from that path). A ProfileError names a part that is missing, unreadable or of
    another split."""
    path = Path(path)
    first = read_gguf(path)
    paths = split_part_paths(path, first)
    if len(paths) == 1:
        return first
    parts = [first]
    for i, part_path in enumerate(paths[1:], start=2):
        if not part_path.exists():
            raise ProfileError(f"{path}: part {i} of {len(paths)} of this split GGUF is missing: looked at "
                               f"{part_path}", hint="download every part of the model (llamactl pull of the "
                               "first part fetches them all)")
        part = read_gguf(part_path)
        if part.split_count != len(paths) or part.metadata.get("split.no") != i - 1:
            raise ProfileError(f"{part_path}: not part {i} of {len(paths)} of {path.name}'s split (its header says "
                               f"part {_part_number(part)} of {part.split_count})",
                               hint="download the model's parts again, all from one release")
        parts.append(part)
    tensors = tuple(t for part in parts for t in part.tensors)
    return GGUFFile(path=path, version=first.version, metadata=first.metadata, tensors=tensors,
                    alignment=first.alignment, data_offset=first.data_offset,
                    file_size_bytes=sum(part.file_size_bytes for part in parts),
                    tensor_index={t.name: t for t in tensors}, parts=tuple(parts))


def _part_number(part: GGUFFile) -> str:
    number = part.metadata.get("split.no")
    return str(number + 1) if isinstance(number, int) else "?"


def read_model_info(path: Path) -> ModelInfo:
    """Read the few metadata keys llamactl needs (a split GGUF's first part holds them all; its file size is that
    part's). Raises ProfileError if the file is not a GGUF."""
    return read_gguf(Path(path)).model_info()
