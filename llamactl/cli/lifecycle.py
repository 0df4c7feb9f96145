"""`llamactl up / down / status / logs`: through the daemon when one runs (`cli.target`), standalone otherwise."""

from __future__ import annotations

import contextlib
import signal
from typing import TYPE_CHECKING

import click

from llamactl.cli.main import main, pass_settings, profile_argument
from llamactl.cli.target import daemon_client, supervisor
from llamactl.errors import LlamactlError

if TYPE_CHECKING:
    from llamactl.settings import Settings


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@main.command()
@profile_argument()
@click.option("--foreground", is_flag=True, help="Stay attached: show the log, stop the server on Ctrl-C.")
@click.option("--ignore-fit", is_flag=True, help="Start even if the memory plan says it does not fit.")
@pass_settings
def up(settings: Settings, profile: str, foreground: bool, ignore_fit: bool) -> None:
    """Start PROFILE's llama-server and wait until it is ready."""
    from llamactl.daemon.auth import new_child_key
    from llamactl.launch import start_profile
    from llamactl.profiles import load_profile

    prof = load_profile(profile, settings)
    _pull_missing(settings, prof)
    client = daemon_client(settings)
    if client is not None and foreground:
        click.echo("note: a llamactl daemon (`llamactl serve`) owns this box's memory; a --foreground start runs "
                   "outside its ledger, so the daemon may plan the same memory for its own engines. "
                   f"`llamactl up {profile}` without --foreground starts it through the daemon.", err=True)
        client = None
    if client is not None:
        click.echo(f"asking the llamactl daemon to start {profile} ...", err=True)
        result = client.up(profile)
        click.echo(f"{profile} ready (pid {result['pid']}), served by the daemon at {result['router']}/v1")
        return
    sup = supervisor(settings, die_with_parent=foreground)
    already = sup.running(prof.name)
    if already is not None and already.state == "ready":
        click.echo(f"{prof.name} is already running at {already.url} (pid {already.pid})")
        if already.api_key:
            click.echo(f"  API key: in {sup.store.key_path(prof.name)}")
        return
    click.echo(f"starting {prof.name} ({prof.engine}){' in the foreground' if foreground else ''} ...", err=True)
    record = None
    try:
        with interrupted_by_signals():
            # A key of its own, like the daemon's engines: llama-server answers any web page's Origin (with
            # credentials allowed), so without a key any page the user visits could use it.
            record = start_profile(sup, prof, ignore_fit=ignore_fit, api_key=new_child_key())
            click.echo(f"{prof.name} ready at {record.url}  (OpenAI API: {record.url}/v1, pid {record.pid})")
            click.echo(f"  API key: in {sup.store.key_path(prof.name)} (send 'Authorization: Bearer <key>'), "
                       "or use `llamactl serve`, which needs none on loopback")
            if foreground:
                _follow_log(sup, prof, record)
    except KeyboardInterrupt:
        if record is None:  # the start stopped the engine it spawned and removed its record
            click.echo(f"interrupted: {prof.name} was not started", err=True)
            raise SystemExit(130) from None
        if foreground:
            click.echo(f"stopping {prof.name} ...", err=True)
    finally:
        if foreground and record is not None:
            sup.stop(prof.name, prof.stop_timeout_s)


def _pull_missing(settings: Settings, prof) -> None:
    """`hf:` models not in the cache yet are downloaded first, with progress here (the daemon would fetch them
    too, but out of sight); Ctrl-C stops the download, and the next `up` or `pull` resumes it."""
    from llamactl.models import hf_models

    wanted = hf_models(prof)
    if not wanted:  # local and built-in models: the Hub's client is not even imported
        return
    from llamactl.cli.hub import PullDisplay, pull_profile
    from llamactl.hf.pull import HubConfig, cached_model
    from llamactl.hf.refs import parse_ref

    config = HubConfig.from_environ()
    if all(cached_model(parse_ref(v), config, where=k) for k, v in wanted):
        return
    try:
        with interrupted_by_signals(), PullDisplay() as display:
            pull_profile(prof, settings, display)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {prof.name} was not started; what was downloaded is kept", err=True)
        raise SystemExit(130) from None


