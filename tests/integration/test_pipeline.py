"""The relay, delivery and rescue loops against real Postgres and the local Feishu-like server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.daemon import Daemon, claim_policy
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers.model import SendResult
from outbox_notifier.rescue import rescue_expired_leases
from outbox_notifier.settings import Settings
from outbox_notifier.sqlfiles import query
from outbox_notifier.store import ClaimPolicy, Pacing, RecordStore
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.support import (
    FLOW_PREFIX,
    add_channel,
    attempts,
    enqueue,
    eventually,
    fill_history,
    outbox_rows,
    payload,
    records,
    relay_for,
    running,
    scalar,
    settings_for,
)


@pytest.fixture
async def server() -> Any:
    async with FeishuServer() as srv:
        yield srv


def _status_of(conn: psycopg.Connection[Any], dedupe_key: str) -> str | None:
    row = conn.execute(
        "SELECT status FROM outbox_notifier.notification_records WHERE dedupe_key = %s",
        (dedupe_key,),
    ).fetchone()
    return None if row is None else row[0]


async def test_committed_event_is_delivered_once_with_the_seed_body(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url("alice"))
    with psycopg.connect(db) as business:  # a business transaction that commits
        business.execute("CREATE TABLE orders (id int)")
        business.execute("INSERT INTO orders VALUES (1)")
        enqueue(business, payload("k-commit"))
        business.commit()
    with psycopg.connect(db) as business:  # and one that rolls back
        enqueue(business, payload("k-rollback"))
        business.rollback()

    async with running(Daemon(settings_for(db, frontend_base_url="https://app.example"))):
        await eventually(lambda: _status_of(conn, "k-commit") == "sent", what="sent")
        await asyncio.sleep(0.3)

    assert server.count(FLOW_PREFIX) == 1
    request = server.requests[0]
    assert request.path == FLOW_PREFIX + "alice"
    body = request.json
    assert isinstance(body, dict)
    [record] = records(conn)
    assert body["event"] == "smartflow.schedule_adjustment_ready"
    assert body["notification_id"] == record["id"]
    assert body["user_id"] == 1
    assert body["preview_id"] == "asp_1"
    assert body["target_id"] == 19
    assert body["trace_id"] == "trace-k-commit"
    assert body["message"]["summary"] == (
        "Your Tuesday has two overlapping meetings.\n/assistant/preview/asp_1"
    )
    assert body["message"]["action_url"] == "https://app.example/assistant/preview/asp_1"
    assert record["status"] == "sent"
    assert record["attempt_count"] == 1
    assert record["sent_at"] is not None
    assert record["provider_request_json"] == body
    assert [o["status"] for o in outbox_rows(conn)] == ["relayed"]
    assert [a["outcome"] for a in attempts(conn, record["id"])] == ["success"]


async def test_notify_wakes_the_relay_long_before_the_poll(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url())
    async with running(Daemon(settings_for(db, poll_interval_s=60.0))):
        await asyncio.sleep(1.0)  # let the first (empty) poll pass; the next one is 60 s away
        started = time.monotonic()
        enqueue(conn, payload("k-notify"))
        await eventually(lambda: server.count(FLOW_PREFIX) == 1, timeout_s=5, what="delivery")
        elapsed = time.monotonic() - started
    assert elapsed < 3.0


async def test_bad_rows_are_rejected_with_reasons_and_the_daemon_keeps_going(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url())
    bad = {
        "not_object": enqueue(conn, ["a", "list"]),
        "missing": enqueue(conn, {k: v for k, v in payload("m").items() if k != "dedupe_key"}),
        "wrong_type": enqueue(conn, {**payload("w"), "user_id": "seven"}),
        "bad_url": enqueue(conn, payload("u", target_url="https://evil.example/x")),
        "version": enqueue(conn, payload("v"), version="2"),
        "type": enqueue(conn, payload("t"), event_type="order.created"),
    }
    good = enqueue(conn, payload("k-good"))
    async with running(Daemon(settings_for(db))):
        await eventually(lambda: _status_of(conn, "k-good") == "sent", what="good row sent")
    rows = {r["id"]: r for r in outbox_rows(conn)}
    assert rows[good]["status"] == "relayed"
    reasons = {name: rows[i]["error"] for name, i in bad.items()}
    assert all(rows[i]["status"] == "rejected" for i in bad.values())
    assert reasons["not_object"] == "payload is not a JSON object"
    assert "dedupe_key" in reasons["missing"]
    assert "user_id" in reasons["wrong_type"]
    assert reasons["bad_url"] == (
        "invalid payload: target_url must be a relative path starting with '/'"
    )
    assert reasons["version"].startswith("unsupported event_version '2'")
    assert reasons["type"] == "unknown event type 'order.created'"
    assert len(records(conn)) == 1


async def test_duplicates_reuse_one_record(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url())
    for _ in range(3):
        enqueue(conn, payload("k-dup"))
    async with running(Daemon(settings_for(db))):
        await eventually(lambda: _status_of(conn, "k-dup") == "sent")
        await asyncio.sleep(0.3)
    assert len(records(conn)) == 1
    assert server.count(FLOW_PREFIX) == 1
    assert {o["status"] for o in outbox_rows(conn)} == {"relayed"}


async def test_500_then_200_is_retried_when_due(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url("flaky"))
    server.script(FLOW_PREFIX + "flaky", [Reply(status=500)])
    enqueue(conn, payload("k-retry"))
    async with running(Daemon(settings_for(db, retry_base_s=1.0, retry_max_s=2.0))):
        await eventually(lambda: _status_of(conn, "k-retry") == "failed", what="failed")
        [failed] = records(conn)
        assert failed["last_error_code"] == "provider_5xx"
        assert failed["attempt_count"] == 1
        assert failed["next_retry_at"] > failed["updated_at"]
        await eventually(lambda: _status_of(conn, "k-retry") == "sent", what="sent on retry")
    [record] = records(conn)
    assert record["attempt_count"] == 2
    assert record["last_error_code"] is None
    log = attempts(conn, record["id"])
    assert [(a["attempt"], a["outcome"], a["http_status"]) for a in log] == [
        (1, "temporary_fail", 500),
        (2, "success", 200),
    ]


async def test_missing_or_disabled_channel_is_skipped(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 2, server.flow_url(), enabled=False)
    enqueue(conn, payload("k-none", user_id=1))
    enqueue(conn, payload("k-disabled", user_id=2))
    async with running(Daemon(settings_for(db))):
        await eventually(
            lambda: {r["status"] for r in records(conn)} == {"skipped"} and len(records(conn)) == 2
        )
    assert {r["last_error_code"] for r in records(conn)} == {"recipient_missing"}
    assert server.count() == 0


async def test_permanent_failure_goes_dead(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url("denied"))
    server.script(FLOW_PREFIX + "denied", [], then=Reply(status=403))
    enqueue(conn, payload("k-403"))
    async with running(Daemon(settings_for(db))):
        await eventually(lambda: _status_of(conn, "k-403") == "dead")
    [record] = records(conn)
    assert record["last_error_code"] == "provider_auth_failed"
    assert server.count() == 1


async def test_advisory_lock_keeps_every_loop_off_the_record(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url())
    enqueue(conn, payload("k-held"))
    enqueue(conn, payload("k-free"))
    with psycopg.connect(db, autocommit=True) as operator:
        operator.execute(
            "SELECT pg_advisory_lock(outbox_notifier.record_lock_key('feishu', 'k-held'))"
        )
        async with running(Daemon(settings_for(db))):
            await eventually(lambda: _status_of(conn, "k-free") == "sent")
            await asyncio.sleep(1.0)  # several delivery and rescue passes
            assert _status_of(conn, "k-held") == "pending"
            operator.execute("SELECT pg_advisory_unlock_all()")
            await eventually(lambda: _status_of(conn, "k-held") == "sent", what="after unlock")


async def test_expired_lease_is_rescued_and_the_late_result_is_fenced(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url())
    enqueue(conn, payload("k-lease"))
    policy = RetryPolicy(max_attempts=5, base_s=0.1, max_s=0.1)
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        relay = relay_for(store, relay_batch_size=10)
        assert (await relay.relay_once()).created == 1
        # Worker A claims with a lease that expires at once, then "dies" mid-call.
        [claimed] = await store.claim_records(10, ClaimPolicy(lease_s=0.01))
        assert claimed.attempt_count == 1
        await asyncio.sleep(0.05)
        [rescued] = await rescue_expired_leases(store, policy)
        assert rescued.status == "failed"
        [record] = records(conn)
        assert record["last_error_code"] == "sending_lease_expired"
        # Worker B takes over once the retry is due and delivers.
        await asyncio.sleep(0.15)
        [claimed_b] = await store.claim_records(10, ClaimPolicy(lease_s=30))
        assert claimed_b.lease_token != claimed.lease_token
        assert claimed_b.attempt_count == 2
        # A's late result arrives now: it must not overwrite B's lease.
        from outbox_notifier.delivery import to_result

        refused = SendResult(outcome=Outcome.PERMANENT_FAIL, error_code=ErrorCode.PAYLOAD_INVALID)
        rng = random.Random(0)
        late = to_result(claimed, refused, policy, record["updated_at"], rng)
        fenced = await store.apply_results([late], ClaimPolicy(lease_s=30))
        assert [(a.id, a.status) for a in fenced.records] == [(claimed.id, None)]
        assert fenced.applied == []
        assert _status_of(conn, "k-lease") == "sending"
        ok = to_result(
            claimed_b, SendResult(outcome=Outcome.SUCCESS), policy, record["updated_at"], rng
        )
        stored = await store.apply_results([ok], ClaimPolicy(lease_s=30))
        assert [(a.status, a.channel, a.dedupe_key) for a in stored.applied] == [
            ("sent", "feishu", "k-lease")
        ]
    [record] = records(conn)
    assert record["status"] == "sent"
    log = attempts(conn, record["id"])
    assert [(a["attempt"], a["error_code"], a["applied"]) for a in log] == [
        (1, "sending_lease_expired", True),
        (1, "payload_invalid", False),
        (2, None, True),
    ]


async def test_rescued_leases_get_the_jittered_backoff(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    for i in range(20):
        enqueue(conn, payload(f"k-{i}"))
    policy = RetryPolicy(base_s=100.0, max_s=100.0)
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        await relay_for(store, relay_batch_size=100).relay_once()
        await store.claim_records(20, ClaimPolicy(lease_s=0.01))  # a worker that then died
        await asyncio.sleep(0.05)
        assert len(await rescue_expired_leases(store, policy)) == 20
    delays = [
        float(row[0])
        for row in conn.execute(
            "SELECT extract(epoch FROM next_retry_at - updated_at)"
            " FROM outbox_notifier.notification_records"
        )
    ]
    assert all(80.0 <= d <= 120.0 for d in delays), delays
    assert len(set(delays)) == 20  # one dead worker's records do not come due together


async def test_lease_expiry_on_the_last_attempt_is_dead(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, payload("k-last"))
    policy = RetryPolicy(max_attempts=1)
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        await relay_for(store, relay_batch_size=10, max_attempts=1).relay_once()
        await store.claim_records(10, ClaimPolicy(lease_s=0.01))
        await asyncio.sleep(0.05)
        [rescued] = await rescue_expired_leases(store, policy)
    assert rescued.status == "dead"
    assert records(conn)[0]["next_retry_at"] is None


@contextlib.asynccontextmanager
async def _relayed_on_one_backend(
    db: str,
) -> AsyncIterator[tuple[AsyncConnectionPool[Any], RecordStore]]:
    """A store on a one-connection pool (every statement on one backend), outbox relayed."""
    pool = AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1, max_size=1)
    async with pool:
        store = RecordStore(pool)
        await relay_for(store, relay_batch_size=500).relay_once()
        yield pool, store


async def test_claim_of_100_records_is_one_statement(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    for i in range(100):
        enqueue(conn, payload(f"k-{i}"))
    commits = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    # One connection, so the claim runs on the backend whose statistics are flushed below.
    async with _relayed_on_one_backend(db) as (pool, store):
        async with pool.connection() as backend:
            await backend.execute("SELECT pg_stat_force_next_flush()")
        before = scalar(conn, commits)
        claimed = await store.claim_records(100, ClaimPolicy(lease_s=30))
        async with pool.connection() as backend:
            # Each autocommit statement is one transaction: force the claim's into the view.
            await backend.execute("SELECT pg_stat_force_next_flush()")
        after = scalar(conn, commits)
    assert len(claimed) == 100
    # The claim, the flush and this test's own reads: a handful, where per-row work would be
    # a hundred or more.
    assert after - before <= 4
    # One fencing token for the claim: it differs from every other claim's, which is all the
    # fence needs (test_expired_lease_is_rescued_and_the_late_result_is_fenced).
    assert len({record.lease_token for record in claimed}) == 1


@pytest.mark.parametrize(("durable", "during"), [(False, "off"), (True, "local")])
async def test_a_claim_commits_without_waiting_for_its_wal_and_nothing_else_does(
    db: str, conn: psycopg.Connection[Any], durable: bool, during: str
) -> None:
    """synchronous_commit is off for the claim's own transaction only: the next statement on
    the same connection (an apply, say) commits as the server says again. With durable claims
    the claim keeps the server's setting."""
    enqueue(conn, payload("async-claim"))
    async with _relayed_on_one_backend(db) as (pool, store):
        async with pool.connection() as backend:
            # the test cluster runs with it off for speed; any durable setting will do here
            await backend.execute("SET synchronous_commit = local")
        async with pool.connection() as backend, backend.transaction():
            await backend.execute(query("claim_records"), _CLAIM_PARAMS | {"durable": durable})
            inside = await (await backend.execute("SHOW synchronous_commit")).fetchone()
        async with pool.connection() as backend:
            after = await (await backend.execute("SHOW synchronous_commit")).fetchone()
        again = await store.claim_records(10, ClaimPolicy(lease_s=30))
    assert inside == (during,)
    assert after == ("local",)
    # the claim in that transaction committed and holds the record
    assert again == []
    assert _status_of(conn, "async-claim") == "sending"


