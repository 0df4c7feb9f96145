"""The box scheduler's sizer for `llamactl serve`: what the box offers our engines, and what a profile needs
there, from the memory plan (the same plan `llamactl plan` shows and the engine's start applies).

A described box (`--gpus FILE`, LLAMACTL_GPUS_FILE) describes the box with none of our engines running, so it is
the capacity as it stands. With NVML, each GPU's free memory plus what our own processes use on it (told apart by
pid), and host RAM available plus our engines' resident memory: the ledger then counts our engines once, by
their plans. RPC workers' devices are not in the ledger (each worker is its own box; the plan checks them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

from llamactl.box.scheduler import Capacity, Placement, Sizing
from llamactl.gpus import GpuInventory, probe_gpus
from llamactl.plan import DEFAULT_MARGIN_MIB, Plan
from llamactl.planning import KnownInventory, plan_for_launch, with_workers, worse_beside
from llamactl.profiles import Profile
from llamactl.settings import Settings
from llamactl.units import MIB

log = logging.getLogger("llamactl.box")
CPU = "CPU"


class PlanSizer:
    def __init__(self, settings: Settings, profile_of: Callable[[str], Profile], *,
                 pids: Callable[[], Mapping[str, int]] = dict, margin_mib: int = DEFAULT_MARGIN_MIB) -> None:
        self.settings = settings
        self.profile_of = profile_of
        self.pids = pids  # profile -> the pid of its running engine
        self.margin_mib = margin_mib
        self._inventory: GpuInventory | None = None  # the last probe (size() plans on it)

    def capacity(self) -> Capacity:
        inventory = self._inventory = probe_gpus(None, self.settings)
        live = inventory.source == "nvml"
        mib: dict[str, int] = {}
        total: dict[str, int | None] = {}
        measured: dict[str, dict[str, int]] = {}
        profile_of_pid = {pid: name for name, pid in self.pids().items()} if live else {}
        for g in inventory.gpus:
            ours = sum(p.used_mib or 0 for p in g.processes if p.ours) if live else 0
            for p in g.processes:
                if p.pid in profile_of_pid and p.used_mib:
                    measured.setdefault(profile_of_pid[p.pid], {})[f"CUDA{g.index}"] = p.used_mib
            mib[f"CUDA{g.index}"] = max(0, min(g.total_mib, g.free_mib + ours) - self.margin_mib)
            total[f"CUDA{g.index}"] = g.total_mib
        if inventory.host_free_mib is not None:
            ours = _our_resident_mib() if live else 0
            host = inventory.host_free_mib + ours
            mib[CPU] = host if inventory.host_total_mib is None else min(inventory.host_total_mib, host)
            total[CPU] = inventory.host_total_mib
        return Capacity(mib, total, measured)

    def size(self, name: str, free: Mapping[str, int], empty: Mapping[str, int]) -> Sizing:
        profile = self.profile_of(name)
        # Its RPC workers are asked once here (both plans use the answer); the start asks them again itself.
        base = with_workers(profile, self.settings, self._inventory or probe_gpus(None, self.settings))
        alone_box = self._box(base, empty)
        alone = plan_for_launch(profile, self.settings, probe=KnownInventory(alone_box), with_argv=False)
        if not alone.fits:
            return Sizing(alone=alone.device_totals_mib(), never=(
                f"does not fit even on an empty box (after the reserve):\n{alone.text()}"))
        beside_box = self._box(base, free)
        beside = plan_for_launch(profile, self.settings, probe=KnownInventory(beside_box), with_argv=False)
        as_good = beside.fits and worse_beside(beside, alone) is None
        return Sizing(alone=self._needs(alone.device_totals_mib(), empty),
                      beside=self._needs(beside.device_totals_mib(), free) if as_good else None,
                      launch_alone=KnownInventory(replace(alone_box, remote=())),
                      launch_beside=KnownInventory(replace(beside_box, remote=())),
                      elsewhere=self._other_cards(profile, base, empty, alone))

    def _other_cards(self, profile: Profile, base: GpuInventory, empty: Mapping[str, int],
                     alone: Plan) -> tuple[Placement, ...]:
        """A profile without `gpus` that the plan puts on one card could as well go on another: each card where
        it is planned as well as alone (the start plans on a box showing only that card, so it lands there)."""
        if profile.gpus is not None or len(base.gpus) < 2 or len(alone.gpus) != 1:
            return ()
        others = []
        for g in base.gpus:
            card = f"CUDA{g.index}"
            if g.index in alone.gpus:
                continue
            only = self._box(base, {d: (mib if d in (card, CPU) else 0) for d, mib in empty.items()})
            plan = plan_for_launch(profile, self.settings, probe=KnownInventory(only), with_argv=False)
            if plan.fits and worse_beside(plan, alone) is None:
                others.append(Placement(self._needs(plan.device_totals_mib(), empty),
                                        KnownInventory(replace(only, remote=())), f" on {card}"))
        return tuple(others)

    def _box(self, base: GpuInventory, free: Mapping[str, int]) -> GpuInventory:
        """The inventory with each device's free memory as the ledger says (the plan's margin added back: the
        ledger's capacity has it taken off already)."""
        gpus = tuple(replace(g, free_mib=max(0, free.get(f"CUDA{g.index}", 0)) + self.margin_mib) for g in base.gpus)
        host = free.get(CPU, base.host_free_mib)
        return replace(base, gpus=gpus, host_free_mib=None if host is None else max(0, host))

    @staticmethod
    def _needs(totals: Mapping[str, int], known: Mapping[str, int]) -> dict[str, int]:
        return {device: mib for device, mib in totals.items() if device in known and mib > 0}


def _our_resident_mib() -> int:
    """The resident memory of this process's children (the engines it started), in MiB."""
    try:
        import psutil

        return sum(p.memory_info().rss for p in psutil.Process().children(recursive=True)) // MIB
    except Exception:  # noqa: BLE001 - psutil missing or a child exiting: count none
        return 0
