"""From profiles to a router: which profiles a daemon serves, the router's settings, and which switch groups
keep both members loaded (the memory plan decides)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llamactl.errors import ConfigError, ProfileNotFound
from llamactl.names import closest_names
from llamactl.router.policy import PolicyConfig
from llamactl.profiles import Profile, load_all
from llamactl.router import Backends, LaneConfig, Router, RouterConfig
from llamactl.router.alerts import AlertConfig
from llamactl.router.lane import Lane
from llamactl.settings import Settings

if TYPE_CHECKING:
    from llamactl.box.scheduler import BoxScheduler

log = logging.getLogger("llamactl.daemon")
CLASS_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,32}$")


def router_config(settings: Settings) -> RouterConfig:
    return RouterConfig(lane=LaneConfig(
        max_queue=settings.router_max_queue,
        queue_timeout_s=settings.router_queue_timeout_s,
        idle_ttl_s=settings.router_idle_ttl_s,
        keep_both_warm=settings.router_keep_both_warm is True,
        policy=PolicyConfig(min_dwell_s=settings.router_min_dwell_s, explore_share=settings.router_explore_share),
    ), max_body_bytes=settings.max_body_bytes, extra_classes=extra_classes(settings),
        alerts=AlertConfig(below=settings.alert_acceptance_below, min_drafted=settings.alert_min_drafted))


def extra_classes(settings: Settings) -> frozenset[str]:
    names = [c.strip() for c in settings.router_classes.split(",") if c.strip()]
    for name in names:
        if not CLASS_NAME.match(name):
            raise ConfigError(f"LLAMACTL_ROUTER_CLASSES: '{name[:40]}' is not a class name",
                              hint="use letters, digits, '_', '.', ':' or '-' (at most 32 characters)")
    return frozenset(names[:64])


def load_profiles(settings: Settings, only: Iterable[str] = ()) -> dict[str, Profile]:
    profiles, errors = load_all(settings)
    for name, error in errors.items():
        log.warning("profile %s is not served: %s", name, error)
    return choose_profiles(profiles, errors, only)


def choose_profiles(profiles: dict[str, Profile], errors: dict[str, Any], only: Iterable[str] = ()) -> dict[str, Profile]:
    wanted = list(only)
    if wanted:
        missing = [n for n in wanted if n not in profiles]
        if missing:
            raise ConfigError(f"cannot serve {', '.join(missing)}: " + "; ".join(
                str(errors[n]) if n in errors else f"no profile named '{n}'" for n in missing))
        chosen = {n: profiles[n] for n in wanted}
        # A profile named on the command line brings its switch group's other member along.
        for p in list(chosen.values()):
            if p.group:
                chosen.update({q.name: q for q in profiles.values() if q.group == p.group})
        profiles = chosen
    if not profiles:
        raise ConfigError("no valid profiles to serve", hint="`llamactl profiles validate` shows what is wrong")
    return profiles


def build_router(settings: Settings, profiles: dict[str, Profile], backends: Backends | None = None) -> Router:
    from llamactl.daemon.engines import Engines

    if backends is None:
        from llamactl.supervisor import Supervisor

        backends = Engines(Supervisor(settings, die_with_parent=True), profiles, settings)
    box = box_scheduler(settings, backends) if isinstance(backends, Engines) else None
    router = Router(profiles.values(), backends, router_config(settings), box=box)
    cache = getattr(backends, "prompt_cache", None)
    if cache is not None:
        from llamactl.daemon.prompt_cache import PromptCacheCollector

        router.telemetry.registry.register(PromptCacheCollector(cache))
    plan_warm(router, profiles, settings)
    return router


def box_scheduler(settings: Settings, engines) -> "BoxScheduler":
    """One memory ledger for every engine the daemon runs; each engine's start plans on what it was granted."""
    from llamactl.box.ledger import parse_reserve
    from llamactl.box.scheduler import BoxScheduler
    from llamactl.daemon.sizing import PlanSizer

    try:
        reserve = parse_reserve(settings.reserve_mib)
    except ValueError as e:
        raise ConfigError(str(e), hint="e.g. LLAMACTL_RESERVE_MIB='CUDA0=2048,host=8192'") from None
    def pids() -> dict[str, int]:
        return {name: e.record.pid for name, e in list(engines.engines.items()) if e.record is not None}

    box = BoxScheduler(PlanSizer(settings, engines._profile, pids=pids), reserve=reserve,
                       min_residence_s=settings.min_residence_s)
    engines.launch_probe = box.launch_probe
    for engine in engines.engines.values():
        engine.launch_probe = box.launch_probe
    return box


def plan_warm(router: Router, profiles: dict[str, Profile], settings: Settings) -> None:
    plan_warm_lanes(router.lanes, profiles, settings)


def plan_warm_lanes(lanes: dict[str, Lane], profiles: dict[str, Profile], settings: Settings) -> None:
    """With ROUTER_KEEP_BOTH_WARM=auto, ask the memory plan which switch groups keep both members loaded."""
    if settings.router_keep_both_warm != "auto":
        return
    inventory, warm = None, []
    for lane in lanes.values():
        if lane.spec.is_group:
            inventory = decide_warm(lane, [profiles[m] for m in lane.spec.members], settings, inventory, warm)
            if lane.keep_both_warm:
                warm.append(lane.name)


def decide_warm(lane: Lane, members: list[Profile], settings: Settings, inventory=None,
                beside: Iterable[str] = ()):
    """Keep a switch group's members both running when the memory plan says they fit together, beside the
    groups already kept warm (a switch is then a drain, not a restart); otherwise a switch stops one
    member before starting the other. Returns the inventory left for the next group (None: probe)."""
    from llamactl.planning import KnownInventory, fit_together

    try:
        probe = KnownInventory(inventory) if inventory is not None else None
        lane.keep_both_warm, why, left = fit_together(members, settings, probe=probe)
    except Exception as e:  # noqa: BLE001 - no plan (model missing, NVML error): the safe choice
        lane.keep_both_warm, why, left = False, f"no memory plan ({getattr(e, 'message', e)})", inventory
    beside = list(beside)
    if beside and not lane.keep_both_warm:
        why += f", with the groups kept warm before it ({', '.join(beside)}) loaded"
    lane.warm_reason = why
    log.info("lane %s: %s switch: %s", lane.name, "warm" if lane.keep_both_warm else "hard", why)
    return left if lane.keep_both_warm else inventory


def lane_of(router: Router, profile: str) -> Lane:
    for lane in router.lanes.values():
        if profile in lane.spec.members:
            return lane
    raise ProfileNotFound(f"profile '{profile}' is not served by this daemon",
                          hint=closest_names(profile, (m for lane in router.lanes.values() for m in lane.spec.members),
                                             noun="profiles served"))
