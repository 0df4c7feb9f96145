"""Acceptance alerts per (lane, traffic class): drafting that stopped paying off.

Rolling acceptance (accepted / drafted tokens over the last `window_n` speculative requests of the class)
under `below` raises an alert, once at least `min_drafted` tokens were drafted in the window; it clears only
once acceptance is back above `below + hysteresis`, so a value hovering at the threshold does not flap. One
log line per episode (raised, cleared); the caller hears of each change through `on_change` (the router
publishes it, the daemon puts it in sd_notify's STATUS line) and the gauge says which are active now.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger("llamactl.router")


@dataclass(frozen=True)
class AlertConfig:
    below: float = 0.6  # LLAMACTL_ALERT_ACCEPTANCE_BELOW
    min_drafted: int = 200  # LLAMACTL_ALERT_MIN_DRAFTED
    hysteresis: float = 0.05
    window_n: int = 50


@dataclass
class _Slice:
    samples: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=50))  # (drafted, accepted)
    active: bool = False

    def totals(self) -> tuple[int, int]:
        return sum(d for d, _ in self.samples), sum(a for _, a in self.samples)


class AcceptanceAlerts:
    def __init__(self, registry: CollectorRegistry, config: AlertConfig | None = None,
                 on_change: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config or AlertConfig()
        self.on_change = on_change
        self.slices: dict[tuple[str, str], _Slice] = {}
        self.gauge = Gauge("llamactl_acceptance_alert", "1 while rolling draft acceptance of a (lane, class) is "
                           "under the alert threshold", ["lane", "class"], registry=registry)
        self.acceptance = Gauge("llamactl_alert_acceptance_ratio", "Rolling draft acceptance the alert judges",
                                ["lane", "class"], registry=registry)

    def observe(self, lane: str, cls: str, drafted: int | None, accepted: int | None) -> None:
        """A finished request's drafting counts (nothing to do for one that did not draft)."""
        if not drafted or drafted <= 0:
            return
        key = (lane, cls)
        piece = self.slices.get(key)
        if piece is None:
            piece = self.slices[key] = _Slice(deque(maxlen=self.config.window_n))
        piece.samples.append((drafted, min(max(0, accepted or 0), drafted)))
        total, ok = piece.totals()
        rate = ok / total
        self.acceptance.labels(lane, cls).set(rate)
        c = self.config
        if not piece.active and total >= c.min_drafted and rate < c.below:
            piece.active = True
            log.warning("alert: lane %s class %s: draft acceptance %.2f is under %.2f (%d tokens drafted)",
                        lane, cls, rate, c.below, total)
            self._changed(lane, cls, piece, rate, total)
        elif piece.active and rate >= c.below + c.hysteresis:
            piece.active = False
            log.info("alert cleared: lane %s class %s: draft acceptance back to %.2f", lane, cls, rate)
            self._changed(lane, cls, piece, rate, total)

    def _changed(self, lane: str, cls: str, piece: _Slice, rate: float, drafted: int) -> None:
        self.gauge.labels(lane, cls).set(1 if piece.active else 0)
        if self.on_change is not None:
            self.on_change(self.describe(lane, cls, piece, rate, drafted))

    def describe(self, lane: str, cls: str, piece: _Slice, rate: float, drafted: int) -> dict[str, Any]:
        return {"lane": lane, "class": cls, "active": piece.active, "acceptance": round(rate, 4),
                "drafted": drafted, "threshold": self.config.below}

    def active(self) -> list[dict[str, Any]]:
        out = []
        for (lane, cls), piece in self.slices.items():
            if piece.active:
                drafted, ok = piece.totals()
                out.append(self.describe(lane, cls, piece, ok / drafted if drafted else 0.0, drafted))
        return out

    def summary(self) -> str:
        """One line for sd_notify's STATUS (empty when no alert is active)."""
        return "; ".join(f"acceptance {a['acceptance']:.2f} < {a['threshold']:.2f} on {a['lane']}/{a['class']}"
                         for a in self.active())
