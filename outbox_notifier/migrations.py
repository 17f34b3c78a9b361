"""Applies the numbered SQL files of ``sql/`` in order, each once, and judges compatibility.

Every file runs in its own transaction that first takes a transaction-scoped advisory lock, so
two ``migrate`` processes started together apply each file exactly once (the second waits, then
sees the file recorded and skips it), and the lock works through a transaction-mode pooler.
A file whose text changed after it was applied is reported, not re-run: released migrations are
never edited.

Expand/contract: each migration is ``additive`` or ``breaking`` (see `sqlfiles`), and
``schema_migrations`` records the kind beside each version, so a daemon can judge migrations it
has never seen. A daemon runs on the schema of its own latest migration and on any newer one
whose later migrations are all additive (`compatibility`); that is what lets ``migrate`` run
before the replicas are rolled, and the previous image run again after a rollback. A migration
that adds an object grants the roles of 0004 what they need on it, so the daemon never needs
more than ``outbox_notifier_daemon``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec
import psycopg

from outbox_notifier import sqlfiles
from outbox_notifier.sqlfiles import query

# Arbitrary constant: the advisory-lock key that serialises migrations.
MIGRATION_LOCK_KEY = 7_244_001

# kind came after release 0.1.0: added (nullable) to existing tables, filled in by migrate.
_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS outbox_notifier;
CREATE TABLE IF NOT EXISTS outbox_notifier.schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox_notifier.schema_migrations ADD COLUMN IF NOT EXISTS kind text
"""


class MigrationError(Exception):
    """A migration could not be applied, or an applied one no longer matches its file."""


class Applied(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``schema_migrations``; kind is None only for rows a 0.1.0 migrate wrote."""

    version: int
    name: str
    kind: str | None
    applied_at: datetime | None = None


class Compatibility(msgspec.Struct, frozen=True, kw_only=True):
    """Whether this daemon may run on the database's schema, and why, in one line."""

    ok: bool
    reason: str
    database_version: int | None
    daemon_version: int


def latest_version() -> int:
    return max((m.version for m in sqlfiles.migrations()), default=0)


def assess(applied: Sequence[Applied] | None, daemon_version: int) -> Compatibility:
    """Judges a schema (its applied migrations; None when there is none) for a daemon whose
    own latest migration is ``daemon_version``. Pure: the unit tests feed it rows."""

    def verdict(ok: bool, reason: str, db_version: int | None) -> Compatibility:
        return Compatibility(
            ok=ok, reason=reason, database_version=db_version, daemon_version=daemon_version
        )

    if not applied:
        return verdict(
            False,
            f"database schema is missing, this daemon needs version {daemon_version}: "
            "run `outbox-notifier migrate`",
            None,
        )
    db_version = max(m.version for m in applied)
    if db_version < daemon_version:
        return verdict(
            False,
            f"database schema is at version {db_version}, older than this daemon's "
            f"{daemon_version}: run `outbox-notifier migrate`",
            db_version,
        )
    # Migrations apply in order, so with the daemon's latest one its earlier ones are there;
    # a newer release's migrate may have run before this one's, though.
    if daemon_version not in {m.version for m in applied}:
        return verdict(
            False,
            f"database schema is at version {db_version} but lacks this daemon's migration "
            f"{daemon_version}: run this release's `outbox-notifier migrate`",
            db_version,
        )
    newer = sorted((m for m in applied if m.version > daemon_version), key=lambda m: m.version)
    # A kind nobody recorded is treated as breaking: running on it would be a guess.
    blocking = next((m for m in newer if m.kind != "additive"), None)
    if blocking is not None:
        kind = blocking.kind or "of unknown kind"
        return verdict(
            False,
            f"database schema is at version {db_version}, newer than this daemon's "
            f"{daemon_version}, and migration {blocking.name} is {kind}: "
            f"run a daemon built for version {blocking.version} or later, or restore the "
            "database from its dump taken before that migrate to run this one",
            db_version,
        )
    if newer:
        return verdict(
            True,
            f"database schema is at version {db_version}, newer than this daemon's "
            f"{daemon_version}; the migrations since are additive",
            db_version,
        )
    return verdict(True, f"database schema is at version {db_version}, as this daemon", db_version)


def _applied_rows(rows: Sequence[tuple[int, str, str | None, datetime]]) -> list[Applied]:
    return [Applied(version=v, name=n, kind=k, applied_at=at) for v, n, k, at in rows]


async def compatibility(
    conn: psycopg.AsyncConnection, daemon_version: int | None = None
) -> Compatibility:
    """The verdict for this daemon (or for ``daemon_version``) on ``conn``'s database.

    Called at start-up and by ``/readyz``. A database error other than a missing schema is
    raised: the callers report an unreachable database in their own way.
    """
    own = latest_version() if daemon_version is None else daemon_version
    try:
        cur = await conn.execute(query("applied_migrations"))
        rows = await cur.fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return assess(None, own)
    return assess(_applied_rows(rows), own)


def applied_migrations(conn: psycopg.Connection) -> list[Applied] | None:
    """The rows of ``schema_migrations`` (None when the schema does not exist yet)."""
    try:
        rows = conn.execute(query("applied_migrations")).fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return None
    return _applied_rows(rows)


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What ``migrate --status`` and ``--dry-run`` show: the database's rows, this release's
    files not applied yet, and this release's verdict on the schema as it is now."""

    applied: list[Applied]
    pending: list[sqlfiles.Migration]
    verdict: Compatibility


def plan(dsn: str) -> Plan:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = applied_migrations(conn)
    return Plan(applied=rows or [], pending=pending(rows), verdict=assess(rows, latest_version()))


def pending(
    applied: Sequence[Applied] | None, available: Sequence[sqlfiles.Migration] | None = None
) -> list[sqlfiles.Migration]:
    """The migrations of ``available`` (default: this release's files) not applied yet."""
    done = {m.version for m in applied or ()}
    return [m for m in available or sqlfiles.migrations() if m.version not in done]


def migrate(dsn: str, available: Sequence[sqlfiles.Migration] | None = None) -> list[str]:
    """Applies pending migrations; returns the names of those applied (empty when up to date).

    ``available`` defaults to this release's files; tests pass synthetic future ones.
    """
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for migration in available or sqlfiles.migrations():
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                conn.execute(_BOOTSTRAP)
                row = conn.execute(
                    "SELECT checksum, kind FROM outbox_notifier.schema_migrations"
                    " WHERE version = %s",
                    (migration.version,),
                ).fetchone()
                if row is not None:
                    if row[0] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.name} was changed after it was applied; "
                            "add a new migration instead of editing a released one"
                        )
                    if row[1] is None:  # applied by a migrate of 0.1.0
                        conn.execute(
                            "UPDATE outbox_notifier.schema_migrations SET kind = %s"
                            " WHERE version = %s",
                            (migration.kind, migration.version),
                        )
                    continue
                try:
                    conn.execute(migration.sql.encode())
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
                conn.execute(
                    "INSERT INTO outbox_notifier.schema_migrations (version, name, checksum, kind)"
                    " VALUES (%s, %s, %s, %s)",
                    (migration.version, migration.name, migration.checksum, migration.kind),
                )
                applied.append(migration.name)
    return applied
