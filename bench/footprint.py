"""What a drain costs the database it runs in: WAL bytes and PostgreSQL statement time.

Around one drain (enqueue included)::

    meter = Meter.probe(server_dsn)      # once: can this server count statements?
    window = meter.begin(run_dsn)        # CHECKPOINT, reset the run's statement stats, WAL LSN
    ...enqueue, wait for the last success (polling on ``window.poll_dsn``)...
    usage = window.end()                 # WAL bytes since begin, statement ms of the run's db

WAL is the ``pg_wal_lsn_diff`` of ``pg_current_wal_lsn()`` before and after: server-wide, so
it counts whatever else the server writes meanwhile (autovacuum included; on a shared ``--dsn``
server, other users' work too). The CHECKPOINT before each drain makes every contender pay the
full-page image of each page it first touches, rather than whichever contender a checkpoint
happened to fall on.

Where the WAL goes: where the server has ``pg_walinspect`` (a contrib module of PostgreSQL 15
and later; the bench creates it in the run's database when it may), ``window.end()`` also sums
the WAL records of the window by relation and record type (``WalShare``), as ``pg_waldump
--stats`` would, naming each relation from the run's catalog.

Statement time is the sum of ``pg_stat_statements.total_exec_time`` of the run's database
(each run has its own clone: filtered by ``dbid``), top-level statements only, so a function's
inner statements are not counted twice; planning is not counted (``track_planning`` is off by
default). The bench's own polls run on a connection that sets ``pg_stat_statements.track =
none``, so only the contender's statements and the enqueue are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg

from outbox_notifier.dbhealth import first_line

# Server settings the bench's private cluster starts with; top-level tracking is the default,
# said here so that it is a decision, not an accident (see the module docstring).
SERVER_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "top",
}
# For the bench's own connections to a run's database: their statements are not counted.
_UNTRACKED = "-c pg_stat_statements.track=none"


@dataclass(frozen=True)
class WalShare:
    """WAL records of one relation and record type (``Heap UPDATE``) over a window."""

    relation: str  # "(none)": records of no relation (commits, ...); "(other)": not the run's
    record: str
    count: int
    bytes: int


@dataclass(frozen=True)
class StatementShare:
    """One top-level statement's share of a window's statement time (``pg_stat_statements``)."""

    query: str  # its normalized text, whitespace collapsed
    calls: int
    exec_ms: float


@dataclass(frozen=True)
class Usage:
    wal_bytes: float
    exec_ms: float  # NaN when the server cannot count statements
    wal_shares: tuple[WalShare, ...] = ()  # empty without pg_walinspect
    statement_shares: tuple[StatementShare, ...] = ()  # empty without pg_stat_statements


# The window's WAL records by relation (the run's catalog names it) and record type.
_WAL_SHARES = """
WITH w AS (
    SELECT resource_manager || ' ' || record_type AS record, record_length,
           substring(block_ref FROM 'rel [0-9]+/[0-9]+/([0-9]+)')::oid AS node
    FROM pg_get_wal_records_info(%(start)s::pg_lsn, %(end)s::pg_lsn)
)
SELECT CASE WHEN w.node IS NULL THEN '(none)' ELSE coalesce(c.relname::text, '(other)') END,
       w.record, count(*), sum(w.record_length)
FROM w LEFT JOIN pg_class c ON c.relfilenode = w.node AND c.relfilenode <> 0
GROUP BY 1, 2
ORDER BY 4 DESC
"""


class Meter:
    """Measures drains on one server; ``statements`` is False when it cannot count statement
    time, and ``why`` then says why (WAL is still measured)."""

    def __init__(self, server_dsn: str, why: str, checkpoint: bool) -> None:
        self.server_dsn = server_dsn
        self.why = why
        self.statements = not why
        self.checkpoint = checkpoint

    @classmethod
    def probe(cls, server_dsn: str) -> Meter:
        """Installs ``pg_stat_statements`` in the server DSN's database if it can, and checks
        that this session may reset it and switch its tracking off."""
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            checkpoint = _tries(conn, "CHECKPOINT") == ""
            row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
            if row is None or "pg_stat_statements" not in str(row[0]):
                why = "pg_stat_statements is not in the server's shared_preload_libraries"
            else:
                why = (
                    _tries(conn, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                    or _tries(conn, "SET pg_stat_statements.track = none")
                    or _tries(conn, "SELECT pg_stat_statements_reset(0, 0, 0)")
                )
        return cls(server_dsn, why, checkpoint)

    def begin(self, dsn: str) -> Window:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT oid FROM pg_database WHERE datname = %s",
                (psycopg.conninfo.conninfo_to_dict(dsn)["dbname"],),
            ).fetchone()
            assert row is not None, dsn
            dbid = int(row[0])
            if self.checkpoint:
                conn.execute("CHECKPOINT")
            if self.statements:
                conn.execute("SELECT pg_stat_statements_reset(0, %s, 0)", (dbid,))
            lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert lsn is not None
        if not self.statements:
            return Window(self, dbid, str(lsn[0]), dsn)
        return Window(
            self, dbid, str(lsn[0]), psycopg.conninfo.make_conninfo(dsn, options=_UNTRACKED)
        )


@dataclass(frozen=True)
class Window:
    meter: Meter
    dbid: int
    lsn: str
    poll_dsn: str  # the run's database, for the bench's own (uncounted) queries

    def end(self) -> Usage:
        with psycopg.connect(self.meter.server_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_current_wal_lsn()::text,"
                " pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::float8",
                (self.lsn,),
            ).fetchone()
            assert row is not None
            end_lsn, wal = str(row[0]), float(row[1])
            exec_ms = float("nan")
            shares: tuple[StatementShare, ...] = ()
            if self.meter.statements:
                rows = conn.execute(
                    "SELECT btrim(regexp_replace(regexp_replace(query, '--[^\\n]*', '', 'g'),"
                    " '\\s+', ' ', 'g')), calls,"
                    " total_exec_time::float8 FROM pg_stat_statements"
                    " WHERE dbid = %s AND toplevel ORDER BY total_exec_time DESC",
                    (self.dbid,),
                ).fetchall()
                shares = tuple(StatementShare(str(r[0]), int(r[1]), float(r[2])) for r in rows)
                exec_ms = sum(s.exec_ms for s in shares)
        return Usage(
            wal_bytes=wal,
            exec_ms=exec_ms,
            wal_shares=self._wal_shares(end_lsn),
            statement_shares=shares,
        )

    def _wal_shares(self, end_lsn: str) -> tuple[WalShare, ...]:
        """The window's WAL by relation and record type; empty where pg_walinspect cannot be
        had (read before anything drops the run's database: a checkpoint may recycle the
        window's WAL files)."""
        with psycopg.connect(self.poll_dsn, autocommit=True) as conn:
            if _tries(conn, "CREATE EXTENSION IF NOT EXISTS pg_walinspect"):
                return ()
            rows = conn.execute(_WAL_SHARES, {"start": self.lsn, "end": end_lsn}).fetchall()
        return tuple(WalShare(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows)


def _tries(conn: psycopg.Connection[Any], statement: LiteralString) -> str:
    """Runs ``statement``; returns "" or why it failed, in one line."""
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        return f"{statement.split()[0]} failed: {first_line(exc)}"
    return ""
