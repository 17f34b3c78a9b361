"""Server-side bounds on every statement of the store modules, applied one way for all of them.

``StatementTimeouts`` are the bounds (Postgres ``lock_timeout`` and ``statement_timeout``).
``SessionTimeouts`` tells which connections carry them for their whole session (the startup
options took). ``Bounds`` wraps one statement, or a transaction, on a connection so that it is
bounded either way::

    bounds = Bounds(timeouts, session)
    async with pool.connection() as conn, bounds.statement(conn):
        await conn.execute(...)

On a connection that kept its startup options a statement is one autocommit round trip.
Otherwise it runs in a short transaction of its own that first sets the bounds with
``set_config(..., true)``: transaction-local, so they hold behind a transaction-mode pooler
(which drops startup options and hands each transaction any server connection) and never leak
to another client; that costs BEGIN, set_config and COMMIT on top of the statement.

A store module, like ``store``: ``store.RecordStore`` and ``maintenance_store.MaintenanceStore``
both bound their statements here, so the two cannot drift apart.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from psycopg import AsyncConnection

from outbox_notifier.sqlfiles import query

logger = logging.getLogger(__name__)


class StatementTimeouts(msgspec.Struct, frozen=True, kw_only=True):
    """Server-side bounds for the daemon's statements (Postgres ``lock_timeout`` and
    ``statement_timeout``), so a lock held elsewhere costs a loop seconds, not its liveness."""

    lock_s: float
    statement_s: float

    @property
    def lock_ms(self) -> int:
        return max(1, round(self.lock_s * 1000))

    @property
    def statement_ms(self) -> int:
        return max(1, round(self.statement_s * 1000))

    def startup_options(self) -> str:
        """The bounds as libpq ``options``: set by the server for the whole session."""
        return f"-c lock_timeout={self.lock_ms} -c statement_timeout={self.statement_ms}"


async def set_timeouts(conn: AsyncConnection[Any], timeouts: StatementTimeouts) -> None:
    """Sets ``lock_timeout`` and ``statement_timeout`` for the current transaction only."""
    await conn.execute(
        query("set_timeouts"),
        {
            "lock_timeout": f"{timeouts.lock_ms}ms",
            "statement_timeout": f"{timeouts.statement_ms}ms",
        },
    )


class SessionTimeouts:
    """Tells which pool connections carry the timeouts for their whole session.

    On a direct connection the bounds go in the startup ``options`` once, and each statement
    is then one autocommit round trip. A pooler may drop startup options (PgBouncer's
    ``ignore_startup_parameters``), so the pool's ``configure`` callback reads the settings
    back; a connection where they did not take is not marked, and its statements set the
    bounds per transaction, which holds behind a transaction-mode pooler too.
    """

    def __init__(self, timeouts: StatementTimeouts) -> None:
        self.timeouts = timeouts
        self._bounded: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()

    async def configure(self, conn: AsyncConnection[Any]) -> None:
        cur = await conn.execute(query("session_timeouts"))
        row = await cur.fetchone()
        if row == (self.timeouts.lock_ms, self.timeouts.statement_ms):
            self._bounded.add(conn)
        else:
            logger.info(
                "database session did not keep its startup timeouts (a pooler?): "
                "setting them per transaction"
            )

    def holds(self, conn: AsyncConnection[Any]) -> bool:
        return conn in self._bounded


class Bounds:
    """Bounds the statements run on autocommit connections by ``timeouts`` (None: unbounded),
    set per transaction unless ``session`` says the connection carries them already."""

    def __init__(
        self, timeouts: StatementTimeouts | None, session: SessionTimeouts | None = None
    ) -> None:
        self.timeouts = timeouts
        self.session = session

    def needed(self, conn: AsyncConnection[Any]) -> StatementTimeouts | None:
        """The timeouts a transaction on ``conn`` must set itself (None: none, or it has them)."""
        if self.timeouts is None or (self.session is not None and self.session.holds(conn)):
            return None
        return self.timeouts

    @asynccontextmanager
    async def transaction(self, conn: AsyncConnection[Any]) -> AsyncIterator[None]:
        """A transaction on ``conn`` whose statements are bounded."""
        async with conn.transaction():
            timeouts = self.needed(conn)
            if timeouts is not None:
                await set_timeouts(conn, timeouts)
            yield

    @asynccontextmanager
    async def statement(self, conn: AsyncConnection[Any]) -> AsyncIterator[None]:
        """Around one statement on ``conn``: nothing when the connection needs no timeouts set
        (a bare autocommit statement, one round trip), else a bounded transaction of its own."""
        if self.needed(conn) is None:
            yield
        else:
            async with self.transaction(conn):
                yield
