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


pass_settings = click.make_pass_decorator(Settings)


def _supervisor(settings: Settings):
    from llamactl.supervisor import Supervisor

    return Supervisor(settings)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# -- up / down / status / logs -------------------------------------------------------------------


@main.command()
@click.argument("profile")
@click.option("--foreground", is_flag=True, help="Stay attached: show the log, stop the server on Ctrl-C.")
@click.option("--ignore-fit", is_flag=True, help="Start even if the memory plan says it does not fit.")
@pass_settings
def up(settings: Settings, profile: str, foreground: bool, ignore_fit: bool) -> None:
    """Start PROFILE's llama-server and wait until it is ready."""
    from llamactl.daemon.control import try_daemon
    from llamactl.launch import start_profile
    from llamactl.profiles import load_profile

    client = None if foreground else try_daemon(settings)
    if client is not None:
        click.echo(f"asking the llamactl daemon to start {profile} ...", err=True)
        result = client.up(profile)
        click.echo(f"{profile} ready (pid {result['pid']}), served by the daemon at {result['router']}/v1")
        return
    prof = load_profile(profile, settings)
    sup = _supervisor(settings)
    already = sup.running(prof.name)
    if already is not None:
        click.echo(f"{prof.name} is already running at {already.url} (pid {already.pid})")
        return
    if foreground:
        _run_foreground(sup, prof, ignore_fit)
        return
    click.echo(f"starting {prof.name} ({prof.engine}) ...", err=True)
    record = start_profile(sup, prof, ignore_fit=ignore_fit)
    click.echo(f"{prof.name} ready at {record.url}  (OpenAI API: {record.url}/v1, pid {record.pid})")


def _run_foreground(sup, prof, ignore_fit: bool) -> None:
    """Start, follow the log, and stop on Ctrl-C / SIGTERM (even one that arrives while loading).
    The child also dies if this process is killed (PR_SET_PDEATHSIG)."""
    import signal

    from llamactl.launch import start_profile
    from llamactl.supervisor.logs import follow

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    sup.die_with_parent = True
    click.echo(f"starting {prof.name} ({prof.engine}) in the foreground ...", err=True)
    try:
        record = start_profile(sup, prof, ignore_fit=ignore_fit)
        click.echo(f"{prof.name} ready at {record.url}  (OpenAI API: {record.url}/v1, pid {record.pid})")
        for line in follow(record.log_path, lambda: sup.running(prof.name) is not None):
            click.echo(line, nl=False)
        click.echo(f"{prof.name}: llama-server exited", err=True)
    except KeyboardInterrupt:
        click.echo(f"stopping {prof.name} ...", err=True)
    finally:
        sup.stop(prof.name, prof.stop_timeout_s)


@main.command()
@click.argument("profile", required=False)
@click.option("--all", "all_", is_flag=True, help="Stop every running profile.")
@pass_settings
def down(settings: Settings, profile: str | None, all_: bool) -> None:
    """Stop PROFILE's server (or --all)."""
    if bool(profile) == all_:
        raise click.UsageError("give a PROFILE or --all")
    from llamactl.daemon.control import try_daemon

    client = try_daemon(settings)
    if client is not None:
        names = [profile] if profile else [r["profile"] for r in client.status()["servers"]]
        stopped = [name for name in names if client.down(name)["stopped"]]
        if all_:
            click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        else:
            click.echo(f"stopped {profile}" if stopped else f"{profile} was not running")
        return
    sup = _supervisor(settings)
    if all_:
        stopped = sup.stop_all()
        click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return
    if sup.stop(profile):
        click.echo(f"stopped {profile}")
    else:
        click.echo(f"{profile} was not running")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_settings
def status(settings: Settings, as_json: bool) -> None:
    """Show running servers: profile, state, pid, port, uptime, model, RSS."""
    import json

    from llamactl.daemon.control import try_daemon

    client = try_daemon(settings)
    if client is not None:
        _daemon_status(client.status(), as_json)
        return
    rows = [s.to_json() for s in _supervisor(settings).status()]
    if as_json:
        # the same shape as with a daemon, so scripts read one format
        click.echo(json.dumps({"daemon": None, "servers": rows, "failed": {}, "router": None}, indent=2))
        return
    if not rows:
        click.echo("no servers running")
        return
    _server_table(rows)


