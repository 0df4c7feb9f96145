"""`llamactl engines` and `engines install`."""

from __future__ import annotations

import click

from llamactl.cli.main import main, pass_settings
from llamactl.errors import LlamactlError
from llamactl.settings import Settings



@main.group(invoke_without_command=True)
@click.pass_context
def engines(ctx: click.Context) -> None:
    """List the llama-server binaries llamactl finds, and their versions."""
    if ctx.invoked_subcommand is not None:
        return
    from llamactl.engines import probe
    from llamactl.engines.binaries import ENGINE_NAMES, candidates

    settings = ctx.find_object(Settings)
    for engine in ENGINE_NAMES:
        options = candidates(engine, settings)
        if not options:
            click.echo(f"{engine:<13} not found (run `llamactl engines install {engine}`)")
        for i, found in enumerate(options):
            try:
                version = probe(found.path, settings.cache_dir).version
            except LlamactlError as e:
                version = f"unusable: {e.message}"
            mark = "*" if i == 0 else " "
            click.echo(f"{mark} {engine:<13} {version:<40} {found.path}  [{found.source}]")


@engines.command("install")
@click.argument("names", nargs=-1)
@click.option("--cuda/--no-cuda", default=None, help="Default: CUDA when nvcc and an NVIDIA driver exist.")
@click.option("--jobs", type=click.IntRange(1, 1024), help="Parallel build jobs (default: all cores).")
@click.option("--force", is_flag=True, help="Rebuild even if a matching build exists.")
@pass_settings
def engines_install(settings: Settings, names: tuple[str, ...], cuda: bool | None, jobs: int | None,
                    force: bool) -> None:
    """Build llama-server for NAMES (llama.cpp, ik_llama.cpp; default both) from the pinned sdists."""
    from llamactl.engines.install import SOURCES, install

    for name in names or tuple(SOURCES):
        if name not in SOURCES:
            raise click.BadParameter(f"unknown engine {name!r}; choose from {', '.join(SOURCES)}")
        install(name, settings, cuda=cuda, jobs=jobs, force=force, progress=lambda m: click.echo(m, err=True))