def test_durable_claims_reach_the_claim_policy() -> None:
    settings = Settings(dsn="dbname=x", durable_claims=True)
    assert claim_policy(settings).durable is True
    assert claim_policy(Settings(dsn="dbname=x")).durable is False


# What puts a target in trouble, each enough for a claim to lock it.
_TROUBLE: dict[str, LiteralString] = {
    "failing": "consecutive_failures = 1",  # as a daemon of the previous release counts
    "open": "breaker_open = true",
    "throttled": "throttled_until = now() + interval '1 minute'",
    "slowed": "slowed_until = now() + interval '1 minute'",
}


@pytest.mark.parametrize("trouble", [None, *_TROUBLE])
def test_a_claim_locks_targets_only_when_one_needs_it(
    conn: psycopg.Connection[Any], trouble: str | None
) -> None:
    """A batch whose providers are unpaced and whose targets are healthy takes no target lock
    (it is answered from targets_trouble_idx); a failing, open, throttled or slowed target is
    locked, as before."""
    conn.execute(
        "INSERT INTO outbox_notifier.notification_channels (user_id, webhook_url)"
        " VALUES (1, 'https://example.com/flow/api/trigger-webhook/a')"
    )
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url)"
        " SELECT 'feishu', 1, 'p', 't' || g, '/x' FROM generate_series(1, 3) g"
    )
    conn.execute(
        "INSERT INTO outbox_notifier.targets (target_key, provider, host)"
        " VALUES (outbox_notifier.target_key('https://example.com/flow/api/trigger-webhook/a'),"
        " 'feishu_flow', 'example.com')"
    )
    if trouble is not None:
        conn.execute("UPDATE outbox_notifier.targets SET " + _TROUBLE[trouble])
    # and a thousand other healthy targets, analysed, as a real installation has
    conn.execute(
        "INSERT INTO outbox_notifier.targets (target_key, provider, host)"
        " SELECT md5(g::text), 'feishu_flow', 'example.com' FROM generate_series(1, 1000) g"
    )
    conn.execute("ANALYZE outbox_notifier.targets")
    plans = _plans(conn, query("claim_records").encode(), _CLAIM_PARAMS)
    check = plans.split("v_providers && v_paced", 1)[1]
    assert "targets_trouble_idx" in check, plans
    # the lock statement (LockRows) comes right after the check, and only when needed
    assert ("LockRows" in check) is (trouble is not None), plans


