"""The maintenance loop's statements: retention purges, the leader lease, the metrics snapshot.

A store module, like ``store``: ``retention``, ``leadership`` and ``metrics`` ask it and never
touch a connection themselves. It works over a pool (a connection per statement, returned in
between) or over one connection in autocommit mode, so that every statement commits on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.sqlfiles import query
from outbox_notifier.timeouts import StatementTimeouts, set_timeouts

#: One row of ``metrics_snapshot`` (sql/metrics.sql): kind, channel, status, count, age in s.
SnapshotRow = tuple[str, str | None, str | None, int, float | None]

_PURGES = {"outbox": "purge_outbox_batch", "records": "purge_records_batch"}


class MaintenanceStore:
    """Statements over a pool or one autocommit connection (``ValueError`` otherwise)."""

    def __init__(
        self,
        target: AsyncConnection[Any] | AsyncConnectionPool[Any],
        *,
        timeouts: StatementTimeouts | None = None,
    ) -> None:
        if isinstance(target, AsyncConnection) and not target.autocommit:
            raise ValueError("maintenance needs an autocommit connection: each batch must commit")
        self._target = target
        self.timeouts = timeouts

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        if isinstance(self._target, AsyncConnectionPool):
            async with self._target.connection() as conn:
                yield conn
        else:
            yield self._target

    async def purge_batch(
        self, table: Literal["outbox", "records"], max_age_s: float, limit: int
    ) -> int:
        """Deletes at most ``limit`` finished rows older than ``max_age_s``; returns how many."""
        async with self._connection() as conn:
            cur = await conn.execute(
                query(_PURGES[table]), {"max_age_s": max_age_s, "limit": limit}
            )
            return int(cur.rowcount)

    async def take_lease(self, name: str, holder: str, ttl_s: float, *, renew: bool) -> bool:
        """Takes (or, with ``renew``, only extends) the lease ``name``; True while it is held."""
        params = {"name": name, "holder": holder, "ttl_s": ttl_s}
        async with self._connection() as conn:
            cur = await conn.execute(query("renew_lease" if renew else "acquire_lease"), params)
            return await cur.fetchone() is not None

    async def release_lease(self, name: str, holder: str) -> None:
        async with self._connection() as conn:
            await conn.execute(query("release_lease"), {"name": name, "holder": holder})

    async def metrics_snapshot(self) -> list[SnapshotRow]:
        """The database gauges' rows, in one transaction bounded by the statement timeouts."""
        async with self._connection() as conn, conn.transaction():
            if self.timeouts is not None:
                await set_timeouts(conn, self.timeouts)
            cur = await conn.execute(query("metrics_snapshot"))
            return await cur.fetchall()
