"""The busy tables' first ANALYZE (migration 0019): given by the daemon's role as soon as a
table holds enough rows, once; left to autovacuum when the role may not give it.

Autovacuum is switched off on the two tables here, so that every analyze seen is the daemon's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier import maintenance
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.store import RecordStore
from tests.support import (
    add_channel,
    enqueue,
    eventually,
    login_role,
    loop_context,
    maintenance_loop,
    payload,
    relay_for,
    scalar,
)

pytestmark = pytest.mark.timeout(60)

BUSY = ("notification_records", "outbox")


def _without_autovacuum(conn: psycopg.Connection[Any]) -> None:
    for table in BUSY:
        conn.execute(f"ALTER TABLE outbox_notifier.{table} SET (autovacuum_enabled = false)")


def _analyzed(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT relname FROM pg_stat_user_tables WHERE schemaname = 'outbox_notifier'"
        " AND relname = ANY(%s) AND last_analyze IS NOT NULL",
        (list(BUSY),),
    ).fetchall()
    return {str(name) for (name,) in rows}


def _live_rows(conn: psycopg.Connection[Any], table: str) -> int:
    """What the statistics count (they lag each commit by up to a second or so)."""
    return int(
        scalar(
            conn,
            "SELECT n_live_tup FROM pg_stat_user_tables"
            " WHERE schemaname = 'outbox_notifier' AND relname = %s",
            (table,),
        )
    )


async def _fresh_outbox(conn: psycopg.Connection[Any], rows: int) -> None:
    """``rows`` outbox rows in tables autovacuum leaves alone, once the statistics count them."""
    _without_autovacuum(conn)
    for i in range(rows):
        enqueue(conn, payload(f"k-{i}"))
    await eventually(lambda: _live_rows(conn, "outbox") >= rows, what=f"statistics of {rows}")


async def test_a_busy_table_is_analyzed_once_it_holds_min_rows_with_the_daemons_role(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    await _fresh_outbox(conn, 5)
    # the daemon's role does not own the tables: ANALYZE needs the function's owner rights
    with login_role(db, "outbox_notifier_daemon") as dsn:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            store = MaintenanceStore(aconn)
            both_fresh = [("notification_records", False), ("outbox", False)]
            assert await store.analyze_fresh_tables(10) == both_fresh
            assert _analyzed(conn) == set()

            for i in range(5, 10):
                enqueue(conn, payload(f"k-{i}"))
            await eventually(lambda: _live_rows(conn, "outbox") >= 10, what="10 rows")
            assert await store.analyze_fresh_tables(10) == [
                ("notification_records", False),
                ("outbox", True),
            ]
            assert _analyzed(conn) == {"outbox"}
            # analyzed once: from now on it is autovacuum's
            assert await store.analyze_fresh_tables(10) == [("notification_records", False)]


async def test_the_maintenance_loop_analyzes_each_table_once_then_stops_asking(
    db: str,
    conn: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(maintenance, "FIRST_ANALYZE_ROWS", 5)
    caplog.set_level(logging.INFO, "outbox_notifier.maintenance")
    add_channel(conn, 1, "https://bot.example/hook/x")
    await _fresh_outbox(conn, 6)
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as aconn:
        loop = maintenance_loop(aconn)
        ctx = loop_context()
        await loop._analyze(ctx)
        assert _analyzed(conn) == {"outbox"}
        assert loop.fresh_tables  # the records are still empty
        assert "analyzed outbox for the first time" in caplog.text

        async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
            await relay_for(RecordStore(pool)).relay_once()
        await eventually(
            lambda: _live_rows(conn, "notification_records") >= 6, what="records' statistics"
        )
        await loop._analyze(ctx)
        assert _analyzed(conn) == {"outbox", "notification_records"}
        assert not loop.fresh_tables
        assert "analyzed notification_records for the first time" in caplog.text

        # it asks no more: a table made fresh again (statistics reset) is not analyzed again
        conn.execute("SELECT pg_stat_reset()")
        await loop._analyze(ctx)
        assert _analyzed(conn) == set()


async def test_a_table_locked_elsewhere_is_analyzed_at_a_later_turn_without_waiting(
    db: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "FIRST_ANALYZE_ROWS", 5)
    await _fresh_outbox(conn, 6)
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as aconn:
        loop = maintenance_loop(aconn)
        with psycopg.connect(db) as holder:  # a manual VACUUM's lock, or another replica's
            holder.execute("LOCK TABLE outbox_notifier.outbox IN SHARE UPDATE EXCLUSIVE MODE")
            started = time.monotonic()
            await loop._analyze(loop_context())
            assert time.monotonic() - started < 2.0  # 100 ms, not the daemon's lock timeout
            assert loop.fresh_tables
            assert _analyzed(conn) == set()
            holder.rollback()
        await loop._analyze(loop_context())
        assert _analyzed(conn) == {"outbox"}


async def test_a_role_that_may_not_analyze_leaves_it_to_autovacuum(
    db: str, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "outbox_notifier.maintenance")
    with login_role(db, "outbox_notifier_operator") as dsn:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            loop = maintenance_loop(aconn)
            await loop._analyze(loop_context())
    assert not loop.fresh_tables
    assert "first analyze of the tables left to autovacuum: InsufficientPrivilege" in caplog.text
    assert _analyzed(conn) == set()
