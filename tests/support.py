"""Helpers shared by the integration and acceptance tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from prometheus_client import CollectorRegistry
from psycopg import sql

from outbox_notifier.daemon import Daemon
from outbox_notifier.dbhealth import DatabaseHealth
from outbox_notifier.delivery import Deliverer
from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.http import HeartbeatMonitor
from outbox_notifier.loops import LoopContext
from outbox_notifier.maintenance import Maintenance
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.metrics import Metrics
from outbox_notifier.names import Outcome
from outbox_notifier.relay import Relay
from outbox_notifier.retention import RetentionPolicy
from outbox_notifier.settings import Settings
from outbox_notifier.store import AttemptResult, ClaimedRecord, RecordStore

FLOW_PREFIX = "/flow/api/trigger-webhook/"


class ManualClock:
    """A monotonic clock the test moves by hand (``clock.now += 5``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings_for(dsn: str, **overrides: Any) -> Settings:
    """Settings pointing at a test database and allowing the local server's URLs."""
    values: dict[str, Any] = {
        "dsn": dsn,
        "poll_interval_s": 0.5,
        "retry_interval_s": 0.2,
        "flow_allowed_schemes": ("http",),
        "flow_allowed_hosts": ("127.0.0.1",),
        "bot_allowed_schemes": ("http",),
        "bot_allowed_hosts": ("127.0.0.1",),
        "webhook_allowed_schemes": ("http",),
        **{f"{chat}_allowed_schemes": ("http",) for chat in ("dingtalk", "wecom", "slack")},
        **{f"{chat}_allowed_hosts": ("127.0.0.1",) for chat in ("dingtalk", "wecom", "slack")},
        # The local server listens on loopback, which the egress guard refuses by default.
        "egress_allow_cidrs": ("127.0.0.0/8",),
        "http_listen": "127.0.0.1:0",
        "shutdown_deadline_s": 5.0,
        "pool_min_size": 1,
        "pool_max_size": 4,
    }
    values.update(overrides)
    return Settings(**values)


def relay_for(store: RecordStore, **overrides: Any) -> Relay:
    """The relay as the daemon builds it from its settings: the defaults with ``overrides``
    (setting names, e.g. ``relay_batch_size=10``)."""
    return Relay.from_settings(Settings(**overrides), store)


def payload(dedupe_key: str, user_id: int = 1, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "notification_id": 0,
        "user_id": user_id,
        "trigger_id": "trg_1",
        "preview_id": "asp_1",
        "trigger_type": "schedule_conflict",
        "target_type": "schedule",
        "target_id": 19,
        "dedupe_key": dedupe_key,
        "target_url": "/assistant/preview/asp_1",
        "summary_text": "Your Tuesday has two overlapping meetings.",
        "fallback_text": "",
        "trace_id": f"trace-{dedupe_key}",
        "requested_at": "2026-11-29T08:00:00Z",
    }
    body.update(fields)
    return body


def enqueue(
    conn: psycopg.Connection[Any],
    body: object,
    event_type: str = EVENT_TYPE,
    version: str = "1",
) -> int:
    row = conn.execute(
        "SELECT outbox_notifier.enqueue(%s, %s::jsonb, %s)",
        (event_type, msgspec.json.encode(body).decode(), version),
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_channel(
    conn: psycopg.Connection[Any],
    user_id: int,
    url: str,
    *,
    enabled: bool = True,
    auth_kind: str = "none",
    secret: str | None = None,
    provider: str = "feishu_flow",
) -> None:
    conn.execute(
        "INSERT INTO outbox_notifier.notification_channels"
        " (user_id, channel, enabled, webhook_url, auth_kind, auth_secret, provider)"
        " VALUES (%s, 'feishu', %s, %s, %s, %s, %s)",
        (user_id, enabled, url, auth_kind, secret, provider),
    )


def records(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("SELECT * FROM outbox_notifier.notification_records ORDER BY id").fetchall()


def outbox_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("SELECT * FROM outbox_notifier.outbox ORDER BY id").fetchall()


def attempts(conn: psycopg.Connection[Any], record_id: int) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "SELECT * FROM outbox_notifier.delivery_attempts WHERE record_id = %s ORDER BY id",
        (record_id,),
    ).fetchall()


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or check}")
        await asyncio.sleep(0.05)


def scalar(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def maintenance_loop(conn: psycopg.AsyncConnection[Any]) -> Maintenance:
    """The maintenance loop over one connection, with retention that removes nothing young,
    for driving one of its steps."""
    retention = RetentionPolicy(
        outbox_max_age_s=3600, records_max_age_s=3600, batch_size=100, pause_factor=0
    )
    return Maintenance(MaintenanceStore(conn), interval_s=3600, retention=retention)


def loop_context(metrics: Metrics | None = None, *, db_deadline_s: float = 10.0) -> LoopContext:
    """What the daemon hands its loops, for one loop (or the completer) run alone."""
    return LoopContext(
        asyncio.Event(), HeartbeatMonitor(), DatabaseHealth(),
        metrics or Metrics(CollectorRegistry()), db_deadline_s=db_deadline_s,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def delivering(
    deliverer: Deliverer, ctx: LoopContext, poll_interval_s: float = 0.1
) -> AsyncIterator[asyncio.Task[None]]:
    """Runs the delivery loop alone for the block; then stops it, which drains it."""
    task = asyncio.create_task(deliverer.run(ctx, asyncio.Event(), poll_interval_s))
    try:
        yield task
    finally:
        ctx.stop.set()
        await asyncio.wait_for(task, timeout=10)


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Daemon]:
    """Runs a daemon in this event loop for the block; stops it and re-raises its errors."""
    task = asyncio.create_task(daemon.run(install_signal_handlers=False))
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, timeout=30)


def fill_history(conn: psycopg.Connection[Any], rows: int = 20_000) -> None:
    """A long history of finished records and outbox rows, the shape the partial indexes are
    for: plan tests add their few live rows and ANALYZE."""
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, status)"
        " SELECT 'feishu', 1, 'p', 'k' || g, '/x', 'sent' FROM generate_series(1, %s) g",
        (rows,),
    )
    conn.execute(
        "INSERT INTO outbox_notifier.outbox (event_type, payload, status)"
        " SELECT 't', '{}', 'relayed' FROM generate_series(1, %s)",
        (rows,),
    )


