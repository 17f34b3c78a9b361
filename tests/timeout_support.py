"""The maintenance statements, each with a lock held elsewhere that it has to wait for: what the
statement-timeout tests, direct and behind PgBouncer, block them with."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg
import pytest

from outbox_notifier.maintenance_store import MaintenanceStore

LEASE = "maintenance"
_LOCK_LEASE_ROW = (
    "SELECT 1 FROM outbox_notifier.maintenance_leases WHERE name = 'maintenance' FOR UPDATE"
)

#: By statement name: the lock to hold, and the store call that runs it.
BLOCKED_MAINTENANCE: dict[str, tuple[str, Callable[[MaintenanceStore], Awaitable[object]]]] = {
    "purge_outbox_batch": (
        "LOCK TABLE outbox_notifier.outbox IN ACCESS EXCLUSIVE MODE",
        lambda store: store.purge_batch("outbox", 60.0, 10),
    ),
    "purge_records_batch": (
        "LOCK TABLE outbox_notifier.notification_records IN ACCESS EXCLUSIVE MODE",
        lambda store: store.purge_batch("records", 60.0, 10),
    ),
    "acquire_lease": (
        _LOCK_LEASE_ROW,
        lambda store: store.take_lease(LEASE, "replica-b", 60.0, renew=False),
    ),
    "renew_lease": (
        _LOCK_LEASE_ROW,
        lambda store: store.take_lease(LEASE, "replica-a", 60.0, renew=True),
    ),
    "release_lease": (_LOCK_LEASE_ROW, lambda store: store.release_lease(LEASE, "replica-a")),
    "metrics_snapshot": (
        "LOCK TABLE outbox_notifier.notification_records IN ACCESS EXCLUSIVE MODE",
        lambda store: store.metrics_snapshot(),
    ),
}


async def assert_fails_at_lock_timeout(db: str, store: MaintenanceStore, statement: str) -> None:
    """While a direct connection to ``db`` holds the lock, ``statement`` fails with
    ``LockNotAvailable`` (lock_timeout fired, not statement_timeout nor the client's 3 s),
    and once it is released the same statement runs through the same store."""
    lock, call = BLOCKED_MAINTENANCE[statement]
    # The lease statements wait on the lease row: replica-a holds it.
    assert await store.take_lease(LEASE, "replica-a", 60.0, renew=False)
    with psycopg.connect(db) as holder:
        holder.execute(lock)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await asyncio.wait_for(call(store), 3.0)
    await asyncio.wait_for(call(store), 3.0)
