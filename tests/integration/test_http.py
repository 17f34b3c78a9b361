"""The /metrics, /healthz and /readyz server and the metrics snapshot against real Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from outbox_notifier import migrations, sqlfiles
from outbox_notifier.http import HealthServer, HeartbeatMonitor, readiness
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.metrics import Metrics
from outbox_notifier.relay import RelayReport
from outbox_notifier.sqlfiles import query
from outbox_notifier.store import RecordStore
from tests.support import ManualClock, eventually, fill_history

MAX_AGE_S = 10.0


@pytest.fixture
async def pool(db: str) -> AsyncIterator[AsyncConnectionPool[psycopg.AsyncConnection]]:
    pool: AsyncConnectionPool[psycopg.AsyncConnection] = AsyncConnectionPool(
        db, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False, timeout=5.0
    )
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


def _server(
    registry: CollectorRegistry,
    monitor: HeartbeatMonitor,
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
    listener_up: Callable[[], bool] = lambda: True,
) -> HealthServer:
    return HealthServer(
        "127.0.0.1",
        0,
        registry,
        health=lambda: monitor.report(MAX_AGE_S),
        ready=lambda: readiness(RecordStore(pool), listener_up, migrations.latest_version()),
    )


async def test_metrics_endpoint_serves_parsable_prometheus_text(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_relay(RelayReport(3, 2, 1, 0, {"malformed": 1}))
    async with (
        _server(registry, HeartbeatMonitor(), pool) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
    ):
        assert server.port > 0
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}

        relayed = families["outbox_notifier_outbox_relayed"]
        assert relayed.type == "counter"
        [total] = [s for s in relayed.samples if s.name.endswith("_total")]
        assert total.value == 3
        rejected = {
            s.labels["reason_class"]: s.value
            for s in families["outbox_notifier_outbox_rejected"].samples
            if s.name.endswith("_total")
        }
        assert rejected == {"malformed": 1, "invalid": 0, "unknown_type": 0,
                            "unsupported_version": 0, "too_large": 0}  # fmt: skip
        assert families["outbox_notifier_end_to_end_latency_seconds"].type == "histogram"
        assert families["outbox_notifier_records"].type == "gauge"

        head = await client.head("/metrics")
        assert head.status_code == 200
        assert head.content == b""
        assert (await client.get("/nope")).status_code == 404
        assert (await client.post("/metrics")).status_code == 405
        assert (await client.get("/metrics?debug=1")).status_code == 200


async def test_healthz_turns_503_when_a_loop_stops_beating(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
) -> None:
    clock = ManualClock()
    monitor = HeartbeatMonitor(("relay", "delivery"), clock=clock)
    async with (
        _server(CollectorRegistry(), monitor, pool) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
    ):
        response = await client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {
            "status": "ok",
            "max_age_s": MAX_AGE_S,
            "loops": {
                "delivery": {"ok": True, "age_s": 0.0},
                "relay": {"ok": True, "age_s": 0.0},
            },
        }

        clock.now += 8
        monitor.beat("relay")
        clock.now += 5  # delivery has not beaten for 13 s
        response = await client.get("/healthz")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["loops"]["delivery"] == {"ok": False, "age_s": 13.0}
        assert body["loops"]["relay"] == {"ok": True, "age_s": 5.0}

        monitor.beat("delivery")
        assert (await client.get("/healthz")).status_code == 200


async def test_readyz_follows_the_database_and_the_listener(
    db: str, pg_server: str, pool: AsyncConnectionPool[psycopg.AsyncConnection]
) -> None:
    listener = {"up": True}
    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    assert isinstance(dbname, str)

    def allow_connections(allow: bool) -> None:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(dbname), sql.Literal(allow)
                )
            )
            if not allow:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (dbname,),
                )

    async with (
        _server(CollectorRegistry(), HeartbeatMonitor(), pool, lambda: listener["up"]) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
    ):
        response = await client.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {
            "status": "ok", "database": "ok", "schema": "ok", "listener": "ok",
        }  # fmt: skip

        listener["up"] = False
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["listener"] == "down"
        assert response.json()["database"] == "ok"
        listener["up"] = True

        # The database goes away: connections are cut and new ones refused.
        allow_connections(False)
        try:
            response = await client.get("/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "unavailable"
            assert body["database"] != "ok"
            assert body["listener"] == "ok"
            # Still unreachable once the pool has noticed its connection is gone.
            response = await client.get("/readyz")
            assert response.status_code == 503
        finally:
            allow_connections(True)

        async def ready_again() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready_again, timeout_s=30.0, what="/readyz 200 after the database is back")


async def test_readiness_reports_a_schema_older_than_the_daemon(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
) -> None:
    ok, checks = await readiness(RecordStore(pool), lambda: True, migrations.latest_version() + 1)
    assert not ok
    version = migrations.latest_version()
    assert checks == {
        "database": "ok",
        "schema": f"database schema is at version {version}, older than this daemon's "
        f"{version + 1}: run `outbox-notifier migrate`",
        "listener": "ok",
    }


async def test_readiness_accepts_a_schema_newer_by_additive_migrations(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
) -> None:
    # The latest migration is additive: a daemon built one migration earlier stays ready (the
    # one before it, not version - 1: the numbers may have a gap while branches land).
    *_, previous, latest = sqlfiles.migrations()
    assert latest.kind == "additive"
    ok, checks = await readiness(RecordStore(pool), lambda: True, previous.version)
    assert ok, checks
    assert checks["schema"] == "ok"


async def test_readiness_reports_a_missing_schema(empty_db: str) -> None:
    async with AsyncConnectionPool(
        empty_db, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
    ) as pool:
        await pool.open(wait=True)
        ok, checks = await readiness(RecordStore(pool), lambda: True, migrations.latest_version())
    assert not ok
    assert checks["database"] == "ok"
    assert checks["schema"].startswith("database schema is missing")


async def test_a_stalled_client_does_not_block_the_server(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
) -> None:
    server = _server(CollectorRegistry(), HeartbeatMonitor(), pool)
    server.request_timeout_s = 0.2
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the headers
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/healthz")
            assert response.status_code == 200
        assert await asyncio.wait_for(reader.read(), timeout=2.0) == b""  # closed on us
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 2.0)).split(b" ", 2)[1] == b"400"
        writer.close()


async def test_close_ends_open_connections_quietly(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        server = _server(CollectorRegistry(), HeartbeatMonitor(), pool)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # a request still arriving
        await asyncio.sleep(0.05)
        await asyncio.wait_for(server.close(), timeout=2.0)
        assert await asyncio.wait_for(reader.read(), timeout=2.0) == b""
        writer.close()
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    assert errors == []


def _insert_records(conn: psycopg.Connection[Any]) -> None:
    def add(
        status: str,
        n: int,
        *,
        channel: str = "feishu",
        updated_s_ago: float = 0.0,
        retry_in_s: float | None = None,
    ) -> None:
        sending = status == "sending"
        conn.execute(
            "INSERT INTO outbox_notifier.notification_records"
            " (channel, user_id, preview_id, dedupe_key, target_url, status, updated_at,"
            "  next_retry_at, lease_expires_at, lease_token)"
            " SELECT %(channel)s, 1, 'p', gen_random_uuid()::text, '/x', %(status)s,"
            "        now() - make_interval(secs => %(ago)s),"
            "        now() + make_interval(secs => %(retry_in)s),"
            "        CASE WHEN %(sending)s THEN now() + interval '1 minute' END,"
            "        CASE WHEN %(sending)s THEN 1 END"
            " FROM generate_series(1, %(n)s)",
            {"channel": channel, "status": status, "ago": updated_s_ago,
             "retry_in": retry_in_s, "sending": sending, "n": n},
        )  # fmt: skip

    add("pending", 3, updated_s_ago=100)
    add("pending", 1, updated_s_ago=5)
    add("failed", 2, retry_in_s=-250)  # due for 250 s
    add("failed", 4, retry_in_s=3600)  # not due yet
    add("sending", 5)
    add("dead", 6)
    add("sent", 50)
    add("skipped", 2)
    add("pending", 7, channel="bot", updated_s_ago=20)
    conn.execute(
        "INSERT INTO outbox_notifier.outbox (event_type, payload, status, created_at)"
        " SELECT 't', '{}', 'pending', now() - make_interval(secs => 40 + g)"
        " FROM generate_series(1, 8) g"
    )
    conn.execute(
        "INSERT INTO outbox_notifier.outbox (event_type, payload, status, created_at)"
        " SELECT 't', '{}', s, now() - interval '1 day'"
        " FROM unnest(ARRAY['relayed', 'rejected', 'relayed']) s"
    )


async def test_snapshot_sets_gauges_from_real_rows(
    conn: psycopg.Connection[Any], pool: AsyncConnectionPool[psycopg.AsyncConnection]
) -> None:
    _insert_records(conn)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert await metrics.snapshot(MaintenanceStore(pool))

    def gauge(name: str, **labels: str) -> float | None:
        return registry.get_sample_value("outbox_notifier_" + name, labels)

    assert gauge("records", channel="feishu", status="pending") == 4
    assert gauge("records", channel="feishu", status="failed") == 6
    assert gauge("records", channel="feishu", status="sending") == 5
    for history in ("sent", "dead", "skipped"):  # left to the counters and operator views
        assert gauge("records", channel="feishu", status=history) is None
    assert gauge("records", channel="bot", status="pending") == 7
    assert gauge("records", channel="bot", status="failed") == 0
    assert gauge("oldest_due_record_age_seconds", channel="feishu") == pytest.approx(250, abs=5)
    assert gauge("oldest_due_record_age_seconds", channel="bot") == pytest.approx(20, abs=5)
    assert gauge("outbox_pending") == 8
    assert gauge("outbox_oldest_pending_age_seconds") == pytest.approx(48, abs=5)

    # Everything delivered: the next snapshot brings the gauges back to zero.
    conn.execute("UPDATE outbox_notifier.notification_records SET status = 'sent',"
                 " lease_expires_at = NULL, lease_token = NULL")  # fmt: skip
    conn.execute("UPDATE outbox_notifier.outbox SET status = 'relayed'")
    assert await metrics.snapshot(MaintenanceStore(pool))
    assert gauge("records", channel="feishu", status="pending") == 0
    assert gauge("records", channel="bot", status="pending") == 0
    assert gauge("oldest_due_record_age_seconds", channel="feishu") == 0
    assert gauge("outbox_pending") == 0
    assert gauge("outbox_oldest_pending_age_seconds") == 0


async def test_snapshot_failure_is_counted_not_raised(db: str) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    async with AsyncConnectionPool(
        db, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
    ) as pool:
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.execute("DROP SCHEMA outbox_notifier CASCADE")
        assert not await metrics.snapshot(MaintenanceStore(pool))
    assert (
        registry.get_sample_value("outbox_notifier_database_errors_total", {"loop": "maintenance"})
        == 1
    )


def test_snapshot_reads_live_statuses_through_their_partial_indexes(
    conn: psycopg.Connection[Any],
) -> None:
    # A realistic shape: a long history of sent records, a small live backlog.
    fill_history(conn)
    conn.execute("ANALYZE outbox_notifier.notification_records")
    conn.execute("ANALYZE outbox_notifier.outbox")
    plan = conn.execute(b"EXPLAIN (FORMAT JSON) " + query("metrics_snapshot").encode()).fetchone()
    assert plan is not None
    text = str(plan[0])
    for index in (
        "records_pending_due_idx", "records_failed_due_idx", "records_sending_lease_idx",
        "outbox_pending_idx",
    ):  # fmt: skip
        assert f"'Index Name': '{index}'" in text
    # The targets table has one row per webhook and may be scanned; history tables not.
    assert not re.search(
        r"'Node Type': 'Seq Scan'[^}]*'Relation Name': '(notification_records|outbox)'", text
    )


async def test_metrics_negotiates_openmetrics_and_gzip(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
) -> None:
    registry = CollectorRegistry()
    Metrics(registry).observe_relay(RelayReport(3, 2, 1, 0, {}))
    async with (
        _server(registry, HeartbeatMonitor(), pool) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
    ):
        om = await client.get(
            "/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
        zipped = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
        assert zipped.headers["content-encoding"] == "gzip"
        assert "outbox_notifier_outbox_relayed_total 3.0" in zipped.text  # httpx inflates it
        plain = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert plain.headers["content-type"].startswith("text/plain")


async def test_idle_connections_over_the_cap_do_not_lock_out_probes(
    pool: AsyncConnectionPool[psycopg.AsyncConnection],
) -> None:
    server = _server(CollectorRegistry(), HeartbeatMonitor(), pool)
    server.max_connections = 8
    async with server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(30)]
        try:
            async with httpx.AsyncClient() as client:
                started = asyncio.get_running_loop().time()
                response = await client.get(f"http://127.0.0.1:{server.port}/healthz")
                assert response.status_code == 200
                assert asyncio.get_running_loop().time() - started < 1.0
            assert server.evicted >= 30 + 1 - 8
            # The evicted idle connections were closed by the server.
            closed = 0
            for reader, _ in idle:
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(), timeout=0.05) == b"":
                        closed += 1
            assert closed >= 30 - 8
        finally:
            for _, writer in idle:
                writer.close()


def test_out_of_descriptors_is_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio reports every failed accept() with a traceback; out of descriptors that was
    thousands of lines a minute. Now: one line, then silence for the interval."""
    import errno as errno_codes

    from outbox_notifier.http import _RateLimitedLoopErrors

    passed: list[dict[str, Any]] = []
    handler = _RateLimitedLoopErrors(lambda _loop, ctx: passed.append(ctx), interval_s=60.0)
    loop = asyncio.new_event_loop()
    try:
        exhausted = OSError(errno_codes.EMFILE, "Too many open files")
        with caplog.at_level("ERROR", logger="outbox_notifier.http"):
            for _ in range(500):
                handler(loop, {"message": "socket.accept() out of system resource",
                               "exception": exhausted})  # fmt: skip
            handler(loop, {"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
    lines = [r for r in caplog.records if r.name == "outbox_notifier.http"]
    assert len(lines) == 1
    assert lines[0].exc_info is None  # no traceback
    assert "out of resources" in lines[0].getMessage()
    assert handler.suppressed == 499
    assert [ctx["message"] for ctx in passed] == ["something else"]  # others pass through
