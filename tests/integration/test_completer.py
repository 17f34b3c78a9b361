"""The result completer alone, against real Postgres: records are claimed through the store,
results are handed to the completer, and the rows are read back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.delivery import to_result
from outbox_notifier.loops import LoopContext
from outbox_notifier.metrics import Metrics
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers.model import SendResult
from outbox_notifier.rescue import rescue_expired_leases
from outbox_notifier.store import (
    AppliedRecord,
    AttemptResult,
    ClaimedRecord,
    ClaimPolicy,
    RecordStore,
)
from outbox_notifier.timeouts import StatementTimeouts
from tests.support import attempts, enqueue, eventually, loop_context, payload, relay_for, scalar

CLAIMS = ClaimPolicy(lease_s=30)
SENT = "SELECT count(*) FROM outbox_notifier.notification_records WHERE status = 'sent'"


class BatchMetrics(Metrics):
    """The daemon's metrics sink, noting the size of each applied batch."""

    def __init__(self) -> None:
        super().__init__(CollectorRegistry())
        self.batches: list[int] = []

    def observe_results(
        self, results: Sequence[AttemptResult], applied: Sequence[AppliedRecord]
    ) -> None:
        self.batches.append(len(results))
        super().observe_results(results, applied)


@pytest.fixture
async def store(db: str) -> AsyncIterator[RecordStore]:
    """A store whose statements give up on a lock after 0.1 s (a lock held elsewhere is then a
    failing database call, which the completer retries)."""
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        yield RecordStore(pool, timeouts=StatementTimeouts(lock_s=0.1, statement_s=5.0))


async def claimed(conn: psycopg.Connection[Any], store: RecordStore, n: int) -> list[ClaimedRecord]:
    for i in range(n):
        enqueue(conn, payload(f"k-{i}"))
    await relay_for(store, relay_batch_size=100).relay_once()
    records = await store.claim_records(n, CLAIMS)
    assert len(records) == n
    return records


def succeeded(record: ClaimedRecord) -> AttemptResult:
    sent = SendResult(outcome=Outcome.SUCCESS, http_status=200)
    return to_result(record, sent, RetryPolicy(), datetime.now(UTC), random.Random(0))


@pytest.fixture
def attempts_locked(db: str) -> Iterator[psycopg.Connection[Any]]:
    """Another session holding a lock that blocks every apply (each writes delivery_attempts)
    but no claim, until it rolls back."""
    with psycopg.connect(db) as holder:
        holder.execute("LOCK TABLE outbox_notifier.delivery_attempts IN EXCLUSIVE MODE")
        yield holder
        holder.rollback()


async def test_a_full_batch_goes_at_once_and_the_rest_at_the_marker(
    conn: psycopg.Connection[Any], store: RecordStore
) -> None:
    metrics = BatchMetrics()
    completer = ResultCompleter(store, CLAIMS, batch_size=3, linger_s=10.0)
    for record in await claimed(conn, store, 7):
        completer.put(succeeded(record), more_due=True)
    completer.finish()
    await asyncio.wait_for(completer.run(loop_context(metrics)), 5)  # no 10 s linger
    assert metrics.batches == [3, 3, 1]
    assert scalar(conn, SENT) == 7


@pytest.mark.parametrize("more_due", [True, False])
async def test_a_batch_lingers_only_while_more_results_are_due(
    conn: psycopg.Connection[Any], store: RecordStore, more_due: bool
) -> None:
    metrics = BatchMetrics()
    completer = ResultCompleter(store, CLAIMS, linger_s=0.5)
    first, second = await claimed(conn, store, 2)
    task = asyncio.create_task(completer.run(loop_context(metrics)))
    completer.put(succeeded(first), more_due=more_due)
    await asyncio.sleep(0.1)  # within the linger
    completer.put(succeeded(second))
    completer.finish()
    await asyncio.wait_for(task, 5)
    assert metrics.batches == ([2] if more_due else [1, 1])
    assert scalar(conn, SENT) == 2


