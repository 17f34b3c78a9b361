"""The lease that lets one replica at a time run retention (every replica takes the metric
snapshots: see outbox_notifier.metrics).

Leadership is a row of ``outbox_notifier.maintenance_leases``, taken by one conditional
``INSERT ... ON CONFLICT DO UPDATE`` on the database clock, rather than an advisory lock: a
transaction-scoped lock ends with its (short) transaction, and a session lock does not survive
a transaction-mode pooler, which may run each statement on a different server connection. The
lease works through PgBouncer and only needs the daemon's ordinary pool::

    store = MaintenanceStore(pool)
    report = await leadership.run_if_leader(
        store, maintenance_pass, ttl_s=3 * settings.maintenance_interval_s
    )  # None when another replica holds the lease
    ...
    await leadership.release_leadership(store)  # on shutdown

The holder renews its lease every ``ttl_s / 3`` while the pass runs and keeps it afterwards, so
one replica stays the leader from pass to pass while ``ttl_s`` exceeds the interval between
passes (the maintenance loop gives three intervals, so a late pass does not lose it); a leader
that dies is replaced once its lease expires. A holder that finds its lease taken over (it
stalled for longer than ``ttl_s``) cancels its pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from outbox_notifier.dbhealth import bounded
from outbox_notifier.maintenance_store import MaintenanceStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The lease that elects the replica running retention.
MAINTENANCE_LEASE = "maintenance"
# Identifies this process as a lease holder: unique across hosts, processes and restarts.
PROCESS_HOLDER = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
DEFAULT_LEASE_TTL_S = 300.0

# (lease, holder) pairs with a pass running in this process: a second call from the same holder
# would otherwise renew the lease it already holds and run alongside the first.
_running: set[tuple[str, str]] = set()


async def run_if_leader(
    store: MaintenanceStore,
    fn: Callable[[], Awaitable[T]],
    *,
    name: str = MAINTENANCE_LEASE,
    holder: str = PROCESS_HOLDER,
    ttl_s: float = DEFAULT_LEASE_TTL_S,
    deadline_s: float | None = None,
) -> T | None:
    """Runs ``fn`` when ``holder`` holds (or can take) the lease ``name``; else returns None.

    The lease is renewed every ``ttl_s / 3`` while ``fn`` runs and kept when it returns. If
    another holder took it over meanwhile, ``fn`` is cancelled and None returned. Each lease
    statement is bounded by ``deadline_s`` (``dbhealth.bounded``); ``fn`` bounds its own.
    """
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a finite number > 0, got {ttl_s!r}")
    key = (name, holder)
    if key in _running:
        return None
    _running.add(key)
    try:
        if not await bounded(store.take_lease(name, holder, ttl_s, renew=False), deadline_s):
            return None
        return await _run_renewing(store, fn, name, holder, ttl_s, deadline_s)
    finally:
        _running.discard(key)


async def release_leadership(
    store: MaintenanceStore, *, name: str = MAINTENANCE_LEASE, holder: str = PROCESS_HOLDER
) -> None:
    """Gives the lease up (on shutdown), so another replica takes over without waiting."""
    await store.release_lease(name, holder)


async def _run_renewing(
    store: MaintenanceStore,
    fn: Callable[[], Awaitable[T]],
    name: str,
    holder: str,
    ttl_s: float,
    deadline_s: float | None,
) -> T | None:
    job = asyncio.ensure_future(fn())
    try:
        while True:
            done, _ = await asyncio.wait({job}, timeout=ttl_s / 3)
            if done:
                return job.result()
            if not await bounded(store.take_lease(name, holder, ttl_s, renew=True), deadline_s):
                logger.warning("lease %s was taken over by another holder; stopping the pass", name)
                return None
    finally:
        # Lost lease, a failed renewal, or this task cancelled: the pass must not go on alone.
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
