"""Delivery in order per ordering key (0013, claim_due_v1), against PostgreSQL.

The claim is driven directly (``RecordStore.claim_records``) and results are written as the
completer writes them, so each rule is seen on its own; the daemon end to end, with random
failures, is the last test here, and several replicas killed at random are in
tests/faults/test_ordering_faults.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.daemon import Daemon
from outbox_notifier.store import ClaimedRecord, ClaimPolicy, RecordStore
from outbox_notifier.testing.feishu_server import FLOW_PREFIX, FeishuServer
from tests.support import (
    add_channel,
    enqueue,
    eventually,
    payload,
    relay_for,
    result_for,
    running,
    scalar,
    settings_for,
)

POLICY = ClaimPolicy(lease_s=30)
URL = "https://example.invalid/flow/api/trigger-webhook/"


def _enqueue_keyed(conn: psycopg.Connection[Any], name: str, key: str | None) -> int:
    fields: dict[str, Any] = {} if key is None else {"ordering_key": key}
    return enqueue(conn, payload(name, **fields))


def _record(conn: psycopg.Connection[Any], dedupe_key: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    row = cur.execute(
        "SELECT * FROM outbox_notifier.notification_records WHERE dedupe_key = %s", (dedupe_key,)
    ).fetchone()
    assert row is not None
    return row


def _make_due(conn: psycopg.Connection[Any]) -> None:
    """Every held record due now: what the passing of time would do."""
    conn.execute(
        "UPDATE outbox_notifier.notification_records SET next_retry_at = now()"
        " WHERE status = 'pending' AND next_retry_at IS NOT NULL"
    )


async def test_an_ordering_key_reaches_the_record_and_only_the_head_of_a_key_is_claimed(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    add_channel(conn, 1, URL + "a")
    for name, key in [("a1", "task-1"), ("a2", "task-1"), ("b1", "task-2"), ("u1", None),
                      ("a3", "task-1"), ("b2", "task-2"), ("u2", None)]:  # fmt: skip
        _enqueue_keyed(conn, name, key)
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        await relay_for(store).relay_once()
        claimed = await store.claim_records(100, POLICY)
    assert sorted(r.dedupe_key for r in claimed) == ["a1", "b1", "u1", "u2"]
    assert _record(conn, "a2")["ordering_key"] == "task-1"
    assert _record(conn, "u1")["ordering_key"] is None
    for name in ("a2", "a3", "b2"):
        held = _record(conn, name)
        # held without spending an attempt, for a second past the head's lease at most
        assert (held["status"], held["attempt_count"]) == ("pending", 0), held
        assert held["next_retry_at"] is not None


async def test_a_failing_head_holds_only_its_key_and_is_retried_before_the_next(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    add_channel(conn, 1, URL + "a")
    for i in range(3):
        _enqueue_keyed(conn, f"a{i}", "task-1")
        _enqueue_keyed(conn, f"b{i}", "task-2")
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        await relay_for(store).relay_once()
        first = {r.dedupe_key: r for r in await store.claim_records(100, POLICY)}
        assert sorted(first) == ["a0", "b0"]
        # a0 fails (retry in a minute), b0 is sent and releases b1 at once
        applied = await store.apply_results(
            [result_for(first["a0"], "failed", delay_s=60), result_for(first["b0"], "sent")], POLICY
        )
        finished = [row.id for row in applied.records if row.ordered and row.finished]
        assert await store.release_next_in_order(finished) == 1
        second = await store.claim_records(100, POLICY)
        assert [r.dedupe_key for r in second] == ["b1"]
        await store.apply_results([result_for(second[0], "sent")], POLICY)
        await store.release_next_in_order([second[0].id])
        third = await store.claim_records(100, POLICY)
        assert [r.dedupe_key for r in third] == ["b2"]
        # a1 and a2, looked at again when their first hold ends, now wait for a0's retry
        _make_due(conn)
        assert await store.claim_records(100, POLICY) == []
        assert _record(conn, "a1")["next_retry_at"] > _record(conn, "a0")["next_retry_at"]
        # once it is due, a0 goes first, alone
        _make_due(conn)
        conn.execute(
            "UPDATE outbox_notifier.notification_records SET next_retry_at = now()"
            " WHERE dedupe_key = 'a0'"
        )
        retried = await store.claim_records(100, POLICY)
        assert [(r.dedupe_key, r.attempt_count) for r in retried] == [("a0", 2)]
    assert _record(conn, "a1")["attempt_count"] == 0


async def test_a_dead_head_releases_the_next_and_stays_visible(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    add_channel(conn, 1, URL + "a")
    for i in range(2):
        _enqueue_keyed(conn, f"a{i}", "task-1")
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        await relay_for(store).relay_once()
        [head] = await store.claim_records(100, POLICY)
        applied = await store.apply_results([result_for(head, "dead")], POLICY)
        assert [(r.status, r.ordered, r.finished) for r in applied.records] == [
            ("dead", True, True)
        ]
        assert await store.release_next_in_order([head.id]) == 1
        nxt = await store.claim_records(100, POLICY)
    assert [r.dedupe_key for r in nxt] == ["a1"]
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.dead_letters WHERE id = %s",
                  (head.id,)) == 1  # fmt: skip


@pytest.mark.parametrize("due", ["deferred", "first"])
async def test_the_next_record_is_released_even_while_a_claim_is_holding_it_behind_the_head(
    db: str, conn: psycopg.Connection[Any], due: str
) -> None:
    # Another replica's claim has the next record locked and has read the head as sending, so
    # it holds the record until a second past the head's lease; the head's result commits before
    # that claim does. The release must wait for the claim and look at the record again, or the
    # record (and its whole key behind it) waits out the lease. "deferred": due since an earlier
    # deferral (an operator pause's end); "first": a first attempt, never deferred.
    add_channel(conn, 1, URL + "a")
    for i in range(2):
        _enqueue_keyed(conn, f"a{i}", "task-1")
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        await relay_for(store).relay_once()
        [head] = await store.claim_records(100, POLICY)
        conn.execute(
            "UPDATE outbox_notifier.notification_records SET next_retry_at = %s"
            " WHERE dedupe_key = 'a1'",
            (datetime.now(UTC) - timedelta(seconds=1) if due == "deferred" else None,),
        )
        with psycopg.connect(db) as other:  # a claim in flight on another replica
            held = other.execute(
                "SELECT count(*) FROM outbox_notifier.claim_due_v1("
                "100, 30, '{}', '{}', '{}', 0.05, 5, 30, 1, 0)"
            ).fetchone()
            assert held == (0,)
            await store.apply_results([result_for(head, "sent")], POLICY)
            release = asyncio.create_task(store.release_next_in_order([head.id]))
            await asyncio.sleep(0.3)
            other.commit()
            assert await asyncio.wait_for(release, 10) == 1
        assert _record(conn, "a1")["next_retry_at"] <= datetime.now(UTC)
        assert [r.dedupe_key for r in await store.claim_records(100, POLICY)] == ["a1"]


async def test_a_keyed_record_waits_for_a_pending_outbox_row_below_it(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    # Two relays side by side: the one holding the earlier row has not committed yet, the one
    # with the later row has. Without the low-water mark the later record would go first.
    add_channel(conn, 1, URL + "a")
    early = _enqueue_keyed(conn, "a0", "task-1")
    _enqueue_keyed(conn, "a1", "task-1")
    _enqueue_keyed(conn, "u0", None)
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=2) as pool:
        store = RecordStore(pool)
        with psycopg.connect(db) as slow_relay:
            slow_relay.execute(
                "SELECT id FROM outbox_notifier.outbox WHERE id = %s FOR UPDATE", (early,)
            )
            await relay_for(store).relay_once()  # relays the later rows, skips the locked one
            assert scalar(conn, "SELECT count(*) FROM outbox_notifier.notification_records") == 2
            claimed = await store.claim_records(100, POLICY)
            assert [r.dedupe_key for r in claimed] == ["u0"]  # a1 waits for the relay
            held = _record(conn, "a1")
            assert held["attempt_count"] == 0
            assert scalar(conn, "SELECT next_retry_at - now() < interval '1 second'"
                          " FROM outbox_notifier.notification_records"
                          " WHERE dedupe_key = 'a1'")  # fmt: skip
        await relay_for(store).relay_once()  # now the earlier row
        _make_due(conn)
        claimed = await store.claim_records(100, POLICY)
    assert [r.dedupe_key for r in claimed] == ["a0"]


async def test_a_backlog_behind_a_failing_head_is_not_walked_by_every_claim(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    add_channel(conn, 1, URL + "a")
    backlog = 2000
    conn.execute(
        "INSERT INTO outbox_notifier.outbox (event_type, payload)"
        " SELECT 'notification.feishu.requested', jsonb_build_object("
        "  'user_id', 1, 'preview_id', 'p', 'dedupe_key', 'k' || g, 'target_url', '/x',"
        "  'requested_at', '2026-11-29T08:00:00Z', 'ordering_key', 'task-1')"
        " FROM generate_series(1, %s) g",
        (backlog,),
    )
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        while (await relay_for(store, relay_batch_size=500).relay_once()).claimed:
            pass
        conn.execute("ANALYZE outbox_notifier.notification_records")
        # the first claims take the head and hold the rest (a batch at a time)
        claimed: list[ClaimedRecord] = []
        walks = 0
        while scalar(conn, "SELECT count(*) FROM outbox_notifier.notification_records"
                           " WHERE status = 'pending' AND next_retry_at IS NULL") > 0:  # fmt: skip
            claimed += await store.claim_records(100, POLICY)
            walks += 1
        assert [r.dedupe_key for r in claimed] == ["k1"]
        await store.apply_results([result_for(claimed[0], "failed", delay_s=300)], POLICY)
        before = conn.execute(
            "SELECT sum(hashtext(next_retry_at::text)) FROM outbox_notifier.notification_records"
        ).fetchone()
        # then claims while the head waits for its retry touch none of them, and cost little
        started = time.perf_counter()
        for _ in range(20):
            assert await store.claim_records(100, POLICY) == []
        per_claim_ms = (time.perf_counter() - started) / 20 * 1000
        after = conn.execute(
            "SELECT sum(hashtext(next_retry_at::text)) FROM outbox_notifier.notification_records"
        ).fetchone()
    assert walks <= backlog // 100 + 2
    assert before == after
    print(f"\n[ordering] {backlog} held behind a failing head: idle claim {per_claim_ms:.2f} ms")
    assert per_claim_ms < 50


def test_the_head_probe_reads_the_ordering_index(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, status, ordering_key, outbox_id)"
        " SELECT 'feishu', 1, 'p', 'k' || g, '/x',"
        "        CASE WHEN g % 100 = 0 THEN 'pending' ELSE 'sent' END, 'key-' || (g % 50), g"
        " FROM generate_series(1, 20000) g"
    )
    conn.execute("ANALYZE outbox_notifier.notification_records")
    plan = conn.execute(
        "EXPLAIN (FORMAT JSON) SELECT e.id FROM outbox_notifier.notification_records e"
        " WHERE e.channel = 'feishu' AND e.ordering_key = 'key-0'"
        "   AND e.status IN ('pending', 'failed', 'sending') AND e.outbox_id < 5000"
        " ORDER BY e.outbox_id LIMIT 1"
    ).fetchone()
    assert plan is not None
    assert "records_ordering_idx" in str(plan[0]), plan[0]


async def test_the_daemon_delivers_each_key_in_outbox_order_through_random_failures(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    keys, per_key = 6, 8
    async with FeishuServer() as server:
        add_channel(conn, 1, server.flow_url("alice"))
        server.chaos(seed=7, p_500=0.3, prefix=FLOW_PREFIX)
        for n in range(per_key):
            for k in range(keys):
                enqueue(conn, payload(f"k{k}-{n}", trigger_id=f"{k}:{n}", ordering_key=f"t{k}"))
        enqueue(conn, payload("unkeyed", trigger_id="u:0"))
        settings = settings_for(
            db, retry_base_s=0.05, retry_max_s=0.2, max_attempts=30, poll_interval_s=0.5,
            delivery_concurrency=10,
        )  # fmt: skip
        async with running(Daemon(settings)):

            def done() -> bool:
                sent = scalar(conn, "SELECT count(*) FROM outbox_notifier.notification_records"
                                    " WHERE status = 'sent'")  # fmt: skip
                return bool(sent == keys * per_key + 1)

            await eventually(done, timeout_s=60, what="every record sent")
        seen: dict[str, list[int]] = defaultdict(list)
        for req in server.requests:
            body = req.json
            assert isinstance(body, dict)
            key, position = str(body["trigger_id"]).split(":")
            seen[key].append(int(position))
    failures = sum(1 for r in server.requests if r.status_sent >= 500)
    assert failures > 0
    for k in range(keys):
        # every call of a key, failed ones too, in outbox order; a retry repeats the same n
        assert seen[str(k)] == sorted(seen[str(k)]), seen[str(k)]
        assert sorted(set(seen[str(k)])) == list(range(per_key))
