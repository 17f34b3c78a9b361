"""Retention and maintenance leadership against real Postgres."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier import leadership, retention
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.sqlfiles import query
from tests.support import fill_history, scalar

DAY_S = 86_400.0
OUTBOX_MAX_AGE_S = 7 * DAY_S
RECORDS_MAX_AGE_S = 30 * DAY_S


@pytest.fixture
async def pool(db: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    async with AsyncConnectionPool(
        db, min_size=1, max_size=4, kwargs={"autocommit": True}, open=False
    ) as opened:
        yield opened


def add_outbox(conn: psycopg.Connection[Any], status: str, age_s: float) -> int:
    row = conn.execute(
        "INSERT INTO outbox_notifier.outbox (event_type, payload, status)"
        " VALUES ('notification.feishu.requested', '{}', %s) RETURNING id",
        (status,),
    ).fetchone()
    assert row is not None
    # Made old after the insert, the way a row ages in production.
    conn.execute(
        "UPDATE outbox_notifier.outbox SET created_at = now() - make_interval(secs => %s)"
        " WHERE id = %s",
        (age_s, row[0]),
    )
    return int(row[0])


def add_record(
    conn: psycopg.Connection[Any], key: str, status: str, age_s: float, attempts: int = 2
) -> int:
    sending = status == "sending"
    row = conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, status, attempt_count,"
        "  lease_expires_at, lease_token)"
        " VALUES ('feishu', 1, 'p', %s, '/x', %s, %s,"
        "  CASE WHEN %s THEN now() + interval '1 minute' END, CASE WHEN %s THEN 1 END)"
        " RETURNING id",
        (key, status, attempts, sending, sending),
    ).fetchone()
    assert row is not None
    record_id = int(row[0])
    for attempt in range(1, attempts + 1):
        conn.execute(
            "INSERT INTO outbox_notifier.delivery_attempts"
            " (record_id, attempt, started_at, duration_ms, outcome)"
            " VALUES (%s, %s, now(), 10, 'temporary_fail')",
            (record_id, attempt),
        )
    conn.execute(
        "UPDATE outbox_notifier.notification_records"
        " SET created_at = now() - make_interval(secs => %s),"
        "     updated_at = now() - make_interval(secs => %s)"
        " WHERE id = %s",
        (age_s, age_s, record_id),
    )
    return record_id


def ids(conn: psycopg.Connection[Any], table: str) -> set[int]:
    if table == "outbox":
        rows = conn.execute("SELECT id FROM outbox_notifier.outbox").fetchall()
    else:
        rows = conn.execute("SELECT id FROM outbox_notifier.notification_records").fetchall()
    return {int(r[0]) for r in rows}


def attempt_record_ids(conn: psycopg.Connection[Any]) -> set[int]:
    rows = conn.execute("SELECT DISTINCT record_id FROM outbox_notifier.delivery_attempts")
    return {int(r[0]) for r in rows}


def count_delete_statements(conn: psycopg.Connection[Any]) -> None:
    """Test-only triggers logging how many rows each DELETE statement removed, per table."""
    conn.execute("CREATE TABLE public.deletes (tbl text, n int, at serial)")
    conn.execute(
        "CREATE FUNCTION public.log_delete() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO public.deletes (tbl, n) SELECT TG_TABLE_NAME, count(*) FROM old;"
        " RETURN NULL; END $$"
    )
    for table in ("outbox", "notification_records"):
        conn.execute(
            f"CREATE TRIGGER log_delete AFTER DELETE ON outbox_notifier.{table}"
            " REFERENCING OLD TABLE AS old FOR EACH STATEMENT EXECUTE FUNCTION public.log_delete()"
        )


def batches(conn: psycopg.Connection[Any], table: str) -> list[int]:
    rows = conn.execute("SELECT n FROM public.deletes WHERE tbl = %s ORDER BY at", (table,))
    return [int(r[0]) for r in rows]


async def test_purge_deletes_exactly_the_old_finished_rows_in_batches(
    conn: psycopg.Connection[Any], aconn: psycopg.AsyncConnection[Any]
) -> None:
    old_outbox = {add_outbox(conn, ("relayed", "rejected")[i % 2], 8 * DAY_S) for i in range(10)}
    kept_outbox = {
        add_outbox(conn, "relayed", 6 * DAY_S),
        add_outbox(conn, "rejected", 60),
        add_outbox(conn, "pending", 30 * DAY_S),  # never relayed: never deleted however old
    }
    old_records = {
        add_record(conn, f"old{i}", ("sent", "dead", "skipped")[i % 3], 31 * DAY_S)
        for i in range(10)
    }
    never_tried = add_record(conn, "old-pending", "pending", 40 * DAY_S, attempts=0)
    kept_records = {
        never_tried,
        add_record(conn, "recent-sent", "sent", 29 * DAY_S),
        add_record(conn, "recent-dead", "dead", 60),
        add_record(conn, "old-failed", "failed", 40 * DAY_S),
        add_record(conn, "old-sending", "sending", 40 * DAY_S),
    }
    count_delete_statements(conn)

    report = await retention.purge_once(
        MaintenanceStore(aconn),
        outbox_max_age_s=OUTBOX_MAX_AGE_S,
        records_max_age_s=RECORDS_MAX_AGE_S,
        batch_size=3,
    )

    assert report == retention.RetentionReport(outbox_deleted=10, records_deleted=10)
    assert ids(conn, "outbox") == kept_outbox
    assert ids(conn, "records") == kept_records
    # Attempts went with their records; those of the records kept are all still there.
    assert attempt_record_ids(conn) == kept_records - {never_tried}
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.delivery_attempts") == 4 * 2
    # One short statement per batch of at most 3, until a batch came back short.
    assert batches(conn, "outbox") == [3, 3, 3, 1]
    assert batches(conn, "notification_records") == [3, 3, 3, 1]
    assert old_outbox.isdisjoint(ids(conn, "outbox"))
    assert old_records.isdisjoint(ids(conn, "records"))

    again = await retention.purge_once(
        MaintenanceStore(aconn),
        outbox_max_age_s=OUTBOX_MAX_AGE_S,
        records_max_age_s=RECORDS_MAX_AGE_S,
    )
    assert again == retention.RetentionReport(outbox_deleted=0, records_deleted=0)


async def test_an_exact_multiple_of_the_batch_size_ends_with_an_empty_batch(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    for i in range(6):
        add_record(conn, f"old{i}", "sent", 31 * DAY_S, attempts=0)
    count_delete_statements(conn)
    report = await retention.purge_once(
        MaintenanceStore(pool),
        outbox_max_age_s=OUTBOX_MAX_AGE_S,
        records_max_age_s=RECORDS_MAX_AGE_S,
        batch_size=3,
    )
    assert report.records_deleted == 6
    assert batches(conn, "notification_records") == [3, 3, 0]


class _TimedStore(MaintenanceStore):
    """The real store, noting when each purge batch started and ended."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        super().__init__(pool)
        self.spans: list[tuple[float, float]] = []

    async def purge_batch(self, table: Any, max_age_s: float, limit: int) -> int:
        started = time.monotonic()
        try:
            return await super().purge_batch(table, max_age_s, limit)
        finally:
            self.spans.append((started, time.monotonic()))


