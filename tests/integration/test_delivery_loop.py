"""The delivery loop alone (no daemon), against real Postgres and providers held by the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.delivery import Deliverer
from outbox_notifier.names import Outcome
from outbox_notifier.providers.model import Delivery, SendResult
from outbox_notifier.store import ClaimPolicy, RecordStore
from outbox_notifier.timeouts import StatementTimeouts
from tests.support import delivering, enqueue, eventually, loop_context, payload, relay_for, scalar

CLAIMS = ClaimPolicy(lease_s=30)
SENT = "SELECT count(*) FROM outbox_notifier.notification_records WHERE status = 'sent'"
CLAIMED = "SELECT count(*) FROM outbox_notifier.notification_records WHERE attempt_count > 0"


class _Held:
    """Succeeds once the test lets it; counts the calls in progress."""

    channel = "feishu"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def send(self, delivery: Delivery) -> SendResult:
        self.calls += 1
        await self.release.wait()
        return SendResult(outcome=Outcome.SUCCESS, http_status=200)


@pytest.fixture
async def store(db: str, conn: psycopg.Connection[Any]) -> AsyncIterator[RecordStore]:
    """Ten records relayed; statements give up on a lock after 0.1 s."""
    for i in range(10):
        enqueue(conn, payload(f"k-{i}"))
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool, timeouts=StatementTimeouts(lock_s=0.1, statement_s=5.0))
        await relay_for(store, relay_batch_size=100).relay_once()
        yield store


def deliverer(
    store: RecordStore, provider: _Held, *, concurrency: int, **completer: Any
) -> Deliverer:
    return Deliverer(
        store, {"feishu_flow": provider}, RetryPolicy(), CLAIMS,
        ResultCompleter(store, CLAIMS, retry_s=0.05, **completer),
        batch_size=10, concurrency=concurrency, claim_retry_s=0.05,
    )  # fmt: skip


async def test_it_claims_only_as_many_records_as_it_has_free_slots(
    conn: psycopg.Connection[Any], store: RecordStore
) -> None:
    provider = _Held()
    loop = deliverer(store, provider, concurrency=4)
    ctx = loop_context()
    async with delivering(loop, ctx, poll_interval_s=0.05):
        await eventually(lambda: provider.calls == 4)
        await asyncio.sleep(0.3)  # several turns of the loop
        assert loop.in_flight == 4
        assert scalar(conn, CLAIMED) == 4  # the other leases have not started ticking
        ages = ctx.monitor.ages()
        assert ages["delivery"] == 0.0  # waiting for a slot is a wait on purpose
        provider.release.set()
        await eventually(lambda: scalar(conn, SENT) == 10)


async def test_a_claim_failure_is_survived(
    db: str, conn: psycopg.Connection[Any], store: RecordStore
) -> None:
    provider = _Held()
    provider.release.set()
    ctx = loop_context()
    with psycopg.connect(db) as holder:
        # The claim's row locks wait on this, and give up after lock_timeout.
        holder.execute("LOCK TABLE outbox_notifier.notification_records IN EXCLUSIVE MODE")
        async with delivering(deliverer(store, provider, concurrency=4), ctx) as task:

            def claim_errors() -> bool:
                value = ctx.metrics.registry.get_sample_value(
                    "outbox_notifier_database_errors_total", {"loop": "delivery"}
                )
                return (value or 0.0) >= 2

            await eventually(claim_errors, what="failing claims")
            assert "delivery" in ctx.db_health.problems()
            assert not task.done()
            assert ctx.monitor.healthy(5.0)[0]  # a locked database is not a wedged loop
            holder.rollback()
            await eventually(lambda: scalar(conn, SENT) == 10, what="delivery after the lock")
            assert "delivery" not in ctx.db_health.problems()


async def test_stopping_drains_the_calls_in_flight(
    conn: psycopg.Connection[Any], store: RecordStore
) -> None:
    provider = _Held()
    loop = deliverer(store, provider, concurrency=10)
    ctx = loop_context()
    task = asyncio.create_task(loop.run(ctx, asyncio.Event(), 0.05))
    await eventually(lambda: provider.calls == 10)
    ctx.stop.set()
    await asyncio.sleep(0.2)
    assert not task.done()  # it waits for the calls
    assert scalar(conn, SENT) == 0
    provider.release.set()
    await asyncio.wait_for(task, 5)
    assert scalar(conn, SENT) == 10  # every result landed before run() returned
    assert provider.calls == 10  # and nothing new was claimed


async def test_no_new_claims_while_the_completer_is_behind(
    db: str, conn: psycopg.Connection[Any], store: RecordStore
) -> None:
    provider = _Held()
    provider.release.set()
    loop = deliverer(store, provider, concurrency=2, backlog_max=1)
    with psycopg.connect(db) as holder:
        # Every apply writes delivery_attempts, which no claim touches: results pile up.
        holder.execute("LOCK TABLE outbox_notifier.delivery_attempts IN EXCLUSIVE MODE")
        async with delivering(loop, loop_context(), poll_interval_s=0.05):
            await eventually(lambda: loop.completer.backlog >= 2)
            await asyncio.sleep(0.3)  # several turns of the loop
            assert provider.calls == 2
            assert scalar(conn, CLAIMED) == 2
            holder.rollback()
            await eventually(lambda: scalar(conn, SENT) == 10, what="delivery after the lag")


async def test_a_record_left_below_the_cursor_goes_while_full_sweeps_are_spaced_out(
    conn: psycopg.Connection[Any], store: RecordStore
) -> None:
    """With full sweeps an hour apart (as after a slow one under a held snapshot), a record the
    cursor passed while its key was held goes with the next trailing claim, which starts where
    the cursor was one sweep_s before."""
    provider = _Held()
    provider.release.set()
    loop = deliverer(store, provider, concurrency=20)
    loop.sweep_s = 2.0
    lowest = int(scalar(conn, "SELECT min(id) FROM outbox_notifier.notification_records"))
    key = scalar(conn, "SELECT dedupe_key FROM outbox_notifier.notification_records WHERE id = %s",
                 (lowest,))  # fmt: skip
    with psycopg.connect(conn.info.dsn) as other:
        other.execute(
            "SELECT pg_advisory_xact_lock(outbox_notifier.record_lock_key('feishu', %s))", (key,)
        )
        async with delivering(loop, loop_context(), poll_interval_s=0.05):
            await eventually(lambda: scalar(conn, SENT) == 9)  # the first claim, a full sweep
            loop._sweeps.every_s = 3600.0  # the next full sweep is an hour away
            loop._sweeps.end()
            other.commit()  # the key is free: only a claim from below the cursor finds it
            await eventually(lambda: scalar(conn, SENT) == 10, timeout_s=5)
