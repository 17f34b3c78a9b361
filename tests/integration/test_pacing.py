"""Per-target pacing inside claim_due, shared by every replica through Postgres."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.store import ClaimPolicy, Pacing, RecordStore
from tests.support import add_channel, enqueue, payload, relay_for


async def _relayed_store(pool: AsyncConnectionPool[Any]) -> RecordStore:
    store = RecordStore(pool)
    await relay_for(store, relay_batch_size=500).relay_once()
    return store


async def test_minute_budget_defers_the_rest_without_spending_attempts(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    add_channel(conn, 1, "https://open.feishu.cn/open-apis/bot/v2/hook/t", provider="feishu_bot")
    for i in range(12):
        enqueue(conn, payload(f"k-{i}"))
    policy = ClaimPolicy(
        lease_s=30, pacing=Pacing(per_s={"feishu_bot": 0}, per_min={"feishu_bot": 10})
    )
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = await _relayed_store(pool)
        claimed = await store.claim_records(100, policy)
        again = await store.claim_records(100, policy)
        due_in = await store.seconds_until_next_due()
    assert len(claimed) == 10
    assert again == []
    deferred = conn.execute(
        "SELECT status, attempt_count, extract(epoch FROM next_retry_at - now())"
        " FROM outbox_notifier.notification_records WHERE status = 'pending'"
    ).fetchall()
    assert len(deferred) == 2
    assert all(status == "pending" and attempts == 0 for status, attempts, _ in deferred)
    # They wait until the oldest call of the minute leaves the window, not a fixed poll.
    assert all(59.0 < float(wait) < 61.0 for *_, wait in deferred), deferred
    assert due_in is not None and 59.0 < due_in < 61.0
    log = conn.execute("SELECT cardinality(recent_sends) FROM outbox_notifier.targets").fetchone()
    assert log == (10,)


async def test_second_budget_is_shared_by_concurrent_claimers(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    add_channel(conn, 1, "https://open.feishu.cn/open-apis/bot/v2/hook/t", provider="feishu_bot")
    for i in range(40):
        enqueue(conn, payload(f"k-{i}"))
    policy = ClaimPolicy(
        lease_s=30, pacing=Pacing(per_s={"feishu_bot": 5}, per_min={"feishu_bot": 0})
    )
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=4) as pool:
        store = await _relayed_store(pool)
        # Four "replicas" claim at once: together they may take only 5 in this second.
        batches = await asyncio.gather(*(store.claim_records(10, policy) for _ in range(4)))
    assert sum(len(b) for b in batches) == 5
    assert len({r.id for b in batches for r in b}) == 5
