"""`llamactl plan PROFILE` and `llamactl gpus`: parse, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from llamactl.cli.main import profile_argument
from llamactl.cli.options import FsPath

if TYPE_CHECKING:
    from llamactl.settings import Settings

GPUS_OPTION = click.option(
    "--gpus", "gpus_file", type=FsPath(dir_okay=False, path_type=Path), default=None,
    help="JSON file describing the GPUs (as printed by `llamactl gpus --json`); replaces the NVML probe. "
         "Default: LLAMACTL_GPUS_FILE, else NVML.",
)


@click.command("plan")
@profile_argument("profile_name", metavar="PROFILE")
@GPUS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--margin-mib", type=click.IntRange(min=0), default=None,
              help="Free memory to keep on every GPU (default 512).")
@click.pass_obj
def plan_command(settings: Settings, profile_name: str, gpus_file: Path | None, as_json: bool,
                 margin_mib: int | None) -> None:
    """Show where PROFILE would go (per device: weights, KV, compute, draft, free after), whether it
    fits, what would make it fit, and the exact engine argv. Starts nothing.

    Exits 0 when it fits, 7 when it does not."""
    from llamactl.plan import DEFAULT_MARGIN_MIB
    from llamactl.planning import plan_for_launch
    from llamactl.profiles import load_profile

    profile = load_profile(profile_name, settings)
    plan = plan_for_launch(profile, settings, gpus_file,
                           margin_mib=DEFAULT_MARGIN_MIB if margin_mib is None else margin_mib)
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2))
    else:
        click.echo(plan.text())
    sys.exit(0 if plan.fits else 7)


@click.command("gpus")
@GPUS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of GPUs (save it to plan for this box).")
@click.option("--rpc", "rpc_entries", multiple=True, metavar="WORKER",
              help="Also list an RPC worker's devices (a name in workers.toml, or host:port; repeatable).")
@click.option("--workers", "all_workers", is_flag=True, help="Also list the devices of every worker in workers.toml.")
@click.pass_obj
def gpus_command(settings: Settings, gpus_file: Path | None, as_json: bool, rpc_entries: tuple[str, ...],
                 all_workers: bool) -> None:
    """List the GPUs (NVML, PCI bus order): memory, processes holding memory, utilization; with --rpc or
    --workers, the RPC workers' devices too, with their host."""
    from llamactl.gpus import probe_gpus

    inv = probe_gpus(gpus_file, settings)
    remote = None
    if rpc_entries or all_workers:
        from llamactl.rpc.inventory import worker_devices

        remote = worker_devices(settings, list(rpc_entries), all_workers)
    if as_json:
        if remote is None:
            click.echo(json.dumps(inv.to_json(), indent=2))
        else:
            click.echo(json.dumps({"gpus": inv.to_json(), "remote": [d.to_json() for d in remote.devices],
                                   "unreachable": remote.unreachable}, indent=2))
        return
    if remote is not None:
        for line in remote.lines():
            click.echo(line)
    if not inv.gpus:
        click.echo(inv.note or "no NVIDIA GPU")
        if inv.host_total_mib:
            click.echo(f"host RAM: {inv.host_free_mib} MiB free of {inv.host_total_mib} MiB")
        return
    rows = [("idx", "name", "total MiB", "free MiB", "used MiB", "util %", "temp C", "bus id", "processes")]
    for g in inv.gpus:
        procs = ", ".join(f"{p.pid}{'*' if p.ours else ''}:{p.used_mib if p.used_mib is not None else '?'}MiB"
                          for p in g.processes) or "-"
        rows.append((str(g.index), g.name, str(g.total_mib), str(g.free_mib),
                     str(g.used_mib if g.used_mib is not None else g.total_mib - g.free_mib),
                     "-" if g.utilization_pct is None else str(g.utilization_pct),
                     "-" if g.temperature_c is None else str(g.temperature_c),
                     g.pci_bus_id or "-", procs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(f"source: {inv.source}" + (f", driver {inv.driver_version}" if inv.driver_version else "")
               + ("; * = started by llamactl" if any(p.ours for g in inv.gpus for p in g.processes) else ""))