@contextlib.contextmanager
def interrupted_by_signals():
    """SIGTERM, SIGINT and SIGHUP raise KeyboardInterrupt while inside, so an interrupted start stops the engine
    it spawned and removes its record (the default SIGTERM would end the process with the engine loading)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _follow_log(sup, prof, record) -> None:
    """`up --foreground`: show the log until the server exits (a signal ends it first; the caller stops the
    server). The engine also dies if this process is killed (PR_SET_PDEATHSIG)."""
    from llamactl.supervisor.logs import follow

    for line in follow(record.log_path, lambda: sup.running(prof.name) is not None):
        click.echo(line, nl=False)
    click.echo(f"{prof.name}: llama-server exited", err=True)


@main.command()
@profile_argument(required=False)
@click.option("--all", "all_", is_flag=True, help="Stop every running profile.")
@pass_settings
def down(settings: Settings, profile: str | None, all_: bool) -> None:
    """Stop PROFILE's server (or --all)."""
    if bool(profile) == all_:
        raise click.UsageError("give a PROFILE or --all")
    client = daemon_client(settings)
    if client is not None:
        names = [profile] if profile else [r["profile"] for r in client.status()["servers"]]
        stopped = [name for name in names if client.down(name)["stopped"]]
        if all_:
            click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        else:
            click.echo(f"stopped {profile}" if stopped else f"{profile} was not running")
        return
    sup = supervisor(settings)
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

    client = daemon_client(settings)
    if client is not None:
        _daemon_status(client.status(), as_json)
        return
    rows = [s.to_json() for s in supervisor(settings).status()]
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
        if r.get("key_file"):
            click.echo(f"{'':<16} API key in {r['key_file']}")
        if r.get("placement"):
            click.echo(f"{'':<16} placement: {r['placement']}")


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
    for name, engine in sorted((status.get("engines") or {}).items()):
        waiting = engine.get("waiting_for_worker") if isinstance(engine, dict) else None
        if waiting:
            click.echo(f"{name:<16} waiting   for worker '{waiting['worker']}': {waiting['reason']}")
        elif isinstance(engine, dict) and engine.get("downloading"):
            click.echo(f"{name:<16} starting  {engine['downloading']}")
        elif isinstance(engine, dict) and engine.get("state") == "starting":  # load progress: its latest line
            click.echo(f"{name:<16} starting  {engine.get('progress') or ''}")
    for alert in (status.get("router") or {}).get("alerts", []):
        click.echo(f"alert: {alert['lane']}/{alert['class']}: draft acceptance {alert['acceptance']:.2f} is under "
                   f"{alert['threshold']:.2f} ({alert['drafted']} tokens drafted)")
    for name, failure in sorted(status.get("failed", {}).items()):
        click.echo(f"{name:<16} failed    {failure['reason']}")
        for line in failure["log_tail"][-5:]:
            click.echo(f"    {line}")
    for line in router_status_lines(status["router"]):
        click.echo(line)
    for problem in (status.get("router") or {}).get("problems", []):
        click.echo(f"warning: {problem}")


@main.command()
@profile_argument()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", type=click.IntRange(0, 1_000_000), default=50, show_default=True, help="How many last lines to show first.")
@pass_settings
def logs(settings: Settings, profile: str, follow: bool, lines: int) -> None:
    """Show PROFILE's llama-server log."""
    from llamactl.supervisor.logs import follow as follow_file
    from llamactl.supervisor.logs import tail_lines

    client = daemon_client(settings)
    path = client.logs_path(profile) if client is not None else supervisor(settings).log_path(profile)
    if not path.exists():
        raise LlamactlError(f"no log for '{profile}' at {path}", hint=f"has it been started? `llamactl up {profile}`")
    for line in tail_lines(path, lines, max_bytes=max(64 * 1024, lines * 512)):
        click.echo(line)
    if follow:
        try:
            for line in follow_file(str(path), lambda: True, from_end=True):
                click.echo(line, nl=False)
        except KeyboardInterrupt:
            pass


