"""The daemon's connections: the pool, the start-up probe and the outbox listener.

A store module, like ``store``: the daemon asks it and never imports the driver. Every
connection carries the socket bounds, so a black-holed one fails instead of hanging.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.settings import Settings
from outbox_notifier.sqlfiles import query
from outbox_notifier.timeouts import SessionTimeouts, StatementTimeouts

#: The NOTIFY channel an outbox insert signals (sql/0001_schema.sql).
OUTBOX_CHANNEL = "outbox_notifier_outbox"

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


def socket_bounds(settings: Settings) -> dict[str, Any]:
    """libpq parameters that bound a connection whose packets stop arriving: the kernel gives
    up on unacknowledged data after ``tcp_user_timeout`` and on a silent idle peer after the
    keepalive probes, so a black-holed connection fails instead of hanging for minutes."""
    return {
        "connect_timeout": max(2, math.ceil(settings.tcp_user_timeout_s)),
        "tcp_user_timeout": max(1, round(settings.tcp_user_timeout_s * 1000)),
        "keepalives": 1,
        "keepalives_idle": settings.keepalives_idle_s,
        "keepalives_interval": settings.keepalives_interval_s,
        "keepalives_count": settings.keepalives_count,
    }


def statement_timeouts(settings: Settings) -> StatementTimeouts:
    return StatementTimeouts(
        lock_s=settings.lock_timeout_s, statement_s=settings.statement_timeout_s
    )


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """Pool connections: autocommit (each batch statement is its own short transaction), the
    socket bounds and, behind a transaction-mode pooler, no server-side prepared statements.

    On a direct connection (``prepared_statements``) the statement timeouts also go in the
    startup options, so statements need not set them per transaction (``SessionTimeouts``).
    They are added to any ``options`` the DSN already has. Behind a transaction-mode pooler
    they are left out: PgBouncer refuses a connection with options it was not told to ignore.
    """
    kwargs: dict[str, Any] = {"autocommit": True, **socket_bounds(settings)}
    if not settings.prepared_statements:
        kwargs["prepare_threshold"] = None
    else:
        own = psycopg.conninfo.conninfo_to_dict(settings.dsn).get("options") or ""
        bounds = statement_timeouts(settings).startup_options()
        kwargs["options"] = f"{own} {bounds}".strip()
    return kwargs


def session_timeouts(settings: Settings) -> SessionTimeouts | None:
    """What tells connections that kept their startup timeouts (see ``connection_kwargs``)."""
    if not settings.prepared_statements:
        return None
    return SessionTimeouts(statement_timeouts(settings))


def new_pool(settings: Settings, session: SessionTimeouts | None = None) -> Pool:
    """The daemon's pool, not yet open (``await pool.open(wait=False)``)."""
    return AsyncConnectionPool(
        settings.dsn,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        kwargs=connection_kwargs(settings),
        configure=None if session is None else session.configure,
        timeout=10.0,
        # The pool retries a lost connection with doubling delays (1, 2, 4 ... s): after a
        # long outage the next try could come half a minute after the database is back.
        # Giving up early instead lets the next request grow the pool at once.
        reconnect_timeout=max(5.0, settings.tcp_user_timeout_s),
        open=False,
        name="outbox-notifier",
    )


async def ping(settings: Settings) -> None:
    """One round trip on a connection of its own rather than the pool's: its error names the
    cause ("connection refused"), where the pool would only say it timed out."""
    async with await psycopg.AsyncConnection.connect(
        settings.dsn, **connection_kwargs(settings)
    ) as conn:
        await conn.execute(query("ping"))


@asynccontextmanager
async def outbox_listener(settings: Settings) -> AsyncIterator[OutboxListener]:
    """A connection LISTENing to outbox inserts (on ``listen_dsn``: a session of its own)."""
    async with await psycopg.AsyncConnection.connect(
        settings.effective_listen_dsn, autocommit=True, **socket_bounds(settings)
    ) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(OUTBOX_CHANNEL)))
        yield OutboxListener(conn)


class OutboxListener:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def notified(self, timeout_s: float) -> AsyncIterator[None]:
        """Yields once per notification until ``timeout_s`` passes."""
        async for _ in self._conn.notifies(timeout=timeout_s):
            yield None
