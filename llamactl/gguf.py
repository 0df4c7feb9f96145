"""GGUF metadata reader (the `gguf` package): metadata and tensor table, never the weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import ProfileError


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    architecture: str
    name: str
    context_length: int | None
    block_count: int | None
    file_size_bytes: int


def read_model_info(path: Path) -> ModelInfo:
    """Read the few metadata keys llamactl needs. Raises ProfileError if the file is not a GGUF."""
    from gguf import GGUFReader  # imported lazily: numpy import costs ~0.1 s on every CLI call

    try:
        reader = GGUFReader(str(path), "r")
    except (OSError, ValueError) as e:
        raise ProfileError(f"{path}: not a readable GGUF model file: {e}",
                           hint="check the path, or re-download the model") from e

    def value(key: str):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture") or "unknown"
    return ModelInfo(
        path=path,
        architecture=arch,
        name=value("general.name") or path.stem,
        context_length=value(f"{arch}.context_length"),
        block_count=value(f"{arch}.block_count"),
        file_size_bytes=path.stat().st_size,
    )
