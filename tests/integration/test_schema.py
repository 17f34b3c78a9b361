"""The migrated schema: objects present, migrations idempotent and safe to run concurrently."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import psycopg
import pytest

from outbox_notifier import migrations, sqlfiles


def _declared_objects() -> dict[str, set[str]]:
    """Tables, views, functions and indexes that the SQL files declare, by kind."""
    text = "\n".join(m.sql for m in sqlfiles.migrations())
    name = r"outbox_notifier\.([a-z_][a-z0-9_]*)"
    return {
        "table": set(re.findall(rf"CREATE TABLE {name}", text)),
        "view": set(re.findall(rf"CREATE VIEW {name}", text)),
        "function": set(re.findall(rf"CREATE (?:OR REPLACE )?FUNCTION {name}", text)),
        "index": set(re.findall(r"CREATE (?:UNIQUE )?INDEX ([a-z_]+) ON", text))
        - set(re.findall(r"DROP INDEX outbox_notifier\.([a-z_]+)", text)),
        "trigger": set(re.findall(r"CREATE TRIGGER ([a-z_]+)", text)),
    }


def _actual_objects(conn: psycopg.Connection) -> dict[str, set[str]]:
    def names(query: str) -> set[str]:
        return {row[0] for row in conn.execute(query)}

    return {
        "table": names(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'outbox_notifier'"
            " AND tablename <> 'schema_migrations'"
        ),
        "view": names("SELECT viewname FROM pg_views WHERE schemaname = 'outbox_notifier'"),
        "function": names(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'outbox_notifier'"
        ),
        "index": names(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'outbox_notifier'"
            " AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'"
        ),
        "trigger": names(
            "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'outbox_notifier' AND NOT t.tgisinternal"
        ),
    }


def test_migrated_schema_matches_the_sql_files(empty_db: str) -> None:
    applied = migrations.migrate(empty_db)
    assert applied == [m.name for m in sqlfiles.migrations()]
    with psycopg.connect(empty_db) as conn:
        assert _actual_objects(conn) == _declared_objects()
        versions = [
            r[0]
            for r in conn.execute(
                "SELECT version FROM outbox_notifier.schema_migrations ORDER BY version"
            )
        ]
        assert versions == [m.version for m in sqlfiles.migrations()]


def test_second_migrate_is_a_no_op(empty_db: str) -> None:
    migrations.migrate(empty_db)
    with psycopg.connect(empty_db) as conn:
        before = conn.execute(
            "SELECT version, applied_at FROM outbox_notifier.schema_migrations"
        ).fetchall()
    assert migrations.migrate(empty_db) == []
    with psycopg.connect(empty_db) as conn:
        after = conn.execute(
            "SELECT version, applied_at FROM outbox_notifier.schema_migrations"
        ).fetchall()
    assert after == before


def test_concurrent_migrations_apply_each_file_once(empty_db: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrations.migrate(empty_db))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    applied = sorted(name for result in results for name in result)
    assert applied == sorted(m.name for m in sqlfiles.migrations())


def test_edited_migration_is_reported(empty_db: str) -> None:
    migrations.migrate(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox_notifier.schema_migrations SET checksum = 'x' WHERE version = 1"
        )
    with pytest.raises(migrations.MigrationError, match="was changed after it was applied"):
        migrations.migrate(empty_db)


def test_migrate_cli_creates_then_is_a_no_op(empty_db: str) -> None:
    cmd = [sys.executable, "-m", "outbox_notifier", "migrate", "--dsn", empty_db]
    first = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "0001_schema" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


def test_enqueue_in_rolled_back_transaction_leaves_nothing(conn: psycopg.Connection) -> None:
    with pytest.raises(RuntimeError), conn.transaction():
        new_id = conn.execute(
            "SELECT outbox_notifier.enqueue('notification.feishu.requested', '{}'::jsonb)"
        ).fetchone()
        assert new_id is not None and new_id[0] > 0
        raise RuntimeError("business transaction fails")
    count = conn.execute("SELECT count(*) FROM outbox_notifier.outbox").fetchone()
    assert count == (0,)


def test_enqueue_commits_a_pending_row(conn: psycopg.Connection) -> None:
    row = conn.execute(
        "SELECT outbox_notifier.enqueue('notification.feishu.requested', '{\"a\": 1}'::jsonb)"
    ).fetchone()
    assert row is not None
    stored = conn.execute(
        "SELECT event_type, event_version, payload, status FROM outbox_notifier.outbox"
        " WHERE id = %s",
        (row[0],),
    ).fetchone()
    assert stored == ("notification.feishu.requested", "1", {"a": 1}, "pending")


def test_insert_notifies_listeners_after_commit(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as listener, psycopg.connect(db) as writer:
        listener.execute("LISTEN outbox_notifier_outbox")
        writer.execute("SELECT outbox_notifier.enqueue('t', '{}'::jsonb)")
        # Nothing is delivered before the producer commits.
        assert list(listener.notifies(timeout=0.3)) == []
        writer.commit()
        received = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in received] == ["outbox_notifier_outbox"]


def test_unique_dedupe_key_per_channel(conn: psycopg.Connection) -> None:
    insert = (
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url) VALUES (%s, 1, 'p', 'k', '/x')"
    )
    conn.execute(insert, ("feishu",))
    conn.execute(insert, ("webhook",))
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(insert, ("feishu",))
