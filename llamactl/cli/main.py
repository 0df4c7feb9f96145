"""The `llamactl` command group: settings built once, and every LlamactlError mapped to its message and exit
code in one place (`LlamactlGroup`). Commands live in the modules beside it; none holds business logic."""

from __future__ import annotations

import sys

import click

from llamactl.errors import LlamactlError
from llamactl.settings import Settings


class LlamactlGroup(click.Group):
    """Maps every LlamactlError (and a bad LLAMACTL_* setting) to its message and exit code, in one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LlamactlError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=LlamactlGroup)
@click.version_option(package_name="llamactl")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Plan, start, supervise and route llama.cpp servers."""
    from llamactl.settings import load_settings

    ctx.obj = load_settings()


pass_settings = click.make_pass_decorator(Settings)


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
