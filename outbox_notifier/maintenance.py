"""The maintenance loop: metric snapshots on every replica (one cheap query on the partial
indexes, paced like a sweep when a held snapshot makes it slow: ``sweeps``; see the
outbox_notifier.metrics docstring for how they are aggregated) with the
horizon check beside them (outbox_notifier.horizon), and retention on one replica at a time
(the holder of the maintenance lease, outbox_notifier.leadership).

On a freshly migrated database the loop also gives the outbox and the records their first
statistics as soon as they hold ``FIRST_ANALYZE_ROWS`` rows, instead of waiting a minute or more
for autovacuum: the statements planned while the tables were empty read them whole, at a cost
that grows with every row, until then (migration 0019 has the figures). Once both tables have
been analyzed, by the daemon or by autovacuum, it stops asking."""

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
from outbox_notifier.store import DatabaseError, NotCallable, OperationalError
from outbox_notifier.sweeps import SweepSchedule, paced_schedule

logger = logging.getLogger(__name__)

#: Snapshots are taken at least this often, however long the retention interval.
SNAPSHOT_MAX_INTERVAL_S = 5.0
#: Rows a never-analyzed busy table holds before the daemon analyzes it: enough for plans that
#: read by index, few enough that the slow plans have not cost much yet (a few seconds of
#: traffic at a few hundred events a second; ANALYZE of them takes milliseconds).
FIRST_ANALYZE_ROWS = 1000
#: How often the loop turns while a busy table was never analyzed (a fresh install's first
#: seconds; on a database in use the first turn finds both analyzed and stops asking).
FRESH_CHECK_S = 1.0


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
    # Until both busy tables have been analyzed once (module docstring).
    fresh_tables: bool = True
    # Each turn while snapshots are quick (every_s 0: the loop's pace); once two in a row are
    # slow (a held snapshot: see ``sweeps``), 1% of the time, a minute apart at most. The gauges
    # are then older; the horizon's are still read each turn.
    snapshots: SweepSchedule = dataclasses.field(default_factory=lambda: paced_schedule(0.0))

    async def run(self, ctx: LoopContext) -> None:
        snapshot_every_s = min(self.interval_s, SNAPSHOT_MAX_INTERVAL_S)
        next_purge = time.monotonic()
        try:
            while ctx.turn("maintenance"):
                # Each step is bounded by db_deadline_s, which is below health_stale_s; the
                # heartbeat beats before each, so a database that swallows every statement
                # costs the loop one deadline per beat, never the sum of them (a wedge).
                steps = (self._end_pauses, self._snapshot, self._check_horizon, self._analyze)
                for step in steps:
                    await step(ctx)
                    if not ctx.turn("maintenance"):
                        return
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self.interval_s
                    await self._purge(ctx)
                # A fresh table costs more with every row until it is analyzed: look often.
                pause_s = (
                    min(FRESH_CHECK_S, snapshot_every_s) if self.fresh_tables else snapshot_every_s
                )
                await ctx.sleep("maintenance", pause_s)
        finally:
            with contextlib.suppress(DatabaseError):
                await leadership.release_leadership(self.store)

    async def _snapshot(self, ctx: LoopContext) -> None:
        if not self.snapshots.begin():
            return
        try:
            await ctx.metrics.snapshot(self.store, timeout_s=ctx.db_deadline_s)
        finally:
            self.snapshots.end()

    async def _check_horizon(self, ctx: LoopContext) -> None:
        await self.horizon.check(self.store, ctx.metrics, timeout_s=ctx.db_deadline_s)

    async def _analyze(self, ctx: LoopContext) -> None:
        """The busy tables' first ANALYZE, while one of them never had it (module docstring)."""
        if not self.fresh_tables:
            return
        try:
            fresh = await bounded(
                self.store.analyze_fresh_tables(FIRST_ANALYZE_ROWS), ctx.db_deadline_s
            )
        except NotCallable as exc:  # a role or schema that does not allow it: autovacuum will
            logger.warning("first analyze of the tables left to autovacuum: %s", describe(exc))
            self.fresh_tables = False
            return
        except DatabaseError as exc:  # a lock held on the table, say: the next turn tries again
            logger.debug("first analyze of the tables not done yet: %s", describe(exc))
            return
        for table, analyzed in fresh:
            if analyzed:
                logger.info(
                    "analyzed %s for the first time: statements planned on the empty table are "
                    "planned again", table, extra={"table": table, "min_rows": FIRST_ANALYZE_ROWS},
                )  # fmt: skip
        self.fresh_tables = not all(analyzed for _, analyzed in fresh)

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
