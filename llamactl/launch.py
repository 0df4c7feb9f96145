"""Plan, then start: the one path from a profile to a running server (CLI `up` and the service)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from llamactl.errors import DoesNotFit
from llamactl.gpus import GpuProbe
from llamactl.profiles import Profile
from llamactl.settings import Settings
from llamactl.supervisor import ServerRecord, Supervisor

log = logging.getLogger(__name__)


def planned_profile(profile: Profile, settings: Settings, *, gpus_file: Path | None = None,
                    ignore_fit: bool = False) -> Profile:
    """The profile with the planner's placement applied; refuses one that does not fit."""
    return placed_profile(profile, settings, gpus_file=gpus_file, ignore_fit=ignore_fit)[0]


def placed_profile(profile: Profile, settings: Settings, *, gpus_file: Path | None = None,
                   ignore_fit: bool = False, probe: GpuProbe | None = None) -> tuple[Profile, str | None]:
    """The profile with the planner's placement applied, and what an automatic placement gives up (layers on
    the CPU, a shorter context) in words, or None. The cost is logged as a warning (`llamactl up` prints it,
    the daemon's log keeps it) and kept in the server's record (`llamactl status` shows it)."""
    from llamactl.planning import plan_for_launch

    plan = plan_for_launch(profile, settings, gpus_file, probe=probe, with_argv=False)
    if not plan.fits and not ignore_fit:
        raise DoesNotFit(f"profile '{profile.name}' does not fit; nothing was started.\n{plan.text()}",
                         hint=f"apply a suggestion above, or `llamactl up {profile.name} --ignore-fit` "
                              "to start anyway")
    if plan.cost:
        log.warning("%s: %s", profile.name, plan.cost)
    return profile.model_copy(update=plan.launch_overrides()), plan.cost


def start_profile(supervisor: Supervisor, profile: Profile, *, ignore_fit: bool = False,
                  api_key: str | None = None, cancelled: Callable[[], bool] | None = None,
                  probe: GpuProbe | None = None, slot_save_path: Path | None = None) -> ServerRecord:
    """`probe`: the box as the daemon's memory scheduler granted it (None: the GPUs as they are now);
    `slot_save_path`: the daemon's prompt cache, where the engine may save slots (None: none)."""
    existing = supervisor.running(profile.name)
    if existing is not None and existing.state == "ready":
        return existing
    placed, cost = placed_profile(profile, supervisor.settings, ignore_fit=ignore_fit, probe=probe)
    return supervisor.start(placed, api_key=api_key, cancelled=cancelled, placement=cost,
                            slot_save_path=slot_save_path)
