"""Which of a repo's files a reference means, without I/O: a quant tag matched against the GGUF names
(case-insensitive, as a whole word of the name), a split GGUF's parts kept together."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from llamactl.errors import ProfileError
from llamactl.gguf import SPLIT_PART_NAME
from llamactl.hf.refs import HfRef

_SPLIT = re.compile(SPLIT_PART_NAME.pattern, re.IGNORECASE)  # a repo's listing: any case of .gguf
# A projector or an imatrix file is never the model a quant tag means.
_NOT_A_MODEL = re.compile(r"(^|[/._-])(mmproj|imatrix)", re.IGNORECASE)
MAX_LISTED = 12


@dataclass(frozen=True)
class Selection:
    """The files one model is made of: one file, or every part of a split GGUF, the first part first."""

    files: tuple[str, ...]

    @property
    def first(self) -> str:
        return self.files[0]


def gguf_groups(files: Iterable[str]) -> dict[str, Selection]:
    """Each model in a file list: its first file -> every file it is made of (split parts grouped, ordered)."""
    singles: dict[str, Selection] = {}
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for name in files:
        if not name.lower().endswith(".gguf"):
            continue
        split = _SPLIT.match(name)
        if split:
            splits.setdefault((split["stem"], int(split["total"])), {})[int(split["part"])] = name
        else:
            singles[name] = Selection((name,))
    for (_, total), parts in splits.items():
        ordered = tuple(parts[i] for i in sorted(parts))
        singles[ordered[0]] = Selection(ordered)
    return singles


def is_complete(selection: Selection) -> bool:
    """Every part of a split GGUF is there (a single file always is)."""
    split = _SPLIT.match(selection.first)
    return split is None or len(selection.files) == int(split["total"])


def select(ref: HfRef, files: Iterable[str], *, where: str) -> Selection:
    """The files `ref` means among `files` (a repo's listing or a cached snapshot's); a ProfileError lists the
    candidates when none or several match."""
    groups = gguf_groups(files)
    if ref.path is not None:
        return _select_path(ref, groups, where)
    pattern = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(ref.quant or '')}(?![A-Za-z0-9_])", re.IGNORECASE)
    matches = [g for first, g in groups.items()
               if not _NOT_A_MODEL.search(first) and pattern.search(_SPLIT.sub(r"\g<stem>", first))]
    if len(matches) == 1:
        return matches[0]
    models = sorted(first for first in groups if not _NOT_A_MODEL.search(first))
    if not matches:
        raise ProfileError(f"{where}: quant tag '{ref.quant}' matches no GGUF file in {ref.repo}"
                           + (f"@{ref.revision}" if ref.revision else "") + f"; its GGUF files: {_listed(models)}",
                           hint=f"use one of their quant tags, or name the file: hf:{ref.repo}/FILE.gguf")
    names = sorted(m.first for m in matches)
    raise ProfileError(f"{where}: quant tag '{ref.quant}' matches several GGUF files in {ref.repo}: {_listed(names)}",
                       hint=f"name the one you want: hf:{ref.repo}/{names[0]}")


def _select_path(ref: HfRef, groups: dict[str, Selection], where: str) -> Selection:
    for group in groups.values():
        if ref.path in group.files:
            return group
    raise ProfileError(f"{where}: {ref.repo} has no file '{ref.path}'; its GGUF files: {_listed(sorted(groups))}",
                       hint="check the file name on the repo's page (Files and versions)")


def _listed(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")
