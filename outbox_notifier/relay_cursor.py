"""Where the relay's next claim starts: past the outbox rows it knows are relayed.

A claim that walks the pending rows' index from its low end reads an entry for every row
relayed since the oldest open snapshot began, and a snapshot held for minutes keeps hundreds of
thousands of them (0017's header has the figures). The relay claims past a cursor instead.

The cursor may not simply jump to the highest id claimed: producers take ids in one order and
commit in another, so a row below it may still be uncommitted. A batch's highest id therefore
waits until every transaction that could hold such a row has ended: the claim reports
``claim_xid``, its own transaction id, taken once its scan had begun and so higher than that of
every transaction that could have written a row the scan did not see, and every later claim
``running_xmin`` (the oldest transaction still running); once ``running_xmin`` reaches a
batch's ``claim_xid``, nothing below that batch's highest id can appear any more. A batch that
has waited ``max_wait_s`` moves the cursor anyway, so one long transaction cannot pin it; what
such a transaction commits below the cursor is taken by a sweep, a claim from 0, as soon as a
claim sees that the transactions passed over have ended. A sweep also runs every ``sweep_s``
(spaced out further when sweeps are slow, see ``sweeps``), for what nothing else reveals: rows
another relay left behind when its transaction failed, and the instant between an enqueue
taking its row's id and its transaction taking an id.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

from outbox_notifier.sweeps import SweepSchedule


@dataclasses.dataclass(frozen=True, slots=True)
class _Waiting:
    last_id: int  # the batch's highest outbox id
    claim_xid: int  # every row below last_id is visible once no transaction older than this runs
    claimed_at: float


@dataclasses.dataclass(eq=False)
class RelayCursor:
    max_wait_s: float = 5.0
    sweep_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    # batches closer together than this share one entry (the later id and xid, the earlier
    # time): the queue stays short whatever the claim rate
    merge_s: float = 0.05
    _after_id: int = dataclasses.field(default=0, init=False)
    _sweeps: SweepSchedule = dataclasses.field(init=False)
    _sweeping: bool = dataclasses.field(default=False, init=False)
    # the cursor was moved past transactions that may still commit rows below it: a sweep is
    # due once running_xmin reaches this (0: none)
    _passed_xid: int = dataclasses.field(default=0, init=False)
    _waiting: collections.deque[_Waiting] = dataclasses.field(
        default_factory=collections.deque, init=False
    )

    def __post_init__(self) -> None:
        self._sweeps = SweepSchedule(self.sweep_s, clock=self.clock)

    @property
    def after_id(self) -> int:
        """Every pending row at or below this id has been relayed (or is left to the sweep)."""
        return self._after_id

    def next_claim_after(self) -> int:
        """The id the next claim starts past: 0 when a sweep is due, the cursor otherwise.
        Call ``claim_ended`` once that claim's transaction has ended."""
        self._sweeping = self._sweeps.begin()
        return 0 if self._sweeping else self._after_id

    def claim_ended(self) -> None:
        if self._sweeping:
            self._sweeps.end()
            self._sweeping = False

    def committed(self, last_id: int, running_xmin: int, claim_xid: int) -> None:
        """A claim's batch was committed: ``last_id`` its highest id, ``running_xmin`` and
        ``claim_xid`` as the claim reported them (0017)."""
        now = self.clock()
        if self._passed_xid and self._passed_xid <= running_xmin:
            self._passed_xid = 0
            self._sweeps.now()
        waiting = self._waiting
        while waiting and (
            waiting[0].claim_xid <= running_xmin or now - waiting[0].claimed_at >= self.max_wait_s
        ):
            passed = waiting.popleft()
            if passed.claim_xid > running_xmin:
                self._passed_xid = max(self._passed_xid, passed.claim_xid)
            self._after_id = max(self._after_id, passed.last_id)
        if waiting and now - waiting[-1].claimed_at < self.merge_s:
            last = waiting.pop()
            last_id, claim_xid, now = (
                max(last.last_id, last_id), max(last.claim_xid, claim_xid), last.claimed_at
            )  # fmt: skip
        waiting.append(_Waiting(last_id, claim_xid, now))
