"""Runs of one traffic class in a lane's arrivals: how long the one going on is likely to last. Pure, no I/O.

A switch that costs a reload pays only for a run long enough to repay it, and the queue shows the run only
when requests pile up. With requests one at a time the length must be guessed from the arrivals. Without
history the guess is that a run that has lasted n arrivals lasts n more (it loses at most about the switch's
cost, whatever the length). With history it is the runs seen before: of the past runs that lasted at least
n, how much longer they went on on average (the empirical mean residual life). Phases of a hundred requests
are then recognised two requests in, and short bursts are not mistaken for phases.
"""

from __future__ import annotations

from collections import deque


class Runs:
    """The run of one class going on, and the lengths of the last `keep` runs that ended, per class."""

    def __init__(self, keep: int = 32, min_history: int = 2) -> None:
        self.keep, self.min_history = keep, min_history
        self.current: tuple[str, int] | None = None  # (class, arrivals in a row so far)
        self.ended: dict[str, deque[int]] = {}

    def arrived(self, cls: str) -> None:
        if self.current is not None and self.current[0] == cls:
            self.current = (cls, self.current[1] + 1)
            return
        if self.current is not None:
            self.ended.setdefault(self.current[0], deque(maxlen=self.keep)).append(self.current[1])
        self.current = (cls, 1)

    def expected_more(self, cls: str, so_far: int) -> float | None:
        """Arrivals of `cls` still to come in a run that has lasted `so_far`: the mean of (length - so_far) over
        past runs of the class that lasted at least that long, or of every class where the class has too few
        (None where neither has `min_history` of them: no history to go by)."""
        for lengths in (self.ended.get(cls, ()), [n for runs in self.ended.values() for n in runs]):
            longer = [n - so_far for n in lengths if n >= so_far]
            if len(longer) >= self.min_history:
                return sum(longer) / len(longer)
        return None

    def next_of(self, cls: str, queued: int) -> int:
        """How many requests of `cls` the lane is expected to serve in a row, where the whole queue is `queued` of
        them: the queued ones and the arrivals still to come in the run, if the run going on is of that class."""
        if self.current is None or self.current[0] != cls:
            return queued
        so_far = self.current[1]
        more = self.expected_more(cls, so_far)
        if more is None:
            return max(queued, so_far)  # no history: as many more as so far
        return queued + round(more)

    def export(self) -> dict[str, list[int]]:
        """The lengths of the runs that ended, per class (what `learned` saves)."""
        return {cls: list(lengths) for cls, lengths in self.ended.items() if lengths}

    def restore(self, ended: dict[str, list[int]]) -> None:
        """Lengths saved before a restart, before those seen since."""
        for cls, lengths in ended.items():
            self.ended[cls] = deque([*lengths, *self.ended.get(cls, ())], maxlen=self.keep)
