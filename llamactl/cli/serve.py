"""`llamactl serve` and `llamactl switch` (which talks to a running serve over loopback HTTP)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from llamactl.cli.main import profile_argument
from llamactl.cli.options import HTTP_URL, PORT, Seconds
from llamactl.cli.target import daemon_client
from llamactl.errors import LlamactlError, NotRunning

if TYPE_CHECKING:
    from llamactl.settings import Settings


@click.command()
@click.option("--host", default=None, help="Address to bind (default: LLAMACTL_ROUTER_HOST or 127.0.0.1).")
@click.option("--port", type=PORT, default=None, help="Port to bind (default: LLAMACTL_ROUTER_PORT or 8080).")
@click.option("--profile", "profiles", multiple=True,
              help="Serve only these profiles (their switch groups come along). Default: every valid profile.")
@click.option("--preload", "preload", multiple=True,
              help="Load these profiles before telling systemd READY (default: LLAMACTL_PRELOAD, comma-separated).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_obj
def serve_command(settings: Settings, host: str | None, port: int | None, profiles: tuple[str, ...],
                  preload: tuple[str, ...], log_level: str) -> None:
    """Run the daemon: one OpenAI-compatible endpoint in front of the profiles, engines supervised
    (restarted on crash or hang), a control socket for up/down/switch/status/logs, sd_notify.
    Engines load on demand, except --preload ones. SIGTERM drains and stops; SIGHUP reloads profiles."""
    from llamactl.daemon.service import serve

    sys.exit(serve(settings, host=host, port=port, profiles=profiles, preload=preload, log_level=log_level))


@click.command()
@profile_argument("group")
@click.argument("member")
@click.option("--url", type=HTTP_URL, default=None,
              help="The running serve (default: http://127.0.0.1:LLAMACTL_ROUTER_PORT).")
@click.option("--timeout", "timeout_s", type=Seconds(), default=600.0, show_default=True)
@click.pass_obj
def switch_command(settings: Settings, group: str, member: str, url: str | None, timeout_s: float) -> None:
    """Force MEMBER of switch GROUP to serve (MEMBER 'auto' hands it back to the policy; MEMBER@DEPTH, one of
    its [speculation] depths, forces that depth too, where its engine chooses depth per request)."""
    if url is None:
        client = daemon_client(settings)
        if client is not None:
            status = client.switch(group, member, timeout_s)
            forced = "automatic" if status["forced"] is None else f"forced to {status['forced']}"
            click.echo(f"{status['lane']}: active {status['active']} ({status['state']}, {forced})")
            return
    import httpx

    base = url or f"http://127.0.0.1:{settings.router_port}"
    _check_answers(base, settings.daemon_answer_s)
    try:
        r = httpx.post(f"{base}/llamactl/switch", json={"group": group, "member": member, "timeout_s": timeout_s},
                       timeout=timeout_s + 10)
    except httpx.HTTPError as e:
        raise NotRunning(f"cannot reach llamactl serve at {base}: {e}",
                         hint="start it with `llamactl serve`, or pass --url") from None
    if r.status_code != 200:
        try:
            message = str(r.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {r.status_code}: {r.text[:500]}"
        raise LlamactlError(message)
    status = r.json()
    forced = "automatic" if status["forced"] is None else f"forced to {status['forced']}"
    click.echo(f"{status['lane']}: active {status['active']} ({status['state']}, {forced})")


def _check_answers(base: str, answer_s: float) -> None:
    """Any HTTP answer from `base` within answer_s (a 401 too): a serve that accepts connections but does not
    answer (stopped, wedged) is said at once rather than after the switch's whole timeout."""
    import httpx

    from llamactl.daemon.control import DaemonNotAnswering

    try:
        httpx.get(f"{base}/health", timeout=answer_s)
    except httpx.TimeoutException:
        raise DaemonNotAnswering(f"llamactl serve at {base} is not answering: no answer within {answer_s:g} s; "
                                 "nothing was asked of it",
                                 hint="was it stopped (SIGSTOP, Ctrl-Z)? `kill -CONT` its pid, or restart it") from None
    except httpx.HTTPError:
        pass  # not reachable at all: the switch request itself says so


