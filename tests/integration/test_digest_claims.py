"""Digests in the claim (0015, claim_due_v1), against PostgreSQL: when a chat bot's records are
merged, which ones, how the budget counts them, and the queue that keeps them in order.

The claim is driven directly (``RecordStore.claim_records``) and its results are made and
applied as the delivery loop makes and the completer applies them (``delivery.to_result``,
``unsent_result``), so each rule is seen on its own; the daemon end to end against the
platforms' look-alike is in test_digest_delivery.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.delivery import calls_of, to_result, unsent_result
from outbox_notifier.names import Outcome
from outbox_notifier.providers.model import SendResult
from outbox_notifier.sqlfiles import query
from outbox_notifier.store import (
    AttemptResult,
    ClaimedRecord,
    ClaimPolicy,
    Digests,
    Pacing,
    RecordStore,
)
from tests.integration.test_pipeline import _CLAIM_PARAMS, _plans
from tests.support import add_channel, enqueue, fill_history, payload, relay_for, scalar

DINGTALK = "https://oapi.dingtalk.com/robot/send?access_token=group-robot"
LEASE_S = 30.0


def policy(per_min: int = 20, per_s: int = 0, digest_max: int = 20) -> ClaimPolicy:
    """A DingTalk robot's budget (20 a minute by default) with digests on."""
    return ClaimPolicy(
        lease_s=LEASE_S,
        pacing=Pacing(per_s={"dingtalk_bot": per_s}, per_min={"dingtalk_bot": per_min}),
        digests=Digests(providers=("dingtalk_bot",), max_records=digest_max),
    )


def burst(conn: psycopg.Connection[Any], n: int, *, user_id: int = 1, **fields: Any) -> None:
    """``n`` events for one user, committed together (record i: dedupe key ``k-i``)."""
    with conn.transaction():
        for i in range(n):
            enqueue(conn, payload(f"k-{i}", user_id=user_id, **fields))


@pytest.fixture
async def pool(db: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=3) as opened:
        yield opened


async def relayed(pool: AsyncConnectionPool[Any]) -> RecordStore:
    store = RecordStore(pool)
    await relay_for(store, relay_batch_size=500).relay_once()
    return store


def results_of(call: Sequence[ClaimedRecord], *, carried: int | None = None) -> list[AttemptResult]:
    """What the delivery loop hands the completer for one call that succeeded, holding the
    first ``carried`` of its records (all by default); the rest were left out of it."""
    carried = len(call) if carried is None else carried
    sent = SendResult(outcome=Outcome.SUCCESS, http_status=200, duration_s=0.01)
    now = datetime.now(UTC)
    made = [
        to_result(
            record,
            sent,
            RetryPolicy(),
            now,
            random.Random(0),
            message_id=record.message_id if carried > 1 else None,
            records_in_call=carried,
            counts_call=number == 0,
        )
        for number, record in enumerate(call[:carried])
    ]
    return made + [unsent_result(record, now) for record in call[carried:]]


def number(record: ClaimedRecord) -> int:
    return int(record.dedupe_key.removeprefix("k-"))


def waiting(conn: psycopg.Connection[Any]) -> list[tuple[str, int, str | None, float]]:
    """(dedupe key, attempts, queue, seconds until due) of the records that wait, oldest first."""
    rows = conn.execute(
        "SELECT dedupe_key, attempt_count, digest_target,"
        " extract(epoch FROM next_retry_at - now())::float8"
        " FROM outbox_notifier.notification_records WHERE status = 'pending' ORDER BY id"
    ).fetchall()
    return [(key, attempts, queue, float(due)) for key, attempts, queue, due in rows]


def log_entries(conn: psycopg.Connection[Any]) -> int:
    return int(scalar(conn, "SELECT cardinality(recent_sends) FROM outbox_notifier.targets"))


