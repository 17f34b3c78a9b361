"""When a claim that normally starts past its cursor starts from the beginning instead.

Both claims keep a cursor so that their index scans skip the entries of rows already taken,
which a long-open snapshot keeps from being cleaned up. A sweep, a claim from the start, takes
what the cursor passed; under such a snapshot it walks every one of those entries, and the loop
waits for it (measured at 300 events/s: 250 ms after a 10-minute hold, growing with the hold).
So sweeps that take long space out the next ones: sweeping takes at most ``share`` of the
loop's time, and while sweeps are quick (``quick_s``: a stall nobody would see) they run every
``every_s``. Only slowness that lasts counts, the shorter of the last two sweeps: a one-off slow
sweep (the first after start-up, which plans the statement and loads the catalog; a checkpoint;
a busy machine) says nothing about dead entries, and spacing on it alone left a record below the
cursor waiting 10 s and more with no snapshot held.

The same schedule paces two periodic statements that a held snapshot slows the same way, each
walking a partial index on the records' status in which every record passing through that
status leaves an entry the hold keeps: the maintenance loop's metric snapshot (every 5 s on
every replica: 465 ms after a 5-minute hold at 300 events/s, from 2 ms) and the lease rescue
(141 ms, from under 0.1). Neither has a cursor to start from; paced at 1%, each costs the
database a bounded share of a core however long the hold, where they took more of it every
minute (their gauges and rescues come less often meanwhile, a minute apart at most: the
snapshot's staleness alert waits ten).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

#: The metric snapshot's and the lease rescue's share of the time once slow, and the most they
#: are spaced out (module docstring).
PACED_SHARE = 0.01
PACED_MAX_SPACING_S = 60.0


@dataclasses.dataclass(eq=False)
class SweepSchedule:
    every_s: float
    # At most this share of the loop's time goes to sweeps slower than quick_s. The loop waits
    # for its sweep, so each one under a held snapshot delays what arrives meanwhile: at 1%,
    # the two loops' sweeps took commit-to-delivery p99 to 104-224 ms in six of the ten minutes
    # of a 10-minute hold (300 events/s); at 0.2%, 36-66 ms in its second to ninth minutes
    # (50-175 ms in a second run on a busier machine; bench/README). The price, under such a
    # hold only: a record left below a cursor waits up to took / share for the next sweep (a
    # 200 ms sweep: 100 s); the usual ones go sooner, by the delivery loop's trailing claim and
    # the relay's sweep once the transactions it passed have ended. A sweep within quick_s
    # delays nothing that matters, and a requeued record should not wait seconds for it: the
    # next one runs every_s later.
    share: float = 0.002
    quick_s: float = 0.02
    # However slow: a gauge or a rescue must not wait longer than this (the sweeps: no bound).
    max_spacing_s: float = math.inf
    clock: Callable[[], float] = time.monotonic
    _next_at: float = dataclasses.field(default=-math.inf, init=False)
    _started_at: float = dataclasses.field(default=-math.inf, init=False)
    _last_took: float = dataclasses.field(default=0.0, init=False)

    def begin(self) -> bool:
        """Whether the next claim sweeps; if it does, call ``end`` once it has finished."""
        now = self.clock()
        if now < self._next_at:
            return False
        self._started_at, self._next_at = now, now + self.every_s
        return True

    def end(self) -> None:
        took = self.clock() - self._started_at
        lasting = min(took, self._last_took)  # module docstring: only slowness that lasts
        self._last_took = took
        spacing = self.every_s
        if lasting > self.quick_s:
            spacing = max(self.every_s, min(lasting / self.share, self.max_spacing_s))
        self._next_at = self._started_at + spacing

    def now(self) -> None:
        """The next claim sweeps, whenever the last one was."""
        self._next_at = -math.inf


def paced_schedule(every_s: float, clock: Callable[[], float] = time.monotonic) -> SweepSchedule:
    """The schedule of the metric snapshot and the lease rescue (module docstring)."""
    return SweepSchedule(every_s, share=PACED_SHARE, max_spacing_s=PACED_MAX_SPACING_S, clock=clock)