def _server_table(rows: list[dict]) -> None:
    header = f"{'PROFILE':<16} {'STATE':<9} {'PID':>7} {'PORT':>6} {'UPTIME':>8} {'RSS MiB':>8}  MODEL"
    click.echo(header)
    for r in rows:
        rss = f"{r['rss_mib']:.0f}" if r["rss_mib"] is not None else "-"
        click.echo(f"{r['profile']:<16} {r['state']:<9} {r['pid']:>7} {r['port']:>6} {_age(r['uptime_s']):>8} "
                   f"{rss:>8}  {r['model']}")


def _daemon_status(status: dict, as_json: bool) -> None:
    """`llamactl status` when a daemon runs: its servers, failed profiles (reason + last log lines), and
    per lane the switch group, active member, last decision and why."""
    import json

    from llamactl.cli.serve import router_status_lines

    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    daemon = status["daemon"]
    click.echo(f"daemon pid {daemon['pid']} serving {daemon['url']}/v1")
    if status["servers"]:
        _server_table(status["servers"])
    else:
        click.echo("no servers running (engines load on demand)")
    for name, failure in sorted(status.get("failed", {}).items()):
        click.echo(f"{name:<16} failed    {failure['reason']}")
        for line in failure["log_tail"][-5:]:
            click.echo(f"    {line}")
    for line in router_status_lines(status["router"]):
        click.echo(line)


@main.command()
@click.argument("profile")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=50, show_default=True, help="How many last lines to show first.")
@pass_settings
def logs(settings: Settings, profile: str, follow: bool, lines: int) -> None:
    """Show PROFILE's llama-server log."""
    from llamactl.supervisor.logs import follow as follow_file
    from llamactl.supervisor.logs import tail_lines

    from llamactl.daemon.control import try_daemon

    client = try_daemon(settings)
    path = client.logs_path(profile) if client is not None else _supervisor(settings).log_path(profile)
    if not path.exists():
        raise click.ClickException(f"no log for '{profile}' at {path}; has it been started?")
    for line in tail_lines(path, lines, max_bytes=max(64 * 1024, lines * 512)):
        click.echo(line)
    if follow:
        try:
            for line in follow_file(str(path), lambda: True, from_end=True):
                click.echo(line, nl=False)
        except KeyboardInterrupt:
            pass


# -- profiles --------------------------------------------------------------------------------------


@main.group(invoke_without_command=True)
@click.pass_context
def profiles(ctx: click.Context) -> None:
    """List profiles (and where each comes from)."""
    if ctx.invoked_subcommand is None:
        from llamactl.profiles import load_all, profile_files

        settings = ctx.find_object(Settings)
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
@click.argument("names", nargs=-1)
@click.option("--no-files", is_flag=True, help="Skip checks that read model files (existence, context).")
@pass_settings
def profiles_validate(settings: Settings, names: tuple[str, ...], no_files: bool) -> None:
    """Check all profiles (or NAMES); exit non-zero on any error."""
    from llamactl.validate import validate_profiles

    results = validate_profiles(settings, list(names) or None, check_files=not no_files)
    bad = 0
    for name, problem in results.items():
        if problem is None:
            click.echo(f"ok      {name}")
        else:
            bad += 1
            click.echo(f"ERROR   {name}\n  " + str(problem).replace("\n", "\n  "))
    if bad:
        click.echo(f"{bad} of {len(results)} profiles have errors", err=True)
        sys.exit(2)


# -- engines ---------------------------------------------------------------------------------------


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
@click.option("--jobs", type=int, help="Parallel build jobs (default: all cores).")
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

from llamactl.cli.plan import gpus_command, plan_command  # noqa: E402

main.add_command(plan_command, "plan")
main.add_command(gpus_command, "gpus")

from llamactl.cli.serve import serve_command, switch_command  # noqa: E402

main.add_command(serve_command, "serve")
main.add_command(switch_command, "switch")

from llamactl.cli.systemd import systemd_command  # noqa: E402

main.add_command(systemd_command, "systemd")