async def test_retention_rests_after_each_full_batch(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    """A full batch is followed by a rest of pause_factor times its duration, so a backlog of
    finished rows never takes the database from the delivery for long."""
    for i in range(6):
        add_record(conn, f"old{i}", "sent", 31 * DAY_S)
    store = _TimedStore(pool)
    report = await retention.purge_once(
        store,
        outbox_max_age_s=OUTBOX_MAX_AGE_S,
        records_max_age_s=RECORDS_MAX_AGE_S,
        batch_size=2,
        pause_factor=3.0,
    )
    assert report.records_deleted == 6
    # outbox: one empty batch; records: 2, 2, 2, then an empty one
    spans = store.spans[1:]
    assert len(spans) == 4
    rests = [after[0] - before[1] for before, after in itertools.pairwise(spans)]
    for (started, ended), rest in zip(spans, rests, strict=False):
        assert rest >= min((ended - started) * 3.0, retention.MAX_PAUSE_S) - 0.001


async def test_a_row_locked_elsewhere_is_left_for_the_next_pass(
    db: str, conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    old = [add_record(conn, f"old{i}", "dead", 31 * DAY_S) for i in range(5)]
    with psycopg.connect(db) as operator_session:
        operator_session.execute(
            "SELECT 1 FROM outbox_notifier.notification_records WHERE id = %s FOR UPDATE",
            (old[2],),
        )
        report = await retention.purge_once(
            MaintenanceStore(pool),
            outbox_max_age_s=OUTBOX_MAX_AGE_S,
            records_max_age_s=RECORDS_MAX_AGE_S,
            batch_size=2,
        )
        assert report.records_deleted == 4
        assert ids(conn, "records") == {old[2]}
        operator_session.rollback()
    report = await retention.purge_once(
        MaintenanceStore(pool),
        outbox_max_age_s=OUTBOX_MAX_AGE_S,
        records_max_age_s=RECORDS_MAX_AGE_S,
    )
    assert report.records_deleted == 1
    assert ids(conn, "records") == set()


async def test_purge_refuses_bad_arguments(db: str, aconn: psycopg.AsyncConnection[Any]) -> None:
    with pytest.raises(ValueError, match="outbox_max_age_s"):
        await retention.purge_once(MaintenanceStore(aconn), outbox_max_age_s=0, records_max_age_s=1)
    with pytest.raises(ValueError, match="records_max_age_s"):
        await retention.purge_once(
            MaintenanceStore(aconn), outbox_max_age_s=1, records_max_age_s=float("nan")
        )
    with pytest.raises(ValueError, match="batch_size"):
        await retention.purge_once(
            MaintenanceStore(aconn), outbox_max_age_s=1, records_max_age_s=1, batch_size=0
        )
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="pause_factor"):
            await retention.purge_once(
                MaintenanceStore(aconn), outbox_max_age_s=1, records_max_age_s=1, pause_factor=bad
            )
    async with await psycopg.AsyncConnection.connect(db) as in_transaction:
        with pytest.raises(ValueError, match="autocommit"):
            await retention.purge_once(
                MaintenanceStore(in_transaction), outbox_max_age_s=1, records_max_age_s=1
            )


@pytest.mark.parametrize(
    ("query_name", "index"),
    [
        ("purge_outbox_batch", "outbox_finished_idx"),
        ("purge_records_batch", "records_terminal_idx"),
    ],
)
def test_purge_batches_use_their_partial_indexes(
    conn: psycopg.Connection[Any], query_name: str, index: str
) -> None:
    # A realistic shape: a large recent history, a few rows past the cutoff.
    fill_history(conn)
    conn.execute("ANALYZE outbox_notifier.notification_records")
    conn.execute("ANALYZE outbox_notifier.outbox")
    with conn.transaction():
        plan = conn.execute(
            b"EXPLAIN (FORMAT JSON) " + query(query_name).encode(),
            {"max_age_s": OUTBOX_MAX_AGE_S, "limit": 1000},
        ).fetchone()
        assert plan is not None
    assert f"'Index Name': '{index}'" in str(plan[0])


# -- leadership --------------------------------------------------------------------------------


class Job:
    """A maintenance pass that records that it ran and takes a while."""

    def __init__(self, name: str, duration_s: float = 0.3) -> None:
        self.name = name
        self.duration_s = duration_s
        self.ran = False
        self.cancelled = False

    async def __call__(self) -> str:
        self.ran = True
        try:
            await asyncio.sleep(self.duration_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return self.name


async def test_of_two_concurrent_passes_only_one_runs(pool: AsyncConnectionPool[Any]) -> None:
    a, b = Job("a"), Job("b")
    results = await asyncio.gather(
        leadership.run_if_leader(MaintenanceStore(pool), a, holder="replica-a"),
        leadership.run_if_leader(MaintenanceStore(pool), b, holder="replica-b"),
    )
    assert sorted(r for r in results if r is not None) in (["a"], ["b"])
    assert results.count(None) == 1
    assert [a.ran, b.ran].count(True) == 1


async def test_many_replicas_racing_elect_exactly_one(db: str) -> None:
    # Each replica with its own pool, as separate processes would be.
    pools = [
        AsyncConnectionPool(db, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False)
        for _ in range(6)
    ]
    for p in pools:
        await p.open(wait=True)
    try:
        jobs = [Job(f"r{i}") for i in range(6)]
        results = await asyncio.gather(
            *(
                leadership.run_if_leader(MaintenanceStore(p), job, holder=job.name)
                for p, job in zip(pools, jobs, strict=True)
            )
        )
    finally:
        for p in pools:
            await p.close()
    assert len([r for r in results if r is not None]) == 1
    assert sum(job.ran for job in jobs) == 1


async def test_the_same_holder_does_not_run_twice_at_once(pool: AsyncConnectionPool[Any]) -> None:
    first, second = Job("first"), Job("second")
    results = await asyncio.gather(
        leadership.run_if_leader(MaintenanceStore(pool), first, holder="replica-a"),
        leadership.run_if_leader(MaintenanceStore(pool), second, holder="replica-a"),
    )
    assert list(results) == ["first", None]
    assert not second.ran


async def test_leadership_is_sticky_until_released_or_expired(
    pool: AsyncConnectionPool[Any],
) -> None:
    assert (
        await leadership.run_if_leader(MaintenanceStore(pool), Job("a", 0), holder="replica-a")
        == "a"
    )
    # The leader keeps its lease between passes; the others keep out.
    assert (
        await leadership.run_if_leader(MaintenanceStore(pool), Job("b", 0), holder="replica-b")
        is None
    )
    assert (
        await leadership.run_if_leader(MaintenanceStore(pool), Job("a", 0), holder="replica-a")
        == "a"
    )
    # Released on shutdown: another replica takes over at once.
    await leadership.release_leadership(MaintenanceStore(pool), holder="replica-a")
    assert (
        await leadership.run_if_leader(
            MaintenanceStore(pool), Job("b", 0), holder="replica-b", ttl_s=0.5
        )
        == "b"
    )
    # A leader that stops renewing loses the lease once it expires.
    assert (
        await leadership.run_if_leader(MaintenanceStore(pool), Job("a", 0), holder="replica-a")
        is None
    )
    await asyncio.sleep(0.6)
    assert (
        await leadership.run_if_leader(MaintenanceStore(pool), Job("a", 0), holder="replica-a")
        == "a"
    )


async def test_the_lease_is_renewed_during_a_long_pass(pool: AsyncConnectionPool[Any]) -> None:
    long = Job("long", duration_s=1.2)
    task = asyncio.create_task(
        leadership.run_if_leader(MaintenanceStore(pool), long, holder="replica-a", ttl_s=0.4)
    )
    await asyncio.sleep(0.8)  # twice the ttl: held only because it is renewed
    assert (
        await leadership.run_if_leader(MaintenanceStore(pool), Job("b", 0), holder="replica-b")
        is None
    )
    assert await task == "long"


async def test_a_pass_whose_lease_was_taken_over_is_cancelled(
    pool: AsyncConnectionPool[Any], conn: psycopg.Connection[Any]
) -> None:
    stalled = Job("stalled", duration_s=10)
    task = asyncio.create_task(
        leadership.run_if_leader(MaintenanceStore(pool), stalled, holder="replica-a", ttl_s=0.6)
    )
    await asyncio.sleep(0.1)
    assert stalled.ran
    # As if replica-a had stalled past its lease and replica-b had taken over.
    conn.execute(
        "UPDATE outbox_notifier.maintenance_leases SET holder = 'replica-b' WHERE name = %s",
        (leadership.MAINTENANCE_LEASE,),
    )
    assert await asyncio.wait_for(task, timeout=5) is None
    assert stalled.cancelled
    holder = scalar(conn, "SELECT holder FROM outbox_notifier.maintenance_leases")
    assert holder == "replica-b"


async def test_run_if_leader_runs_a_real_retention_pass(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[Any]
) -> None:
    add_outbox(conn, "relayed", 8 * DAY_S)
    add_record(conn, "old", "sent", 31 * DAY_S)

    async def maintenance_pass() -> retention.RetentionReport:
        return await retention.purge_once(
            MaintenanceStore(pool),
            outbox_max_age_s=OUTBOX_MAX_AGE_S,
            records_max_age_s=RECORDS_MAX_AGE_S,
        )

    report = await leadership.run_if_leader(MaintenanceStore(pool), maintenance_pass)
    assert report == retention.RetentionReport(outbox_deleted=1, records_deleted=1)
    await leadership.release_leadership(MaintenanceStore(pool))
