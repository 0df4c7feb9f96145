"""What a llama-server binary accepts: probed once from `--help` / `--version`, cached by path + mtime."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from llamactl.errors import EngineNotFound

FLAG_RE = re.compile(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9_-]*)")
VERSION_RE = re.compile(r"version:\s*(\S+(?:\s*\([^)]*\))?)")
PROBE_TIMEOUT_S = 60


Verifier = Callable[[Sequence[str]], bool]


@dataclass(frozen=True)
class Capabilities:
    """Flags a binary documents in --help, plus (for a probed binary) a try-run for the rest:
    ik_llama.cpp accepts flags its help does not list (-a, -ngl, -sm, -ts, -mg, -ngld, -devd)."""

    binary: str
    version: str
    flags: frozenset[str]
    help_text: str = field(repr=False, default="")
    verifier: Verifier | None = field(repr=False, default=None, compare=False)
    _verified: dict[tuple[str, ...], bool] = field(repr=False, default_factory=dict, compare=False)

    def accepts(self, flag: str, values: Sequence[object] = ()) -> bool:
        if flag in self.flags:
            return True
        if self.verifier is None:
            return False
        key = (flag, *map(str, values))
        if key not in self._verified:
            self._verified[key] = self.verifier(key)
        return self._verified[key]

    def first(self, *spellings: str, values: Sequence[object] = ()) -> str | None:
        """The first spelling this binary accepts (documented first, then tried), or None."""
        documented = next((s for s in spellings if s in self.flags), None)
        if documented is not None:
            return documented
        return next((s for s in spellings if self.accepts(s, values)), None)

    def aliases(self, flag: str) -> frozenset[str]:
        """Every spelling of `flag` its usage line in --help lists ("-n, --draft-max, --draft, --draft-n N"), `flag`
        among them; just `flag` where no usage line starts with it."""
        return self._usage_spellings.get(flag, frozenset((flag,)))

    @cached_property
    def _usage_spellings(self) -> dict[str, frozenset[str]]:
        """Each flag -> the spellings of the first --help usage line that lists it (read once per binary)."""
        out: dict[str, frozenset[str]] = {}
        for line in self.help_text.splitlines():
            spellings = []
            for token in line.split():
                if not token.startswith("-"):
                    break
                spellings.append(token.rstrip(","))
                if not token.endswith(","):
                    break
            group = frozenset(spellings)
            for spelling in spellings:
                out.setdefault(spelling, group)
        return out

    def help_for(self, flag: str) -> str:
        """The help lines that mention `flag` (its usage line and description)."""
        lines = self.help_text.splitlines()
        out: list[str] = []
        for i, line in enumerate(lines):
            if flag in FLAG_RE.findall(line):
                out.extend(lines[i : i + 3])
        return "\n".join(out)


def parse_capabilities(binary: str, help_text: str, version_text: str,
                       verifier: Verifier | None = None) -> Capabilities:
    """Pure: turn --help and --version output into Capabilities."""
    match = VERSION_RE.search(version_text)
    version = match.group(1) if match else (version_text.strip().splitlines() or ["unknown"])[-1]
    return Capabilities(binary=binary, version=version, flags=frozenset(FLAG_RE.findall(help_text)),
                        help_text=help_text, verifier=verifier)


def try_run_verifier(binary: Path) -> Verifier:
    """Both forks parse arguments left to right and exit 0 at --version, after rejecting an
    unknown flag or a bad value: so `binary FLAG VALUE --version` tells if FLAG VALUE is accepted."""

    def verify(args: Sequence[str]) -> bool:
        try:
            done = subprocess.run([str(binary), *args, "--version"], capture_output=True, text=True,
                                  errors="replace", timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0 and "version" in (done.stdout + done.stderr).lower()

    return verify


def _run(binary: Path, arg: str) -> str:
    try:
        done = subprocess.run([str(binary), arg], capture_output=True, text=True, errors="replace",
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise EngineNotFound(f"cannot run {binary}: {e.strerror}",
                             hint="check the path and that the file is an executable llama-server") from e
    except subprocess.TimeoutExpired as e:
        raise EngineNotFound(f"{binary} {arg} did not answer within {PROBE_TIMEOUT_S} s",
                             hint="is this really a llama-server binary?") from e
    return done.stdout + done.stderr


def probe(binary: Path, cache_dir: Path) -> Capabilities:
    """Probe `binary` once; the result is cached under cache_dir keyed by path, mtime and size."""
    try:
        st = binary.stat()
    except OSError as e:
        raise EngineNotFound(f"llama-server binary {binary} not found", hint="fix the path or run "
                             "`llamactl engines install`") from e
    key = hashlib.sha1(f"{binary.resolve()}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()
    cache_file = cache_dir / "capabilities" / f"{key}.json"
    if cache_file.exists():
        try:
            data = json.loads(cache_file.read_text())
            return parse_capabilities(str(binary), data["help"], data["version"], try_run_verifier(binary))
        except (OSError, ValueError, KeyError):
            pass
    help_text = _run(binary, "--help")
    if not FLAG_RE.search(help_text) or "--port" not in help_text:
        raise EngineNotFound(f"{binary} --help does not look like llama-server's help",
                             hint="point the profile's `binary` at a llama-server executable")
    version_text = _run(binary, "--version")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"help": help_text, "version": version_text}))
    tmp.replace(cache_file)
    return parse_capabilities(str(binary), help_text, version_text, try_run_verifier(binary))
