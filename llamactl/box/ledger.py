"""The box's memory ledger: per device, what llamactl's engines hold, what loads in progress have reserved,
what the user keeps free (the reserve) and what is left. Pure data; the scheduler owns the one instance.

Devices are the plan's keys: "CUDA0", "CUDA1", ... for local GPUs, "CPU" for host RAM, "RPC0", ... for RPC
workers' devices. `capacity` is what a device offers llamactl's engines with none of them running (a described
box as described; with NVML, the free memory plus what our own processes use), so the ledger never counts our
engines twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

HoldState = Literal["loading", "running"]


@dataclass(frozen=True)
class Holding:
    """What one engine (a profile) holds, per device, in MiB."""

    profile: str
    lane: str
    mib: Mapping[str, int]
    state: HoldState


@dataclass
class Ledger:
    capacity: dict[str, int]  # device -> MiB our engines may use with none of them running (before the reserve)
    reserve: dict[str, int] = field(default_factory=dict)  # device -> MiB left free for the user's other work
    total: dict[str, int | None] = field(default_factory=dict)  # device -> its size, for the words only
    holdings: dict[str, Holding] = field(default_factory=dict)  # profile -> its holding
    # profile -> device -> MiB its running engine uses as measured (NVML per process); a holding counts the larger
    # of its plan and this, so an engine that grew past its plan is not undercounted.
    measured: dict[str, dict[str, int]] = field(default_factory=dict)

    def holds(self, h: Holding, device: str) -> int:
        planned = h.mib.get(device, 0)
        return max(planned, self.measured.get(h.profile, {}).get(device, 0)) if h.state == "running" else planned

    def usable(self, device: str) -> int:
        return max(0, self.capacity.get(device, 0) - self.reserve.get(device, 0))

    def held(self, device: str, *, without: frozenset[str] = frozenset()) -> int:
        return sum(self.holds(h, device) for h in self.holdings.values() if h.profile not in without)

    def free(self, *, without: frozenset[str] = frozenset()) -> dict[str, int]:
        """MiB left per device for a new engine (less the reserve); `without`: as if those profiles stopped."""
        return {d: self.usable(d) - self.held(d, without=without) for d in self.capacity}

    def shortfall(self, needs: Mapping[str, int], *, without: frozenset[str] = frozenset()) -> dict[str, int]:
        """MiB missing per device for `needs` (only the devices short); {} means it fits. A device the ledger
        does not know (an unknown host RAM size) is not checked."""
        free = self.free(without=without)
        return {d: need - free[d] for d, need in needs.items() if need > 0 and d in free and need > free[d]}

    def fits(self, needs: Mapping[str, int], *, without: frozenset[str] = frozenset()) -> bool:
        return not self.shortfall(needs, without=without)

    def hold(self, profile: str, lane: str, mib: Mapping[str, int], state: HoldState) -> None:
        self.holdings[profile] = Holding(profile, lane, dict(mib), state)

    def release(self, profile: str) -> Holding | None:
        return self.holdings.pop(profile, None)

    def view(self) -> list[dict[str, Any]]:
        """Per device: ours by profile (running and loading), the reserve, others', free (for status and top)."""
        rows = []
        for device in sorted(self.capacity, key=_device_order):
            ours = {h.profile: self.holds(h, device) for h in self.holdings.values()
                    if h.state == "running" and self.holds(h, device)}
            loading = {h.profile: h.mib[device] for h in self.holdings.values()
                       if h.state == "loading" and h.mib.get(device)}
            total = self.total.get(device)
            rows.append({
                "device": device, "total_mib": total, "capacity_mib": self.capacity[device],
                "others_mib": None if total is None else max(0, total - self.capacity[device]),
                "reserve_mib": self.reserve.get(device, 0), "ours_mib": ours, "loading_mib": loading,
                "free_mib": self.free()[device],
            })
        return rows


def _device_order(device: str) -> tuple[int, str]:
    return (0 if device.startswith("CUDA") else 1 if device.startswith("RPC") else 2, device)


def parse_reserve(text: str, where: str = "LLAMACTL_RESERVE_MIB") -> dict[str, int]:
    """'CUDA0=2048,host=8192' -> {"CUDA0": 2048, "CPU": 8192}; raises ValueError naming the bad part."""
    reserve: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        device, eq, amount = part.partition("=")
        device = device.strip()
        key = "CPU" if device.lower() in ("host", "cpu", "ram") else device.upper()
        valid = key == "CPU" or (key[:4] in ("CUDA",) and key[4:].isdigit()) or (key[:3] == "RPC" and key[3:].isdigit())
        if not eq or not valid:
            raise ValueError(f"{where}: '{part[:40]}' is not DEVICE=MIB (devices: CUDA0, CUDA1, ..., RPC0, ..., host)")
        try:
            mib = int(amount.strip())
        except ValueError:
            raise ValueError(f"{where}: '{part[:40]}': {amount.strip()[:20]!r} is not a whole number of MiB") from None
        if not 0 <= mib <= 1 << 30:
            raise ValueError(f"{where}: '{part[:40]}': {mib} MiB is outside 0..{1 << 30}")
        reserve[key] = mib
    return reserve
