"""When a claim that normally starts past its cursor starts from the beginning instead.

Both claims keep a cursor so that their index scans skip the entries of rows already taken,
which a long-open snapshot keeps from being cleaned up. A sweep, a claim from the start, takes
what the cursor passed; under such a snapshot it walks every one of those entries, and the loop
waits for it (measured at 300 events/s: 250 ms after a 10-minute hold, growing with the hold).
So a sweep that took long spaces out the next ones: sweeping takes at most ``share`` of the
loop's time, and while sweeps are quick they run every ``every_s``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable


@dataclasses.dataclass(eq=False)
class SweepSchedule:
    every_s: float
    # at most this share of the loop's time goes to sweeps: 1% keeps them out of the p99
    share: float = 0.01
    clock: Callable[[], float] = time.monotonic
    _next_at: float = dataclasses.field(default=-math.inf, init=False)
    _started_at: float = dataclasses.field(default=-math.inf, init=False)

    def begin(self) -> bool:
        """Whether the next claim sweeps; if it does, call ``end`` once it has finished."""
        now = self.clock()
        if now < self._next_at:
            return False
        self._started_at, self._next_at = now, now + self.every_s
        return True

    def end(self) -> None:
        took = self.clock() - self._started_at
        self._next_at = self._started_at + max(self.every_s, took / self.share)

    def now(self) -> None:
        """The next claim sweeps, whenever the last one was."""
        self._next_at = -math.inf