_CLAIM_PARAMS: dict[str, Any] = {
    "limit": 100, "lease_s": 30.0, "paced": [], "per_s": [], "per_min": [],
    "margin_s": 0.05, "breaker_failures": 5, "cooloff_s": 60.0, "slow_per_s": 5,
    "durable": False, "after_id": 0, "digest": [], "digest_max_records": 20,
    "max_batch_bytes": Settings().relay_batch_bytes,
    "max_payload_bytes": Settings().max_payload_bytes,
}  # fmt: skip


def _plans(conn: psycopg.Connection[Any], statement: bytes, params: dict[str, Any]) -> str:
    """Every plan the statement runs, nested statements of functions included (auto_explain
    sends them to the client as notices)."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET auto_explain.log_level = notice")
    with conn.transaction(force_rollback=True):
        conn.execute(statement, params)
    return "\n".join(notices)


@pytest.mark.parametrize(
    ("query_name", "indexes"),
    [
        ("claim_records", ["records_pending_due_idx", "records_failed_due_idx"]),
        ("rescue_expired_leases", ["records_sending_lease_idx"]),
        ("claim_outbox", ["outbox_pending_idx"]),
        ("next_due", ["records_pending_due_idx", "records_failed_due_idx"]),
    ],
)
def test_claim_queries_use_their_partial_indexes(
    conn: psycopg.Connection[Any], query_name: str, indexes: list[str]
) -> None:
    # A realistic table shape: many finished rows, a few due ones of each kind.
    fill_history(conn)
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, status, next_retry_at)"
        " SELECT 'feishu', 1, 'p', 'f' || g, '/x', 'failed', now() - interval '1 s'"
        " FROM generate_series(1, 5) g"
    )
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url)"
        " SELECT 'feishu', 1, 'p', 'p' || g, '/x' FROM generate_series(1, 5) g"
    )
    conn.execute("ANALYZE outbox_notifier.notification_records")
    conn.execute("ANALYZE outbox_notifier.outbox")
    params = _CLAIM_PARAMS | {"delays_s": [1.0], "jitter": 0.2}  # the rescue's
    plans = _plans(conn, query(query_name).encode(), params)
    for index in indexes:
        assert f"Index Scan using {index}" in plans or f"Index Only Scan using {index}" in plans, (
            plans
        )
    assert "Seq Scan on notification_records" not in plans, plans
    assert "Seq Scan on outbox" not in plans, plans


@pytest.mark.parametrize(
    ("query_name", "table", "index"),
    [
        ("claim_outbox", "outbox", "outbox_pending_idx"),
        ("claim_records", "notification_records", "records_pending_due_idx"),
    ],
)
def test_claims_read_their_index_in_order_during_a_burst(
    conn: psycopg.Connection[Any], query_name: str, table: str, index: str
) -> None:
    """Statistics lag behind a burst: analysed while (nearly) empty, the tables then get 5,000
    pending rows. A plan that trusts the estimate (a bitmap scan of every pending row, then a
    sort) makes each claim read the whole backlog; the claims must walk their index instead."""
    conn.execute("ANALYZE outbox_notifier.outbox")
    conn.execute("ANALYZE outbox_notifier.notification_records")
    conn.execute(
        "INSERT INTO outbox_notifier.outbox (event_type, event_version, payload)"
        " SELECT 'notification.feishu.requested', '1', '{}' FROM generate_series(1, 5000)"
    )
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url)"
        " SELECT 'feishu', 1, 'p', 'b' || g, '/x' FROM generate_series(1, 5000) g"
    )
    plans = _plans(conn, query(query_name).encode(), _CLAIM_PARAMS)
    assert f"Index Scan using {index}" in plans or f"Index Only Scan using {index}" in plans, plans
    assert f"Bitmap Heap Scan on {table}" not in plans, plans


async def test_record_keeps_the_producers_requested_at_and_the_outbox_time(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    """The payload's requested_at was validated and then dropped (the record held the outbox
    time under that name): now both are kept, each under its own name."""
    enqueue(conn, payload("times", requested_at="2020-01-02T03:04:05+08:00"))
    pool: AsyncConnectionPool[psycopg.AsyncConnection] = AsyncConnectionPool(
        db, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    async with pool:
        relay = relay_for(RecordStore(pool), relay_batch_size=10)
        assert (await relay.relay_once()).created == 1
    [record] = records(conn)
    [outbox] = outbox_rows(conn)
    assert record["requested_at"].isoformat() == "2020-01-01T19:04:05+00:00"
    assert record["outbox_created_at"] == outbox["created_at"]


def test_the_claim_policys_arrays_reach_postgresql_as_given(conn: psycopg.Connection[Any]) -> None:
    from outbox_notifier.store import claim_params

    policy = ClaimPolicy(
        lease_s=30, pacing=Pacing(per_s={'we"ird\\name': 3, "b": 0}, per_min={"a": 100, "b": 7})
    )
    params = claim_params(policy)
    row = conn.execute(
        "SELECT %(paced)s::text[], %(per_s)s::integer[], %(per_min)s::integer[]", params
    ).fetchone()
    assert row == (["a", "b", 'we"ird\\name'], [0, 0, 3], [100, 7, 0])


def _payload_bytes(conn: psycopg.Connection[Any], outbox_id: int) -> int:
    """The size the claim measures: the payload's JSON text as PostgreSQL renders it."""
    query = "SELECT octet_length(payload::text) FROM outbox_notifier.outbox WHERE id = %s"
    return int(scalar(conn, query, (outbox_id,)))