async def test_a_batch_is_retried_while_the_database_refuses_it(
    conn: psycopg.Connection[Any],
    store: RecordStore,
    attempts_locked: psycopg.Connection[Any],
) -> None:
    ctx = loop_context()
    completer = ResultCompleter(store, CLAIMS, retry_s=0.05)
    records = await claimed(conn, store, 3)
    task = asyncio.create_task(completer.run(ctx))
    for record in records:
        completer.put(succeeded(record))
    await eventually(lambda: errors(ctx) >= 2, what="apply retries")
    assert "apply" in ctx.db_health.problems()
    assert scalar(conn, SENT) == 0
    assert completer.backlog == 3  # kept, not dropped
    attempts_locked.rollback()  # the lock goes away
    await eventually(lambda: scalar(conn, SENT) == 3, what="the batch after the lock")
    # the commit is visible a moment before the completer resumes and reports it
    await eventually(lambda: ctx.db_health.problems() == {}, what="apply healthy again")
    completer.finish()
    await asyncio.wait_for(task, 5)
    assert completer.backlog == 0
    # applied once: one attempt row each, no late results
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.delivery_attempts") == 3
    assert ctx.metrics.registry.get_sample_value("outbox_notifier_late_results_total") == 0


async def test_a_late_result_is_fenced_off(
    conn: psycopg.Connection[Any], store: RecordStore
) -> None:
    enqueue(conn, payload("k-late"))
    await relay_for(store, relay_batch_size=10).relay_once()
    [first] = await store.claim_records(1, ClaimPolicy(lease_s=0.01))
    await asyncio.sleep(0.05)
    policy = RetryPolicy(base_s=0.01, max_s=0.01)
    [rescued] = await rescue_expired_leases(store, policy)
    assert rescued.status == "failed"
    await asyncio.sleep(0.05)
    [second] = await store.claim_records(1, CLAIMS)  # a new lease, a new token
    ctx = loop_context()
    completer = ResultCompleter(store, CLAIMS)
    refused = SendResult(outcome=Outcome.PERMANENT_FAIL, error_code=ErrorCode.PAYLOAD_INVALID)
    completer.put(to_result(first, refused, policy, datetime.now(UTC), random.Random(0)))
    completer.finish()
    await asyncio.wait_for(completer.run(ctx), 5)
    assert ctx.metrics.registry.get_sample_value("outbox_notifier_late_results_total") == 1
    # the second worker's lease stands
    assert (
        scalar(
            conn,
            "SELECT status FROM outbox_notifier.notification_records WHERE id = %s",
            (second.id,),
        )
        == "sending"
    )
    log = attempts(conn, first.id)
    assert [(a["attempt"], a["error_code"], a["applied"]) for a in log] == [
        (1, "sending_lease_expired", True),
        (1, "payload_invalid", False),
    ]


async def test_finish_applies_everything_queued_before_run_returns(
    conn: psycopg.Connection[Any],
    store: RecordStore,
    attempts_locked: psycopg.Connection[Any],
) -> None:
    completer = ResultCompleter(store, CLAIMS, batch_size=2, retry_s=0.05)
    records = await claimed(conn, store, 5)
    ctx = loop_context()
    task = asyncio.create_task(completer.run(ctx))
    for record in records:
        completer.put(succeeded(record))
    completer.finish()
    await eventually(lambda: errors(ctx) >= 1, what="a blocked apply")
    assert not task.done()  # the marker does not cut the queue short
    attempts_locked.rollback()
    await asyncio.wait_for(task, 5)
    assert scalar(conn, SENT) == 5


async def test_back_pressure_while_the_database_lags(
    conn: psycopg.Connection[Any],
    store: RecordStore,
    attempts_locked: psycopg.Connection[Any],
) -> None:
    completer = ResultCompleter(store, CLAIMS, retry_s=0.05, backlog_max=3)
    records = await claimed(conn, store, 6)
    task = asyncio.create_task(completer.run(loop_context()))
    for record in records[:3]:
        completer.put(succeeded(record))
    assert completer.has_room.is_set()  # at the bound, not over it
    for record in records[3:]:
        completer.put(succeeded(record))  # a result is never refused, whatever the backlog
    assert not completer.has_room.is_set()
    assert completer.backlog == 6
    attempts_locked.rollback()
    await asyncio.wait_for(completer.has_room.wait(), 5)
    await eventually(lambda: scalar(conn, SENT) == 6)
    assert completer.backlog == 0
    completer.finish()
    await asyncio.wait_for(task, 5)


def errors(ctx: LoopContext) -> float:
    value = ctx.metrics.registry.get_sample_value(
        "outbox_notifier_database_errors_total", {"loop": "apply"}
    )
    return value or 0.0
