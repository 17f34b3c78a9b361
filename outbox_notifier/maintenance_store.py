"""The maintenance loop's statements: retention purges, the leader lease, the metrics snapshot,
what holds the database back (the xmin horizon, dead tuples), and the busy tables' first
statistics.

A store module, like ``store``: ``retention``, ``leadership`` and ``metrics`` ask it and never
touch a connection themselves. It works over a pool (a connection per statement, returned in
between) or over one connection in autocommit mode, so that every statement commits on its own.
Its statements are those of ``sql/maintenance.sql``.

Every statement runs under the same ``StatementTimeouts`` as the pipeline's, applied the same
way (``timeouts.Bounds``): a purge blocked by a table lock, or a lease row held by a stalled
transaction, fails at ``lock_timeout`` instead of stalling the maintenance loop, behind a
transaction-mode pooler too. No statement here gets a longer ``statement_timeout``: a purge is
one batch of at most ``retention_batch_size`` rows on a partial index (a batch of 1000 took
about 12 ms in bench/README.md, 82,016 records/s unpaced: far under the 30 s default), and the
snapshot reads only live work. A batch that still overruns is cancelled whole (nothing of it is
deleted) and the next pass tries again; a smaller ``retention_batch_size`` is the remedy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal, NamedTuple

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.sqlfiles import query
from outbox_notifier.timeouts import Bounds, SessionTimeouts, StatementTimeouts

#: One row of ``metrics_snapshot`` (sql/maintenance.sql): kind, channel, status, count, age in s.
SnapshotRow = tuple[str, str | None, str | None, int, float | None]
#: The row of ``xmin_horizon``: sees every session, age in s, age in xids, the oldest holder.
HorizonRow = tuple[bool, float, int, str | None]
#: One row of ``table_tuples``: table, live tuples, dead tuples.
TuplesRow = tuple[str, int, int]


class EndedPause(NamedTuple):
    """An operator pause whose end passed, as ``end_pauses`` marked it resumed."""

    id: int
    scope: str
    paused: str  # the target's host, "user N" or "provider P": never a URL
    reason: str
    paused_by: str
    since: datetime
    until: datetime


_PURGES = {"outbox": "purge_outbox_batch", "records": "purge_records_batch"}


class MaintenanceStore:
    """Statements over a pool or one autocommit connection (``ValueError`` otherwise), each
    bounded by ``timeouts`` as ``store.RecordStore``'s are (``session``: which pool connections
    carry them from their startup options)."""

    def __init__(
        self,
        target: AsyncConnection[Any] | AsyncConnectionPool[Any],
        *,
        timeouts: StatementTimeouts | None = None,
        session: SessionTimeouts | None = None,
    ) -> None:
        if isinstance(target, AsyncConnection) and not target.autocommit:
            raise ValueError("maintenance needs an autocommit connection: each batch must commit")
        self._target = target
        self._bounds = Bounds(timeouts, session)

    @asynccontextmanager
    async def _statement(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection for one bounded statement (``timeouts.Bounds.statement``)."""
        if isinstance(self._target, AsyncConnectionPool):
            async with self._target.connection() as conn, self._bounds.statement(conn):
                yield conn
        else:
            async with self._bounds.statement(self._target):
                yield self._target

    async def purge_batch(
        self, table: Literal["outbox", "records"], max_age_s: float, limit: int
    ) -> int:
        """Deletes at most ``limit`` finished rows older than ``max_age_s``; returns how many."""
        async with self._statement() as conn:
            cur = await conn.execute(
                query(_PURGES[table]), {"max_age_s": max_age_s, "limit": limit}
            )
            return int(cur.rowcount)

    async def take_lease(self, name: str, holder: str, ttl_s: float, *, renew: bool) -> bool:
        """Takes (or, with ``renew``, only extends) the lease ``name``; True while it is held."""
        params = {"name": name, "holder": holder, "ttl_s": ttl_s}
        async with self._statement() as conn:
            cur = await conn.execute(query("renew_lease" if renew else "acquire_lease"), params)
            return await cur.fetchone() is not None

    async def release_lease(self, name: str, holder: str) -> None:
        async with self._statement() as conn:
            await conn.execute(query("release_lease"), {"name": name, "holder": holder})

    async def metrics_snapshot(self) -> list[SnapshotRow]:
        """The database gauges' rows."""
        async with self._statement() as conn:
            cur = await conn.execute(query("metrics_snapshot"))
            return await cur.fetchall()

    async def end_pauses(self) -> list[EndedPause]:
        """Marks resumed the operator pauses past their end; returns them."""
        async with self._statement() as conn:
            cur = await conn.execute(query("end_pauses"))
            return [EndedPause(*row) for row in await cur.fetchall()]

    async def xmin_horizon(self) -> HorizonRow:
        """What holds back vacuum of this database (see ``xmin_horizon`` in sql/maintenance.sql)."""
        async with self._statement() as conn:
            cur = await conn.execute(query("xmin_horizon"))
            row = await cur.fetchone()
            assert row is not None  # an aggregate: always one row
            sees_all, age_s, age_xids, holder = row
            return bool(sees_all), float(age_s), int(age_xids), holder

    async def analyze_fresh_tables(self, min_rows: int) -> list[tuple[str, bool]]:
        """Analyzes the busy tables never analyzed that hold ``min_rows`` rows; returns each
        table never analyzed before the call, with whether it was analyzed now."""
        async with self._statement() as conn:
            cur = await conn.execute(query("analyze_fresh_tables"), {"min_rows": min_rows})
            return [(str(table), bool(analyzed)) for table, analyzed in await cur.fetchall()]

    async def table_tuples(self) -> list[TuplesRow]:
        """Live and dead tuples of each table of the schema."""
        async with self._statement() as conn:
            cur = await conn.execute(query("table_tuples"))
            return [(str(t), int(live), int(dead)) for t, live, dead in await cur.fetchall()]
