"""``outbox-notifier demo``: the whole pipeline on a throwaway database, in under a minute.

Starts PostgreSQL the way the test suite does (or uses a fresh database on ``--dsn``'s server),
migrates, starts the local look-alike of the platforms, registers two users' Flow webhooks and
one user for each other provider (Feishu bot, webhook, DingTalk signed, WeCom, Slack), writes a
handful of events inside one business transaction (one malformed, one duplicate, one whose
webhook fails once, one per provider), runs the daemon until everything settles, prints what
happened, and removes everything it created.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg

from outbox_notifier import migrations, providers
from outbox_notifier.daemon import Daemon
from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.settings import Settings
from outbox_notifier.testing import postgres
from outbox_notifier.testing.feishu_server import FeishuServer, Reply

SETTLE_TIMEOUT_S = 45.0
LOOPBACK = "127.0.0.1"


def _event(dedupe_key: str, user_id: int, summary: str) -> bytes:
    return msgspec.json.encode(
        {
            "user_id": user_id,
            "preview_id": f"asp_{dedupe_key}",
            "trigger_id": f"trg_{dedupe_key}",
            "trigger_type": "schedule_conflict",
            "target_type": "schedule",
            "target_id": 42,
            "dedupe_key": dedupe_key,
            "target_url": f"/assistant/preview/asp_{dedupe_key}",
            "summary_text": summary,
            "trace_id": f"demo-{dedupe_key}",
            "requested_at": "2026-01-01T09:00:00Z",
        }
    )


# user id, provider, the look-alike's URL for it, signing secret (DingTalk's is signed).
_OTHER_PROVIDERS: tuple[tuple[int, str, Callable[[FeishuServer], str], str | None], ...] = (
    (1004, "feishu_bot", lambda srv: srv.bot_url("demo-bot"), None),
    (1005, "webhook", lambda srv: f"{srv.url}/hooks/demo", None),
    (1006, "dingtalk_bot", lambda srv: srv.dingtalk_url("demo-dingtalk"), "SECdemo"),
    (1007, "wecom_bot", lambda srv: srv.wecom_url("demo-wecom"), None),
    (1008, "slack_webhook", lambda srv: srv.slack_url("T0/B0/demo-slack"), None),
)


def _add_channels(conn: psycopg.Connection[Any], server: FeishuServer) -> None:
    for user_id, token in ((1001, "demo-alice"), (1002, "demo-flaky")):
        conn.execute(
            "INSERT INTO outbox_notifier.notification_channels (user_id, webhook_url)"
            " VALUES (%s, %s)",
            (user_id, server.flow_url(token)),
        )
    for user_id, provider, url, secret in _OTHER_PROVIDERS:
        conn.execute(
            "INSERT INTO outbox_notifier.notification_channels"
            " (user_id, webhook_url, provider, auth_kind, auth_secret) VALUES (%s, %s, %s, %s, %s)",
            (user_id, url(server), provider, "bot_secret" if secret else "none", secret),
        )


def _write_business_transaction(dsn: str) -> None:
    """What an application does: its own rows and the outbox rows, in one transaction."""
    events = [
        (EVENT_TYPE, _event("order-1", 1001, "Your 10:00 review moved to 11:00.")),
        (EVENT_TYPE, _event("order-2", 1001, "See www.example.com for details")),  # -> fallback
        (EVENT_TYPE, _event("order-3", 1002, "Standup clashes with a 1:1.")),  # flaky webhook
        (EVENT_TYPE, _event("order-1", 1001, "Your 10:00 review moved to 11:00.")),  # duplicate
        (EVENT_TYPE, b'{"user_id": "not a number"}'),  # malformed: rejected with a reason
        (EVENT_TYPE, _event("order-4", 1003, "Nobody listens here.")),  # no channel -> skipped
        # One record to each of the other providers (the users' channels pick them).
        *(
            (EVENT_TYPE, _event(f"order-{5 + i}", user, "Lunch moved to 12:30."))
            for i, user in enumerate(user for user, *_ in _OTHER_PROVIDERS)
        ),
    ]
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("CREATE TABLE IF NOT EXISTS demo_orders (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO demo_orders VALUES (1, 'rescheduled')")
        for event_type, body in events:
            conn.execute(
                "SELECT outbox_notifier.enqueue(%s, %s::jsonb)", (event_type, body.decode())
            )


def _settled(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM outbox_notifier.outbox WHERE status = 'pending')"
            " + (SELECT count(*) FROM outbox_notifier.notification_records"
            "    WHERE status IN ('pending', 'sending', 'failed'))"
        ).fetchone()
    return row is not None and row[0] == 0


def _table(title: str, header: list[str], rows: list[tuple[Any, ...]]) -> str:
    cells = [header] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title]
    for i, row in enumerate(cells):
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _report(dsn: str, server: FeishuServer) -> str:
    with psycopg.connect(dsn) as conn:
        records = conn.execute(
            "SELECT r.id, r.user_id, r.dedupe_key, r.status, r.attempt_count, r.fallback_used,"
            " coalesce(r.last_error_code, ''), coalesce(c.provider, '')"
            " FROM outbox_notifier.notification_records r"
            " LEFT JOIN outbox_notifier.notification_channels c USING (user_id, channel)"
            " ORDER BY r.id"
        ).fetchall()
        outbox = conn.execute(
            "SELECT id, status, coalesce(error, '') FROM outbox_notifier.outbox ORDER BY id"
        ).fetchall()
    return "\n\n".join(
        [
            _table(
                "notification_records",
                [
                    "id",
                    "user",
                    "dedupe_key",
                    "status",
                    "attempts",
                    "fallback",
                    "last_error",
                    "provider",
                ],
                records,
            ),
            _table("outbox", ["id", "status", "error"], outbox),
            f"calls received by the local look-alike of the platforms: {server.count()}",
        ]
    )


async def _run_until_settled(settings: Settings) -> bool:
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run(install_signal_handlers=False))
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    try:
        while time.monotonic() < deadline and not task.done():
            if await asyncio.to_thread(_settled, settings.dsn):
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        daemon.stop()
        await task


def _demo(server_dsn: str, settings: Settings) -> int:
    dsn = postgres.create_database(server_dsn, prefix="outbox_notifier_demo")
    try:
        print(f"migrated: {', '.join(migrations.migrate(dsn))}")
        with FeishuServer.in_thread() as server:
            server.script("demo-flaky", [Reply(status=500)])  # fails once, then succeeds
            with psycopg.connect(dsn) as conn:
                _add_channels(conn, server)
            _write_business_transaction(dsn)
            print("enqueued 11 outbox rows in one business transaction; running the daemon...")
            # Every provider's URL policy lets the look-alike (plain http on loopback) through.
            local = {
                f"{spec.settings_prefix}_{name}": value
                for spec in providers.REGISTRY
                for name, value in (("allowed_schemes", ("http",)), ("allowed_hosts", (LOOPBACK,)))
            }
            demo_settings = msgspec.structs.replace(
                settings,
                dsn=dsn,
                listen_dsn="",
                **local,
                # The look-alike listens on loopback, which the egress guard refuses by default.
                egress_allow_cidrs=(*settings.egress_allow_cidrs, "127.0.0.0/8"),
                poll_interval_s=0.5,
                retry_interval_s=0.5,
                retry_base_s=1.0,
                retry_max_s=2.0,
                http_listen="127.0.0.1:0",
                frontend_base_url=settings.frontend_base_url or "https://app.example.com",
            )
            started = time.monotonic()
            settled = asyncio.run(_run_until_settled(demo_settings))
            print(f"\n{'settled' if settled else 'NOT settled'} after "
                  f"{time.monotonic() - started:.1f}s\n")  # fmt: skip
            print(_report(dsn, server))
        return 0 if settled else 1
    finally:
        postgres.drop_database(server_dsn, dsn)


def main(settings: Settings) -> int:
    if settings.dsn:
        return _demo(settings.dsn, settings)
    try:
        with postgres.throwaway_server() as server_dsn:
            return _demo(server_dsn, settings)
    except postgres.NoPostgres as exc:
        print(f"outbox-notifier: {exc}", file=sys.stderr)
        return 1
