"""The relay's cursor: it passes a batch only once nothing below it can still appear."""

from __future__ import annotations

from outbox_notifier.relay_cursor import RelayCursor
from tests.support import ManualClock


def _cursor(clock: ManualClock) -> RelayCursor:
    cursor = RelayCursor(max_wait_s=5.0, sweep_s=30.0, clock=clock)
    assert cursor.next_claim_after() == 0  # the first claim sweeps
    return cursor


def test_a_batch_is_passed_once_the_transactions_running_at_its_scan_have_ended() -> None:
    clock = ManualClock()
    cursor = _cursor(clock)
    cursor.committed(last_id=10, running_xmin=100, claim_xid=105)
    assert cursor.next_claim_after() == 0  # 100..104 may still commit ids below 10
    clock.now += 1
    cursor.committed(last_id=20, running_xmin=104, claim_xid=110)
    assert cursor.next_claim_after() == 0  # 104 still runs
    clock.now += 1
    cursor.committed(last_id=30, running_xmin=105, claim_xid=112)
    assert cursor.next_claim_after() == 10  # the first batch's transactions have ended
    clock.now += 1
    cursor.committed(last_id=40, running_xmin=112, claim_xid=113)
    assert cursor.next_claim_after() == 30


def test_one_long_transaction_holds_the_cursor_no_longer_than_max_wait() -> None:
    clock = ManualClock()
    cursor = _cursor(clock)
    cursor.committed(last_id=10, running_xmin=100, claim_xid=105)
    clock.now += 4.9
    cursor.committed(last_id=20, running_xmin=100, claim_xid=106)
    assert cursor.next_claim_after() == 0
    clock.now += 0.1
    cursor.committed(last_id=30, running_xmin=100, claim_xid=107)
    assert cursor.next_claim_after() == 10  # waited 5 s: passed, though 100 still runs


def test_the_transactions_passed_over_are_swept_for_as_soon_as_they_end() -> None:
    clock = ManualClock()
    cursor = _cursor(clock)
    cursor.committed(last_id=10, running_xmin=100, claim_xid=105)
    clock.now += 5
    cursor.committed(last_id=20, running_xmin=100, claim_xid=106)  # passes 10 by time
    assert cursor.after_id == 10
    assert cursor.next_claim_after() == 10
    cursor.committed(last_id=21, running_xmin=104, claim_xid=107)  # 104 still runs
    assert cursor.next_claim_after() == 10
    cursor.committed(last_id=22, running_xmin=105, claim_xid=108)  # all of them have ended
    assert cursor.next_claim_after() == 0  # a sweep, at once, not after sweep_s
    assert cursor.next_claim_after() == cursor.after_id > 0


def test_a_sweep_runs_every_sweep_s() -> None:
    clock = ManualClock()
    cursor = _cursor(clock)
    cursor.committed(last_id=10, running_xmin=100, claim_xid=101)
    cursor.committed(last_id=20, running_xmin=101, claim_xid=102)
    clock.now += 29.9
    assert cursor.next_claim_after() == 10
    clock.now += 0.1
    assert cursor.next_claim_after() == 0
    assert cursor.next_claim_after() == 10


def test_batches_close_together_wait_as_one_for_the_later_horizon() -> None:
    clock = ManualClock()
    cursor = _cursor(clock)
    for n in range(1, 1001):  # a thousand batches within merge_s
        cursor.committed(last_id=n, running_xmin=100, claim_xid=100 + n)
    assert len(cursor._waiting) == 1
    clock.now += 1
    cursor.committed(last_id=2000, running_xmin=1099, claim_xid=1200)
    assert cursor.after_id == 0  # the merged entry waits for the latest of its horizons
    clock.now += 1
    cursor.committed(last_id=2001, running_xmin=1100, claim_xid=1201)
    assert cursor.after_id == 1000
