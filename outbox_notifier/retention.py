"""Retention of finished rows: the outbox rows relayed or rejected, the records finished.

`purge_once` deletes finished outbox rows (relayed, rejected) by ``created_at`` and terminal
records (sent, dead, skipped) by ``updated_at``, with their ``delivery_attempts`` (ON DELETE
CASCADE). Each batch is one short statement, its own transaction, that row-locks with
``FOR UPDATE SKIP LOCKED`` and deletes at most ``batch_size`` rows oldest first on the partial
indexes ``outbox_finished_idx`` and ``records_terminal_idx``: no long lock, no long transaction,
no burst of WAL, and rows that a worker or an operator holds are left for the next pass.

Deleting a record ends its deduplication: an outbox row that arrives later with the same
``(channel, dedupe_key)`` creates a new record and is delivered again. ``records_max_age_s``
(the ``records_retention_s`` setting, 30 days by default) is therefore also the dedupe window.

Retention yields to delivery: after each full batch it rests ``pause_factor`` times as long as
the batch took (1.0 by default: at most half of one database core, and of the WAL's
bandwidth, while a backlog of finished rows is deleted). A batch's delete competes with the
delivery's claims and applies for CPU and for the same WAL flush. In the benchmark
(bench/README.md) a 1,000,000-row purge at full speed took delivery latency p99 to 68 ms on a
busy machine and to 17 ms on a quiet one; paced, 11-13 ms, at about 40,000 records/s.

One replica at a time runs it: see ``outbox_notifier.leadership``. The statements are
``MaintenanceStore``'s::

    report = await retention.purge_once(
        MaintenanceStore(pool),
        outbox_max_age_s=settings.outbox_retention_s,
        records_max_age_s=settings.records_retention_s,
    )
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Literal

import msgspec

from outbox_notifier.dbhealth import bounded
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000
DEFAULT_PAUSE_FACTOR = 1.0
# A pause never exceeds this, however slow a batch was (a stall must not stall the next pass).
MAX_PAUSE_S = 1.0


class RetentionReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one retention pass deleted."""

    outbox_deleted: int
    records_deleted: int  # their delivery_attempts went with them


class RetentionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What a pass deletes and how it paces itself, as one value: its fields are `purge_once`'s
    keywords of the same names (which checks them), so a loop that runs pass after pass holds
    one policy rather than four loose values."""

    outbox_max_age_s: float
    records_max_age_s: float
    batch_size: int = DEFAULT_BATCH_SIZE
    pause_factor: float = DEFAULT_PAUSE_FACTOR

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        """The daemon's policy: the ages are the ``outbox_retention_s`` and
        ``records_retention_s`` settings, the pacing the ``retention_*`` ones."""
        return cls(
            outbox_max_age_s=settings.outbox_retention_s,
            records_max_age_s=settings.records_retention_s,
            batch_size=settings.retention_batch_size,
            pause_factor=settings.retention_pause_factor,
        )


async def purge_once(
    store: MaintenanceStore,
    *,
    outbox_max_age_s: float,
    records_max_age_s: float,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pause_factor: float = DEFAULT_PAUSE_FACTOR,
    deadline_s: float | None = None,
    keep_going: Callable[[], bool] = lambda: True,
) -> RetentionReport:
    """Deletes the finished rows older than the given ages, batch by batch, until none is left;
    every batch commits on its own, and a full one is followed by a pause of ``pause_factor``
    times its duration (0: none).

    A large backlog takes many batches: ``deadline_s`` bounds each batch's statement (a
    ``dbhealth.DeadlineExceeded`` ends the pass; the batches before it are kept), not the
    pass. ``keep_going`` is asked before each batch: the maintenance loop beats its heartbeat
    there, and says stop when the daemon is stopping."""
    for name, age in (
        ("outbox_max_age_s", outbox_max_age_s),
        ("records_max_age_s", records_max_age_s),
    ):
        if not (math.isfinite(age) and age > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {age!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if not (math.isfinite(pause_factor) and pause_factor >= 0):
        raise ValueError(f"pause_factor must be a finite number >= 0, got {pause_factor!r}")
    pacing = _Pacing(batch_size, pause_factor, deadline_s, keep_going)
    outbox = await _purge(store, "outbox", outbox_max_age_s, pacing)
    records = await _purge(store, "records", records_max_age_s, pacing)
    if outbox or records:
        logger.info("retention deleted %d outbox rows and %d records", outbox, records)
    return RetentionReport(outbox_deleted=outbox, records_deleted=records)


class _Pacing(msgspec.Struct, frozen=True):
    batch_size: int
    pause_factor: float
    deadline_s: float | None
    keep_going: Callable[[], bool]


async def _purge(
    store: MaintenanceStore,
    table: Literal["outbox", "records"],
    max_age_s: float,
    pacing: _Pacing,
) -> int:
    total = 0
    while pacing.keep_going():
        started = time.monotonic()
        deleted = await bounded(
            store.purge_batch(table, max_age_s, pacing.batch_size), pacing.deadline_s
        )
        total += deleted
        if deleted < pacing.batch_size:
            return total
        if pacing.pause_factor > 0:
            took = time.monotonic() - started
            await asyncio.sleep(min(took * pacing.pause_factor, MAX_PAUSE_S))
    return total
