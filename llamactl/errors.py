"""One family of user-facing errors. Each says what was wrong, where, and what to do.

Lower-level exceptions (OSError, httpx, NVML, pydantic) are caught at the adapter that calls them
and re-raised as one of these; cli.py maps them to exit codes in one place.
"""

from __future__ import annotations


class LlamactlError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


def first_line(error: BaseException) -> str:
    """The first line of what an error says (a status line's worth); its type's name where it says nothing
    (asyncio's TimeoutError, an error raised with an empty message)."""
    text = error.message if isinstance(error, LlamactlError) else str(error)
    return next((line for line in text.splitlines() if line.strip()), type(error).__name__)


class ConfigError(LlamactlError):
    """A settings file or environment variable is invalid."""

    exit_code = 2


class ProfileError(LlamactlError):
    """A profile file is invalid: names the file, the key path and the fix."""

    exit_code = 2


class ProfileNotFound(ProfileError):
    pass


class HubError(LlamactlError):
    """A model could not be had from the Hugging Face Hub (no such repo, gated, offline, network, disk full)."""

    exit_code = 2


class EngineNotFound(LlamactlError):
    """No llama-server binary for the engine a profile asks for."""

    exit_code = 3


class UnsupportedFlag(LlamactlError):
    """The profile needs a flag the engine binary does not accept."""

    exit_code = 3


class EngineBuildError(LlamactlError):
    exit_code = 3


class StartError(LlamactlError):
    """The engine exited or never became ready while starting. `cause` is a short classification."""

    exit_code = 4

    def __init__(self, message: str, *, cause: str, log_tail: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.cause = cause
        self.log_tail = log_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.log_tail:
            text += "\n  last log lines:\n" + "\n".join(f"    {line}" for line in self.log_tail)
        return text


class NotRunning(LlamactlError):
    exit_code = 5


class StartCancelled(StartError):
    """A start stopped on purpose (`llamactl down`, a shutdown) before the engine was ready."""

    def __init__(self, message: str) -> None:
        super().__init__(message, cause="cancelled", log_tail=[])


class DoesNotFit(LlamactlError):
    """The memory plan says the profile does not fit the GPUs (or RAM); nothing was started."""

    exit_code = 7
