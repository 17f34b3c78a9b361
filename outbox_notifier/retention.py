"""Retention of finished rows, and the lease that lets one replica at a time run maintenance.

`purge_once` deletes finished outbox rows (relayed, rejected) by ``created_at`` and terminal
records (sent, dead, skipped) by ``updated_at``, with their ``delivery_attempts`` (ON DELETE
CASCADE). Each batch is one short statement, its own transaction, that row-locks with
``FOR UPDATE SKIP LOCKED`` and deletes at most ``batch_size`` rows oldest first on the partial
indexes ``outbox_finished_idx`` and ``records_terminal_idx``: no long lock, no long transaction,
no burst of WAL, and rows that a worker or an operator holds are left for the next pass.

Deleting a record ends its deduplication: an outbox row that arrives later with the same
``(channel, dedupe_key)`` creates a new record and is delivered again. ``records_max_age_s``
(the ``records_retention_s`` setting, 30 days by default) is therefore also the dedupe window.

Leadership is a row of ``outbox_notifier.maintenance_leases``, taken by one conditional
``INSERT ... ON CONFLICT DO UPDATE`` on the database clock, rather than an advisory lock: a
transaction-scoped lock ends with its (short) transaction, and a session lock does not survive
a transaction-mode pooler, which may run each statement on a different server connection. The
lease works through PgBouncer and only needs the daemon's ordinary pool::

    async def maintenance_pass() -> retention.RetentionReport:
        return await retention.purge_once(
            pool,
            outbox_max_age_s=settings.outbox_retention_s,
            records_max_age_s=settings.records_retention_s,
        )

    report = await retention.run_if_leader(
        pool, maintenance_pass, ttl_s=2 * settings.maintenance_interval_s
    )  # None when another replica holds the lease
    ...
    await retention.release_leadership(pool)  # on shutdown

The holder renews its lease every ``ttl_s / 3`` while the pass runs and keeps it afterwards, so
one replica stays the leader from pass to pass while ``ttl_s`` exceeds the interval between
passes; a leader that dies is replaced once its lease expires. A holder that finds its lease
taken over (it stalled for longer than ``ttl_s``) cancels its pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, LiteralString, TypeVar

import msgspec
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.sqlfiles import query

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The lease that elects the replica running retention and metric snapshots.
MAINTENANCE_LEASE = "maintenance"
# Identifies this process as a lease holder: unique across hosts, processes and restarts.
PROCESS_HOLDER = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

DEFAULT_OUTBOX_RETENTION_S = 7 * 86_400.0
DEFAULT_RECORDS_RETENTION_S = 30 * 86_400.0
DEFAULT_BATCH_SIZE = 1000
DEFAULT_LEASE_TTL_S = 300.0

# (lease, holder) pairs with a pass running in this process: a second call from the same holder
# would otherwise renew the lease it already holds and run alongside the first.
_running: set[tuple[str, str]] = set()


class RetentionReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one retention pass deleted."""

    outbox_deleted: int
    records_deleted: int  # their delivery_attempts went with them


ConnOrPool = AsyncConnection[Any] | AsyncConnectionPool[Any]


async def purge_once(
    conn_or_pool: ConnOrPool,
    *,
    outbox_max_age_s: float,
    records_max_age_s: float,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RetentionReport:
    """Deletes the finished rows older than the given ages, batch by batch, until none is left.

    ``conn_or_pool`` is a pool, whose connection is taken per batch and returned in between, or
    a connection in autocommit mode, so that every batch commits on its own.
    """
    for name, age in (
        ("outbox_max_age_s", outbox_max_age_s),
        ("records_max_age_s", records_max_age_s),
    ):
        if not (math.isfinite(age) and age > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {age!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(conn_or_pool, AsyncConnection) and not conn_or_pool.autocommit:
        raise ValueError("retention needs an autocommit connection: each batch must commit")

    outbox = await _purge(conn_or_pool, query("purge_outbox_batch"), outbox_max_age_s, batch_size)
    records = await _purge(
        conn_or_pool, query("purge_records_batch"), records_max_age_s, batch_size
    )
    if outbox or records:
        logger.info("retention deleted %d outbox rows and %d records", outbox, records)
    return RetentionReport(outbox_deleted=outbox, records_deleted=records)


async def _purge(
    target: ConnOrPool, statement: LiteralString, max_age_s: float, batch_size: int
) -> int:
    params = {"max_age_s": max_age_s, "limit": batch_size}
    total = 0
    while True:
        deleted = await _execute(target, statement, params)
        total += deleted
        if deleted < batch_size:
            return total


async def _execute(target: ConnOrPool, statement: LiteralString, params: Mapping[str, Any]) -> int:
    """Runs one statement as its own transaction; returns the number of rows it touched."""
    if isinstance(target, AsyncConnectionPool):
        async with target.connection() as conn:
            cur = await conn.execute(statement, params)
            return int(cur.rowcount)
    cur = await target.execute(statement, params)
    return int(cur.rowcount)


# -- leadership --------------------------------------------------------------------------------


async def run_if_leader(
    pool: AsyncConnectionPool[Any],
    fn: Callable[[], Awaitable[T]],
    *,
    name: str = MAINTENANCE_LEASE,
    holder: str = PROCESS_HOLDER,
    ttl_s: float = DEFAULT_LEASE_TTL_S,
) -> T | None:
    """Runs ``fn`` when ``holder`` holds (or can take) the lease ``name``; else returns None.

    The lease is renewed every ``ttl_s / 3`` while ``fn`` runs and kept when it returns. If
    another holder took it over meanwhile, ``fn`` is cancelled and None returned.
    """
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a finite number > 0, got {ttl_s!r}")
    key = (name, holder)
    if key in _running:
        return None
    _running.add(key)
    try:
        if not await _lease(pool, "acquire_lease", name, holder, ttl_s):
            return None
        return await _run_renewing(pool, fn, name, holder, ttl_s)
    finally:
        _running.discard(key)


async def release_leadership(
    pool: AsyncConnectionPool[Any], *, name: str = MAINTENANCE_LEASE, holder: str = PROCESS_HOLDER
) -> None:
    """Gives the lease up (on shutdown), so another replica takes over without waiting."""
    async with pool.connection() as conn:
        await conn.execute(query("release_lease"), {"name": name, "holder": holder})


async def _lease(
    pool: AsyncConnectionPool[Any], statement: str, name: str, holder: str, ttl_s: float
) -> bool:
    params = {"name": name, "holder": holder, "ttl_s": ttl_s}
    async with pool.connection() as conn:
        cur = await conn.execute(query(statement), params)
        return await cur.fetchone() is not None


async def _run_renewing(
    pool: AsyncConnectionPool[Any],
    fn: Callable[[], Awaitable[T]],
    name: str,
    holder: str,
    ttl_s: float,
) -> T | None:
    job = asyncio.ensure_future(fn())
    try:
        while True:
            done, _ = await asyncio.wait({job}, timeout=ttl_s / 3)
            if done:
                return job.result()
            if not await _lease(pool, "renew_lease", name, holder, ttl_s):
                logger.warning("lease %s was taken over by another holder; stopping the pass", name)
                return None
    finally:
        # Lost lease, a failed renewal, or this task cancelled: the pass must not go on alone.
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
