"""`llamactl profiles` and `profiles validate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from llamactl.cli.main import main, pass_settings, profile_argument
from llamactl.errors import ProfileError

if TYPE_CHECKING:
    from llamactl.settings import Settings



@main.group(invoke_without_command=True)
@click.pass_context
def profiles(ctx: click.Context) -> None:
    """List profiles (and where each comes from)."""
    if ctx.invoked_subcommand is None:
        from llamactl.profiles import load_all, profile_files

        settings = ctx.obj
        files = profile_files(settings)
        loaded, errors = load_all(settings)
        for name, path in files.items():
            if name in errors:
                click.echo(f"{name:<20} INVALID  {path}")
                continue
            p = loaded[name]
            spec = p.speculation.type if p.speculation.enabled else "-"
            click.echo(f"{name:<20} {p.engine:<13} spec={spec:<10} {path}")


@profiles.command("validate")
@profile_argument("names", nargs=-1)
@click.option("--no-files", is_flag=True, help="Skip checks that read model files (existence, context).")
@pass_settings
def profiles_validate(settings: Settings, names: tuple[str, ...], no_files: bool) -> None:
    """Check all profiles (or NAMES); exit non-zero on any error."""
    from llamactl.profiles import load_all
    from llamactl.validate import group_warnings, validate_profiles

    results = validate_profiles(settings, list(names) or None, check_files=not no_files)
    warnings = group_warnings(load_all(settings)[0])
    bad = 0
    for name, problem in results.items():
        if problem is None:
            click.echo(f"ok      {name}")
        else:
            bad += 1
            click.echo(f"ERROR   {name}\n  " + str(problem).replace("\n", "\n  "))
        if name in warnings:
            click.echo(f"  warning: {warnings[name]}")
    if bad:
        raise ProfileError(f"{bad} of {len(results)} profiles have errors", hint="fix what is shown above")


