"""Reading engine log lines (both forks): why a start failed, and per-request acceptance."""

from __future__ import annotations

import re
from dataclasses import dataclass

# (cause, what to do, patterns), root causes first: the first cause with a matching line wins. The order
# matters because an engine reports consequences after the cause (an allocation failure is followed by
# "failed to load model", which alone would mean an unreadable file).
EXIT_CAUSES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("port in use", "another process took the port; llamactl retries with a new one",
     ("couldn't bind", "address already in use", "bind to server socket")),
    ("bad flag", "a flag is unknown to this binary or has a bad value; check the profile and `llamactl engines`",
     ("invalid argument", "unknown argument", "argument has been removed", "error while handling argument",
      "unknown speculative decoding type", "invalid value")),
    ("out of memory", "lower ctx_size, use a quantised KV cache, fewer slots or fewer GPU layers "
                      "(`llamactl plan PROFILE` shows the numbers)",
     ("out of memory", "failed to allocate", "cudamalloc failed", "unable to allocate", "std::bad_alloc",
      "not enough memory", "ggml_backend_alloc_ctx_tensors_from_buft: failed")),
    ("model file unreadable", "check the model path and that the file is a complete GGUF",
     ("failed to open", "no such file", "gguf_init_from_file", "failed to load model", "error loading model",
      "failed to read", "invalid magic", "unable to load model")),
)

# mainline: "draft acceptance = 0.50000 (   8 accepted /    16 generated), mean len =  1.80";
# the pinned ik: "draft acceptance rate = 0.62500 (   10 accepted /    16 generated)"
_ACCEPT = re.compile(r"draft acceptance(?: rate)?\s*=\s*([0-9.]+)\s*\(\s*(\d+)\s+accepted\s*/\s*(\d+)\s+generated\)"
                     r"(?:,\s*mean len\s*=\s*([0-9.]+))?")


@dataclass(frozen=True)
class ExitCause:
    cause: str
    hint: str
    line: str | None


def classify_exit(lines: list[str]) -> ExitCause:
    """Why did the engine exit during start? The first cause (in EXIT_CAUSES order) found in its log lines,
    quoting the newest line that shows it."""
    lowered = [line.lower() for line in reversed(lines)]
    for cause, hint, patterns in EXIT_CAUSES:
        for low, line in zip(lowered, reversed(lines)):
            if any(p in low for p in patterns):
                return ExitCause(cause, hint, line.strip())
    return ExitCause("exited", "read the log lines below; `llamactl logs PROFILE` has the whole log", None)


@dataclass(frozen=True)
class Acceptance:
    rate: float
    accepted: int
    generated: int
    mean_len: float | None = None


def parse_acceptance(line: str) -> Acceptance | None:
    """The per-request acceptance line both forks print (ik's pinned build reports it only here)."""
    match = _ACCEPT.search(line)
    if not match:
        return None
    mean_len = float(match.group(4)) if match.group(4) else None
    return Acceptance(float(match.group(1)), int(match.group(2)), int(match.group(3)), mean_len)
