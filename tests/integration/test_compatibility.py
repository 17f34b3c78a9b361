"""Expand/contract: today's daemon on a schema a newer release migrated.

The future migrations are synthetic but real: `migrations.migrate` applies them as a newer
release's migrate would, recording their kinds, and the daemon judges them by what it reads.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import httpx
import psycopg
import pytest

from outbox_notifier import migrations, sqlfiles
from outbox_notifier.daemon import Daemon, SchemaNotCurrent
from outbox_notifier.testing.feishu_server import FeishuServer
from tests.support import (
    add_channel,
    enqueue,
    eventually,
    payload,
    running,
    scalar,
    settings_for,
)

NEXT = migrations.latest_version() + 1

# What a later release might add without breaking anyone: a nullable column, and a new version
# of a function beside the old one.
ADDITIVE = sqlfiles.Migration(
    version=NEXT,
    name=f"{NEXT:04d}_future_additive",
    kind="additive",
    sql=(
        "-- kind: additive\n"
        "ALTER TABLE outbox_notifier.notification_records ADD COLUMN priority integer;\n"
        "CREATE FUNCTION outbox_notifier.next_due_v2() RETURNS integer"
        " LANGUAGE sql AS $$ SELECT 1 $$;\n"
    ),
)

# A contract step: a column today's daemon writes is renamed.
BREAKING = sqlfiles.Migration(
    version=NEXT + 1,
    name=f"{NEXT + 1:04d}_future_breaking",
    kind="breaking",
    sql=(
        "-- kind: breaking\n"
        "ALTER TABLE outbox_notifier.notification_records"
        " RENAME COLUMN summary_text TO summary;\n"
    ),
)


def test_the_daemons_statements_call_only_versioned_functions() -> None:
    text = "\n".join(sqlfiles.queries().values())
    assert "outbox_notifier.claim_due_v1(" in text
    assert "outbox_notifier.claim_outbox_v2(" in text
    # which calls record_target_results_v1 (0020)
    assert "outbox_notifier.apply_results_v2(" in text
    assert "outbox_notifier.analyze_fresh_tables_v1(" in text  # the maintenance loop's (0019)
    assert "outbox_notifier.claim_due(" not in text
    assert "outbox_notifier.record_target_results(" not in text


async def test_additive_future_migration_leaves_the_daemon_starting_ready_and_delivering(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    assert migrations.migrate(db, [*sqlfiles.migrations(), ADDITIVE]) == [ADDITIVE.name]
    assert scalar(conn, "SELECT kind FROM outbox_notifier.schema_migrations WHERE version = %s",
                  (NEXT,)) == "additive"  # fmt: skip
    async with FeishuServer() as server:
        add_channel(conn, 1, server.flow_url("alice"))
        enqueue(conn, payload("k-additive"))
        daemon = Daemon(settings_for(db))
        async with running(daemon):

            def sent() -> bool:
                query = "SELECT count(*) FROM outbox_notifier.notification_records"
                return int(scalar(conn, query + " WHERE status = 'sent'")) == 1

            await eventually(sent, what="the record delivered")
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"http://127.0.0.1:{daemon.http_port}/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["schema"] == "ok"
        assert len(server.requests) == 1


async def test_breaking_future_migration_is_refused_in_process(db: str) -> None:
    migrations.migrate(db, [*sqlfiles.migrations(), ADDITIVE, BREAKING])
    # Run to completion: a stop requested during start-up is honoured before the schema check.
    daemon = Daemon(settings_for(db))
    with pytest.raises(SchemaNotCurrent, match=f"migration {BREAKING.name} is breaking"):
        await asyncio.wait_for(daemon.run(install_signal_handlers=False), timeout=30)


def test_breaking_future_migration_makes_run_exit_2_with_one_line(db: str) -> None:
    migrations.migrate(db, [*sqlfiles.migrations(), ADDITIVE, BREAKING])
    proc = subprocess.run(
        [sys.executable, "-m", "outbox_notifier", "run", "--dsn", db,
         "--set", "http_listen=127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    own = migrations.latest_version()
    assert proc.stderr.strip().splitlines()[-1] == (
        f"outbox-notifier: database schema is at version {NEXT + 1}, newer than this daemon's "
        f"{own}, and migration {BREAKING.name} is breaking: run a daemon built for version "
        f"{NEXT + 1} or later, or restore the database from its dump taken before that migrate "
        "to run this one"
    )


def test_schema_migrated_by_0_1_0_gets_its_kinds_filled_in(empty_db: str) -> None:
    # 0.1.0's migrate recorded no kind column at all; this release's migrate adds and fills it.
    released = [m for m in sqlfiles.migrations() if m.version in sqlfiles.RELEASED_KINDS]
    migrations.migrate(empty_db, released)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE outbox_notifier.schema_migrations DROP COLUMN kind")
        assert [a.kind for a in migrations.applied_migrations(conn) or []] == [None] * len(released)
        migrations.migrate(empty_db)
        applied = migrations.applied_migrations(conn)
    assert applied is not None
    assert [(a.version, a.kind) for a in applied] == [
        (m.version, m.kind) for m in sqlfiles.migrations()
    ]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox_notifier", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_migrate_status_lists_applied_pending_and_newer_migrations_with_their_kind(
    empty_db: str,
) -> None:
    own = sqlfiles.migrations()
    migrations.migrate(empty_db, [*own[:-1], ADDITIVE])  # the latest one left pending
    proc = _cli("migrate", "--status", "--dsn", empty_db)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "NAME", "KIND", "STATE"]
    rows = {line.split()[1]: line.split()[2:] for line in lines[1:-1]}
    assert list(rows) == [*(m.name for m in own), ADDITIVE.name]
    assert rows[own[0].name][:2] == ["breaking", "applied"]
    assert rows[own[-1].name] == ["additive", "pending"]
    assert rows[ADDITIVE.name][0:2] == ["additive", "applied"]
    assert rows[ADDITIVE.name][-4:] == ["newer", "than", "this", "release"]
    assert lines[-1].startswith("this release cannot run on it: ")
    assert f"version {NEXT}" in lines[-1]


def test_migrate_dry_run_prints_the_pending_sql_and_changes_nothing(empty_db: str) -> None:
    proc = _cli("migrate", "--dry-run", "--dsn", empty_db)
    assert proc.returncode == 0, proc.stderr
    for m in sqlfiles.migrations():
        assert f"-- would apply {m.name} ({m.kind}), in its own transaction\n" in proc.stdout
        assert m.sql.rstrip() in proc.stdout
    with psycopg.connect(empty_db) as conn:
        assert migrations.applied_migrations(conn) is None
    migrations.migrate(empty_db)
    again = _cli("migrate", "--dry-run", "--dsn", empty_db)
    assert again.stdout == "-- schema is up to date: nothing would run\n"


def test_migrate_status_and_dry_run_exclude_each_other(empty_db: str) -> None:
    proc = _cli("migrate", "--status", "--dry-run", "--dsn", empty_db)
    assert proc.returncode == 2
    assert "not allowed with argument" in proc.stderr
