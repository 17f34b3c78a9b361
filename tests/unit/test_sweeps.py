"""Sweeps run every every_s while they are quick, and take at most their share of the time
once they stay slow."""

from __future__ import annotations

from outbox_notifier.sweeps import SweepSchedule
from tests.support import ManualClock


def _sweep(schedule: SweepSchedule, clock: ManualClock, took_s: float) -> None:
    assert schedule.begin()
    clock.now += took_s
    schedule.end()


def test_quick_sweeps_run_every_every_s() -> None:
    clock = ManualClock()
    schedule = SweepSchedule(1.0, clock=clock)
    _sweep(schedule, clock, 0.002)
    clock.now += 0.99
    assert not schedule.begin()
    clock.now += 0.01
    assert schedule.begin()


def test_a_slow_sweep_spaces_out_the_next_so_sweeping_takes_its_share_at_most() -> None:
    clock = ManualClock()
    schedule = SweepSchedule(1.0, share=0.01, clock=clock)
    _sweep(schedule, clock, 0.3)  # a held snapshot's dead entries
    clock.now += 1.0
    started = clock.now
    _sweep(schedule, clock, 0.25)  # still slow: the shorter of the two sets the spacing
    clock.now = started + 24.9
    assert not schedule.begin()
    clock.now = started + 25.0
    _sweep(schedule, clock, 0.001)  # the snapshot is gone: quick again
    clock.now += 1.0
    assert schedule.begin()


def test_a_sweep_within_quick_s_is_not_spaced_out_by_its_share() -> None:
    # a busy machine, no held snapshot: 15 ms is over the share of a 1 s loop, a stall of
    # nothing, and a requeued record below the cursor should not wait 7.5 s for it
    clock = ManualClock()
    schedule = SweepSchedule(1.0, share=0.002, quick_s=0.02, clock=clock)
    for _ in range(3):
        started = clock.now
        _sweep(schedule, clock, 0.015)
        clock.now = started + 1.0
    _sweep(schedule, clock, 0.025)
    started = clock.now = clock.now + 0.975
    _sweep(schedule, clock, 0.025)  # over quick_s, and so was the one before: 12.5 s apart
    clock.now = started + 12.4
    assert not schedule.begin()
    clock.now = started + 12.5
    assert schedule.begin()


def test_one_slow_sweep_among_quick_ones_does_not_space_out_the_next() -> None:
    # the first sweep after start-up plans the statement and loads the catalog; with no
    # snapshot held, a record below the cursor should not wait took / share (15 s) for that
    clock = ManualClock()
    schedule = SweepSchedule(1.0, share=0.002, quick_s=0.02, clock=clock)
    started = clock.now
    _sweep(schedule, clock, 0.03)
    clock.now = started + 1.0
    _sweep(schedule, clock, 0.002)
    clock.now += 0.998
    _sweep(schedule, clock, 0.03)  # a checkpoint, say, between quick ones
    clock.now += 0.97
    assert schedule.begin()


def test_now_makes_the_next_claim_sweep() -> None:
    clock = ManualClock()
    schedule = SweepSchedule(30.0, clock=clock)
    _sweep(schedule, clock, 0.001)
    assert not schedule.begin()
    schedule.now()
    assert schedule.begin()


def test_a_bounded_schedule_is_never_spaced_out_further_than_its_bound() -> None:
    clock = ManualClock()
    schedule = SweepSchedule(5.0, share=0.01, max_spacing_s=60.0, clock=clock)
    _sweep(schedule, clock, 3.0)
    clock.now += 5.0
    started = clock.now
    _sweep(schedule, clock, 3.0)  # 3 s at 1% would be 300 s apart
    clock.now = started + 59.9
    assert not schedule.begin()
    clock.now = started + 60.0
    assert schedule.begin()