async def test_a_relay_claim_stops_at_its_byte_budget_and_locks_only_what_it_returns(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    # five rows of one size (padding in a field the contract ignores), one much larger
    ids = [enqueue(conn, payload(f"k-{i}", padding="x" * 1000)) for i in range(5)]
    big = enqueue(conn, payload("k-big", padding="x" * 50_000))
    size = _payload_bytes(conn, ids[0])
    assert {_payload_bytes(conn, i) for i in ids} == {size}
    async with (
        AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=2) as pool,
        RecordStore(pool).transaction() as one,
        RecordStore(pool).transaction() as two,
    ):
        store = RecordStore(pool)
        # room for two and a half rows: two, the third would pass the budget
        first = (
            await store.claim_outbox(
                one, 100, max_batch_bytes=size * 5 // 2, max_payload_bytes=1 << 20
            )
        ).rows
        assert [(r.id, r.payload_bytes) for r in first] == [(ids[0], size), (ids[1], size)]
        assert all(r.payload is not None and len(r.payload) == size for r in first)
        # the third row was read but not locked: the next relay takes it
        second = (
            await store.claim_outbox(two, 100, max_batch_bytes=size * 3, max_payload_bytes=1 << 20)
        ).rows
        assert [r.id for r in second] == ids[2:5]
    async with (
        AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool,
        RecordStore(pool).transaction() as tx,
    ):
        store = RecordStore(pool)
        await tx.execute(
            "UPDATE outbox_notifier.outbox SET status = 'relayed' WHERE id = ANY(%s)", (ids,)
        )
        # a row larger than the whole budget but allowed still moves, alone
        claim = await store.claim_outbox(tx, 100, max_batch_bytes=size, max_payload_bytes=1 << 20)
        [alone] = claim.rows
        assert (alone.id, alone.payload_bytes) == (big, _payload_bytes(conn, big))


async def test_an_oversized_payload_is_rejected_with_its_size_and_its_neighbours_delivered(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url())
    before = enqueue(conn, payload("k-before"))
    big = enqueue(conn, payload("k-big", padding="x" * 20_000))
    after = enqueue(conn, payload("k-after"))
    size = _payload_bytes(conn, big)
    settings = settings_for(db, max_payload_bytes=16_384, relay_batch_bytes=65_536)
    async with running(Daemon(settings)):
        await eventually(
            lambda: {_status_of(conn, "k-before"), _status_of(conn, "k-after")} == {"sent"},
            what="the neighbours sent",
        )
    rows = {row["id"]: row for row in outbox_rows(conn)}
    assert (rows[before]["status"], rows[after]["status"]) == ("relayed", "relayed")
    assert rows[big]["status"] == "rejected"
    assert rows[big]["error"] == f"payload is {size:,} bytes; max_payload_bytes is 16,384"
    assert _status_of(conn, "k-big") is None
    assert server.count(FLOW_PREFIX) == 2
