"""Applies the numbered SQL files of ``sql/`` in order, each once.

Every file runs in its own transaction that first takes a transaction-scoped advisory lock, so
two ``migrate`` processes started together apply each file exactly once (the second waits, then
sees the file recorded and skips it), and the lock works through a transaction-mode pooler.
A file whose text changed after it was applied is reported, not re-run: released migrations are
never edited.
"""

from __future__ import annotations

import logging

import psycopg

from outbox_notifier import sqlfiles

logger = logging.getLogger(__name__)

# Arbitrary constant: the advisory-lock key that serialises migrations.
MIGRATION_LOCK_KEY = 7_244_001

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS outbox_notifier;
CREATE TABLE IF NOT EXISTS outbox_notifier.schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """A migration could not be applied, or an applied one no longer matches its file."""


def latest_version() -> int:
    return max((m.version for m in sqlfiles.migrations()), default=0)


def migrate(dsn: str) -> list[str]:
    """Applies pending migrations; returns the names of those applied (empty when up to date)."""
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for migration in sqlfiles.migrations():
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                conn.execute(_BOOTSTRAP)
                row = conn.execute(
                    "SELECT checksum FROM outbox_notifier.schema_migrations WHERE version = %s",
                    (migration.version,),
                ).fetchone()
                if row is not None:
                    if row[0] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.name} was changed after it was applied; "
                            "add a new migration instead of editing a released one"
                        )
                    continue
                try:
                    conn.execute(migration.sql.encode())
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
                conn.execute(
                    "INSERT INTO outbox_notifier.schema_migrations (version, name, checksum)"
                    " VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
                logger.info("applied migration %s", migration.name)
                applied.append(migration.name)
    return applied
