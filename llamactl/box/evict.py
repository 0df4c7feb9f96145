"""Which engines to stop so that a load fits: pure, over a snapshot of the box.

The rule (README, "One box"):
- only idle lanes are stopped (nothing in flight, nothing queued, no load under way), never one pinned by
  `keep = true`, never the lane asking;
- a lane is stopped only once it has run at least as long as its own load took (and `min_residence_s`), so two
  lanes that cannot share the box take turns no faster than their loads: at least half of the time serves;
- the fewest lanes that make room; among as few, the ones least worth keeping: a lane's worth is what reloading
  it costs, discounted by how long it has been idle (`reload_s / (1 + idle_s / 60)`), so a cheap or long-idle
  engine goes first (least recently used, weighted by the reload cost);
- where no choice of idle lanes makes room but stopping busy or recent ones would, the load waits for them;
  where not even an empty box (less the reserve and the kept lanes) has room, it is refused at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from llamactl.box.ledger import Ledger

EXACT_SEARCH_MAX = 12  # up to 2**12 subsets; beyond, a greedy choice by worth


@dataclass(frozen=True)
class Resident:
    """A lane holding memory, as the scheduler sees it at one moment."""

    lane: str
    profiles: tuple[str, ...]  # its members holding memory
    idle: bool
    idle_s: float  # since its last request ended
    resident_s: float  # since it last became ready
    reload_s: float  # what loading it again costs (its last load's seconds)
    keep: bool = False

    @property
    def worth(self) -> float:
        return self.reload_s / (1.0 + self.idle_s / 60.0)


@dataclass(frozen=True)
class Choice:
    verdict: Literal["fits", "evict", "wait", "never"]
    victims: tuple[str, ...] = ()  # lanes to stop (evict)
    waits_for: tuple[str, ...] = ()  # lanes whose memory is needed once they are idle long enough (wait)
    shortfall: Mapping[str, int] = field(default_factory=dict)  # MiB missing per device now
    why: str = ""
    retry_in_s: float | None = None  # wait: when a lane needed becomes old enough to stop (None: when idle)


def choose(needs: Mapping[str, int], ledger: Ledger, residents: Sequence[Resident], *, requester: str,
           min_residence_s: float = 0.0) -> Choice:
    short = ledger.shortfall(needs)
    if not short:
        return Choice("fits")
    others = [r for r in residents if r.lane != requester]
    own = frozenset(p for r in residents if r.lane == requester for p in r.profiles)
    kept = [r for r in others if r.keep]
    movable = [r for r in others if not r.keep]
    every = frozenset(p for r in movable for p in r.profiles)
    if not ledger.fits(needs, without=every):
        empty = ledger.shortfall(needs, without=every | own | frozenset(p for r in kept for p in r.profiles))
        if empty:
            return Choice("never", shortfall=short, why="does not fit even on an empty box (after the reserve): "
                          + _words(empty))
        blockers = [r.lane for r in kept] + ([requester] if own else [])
        return Choice("never", shortfall=short, why=f"does not fit beside {', '.join(blockers)} (kept loaded): "
                      + _words(ledger.shortfall(needs, without=every)))

    def evictable(r: Resident) -> bool:
        return r.idle and r.resident_s >= max(min_residence_s, r.reload_s)

    ready = [r for r in movable if evictable(r)]
    victims = _fewest(needs, ledger, ready)
    if victims is not None:
        names = tuple(r.lane for r in victims)
        return Choice("evict", victims=names, shortfall=short,
                      why=f"short by {_words(short)}: stopping idle {', '.join(names)}")
    needed = _fewest(needs, ledger, movable) or movable
    waits = tuple(r.lane for r in needed if not evictable(r))
    # Any idle lane coming of age may open a choice the cheapest pick (which may be busy) does not: look again
    # then. A busy lane going idle wakes the scheduler by itself.
    young = [max(min_residence_s, r.reload_s) - r.resident_s for r in movable if r.idle and not evictable(r)]
    return Choice("wait", waits_for=waits, shortfall=short, retry_in_s=min(young) if young else None,
                  why=f"short by {_words(short)}: waiting for {', '.join(waits)} "
                      "(busy, or not yet loaded as long as its load took)")


def _fewest(needs: Mapping[str, int], ledger: Ledger, candidates: Sequence[Resident]) -> list[Resident] | None:
    """The fewest candidates whose memory makes room, the least worth keeping among as few; None if none do."""
    def room(chosen: Sequence[Resident]) -> bool:
        return ledger.fits(needs, without=frozenset(p for r in chosen for p in r.profiles))

    if len(candidates) > EXACT_SEARCH_MAX:
        chosen: list[Resident] = []
        for r in sorted(candidates, key=lambda r: (r.worth, r.lane)):
            chosen.append(r)
            if room(chosen):
                return chosen
        return None
    for k in range(1, len(candidates) + 1):
        fitting = [list(c) for c in itertools.combinations(candidates, k) if room(c)]
        if fitting:
            return min(fitting, key=lambda c: (sum(r.worth for r in c), sorted(r.lane for r in c)))
    return None


def _words(short: Mapping[str, int]) -> str:
    return ", ".join(f"{mib} MiB on {device}" for device, mib in sorted(short.items())) or "nothing"
