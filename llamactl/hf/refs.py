"""`hf:` model references, parsed without I/O.

    hf:OWNER/REPO:QUANT[@REVISION]          the repo's GGUF whose name carries the quant tag (Q4_K_M, UD-Q4_K_XL)
    hf:OWNER/REPO/PATH/FILE.gguf[@REVISION] one file (a split GGUF's first part brings the other parts)

Names are never paths: every part is checked against the characters the Hub allows, and `..`, empty segments
and absolute paths are refused, so a reference can only ever name a file inside the repo's cache folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llamactl.errors import ProfileError

HF_PREFIX = "hf:"
MAX_REF_CHARS = 512
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?")  # the Hub's owner and repo names
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SEGMENT = re.compile(r"[A-Za-z0-9._+-]{1,200}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
SYNTAX = "hf:OWNER/REPO:QUANT or hf:OWNER/REPO/FILE.gguf, optionally followed by @REVISION"


@dataclass(frozen=True)
class HfRef:
    repo: str  # OWNER/REPO
    quant: str | None = None  # exactly one of quant and path
    path: str | None = None  # inside the repo, '/'-separated
    revision: str | None = None  # None: the default branch

    @property
    def revision_or_main(self) -> str:
        return self.revision or "main"

    def __str__(self) -> str:
        body = f"{self.repo}:{self.quant}" if self.quant else f"{self.repo}/{self.path}"
        return f"{HF_PREFIX}{body}" + (f"@{self.revision}" if self.revision else "")


def is_hf_ref(value: object) -> bool:
    return isinstance(value, str) and value.startswith(HF_PREFIX)


def parse_ref(text: str) -> HfRef:
    """Parse an `hf:` reference; a ProfileError says which part is wrong and shows the syntax."""
    if not is_hf_ref(text):
        raise _bad(text, f"does not start with '{HF_PREFIX}'")
    if len(text) > MAX_REF_CHARS:
        raise _bad(text[:60] + "...", f"longer than {MAX_REF_CHARS} characters")
    body = text.removeprefix(HF_PREFIX)
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision or revision.endswith("/"):
            raise _bad(text, f"revision '{revision}' is not a branch, tag or commit name")
    quant = path = None
    if ":" in body:
        repo, quant = body.split(":", 1)
        if not _QUANT.fullmatch(quant):
            raise _bad(text, f"quant tag '{quant}' may hold only letters, digits, '.', '_' and '-' (e.g. Q4_K_M)")
    else:
        parts = body.split("/")
        if len(parts) < 3:
            raise _bad(text, "names a repo but not which file: add a quant tag (':Q4_K_M') or a file ('/FILE.gguf')")
        repo, path = "/".join(parts[:2]), "/".join(parts[2:])
        for segment in parts[2:]:
            if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
                raise _bad(text, f"file path '{path}' has a bad part '{segment}' (names are never paths: no '..', "
                                 "no empty parts, only letters, digits, '.', '_', '+' and '-')")
        if not path.lower().endswith(".gguf"):
            raise _bad(text, f"file '{path}' is not a .gguf file")
    _check_repo(text, repo)
    return HfRef(repo=repo, quant=quant, path=path, revision=revision)


def _check_repo(text: str, repo: str) -> None:
    parts = repo.split("/")
    if len(parts) != 2:
        raise _bad(text, f"repo '{repo}' is not OWNER/REPO")
    for part in parts:
        if not _NAME.fullmatch(part) or ".." in part or "--" in part:
            raise _bad(text, f"'{part}' in '{repo}' is not a Hub name (letters, digits, '.', '_', '-'; at most 96)")


def _bad(text: str, why: str) -> ProfileError:
    return ProfileError(f"model reference '{text}': {why}", hint=f"write it as {SYNTAX}")


def is_safe_repo_path(name: str) -> bool:
    """A file name from a repo's listing that can only land inside the repo's cache folder."""
    parts = name.split("/")
    return len(name) <= 1000 and all(p not in ("", ".", "..") and _SEGMENT.fullmatch(p) for p in parts)