def box_lines(box: dict | None) -> list[str]:
    """The memory ledger in words: per device, ours by profile, loads in progress, the reserve, free; then what
    waits for memory and the last evictions."""
    if not box:
        return []
    lines = []
    for d in box["devices"]:
        ours = ", ".join(f"{p} {m}" for p, m in d["ours_mib"].items()) or "none"
        loading = ", ".join(f"{p} {m}" for p, m in d["loading_mib"].items())
        others = "" if d["others_mib"] is None else f", others {d['others_mib']}"
        lines.append(f"memory {d['device']}: ours {ours}" + (f", loading {loading}" if loading else "")
                     + f", reserve {d['reserve_mib']}{others}, free {d['free_mib']} MiB")
    for profile, wait in (box.get("waiting") or {}).items():
        lines.append(f"  {profile} waits for memory: {wait['why']}")
    for e in (box.get("evictions") or [])[-3:]:
        lines.append(f"  stopped idle {e['lane']} for {e['for']}: {e['why']}")
    return lines


def prompt_cache_lines(cache: dict | None) -> list[str]:
    """The prompt cache on disk: its use of the budget, then per profile on/off and why, what it holds, its restores
    and the prefill they saved."""
    if not cache:
        return []
    lines = [f"prompt cache: {cache['bytes'] / 2**20:.1f} MiB of {cache['budget_bytes'] / 2**20:.0f} MiB in "
             f"{cache['dir']}"]
    for name, row in cache["profiles"].items():
        persist = row.get("persist")
        words = "" if persist is None else f"{'on' if persist['on'] else 'off'} ({persist['reason']}); "
        words += f"{row['files']} slot file(s), {row['bytes'] / 2**20:.1f} MiB"
        if row["restores"]:
            words += (f"; {row['restores']} restore(s), {row['restored_tokens']} tokens in {row['restore_s']:.2f} s, "
                      f"{row['reused_tokens']} reused (about {row['prefill_saved_s']:.1f} s of prefill saved)")
        if row["not_taken"] or row["failed"]:
            words += f"; {row['not_taken'] + row['failed']} dropped (did not take or failed)"
        lines.append(f"  {name}: {words}")
    return lines


def router_status_lines(status: dict) -> list[str]:
    """Human lines per lane: the group, its active member, the last decision and why; then the names
    clients use that are mapped to profiles, and the router's problems."""
    lines = []
    for lane in status.get("lanes", []):
        mode = "auto" if lane["forced"] is None else f"forced {lane['forced']}"
        head = (f"{lane['lane']}: active {lane['active']} [{lane['state']}, {mode}] "
                f"queue {lane['queue_depth']} in flight {lane['in_flight']}")
        lines.append(head)
        if lane["group"] and lane.get("warm_reason"):
            switch = "warm (both members stay loaded)" if lane["keep_both_warm"] else "hard (stop, then start)"
            lines.append(f"  switch: {switch}: {lane['warm_reason']}")
        decision = lane.get("last_decision")
        if lane["group"] and decision:
            lines.append(f"  last decision ({decision['age_s']:.0f}s ago): {decision['reason']}")
        for switch in lane.get("recent_switches", [])[-3:]:
            lines.append(f"  switched {switch['from']} -> {switch['to']} in {switch['seconds']}s ({switch['trigger']})")
        for member, host in (lane.get("per_request") or {}).items():
            lines.append(f"  per request: {member} is served by {host}'s engine with drafting off (one process)")
        for member, depths in (lane.get("depths") or {}).items():
            lines.append(f"  per request: {member} drafts at depth {', '.join(map(str, depths))}, chosen per "
                         "request in its one engine")
        for member, why in (lane.get("depths_refused") or {}).items():
            lines.append(f"  depths of {member} not chosen per request: {why}")
        choice = lane.get("last_choice")
        if lane["group"] and choice:
            drafting = f"drafting on (depth {choice['depth'] or 'default'})" if choice["drafting"] else "drafting off"
            where = f" in {choice['process']}'s engine" if choice["process"] != choice["member"] else ""
            lines.append(f"  last request: {choice.get('option') or choice['member']}{where}, {drafting}, "
                         f"{choice['why']}")
        for member, why in (lane.get("passed_over") or {}).items():
            lines.append(f"  {member} passed over for {why['for_s']:.0f}s more: it failed to start: {why['reason']}")
        if lane.get("last_error"):
            lines.append(f"  last error: {lane['last_error']}")
    lines.extend(box_lines(status.get("box")))
    lines.extend(prompt_cache_lines(status.get("prompt_cache")))
    if status.get("model_map"):
        lines.append("model names: " + ", ".join(f"{glob} -> {target}" for glob, target in status["model_map"].items()))
    if status.get("default_model"):
        lines.append(f"requests without a model: {status['default_model']}")
    for problem in status.get("problems", []):
        lines.append(f"problem: {problem}")
    return lines
