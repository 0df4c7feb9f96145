"""The `llamactl` command group: settings built once, and every LlamactlError mapped to its message and exit
code in one place (`LlamactlGroup`). Commands live in the modules beside it; none holds business logic."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from llamactl.errors import ConfigError, LlamactlError

if TYPE_CHECKING:
    from llamactl.settings import Settings

INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE


class LlamactlGroup(click.Group):
    """Maps every error to a sentence and an exit code, in one place: a LlamactlError (and a bad LLAMACTL_*
    setting) to its message and code, an OSError to the path and what to check, anything else to "internal
    error" (a bug). No traceback reaches the user unless LLAMACTL_DEBUG=1 asks for one."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LlamactlError as e:
            _fail(e)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as e:
            if _debug():
                raise
            _fail(os_error(e, ctx.obj))
        except Exception as e:
            if _debug():
                raise
            _fail(LlamactlError(f"internal error: {type(e).__name__}: {str(e)[:500]}",
                                hint="this is a bug in llamactl: please report it with the command; "
                                     "LLAMACTL_DEBUG=1 shows the traceback"), INTERNAL_ERROR_EXIT)


def _debug() -> bool:
    return os.environ.get("LLAMACTL_DEBUG", "") not in ("", "0")


def _fail(error: LlamactlError, code: int | None = None):
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code if code is None else code)


def os_error(e: OSError, settings: "Settings | None") -> LlamactlError:
    """An OSError as a sentence: the path, the system's reason; when the path is one of llamactl's own
    directories, which setting places it (a ConfigError: exit 2)."""
    path = e.filename if e.filename is not None else "a file"
    message = f"cannot use {path}: {e.strerror or e}"
    if settings is not None and hasattr(settings, "state_dir") and e.filename is not None:
        failed = Path(os.fsdecode(e.filename))
        dirs = {"state": settings.state_dir, "cache": settings.cache_dir, "config": settings.config_dir}
        for purpose, directory in dirs.items():
            if failed == directory or directory in failed.parents or failed in directory.parents:
                return ConfigError(f"{message} (llamactl's {purpose} directory is {directory})",
                                   hint="set LLAMACTL_HOME (or XDG_STATE_HOME / XDG_CACHE_HOME / XDG_CONFIG_HOME) to "
                                        "a directory this user can write, or fix the permissions there")
    return LlamactlError(message, hint="check that the path exists, is of the right kind and this user may use it")


@click.group(cls=LlamactlGroup)
@click.version_option(package_name="llamactl")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Plan, start, supervise and route llama.cpp servers."""
    from llamactl import gguf_cache
    from llamactl.settings import load_settings

    ctx.obj = load_settings()
    gguf_cache.use(ctx.obj.cache_dir / "gguf-headers")  # a model's header is parsed once, not at every `up`


pass_settings = click.pass_obj  # ctx.obj is the Settings main() built (no import of them here: start-up time)


def _checked_names(_ctx: click.Context, _param: click.Parameter, value):
    """Profile names are file stems: checked where they enter (llamactl.names), before anything uses them."""
    from llamactl.names import check_profile_name

    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(check_profile_name(v) for v in value)
    return check_profile_name(value)


def profile_argument(name: str = "profile", **kwargs):
    """A click argument holding a profile name (or several, with nargs=-1), validated on entry."""
    return click.argument(name, callback=_checked_names, **kwargs)
