"""The metric snapshot and the lease rescue, paced like sweeps (``outbox_notifier.sweeps``):
each turn while they are quick; once two in a row are slow, as under a held snapshot that
fills the partial indexes they walk, at most 1% of the time.

The statements are real; only their duration is made up: each one moves the loop's clock
(a ``ManualClock``) by 300 ms, as a walk of a long hold's dead entries takes. Two such in a
row put the next one 300 ms / 1% = 30 s after the second began (below the one-minute bound,
which tests/unit/test_sweeps.py covers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.maintenance_store import MaintenanceStore, SnapshotRow
from outbox_notifier.rescue import Rescuer
from outbox_notifier.store import RecordStore, RescuedRecord
from outbox_notifier.sweeps import PACED_SHARE, paced_schedule
from tests.support import (
    ManualClock,
    enqueue,
    eventually,
    loop_context,
    maintenance_loop,
    payload,
    relay_for,
)

pytestmark = pytest.mark.timeout(60)

SLOW_S = 0.3  # what each statement "takes" on the loop's clock
START = 1000.0  # the ManualClock's
NEXT_AT = START + SLOW_S + SLOW_S / PACED_SHARE  # the second began at START + SLOW_S


class _SlowRescues(RecordStore):
    def __init__(self, pool: AsyncConnectionPool[Any], clock: ManualClock) -> None:
        super().__init__(pool)
        self.clock = clock
        self.calls = 0

    async def rescue_expired_leases(
        self, limit: int, delays_s: Sequence[float], jitter: float
    ) -> list[RescuedRecord]:
        self.calls += 1
        rescued = await super().rescue_expired_leases(limit, delays_s, jitter)
        self.clock.now += SLOW_S
        return rescued


class _SlowSnapshots(MaintenanceStore):
    def __init__(self, conn: psycopg.AsyncConnection[Any], clock: ManualClock) -> None:
        super().__init__(conn)
        self.clock = clock
        self.calls = 0

    async def metrics_snapshot(self) -> list[SnapshotRow]:
        self.calls += 1
        rows = await super().metrics_snapshot()
        self.clock.now += SLOW_S
        return rows


async def test_slow_rescues_are_spaced_out_to_their_share(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    clock = ManualClock(START)
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = _SlowRescues(pool, clock)
        enqueue(conn, payload("k-1"))
        await relay_for(store).relay_once()
        # A record whose worker died: its lease ran out an hour ago.
        conn.execute(
            "UPDATE outbox_notifier.notification_records SET status = 'sending', lease_token = 1,"
            " attempt_count = 1, lease_expires_at = now() - interval '1 hour'"
        )
        rescuer = Rescuer(store, RetryPolicy(), interval_s=0.01, clock=clock)
        ctx = loop_context()
        task = asyncio.create_task(rescuer.run(ctx, asyncio.Event()))
        try:
            await eventually(lambda: store.calls == 2, what="two rescues")
            await asyncio.sleep(0.3)  # some 30 turns of the loop
            # The first took the record back, in time; the two slow ones in a row put the next
            # one 30 s away on the loop's clock, which has not moved since.
            assert store.calls == 2
            status = conn.execute("SELECT status FROM outbox_notifier.notification_records")
            assert status.fetchone() == ("failed",)
            clock.now = NEXT_AT - 0.1
            await asyncio.sleep(0.2)
            assert store.calls == 2
            clock.now = NEXT_AT + 0.1
            await eventually(lambda: store.calls == 3, what="the rescue 30 s later")
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 5)


async def test_quick_rescues_run_every_turn(db: str) -> None:
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        rescuer = Rescuer(store, RetryPolicy(), interval_s=0.01)  # the real clock
        ctx = loop_context()
        task = asyncio.create_task(rescuer.run(ctx, asyncio.Event()))
        try:
            await eventually(
                lambda: (ctx.metrics.registry.get_sample_value(
                    "outbox_notifier_claim_duration_seconds_count", {"loop": "rescue"}
                ) or 0) >= 10,
                what="ten rescues",
            )  # fmt: skip
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 5)


async def test_slow_metric_snapshots_are_spaced_out_and_the_gauges_kept(
    aconn: psycopg.AsyncConnection[Any], conn: psycopg.Connection[Any]
) -> None:
    clock = ManualClock(START)
    loop = maintenance_loop(aconn)
    store = _SlowSnapshots(aconn, clock)
    loop.store = store
    loop.snapshots = paced_schedule(0.0, clock)  # the loop's own schedule, on the test's clock
    ctx = loop_context()
    enqueue(conn, payload("k-1"))
    for _ in range(5):  # five turns of the loop at once on its clock
        await loop._snapshot(ctx)
    assert store.calls == 2  # the second slow one in a row spaces the next 30 s out
    pending = ctx.metrics.registry.get_sample_value("outbox_notifier_outbox_pending")
    assert pending == 1.0  # the gauges hold the last snapshot's values meanwhile
    clock.now = NEXT_AT - 0.1
    await loop._snapshot(ctx)
    assert store.calls == 2
    clock.now = NEXT_AT + 0.1
    await loop._snapshot(ctx)
    assert store.calls == 3
