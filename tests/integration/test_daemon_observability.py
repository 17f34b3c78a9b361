"""A running daemon seen from outside: /metrics after a known workload, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg.types.json import Jsonb

from outbox_notifier.completer import dedupe_key_hash
from outbox_notifier.daemon import Daemon
from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.logs import JsonFormatter
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.support import (
    FLOW_PREFIX,
    add_channel,
    enqueue,
    eventually,
    fill_history,
    payload,
    running,
    scalar,
)
from tests.support import settings_for as base_settings


@pytest.fixture
async def server() -> Any:
    async with FeishuServer() as srv:
        yield srv


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(scraped: dict[Any, float], name: str, **labels: str) -> float | None:
    return scraped.get((name, tuple(sorted(labels.items()))))


async def scrape(daemon: Daemon, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{daemon.http_port}{path}")


async def test_metrics_after_a_known_workload(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url("ok"))
    add_channel(conn, 2, server.flow_url("flaky"))
    server.script(FLOW_PREFIX + "flaky", [Reply(status=500)])
    enqueue(conn, payload("a", user_id=1))
    enqueue(conn, payload("a", user_id=1))  # duplicate: a dedupe hit
    enqueue(conn, payload("b", user_id=2))  # 500, then 200 on retry
    enqueue(conn, payload("c", user_id=1, summary_text="see https://x.example"))  # fallback
    enqueue(conn, payload("d", user_id=3))  # no channel: skipped
    enqueue(conn, ["not", "an", "object"])  # rejected: malformed
    enqueue(conn, payload("e"), event_type="other.event")  # rejected: unknown type

    daemon = Daemon(
        base_settings(db, retry_base_s=0.5, retry_max_s=1.0), registry=CollectorRegistry()
    )
    async with running(daemon):

        def settled() -> bool:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('sent', 'skipped')), count(*)"
                " FROM outbox_notifier.notification_records"
            ).fetchone()
            return row == (4, 4)

        await eventually(settled, timeout_s=15, what="all records settled")
        await asyncio.sleep(0.3)
        response = await scrape(daemon, "/metrics")
    assert response.status_code == 200
    m = samples(response.text)
    p = "outbox_notifier_"
    assert value(m, p + "outbox_relayed_total") == 5
    assert value(m, p + "outbox_rejected_total", reason_class="malformed") == 1
    assert value(m, p + "outbox_rejected_total", reason_class="unknown_type") == 1
    assert value(m, p + "dedupe_hits_total") == 1
    assert value(m, p + "fallback_used_total") == 1
    flow = {"channel": "feishu", "provider": "feishu_flow"}
    assert value(m, p + "delivery_attempts_total", **flow, outcome="success") == 3
    assert value(m, p + "delivery_attempts_total", **flow, outcome="skipped") == 1
    assert value(m, p + "delivery_attempts_total", **flow, outcome="temporary_fail") == 1
    assert value(m, p + "provider_errors_total", **flow, error_code="provider_5xx") == 1
    assert value(m, p + "records_dead_total", channel="feishu") == 0
    assert value(m, p + "end_to_end_latency_seconds_count", **flow) == 3
    assert value(m, p + "late_results_total") == 0
    # Labels stay bounded: no user ids, URLs or dedupe keys anywhere.
    labels = {v for (_, pairs) in m for _, v in pairs}
    assert not any("flow/api" in v or v in {"a", "b", "c"} for v in labels)


async def test_a_locked_outbox_is_not_a_liveness_failure(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    """An ACCESS EXCLUSIVE lock on the outbox held past health_stale_s: /healthz stays 200,
    /readyz says the relay is locked out, records already relayed keep being delivered, and
    the outbox backlog drains once the lock goes."""
    add_channel(conn, 1, server.flow_url("ok"))
    stale_s = 2.0
    daemon = Daemon(
        base_settings(
            db, health_stale_s=stale_s, db_deadline_s=1.0, lock_timeout_s=0.3,
            statement_timeout_s=0.8, poll_interval_s=0.2,
        )
    )  # fmt: skip
    async with running(daemon):
        await eventually(lambda: daemon.listener_up, what="listener up")
        assert (await scrape(daemon, "/readyz")).status_code == 200
        with psycopg.connect(db) as blocker:
            blocker.execute("LOCK TABLE outbox_notifier.outbox IN ACCESS EXCLUSIVE MODE")
            for n in range(5):  # the backlog: visible to the relay once the lock goes
                blocker.execute(
                    "SELECT outbox_notifier.enqueue(%s, %s)",
                    (EVENT_TYPE, Jsonb(payload(f"backlog-{n}"))),
                )
            # A record relayed before the lock (no outbox row needed to deliver it).
            conn.execute(
                "INSERT INTO outbox_notifier.notification_records"
                " (channel, user_id, preview_id, dedupe_key, target_url, trace_id)"
                " VALUES ('feishu', 1, 'p', 'relayed-before', '/x', 't')"
            )
            locked_at = asyncio.get_running_loop().time()
            while asyncio.get_running_loop().time() - locked_at < 2 * stale_s:
                health = await scrape(daemon, "/healthz")
                assert health.status_code == 200, health.text
                await asyncio.sleep(0.2)
            ready = await scrape(daemon, "/readyz")
            assert ready.status_code == 503
            assert "relay: LockNotAvailable" in ready.json()["database"]
            failing = samples((await scrape(daemon, "/metrics")).text)
            assert value(failing, "outbox_notifier_database_failing", loop="relay") == 1
            assert _record_status(conn, "relayed-before") == "sent"
            blocker.commit()
        await eventually(
            lambda: all(_record_status(conn, f"backlog-{n}") == "sent" for n in range(5)),
            what="backlog drained",
        )
        await eventually(lambda: _status(daemon, "/readyz", 200), what="ready again")


def _record_status(conn: psycopg.Connection[Any], dedupe_key: str) -> str | None:
    row = conn.execute(
        "SELECT status FROM outbox_notifier.notification_records WHERE dedupe_key = %s",
        (dedupe_key,),
    ).fetchone()
    return None if row is None else str(row[0])


async def _status(daemon: Daemon, path: str, expected: int) -> bool:
    return (await scrape(daemon, path)).status_code == expected


async def test_readyz_follows_the_database(db: str, pg_server: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    daemon = Daemon(base_settings(db))
    async with running(daemon):
        await eventually(lambda: daemon.listener_up, what="listener up")
        assert (await scrape(daemon, "/readyz")).status_code == 200
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            try:
                await eventually(
                    lambda: _status(daemon, "/readyz", 503),
                    timeout_s=10,
                    what="not ready while the database is away",
                )
            finally:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await eventually(
            lambda: _status(daemon, "/readyz", 200),
            timeout_s=20,
            what="ready again",
        )


async def test_log_lines_carry_ids_and_never_secrets(
    db: str,
    conn: psycopg.Connection[Any],
    server: FeishuServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="outbox_notifier")
    add_channel(conn, 1, server.bot_url("tok-SECRET-PATH"), provider="feishu_bot",
                auth_kind="bot_secret", secret="sign-secret-XYZ")  # fmt: skip
    server.script(
        "tok-SECRET-PATH", [Reply(status=503)], then=Reply.feishu_error(19021, "bad sign")
    )
    enqueue(conn, payload("log-me"))
    settings = base_settings(db, retry_base_s=0.2, retry_max_s=0.2)
    async with running(Daemon(settings)):
        await eventually(
            lambda: (
                conn.execute("SELECT status FROM outbox_notifier.notification_records").fetchone()
                == ("dead",)
            ),
            what="dead",
        )
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name.startswith("outbox_notifier")]
    text = "\n".join(lines)
    assert "tok-SECRET-PATH" not in text
    assert "sign-secret-XYZ" not in text
    events = [msgspec.json.decode(line) for line in lines]
    failed = [e for e in events if e.get("msg") == "record failed: provider_5xx"]
    dead = [e for e in events if e.get("msg") == "record dead: provider_auth_failed"]
    assert len(failed) == 1 and len(dead) == 1
    assert failed[0]["trace_id"] == "trace-log-me"
    assert failed[0]["attempt"] == 1 and dead[0]["attempt"] == 2
    assert failed[0]["dedupe_key_hash"] == dedupe_key_hash("log-me")
    assert "log-me" not in failed[0]["dedupe_key_hash"]
    assert any(e.get("msg") == "outbox row relayed" for e in events)


async def test_relay_keeps_going_while_record_rows_are_locked(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    """Hot notification_records rows row-locked by someone else (an operator's transaction, a
    slow replica): new outbox rows are still relayed into new records."""
    add_channel(conn, 1, server.flow_url("ok"))
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, trace_id, status)"
        " VALUES ('feishu', 1, 'p', 'hot', '/x', 't', 'sent')"
    )
    daemon = Daemon(base_settings(db, lock_timeout_s=0.3, poll_interval_s=0.2))
    async with running(daemon):
        await eventually(lambda: daemon.listener_up, what="listener up")
        with psycopg.connect(db) as locker:
            locker.execute("SELECT * FROM outbox_notifier.notification_records FOR UPDATE")
            enqueue(conn, payload("hot"))  # a dedupe hit on the locked row
            enqueue(conn, payload("fresh"))
            await eventually(lambda: _record_status(conn, "fresh") == "sent", what="relayed")
            outbox = conn.execute(
                "SELECT count(*) FROM outbox_notifier.outbox WHERE status = 'relayed'"
            ).fetchone()
            assert outbox == (2,)
            locker.rollback()
        assert (await scrape(daemon, "/healthz")).status_code == 200


@pytest.mark.timeout(60)
async def test_a_retention_pass_longer_than_the_database_deadline_runs_to_its_end(
    db: str, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A backlog of finished rows takes many paced batches. The deadline bounds each batch,
    not the pass (which it used to cut off with 'retention failed'), and the maintenance loop
    stays alive batch by batch past health_stale_s."""
    # finished records and outbox rows: 160 batches of 25, so that the pass outlasts stale_s
    # on a fast cluster too (80 batches of 50 once took 1.8 s with fsync off)
    fill_history(conn, 2_000)
    stale_s = 2.0
    daemon = Daemon(
        base_settings(
            db, health_stale_s=stale_s, db_deadline_s=1.0, maintenance_interval_s=60.0,
            records_retention_s=0.001, outbox_retention_s=0.001,
            retention_batch_size=25, retention_pause_factor=20.0,
        )
    )  # fmt: skip
    left = "SELECT count(*) FROM outbox_notifier.notification_records"
    started = asyncio.get_running_loop().time()
    async with running(daemon):
        await eventually(lambda: daemon.listener_up, what="listener up")
        while scalar(conn, left) > 0:
            assert (await scrape(daemon, "/healthz")).status_code == 200
            assert asyncio.get_running_loop().time() - started < 45, "retention too slow"
            await asyncio.sleep(0.2)
        took = asyncio.get_running_loop().time() - started
    # one pass (the next is a minute away), longer than the deadline and the staleness bound
    assert took > stale_s
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.outbox") == 0
    assert "retention failed" not in caplog.text
