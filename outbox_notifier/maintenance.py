"""The maintenance loop: metric snapshots on every replica (one cheap query on the partial
indexes; see the outbox_notifier.metrics docstring for how they are aggregated) with the
horizon check beside them (outbox_notifier.horizon), and retention on one replica at a time
(the holder of the maintenance lease, outbox_notifier.leadership)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import msgspec

from outbox_notifier import leadership, retention
from outbox_notifier.dbhealth import bounded, describe
from outbox_notifier.horizon import DEFAULT_WARN_S, HorizonWatch
from outbox_notifier.loops import LoopContext
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.store import DatabaseError, OperationalError

logger = logging.getLogger(__name__)

#: Snapshots are taken at least this often, however long the retention interval.
SNAPSHOT_MAX_INTERVAL_S = 5.0


@dataclasses.dataclass(eq=False)
class Maintenance:
    store: MaintenanceStore
    _: dataclasses.KW_ONLY
    interval_s: float
    retention: retention.RetentionPolicy
    # Read each turn, so the horizon gauges and /readyz lag a hold by one snapshot interval.
    horizon: HorizonWatch = dataclasses.field(
        default_factory=lambda: HorizonWatch(warn_s=DEFAULT_WARN_S)
    )

    async def run(self, ctx: LoopContext) -> None:
        snapshot_every_s = min(self.interval_s, SNAPSHOT_MAX_INTERVAL_S)
        next_purge = time.monotonic()
        try:
            while ctx.turn("maintenance"):
                # Each step is bounded by db_deadline_s, which is below health_stale_s; the
                # heartbeat beats before each, so a database that swallows every statement
                # costs the loop one deadline per beat, never the sum of them (a wedge).
                for step in (self._end_pauses, self._snapshot, self._check_horizon):
                    await step(ctx)
                    if not ctx.turn("maintenance"):
                        return
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self.interval_s
                    await self._purge(ctx)
                await ctx.sleep("maintenance", snapshot_every_s)
        finally:
            with contextlib.suppress(DatabaseError):
                await leadership.release_leadership(self.store)

    async def _snapshot(self, ctx: LoopContext) -> None:
        await ctx.metrics.snapshot(self.store, timeout_s=ctx.db_deadline_s)

    async def _check_horizon(self, ctx: LoopContext) -> None:
        await self.horizon.check(self.store, ctx.metrics, timeout_s=ctx.db_deadline_s)

    async def _end_pauses(self, ctx: LoopContext) -> None:
        """Marks resumed the operator pauses past their end, one log line each (claims stopped
        honouring them at their end already; this makes it visible)."""
        try:
            ended = await bounded(self.store.end_pauses(), ctx.db_deadline_s)
        except DatabaseError as exc:
            logger.warning("ending operator pauses failed: %s", describe(exc))
            ctx.metrics.database_error("maintenance")
            return
        for pause in ended:
            logger.info(
                "operator pause %d of %s ended at its end time; resumed",
                pause.id, pause.paused,
                extra={"pause_id": pause.id, "scope": pause.scope, "reason": pause.reason,
                       "paused_by": pause.paused_by, "since": pause.since.isoformat(),
                       "until": pause.until.isoformat()},
            )  # fmt: skip

    async def _purge(self, ctx: LoopContext) -> None:
        async def purge() -> retention.RetentionReport:
            return await retention.purge_once(
                self.store,
                **msgspec.structs.asdict(self.retention),
                # Each statement is bounded, not the pass: a backlog of finished rows may take
                # minutes to delete at the paced rate, beating the heartbeat batch by batch.
                deadline_s=ctx.db_deadline_s,
                keep_going=lambda: ctx.turn("maintenance"),
            )

        try:
            await leadership.run_if_leader(
                self.store, purge, ttl_s=3 * self.interval_s, deadline_s=ctx.db_deadline_s
            )
        except OperationalError as exc:
            logger.warning("retention failed, database unavailable: %s", describe(exc))
            ctx.metrics.database_error("maintenance")
            return
        # retention.purge_once logs what it deleted; one line per pass is enough.
