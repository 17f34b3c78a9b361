"""Results of calls that finish close together are applied together: one commit, not one each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.delivery import Deliverer
from outbox_notifier.metrics import Metrics
from outbox_notifier.names import Outcome
from outbox_notifier.providers.model import Delivery, SendResult
from outbox_notifier.store import AppliedRecord, AttemptResult, ClaimPolicy, RecordStore
from tests.support import delivering, enqueue, loop_context, payload, relay_for, scalar

RECORDS = 20


class _Staggered:
    """Succeeds after 0.5 ms x the record's position: the calls finish over 10 ms."""

    channel = "feishu"

    def __init__(self, first_id: int) -> None:
        self.first_id = first_id

    async def send(self, delivery: Delivery) -> SendResult:
        await asyncio.sleep((delivery.record_id - self.first_id) * 0.0005)
        return SendResult(outcome=Outcome.SUCCESS, http_status=200)


@pytest.mark.parametrize("linger_s", [0.05, 0.0])
async def test_results_landing_together_are_applied_in_few_batches(
    db: str, conn: psycopg.Connection[Any], linger_s: float
) -> None:
    for i in range(RECORDS):
        enqueue(conn, payload(f"k-{i}"))
    batches: list[int] = []

    class BatchMetrics(Metrics):
        """The daemon's metrics sink, noting the size of each applied batch."""

        def observe_results(
            self, results: Sequence[AttemptResult], applied: Sequence[AppliedRecord]
        ) -> None:
            assert len(applied) == len(results)
            batches.append(len(results))
            super().observe_results(results, applied)

    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=2) as pool:
        store = RecordStore(pool)
        await relay_for(store, relay_batch_size=100).relay_once()
        first_id = scalar(conn, "SELECT min(id) FROM outbox_notifier.notification_records")
        claims = ClaimPolicy(lease_s=30)
        deliverer = Deliverer(
            store, {"feishu_flow": _Staggered(first_id)}, RetryPolicy(), claims,
            ResultCompleter(store, claims, linger_s=linger_s),
            batch_size=RECORDS, concurrency=RECORDS,
        )  # fmt: skip
        async with delivering(deliverer, loop_context(BatchMetrics(CollectorRegistry()))):
            deadline = time.monotonic() + 10
            while sum(batches) < RECORDS:
                assert time.monotonic() < deadline, batches
                await asyncio.sleep(0.01)
    sent = "SELECT count(*) FROM outbox_notifier.notification_records WHERE status = 'sent'"
    assert scalar(conn, sent) == RECORDS
    if linger_s:
        # 10 ms of results, a 50 ms window: one batch (two if the first apply raced the rest)
        assert len(batches) <= 2, batches
    else:
        assert len(batches) >= 2, batches  # each result goes as soon as the applier is free