async def test_a_target_within_its_budget_gets_a_call_per_record(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    burst(conn, 5)
    store = await relayed(pool)
    claimed = await store.claim_records(100, policy())
    assert [number(r) for r in claimed] == [0, 1, 2, 3, 4]
    assert all(r.message_id is None for r in claimed)
    assert [len(call) for call in calls_of(claimed)] == [1] * 5
    assert log_entries(conn) == 5  # five calls
    queued = (
        "SELECT count(*) FROM outbox_notifier.notification_records WHERE digest_target IS NOT NULL"
    )
    assert scalar(conn, queued) == 0


async def test_a_target_over_its_budget_gets_one_call_of_its_oldest_records(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    burst(conn, 30)
    store = await relayed(pool)
    claimed = await store.claim_records(100, policy(per_min=5))
    [digest] = calls_of(claimed)
    assert [number(r) for r in digest] == list(range(20))  # digest_max_records, oldest first
    assert len({r.message_id for r in digest}) == 1 and digest[0].message_id is not None
    assert log_entries(conn) == 1  # one call, however many records
    # the rest wait in the target's queue, attempts unspent, until a second past the call's
    # lease at the latest (its result wakes them sooner)
    rest = waiting(conn)
    assert [key for key, *_ in rest] == [f"k-{i}" for i in range(20, 30)]
    assert {(attempts, queue is not None) for _, attempts, queue, _ in rest} == {(0, True)}
    assert all(LEASE_S < due <= LEASE_S + 2 for *_, due in rest), rest


async def test_one_call_of_a_queue_at_a_time_and_its_result_wakes_the_next(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    burst(conn, 45)
    store = await relayed(pool)
    [first] = calls_of(await store.claim_records(100, policy()))
    # new records meet the target while its digest is in flight: they join the queue
    with conn.transaction():
        for i in range(45, 50):
            enqueue(conn, payload(f"k-{i}"))
    await relay_for(store, relay_batch_size=500).relay_once()
    assert await store.claim_records(100, policy()) == []
    assert all(queue is not None for _, _, queue, _ in waiting(conn))
    applied = await store.apply_results(results_of(first), policy())
    assert applied.woke  # the completer wakes the delivery loop on it
    head = waiting(conn)[0]
    assert head[0] == "k-20" and head[3] <= 0  # due now
    [second] = calls_of(await store.claim_records(100, policy()))
    assert [number(r) for r in second] == list(range(20, 40))
    await store.apply_results(results_of(second), policy())
    [third] = calls_of(await store.claim_records(100, policy()))
    assert [number(r) for r in third] == list(range(40, 50))
    await store.apply_results(results_of(third), policy())
    assert waiting(conn) == []
    assert log_entries(conn) == 3


async def test_records_left_out_of_a_message_wait_first_in_line_without_spending_an_attempt(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    burst(conn, 25)
    store = await relayed(pool)
    [call] = calls_of(await store.claim_records(100, policy(per_min=5)))
    assert len(call) == 20
    # the platform's limits let 8 of them into the message
    applied = await store.apply_results(results_of(call, carried=8), policy(per_min=5))
    assert {r.status for r in applied.records} == {"sent", "pending"}
    rest = waiting(conn)
    assert [key for key, *_ in rest] == [f"k-{i}" for i in range(8, 25)]
    assert {(attempts, queue is not None) for _, attempts, queue, _ in rest} == {(0, True)}
    assert rest[0][3] <= 0  # the first left out is due at once
    logged = scalar(conn, "SELECT count(*) FROM outbox_notifier.delivery_attempts")
    assert logged == 8  # no attempt row for a record the call did not carry
    [again] = calls_of(await store.claim_records(100, policy(per_min=5)))
    assert [number(r) for r in again] == list(range(8, 25))
    assert {r.attempt_count for r in again} == {1}


async def test_three_claimers_at_once_share_one_budget_and_never_share_a_record(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    burst(conn, 300)
    store = await relayed(pool)
    replicas = [RecordStore(pool) for _ in range(3)]
    rounds: list[list[list[ClaimedRecord]]] = []
    unsent = "SELECT count(*) FROM outbox_notifier.notification_records WHERE status <> 'sent'"
    deadline = asyncio.get_running_loop().time() + 20
    while scalar(conn, unsent) and asyncio.get_running_loop().time() < deadline:
        # all three claim at once, then the calls' results land
        claims = await asyncio.gather(*(r.claim_records(100, policy()) for r in replicas))
        made = [call for claimed in claims for call in calls_of(claimed)]
        if not made:  # records deferred for a moment (a contended queue): as the loop waits
            await asyncio.sleep(0.05)
            continue
        # one call of the target's queue in flight at a time, whoever claimed it
        assert len([call for call in made if len(call) > 1]) <= 1
        rounds.append(made)
        for call in made:
            await store.apply_results(results_of(call), policy())
    calls = [call for made in rounds for call in made]
    sent = [number(r) for call in calls for r in call]
    assert sorted(sent) == list(range(300))  # every record in exactly one call
    assert len(calls) <= 20 and log_entries(conn) == len(calls)  # the minute's budget
    # oldest first within each call, and from each round of calls to the next (the calls of
    # one round are in flight together: no order between them)
    assert all(sorted(map(number, call)) == list(map(number, call)) for call in calls)
    spans = [sorted(number(r) for call in made for r in call) for made in rounds]
    assert [i for span in spans for i in span] == list(range(300)), [
        (span[0], len(span)) for span in spans
    ]


async def test_a_digest_holds_at_most_the_head_of_an_ordering_key(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    with conn.transaction():
        for i in range(12):  # keys task-0, task-1, task-2 in turn
            enqueue(conn, payload(f"k-{i}", ordering_key=f"task-{i % 3}"))
    store = await relayed(pool)
    [call] = calls_of(await store.claim_records(100, policy(per_min=2)))
    assert [number(r) for r in call] == [0, 1, 2]  # one record of each key


async def test_a_record_to_be_sent_alone_takes_a_call_of_its_own_first(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    burst(conn, 10)
    store = await relayed(pool)
    conn.execute(
        "UPDATE outbox_notifier.notification_records SET digest_alone = true"
        " WHERE dedupe_key IN ('k-3', 'k-6')"
    )
    calls = calls_of(await store.claim_records(100, policy(per_min=4)))
    assert sorted([number(r) for r in call] for call in calls) == [
        [0, 1, 2, 4, 5, 7, 8, 9], [3], [6],
    ]  # fmt: skip
    assert log_entries(conn) == 3
    marked = "SELECT count(*) FROM outbox_notifier.notification_records WHERE digest_alone"
    assert scalar(conn, marked) == 0  # the claim clears the mark: it is for one call


async def test_a_provider_without_digests_is_paced_a_call_per_record(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    burst(conn, 30)
    store = await relayed(pool)
    off = ClaimPolicy(lease_s=LEASE_S, pacing=policy(per_min=5).pacing)
    claimed = await store.claim_records(100, off)
    assert len(claimed) == 5 and all(r.message_id is None for r in claimed)
    assert all(queue is None for _, _, queue, _ in waiting(conn))


def test_the_claim_reads_digest_queues_through_their_partial_index(
    conn: psycopg.Connection[Any],
) -> None:
    # A long history, a robot over its budget with a queue: every probe of the queue (is any
    # queue in use, its head, whether a call of it is in flight, its front) walks the queue's
    # partial index, never the records.
    fill_history(conn)
    add_channel(conn, 1, DINGTALK, provider="dingtalk_bot")
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, next_retry_at, digest_target)"
        " SELECT 'feishu', 1, 'p', 'q' || g, '/x', now() - interval '1 s', %s"
        " FROM generate_series(1, 30) g",
        (scalar(conn, "SELECT outbox_notifier.target_key(%s)", (DINGTALK,)),),
    )
    conn.execute("ANALYZE outbox_notifier.notification_records")
    params = _CLAIM_PARAMS | {
        "paced": "{dingtalk_bot}", "per_s": "{0}", "per_min": "{5}",
        "digest": "{dingtalk_bot}", "digest_max_records": 20,
    }  # fmt: skip
    plans = _plans(conn, query("claim_records").encode(), params)
    assert "using records_digest_queue_idx" in plans, plans
    assert "Seq Scan on notification_records" not in plans, plans
