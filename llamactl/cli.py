"""Click commands: parse, call the library, print. No business logic here."""

from __future__ import annotations

import sys

import click

from llamactl.errors import LlamactlError
from llamactl.settings import Settings


class LlamactlGroup(click.Group):
    """Maps every LlamactlError to its message and exit code, in one place."""

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
    ctx.obj = Settings()