def column(cur: psycopg.Cursor[Any], rows: list[tuple[Any, ...]], name: str) -> list[Any]:
    """One column of ``rows`` by its name in the cursor's result (statements such as
    ``claim_records`` list their columns in a struct's order, not the table's)."""
    assert cur.description is not None
    index = [c.name for c in cur.description].index(name)
    return [row[index] for row in rows]


def result_for(
    record: ClaimedRecord, status: str, *, delay_s: float | None = None
) -> AttemptResult:
    """An attempt's result for a claimed record as the completer would write it, without a
    provider call: ``status`` 'sent' succeeded, 'failed' failed for now, anything else for good."""
    outcome = {"sent": Outcome.SUCCESS, "failed": Outcome.TEMPORARY_FAIL}.get(
        status, Outcome.PERMANENT_FAIL
    )
    return AttemptResult(
        record_id=record.id, lease_token=record.lease_token, attempt=record.attempt_count,
        status=status, outcome=outcome,  # type: ignore[arg-type]
        error_code=None, error=None if status == "sent" else "test",
        delay_s=delay_s, provider_message_id=None, request_json=None, response_json=None,
        http_status=None, started_at=datetime.now(UTC), duration_ms=1.0,
    )  # fmt: skip


@contextlib.contextmanager
def held_snapshot(dsn: str) -> Iterator[int]:
    """A REPEATABLE READ transaction that has read a row and stays open (the forgotten
    ``BEGIN`` of an analytics session): vacuum may remove no row version it can see, and no
    index entry pointing at one. Yields its pid."""
    with psycopg.connect(dsn, application_name="analytics") as holder:
        holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        row = holder.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        holder.execute("SELECT count(*) FROM outbox_notifier.outbox").fetchone()
        yield int(row[0])
        holder.rollback()


@contextlib.contextmanager
def login_role(db: str, *groups: str) -> Iterator[str]:
    """A login role, member of ``groups``; yields its DSN and drops it afterwards."""
    name = f"on_login_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(db, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, groups))
            )
        )
    try:
        yield psycopg.conninfo.make_conninfo(db, user=name)
    finally:
        with psycopg.connect(db, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
