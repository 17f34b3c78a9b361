"""Whether something holds the database back: the xmin horizon and the dead tuples behind it.

Vacuum keeps every row version that a snapshot might still see. A snapshot left open on the
primary (a forgotten ``BEGIN`` in REPEATABLE READ, a long analytics query, a prepared
transaction, a replication slot or a standby's ``hot_standby_feedback``) stops it cleaning the
daemon's tables, whose rows are updated several times each: dead tuples pile up, claims walk
over them and get slower for as long as the hold lasts. The daemon cannot end the hold; it says
so, with the numbers and the holder:

- gauges ``xmin_horizon_age_seconds`` and ``xmin_horizon_age_xids`` (NaN: unknown, when this
  role cannot see other roles' sessions or the read failed) and ``dead_tuples{table}``;
- one log line when the horizon passes ``warn_s``, naming the holder, and one when it is free;
- a ``horizon`` entry in the ``/readyz`` answer while it is held, which never fails readiness:
  every replica would leave service for something none of them can change.

The holder is a pid, user, state and ``application_name`` (or a slot or a prepared
transaction), never a query's text, which may hold secrets. It is not a metric label: pids are
unbounded. Usage::

    watch = HorizonWatch(warn_s=settings.horizon_warn_s)
    await watch.check(maintenance_store, metrics, timeout_s=35.0)  # each maintenance turn
    watch.readiness_detail()  # {} or {"horizon": {...}} for /readyz
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import msgspec

from outbox_notifier.dbhealth import bounded, first_line
from outbox_notifier.maintenance_store import MaintenanceStore, TuplesRow
from outbox_notifier.store import DatabaseError

if TYPE_CHECKING:
    from outbox_notifier.metrics import Metrics

logger = logging.getLogger(__name__)

#: The ``horizon_warn_s`` default: a hold this old is named in the log and on ``/readyz``; the
#: alert OutboxNotifierDatabaseHorizonHeld uses the same threshold.
DEFAULT_WARN_S: Final = 30.0
#: What the monitoring role lacks when it sees only its own sessions.
GRANT_HINT: Final = "GRANT pg_read_all_stats TO outbox_notifier_daemon"


class Horizon(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of ``xmin_horizon`` (sql/maintenance.sql).

    ``age_s``: how long the oldest holder with a clock (a session's transaction, a prepared
    transaction) has held it; ``age_xids``: how many transactions the horizon lags, the only
    age a replication slot has. Both 0 when nothing holds it. ``sees_all`` False: other roles'
    sessions were invisible, so the ages are a lower bound.
    """

    sees_all: bool
    age_s: float
    age_xids: int
    holder: str | None


class HorizonWatch:
    """The last horizon reading, told to the metrics, the log and ``/readyz``."""

    def __init__(self, *, warn_s: float) -> None:
        self.warn_s = warn_s
        self.last: Horizon | None = None
        self._warned_holder: str | None = None
        self._told_blind = False

    async def check(self, store: MaintenanceStore, metrics: Metrics, *, timeout_s: float) -> None:
        """Reads the horizon and the tables' tuples (two statements, each may fail alone: a
        failure leaves its gauges unknown, not stale)."""
        horizon: Horizon | None = None
        try:
            sees_all, age_s, age_xids, holder = await bounded(store.xmin_horizon(), timeout_s)
            horizon = Horizon(sees_all=sees_all, age_s=age_s, age_xids=age_xids, holder=holder)
        except DatabaseError as exc:
            metrics.database_error("maintenance")
            logger.warning("horizon check failed: %s", first_line(exc))
        tuples: list[TuplesRow] | None = None
        try:
            tuples = await bounded(store.table_tuples(), timeout_s)
        except DatabaseError as exc:
            metrics.database_error("maintenance")
            logger.warning("dead tuples check failed: %s", first_line(exc))
        metrics.apply_horizon(horizon)
        metrics.apply_table_tuples(tuples)
        self.observe(horizon)

    def observe(self, horizon: Horizon | None) -> None:
        """Keeps ``horizon`` for `readiness_detail` and logs the changes that matter."""
        self.last = horizon
        if horizon is None:
            return
        if not horizon.sees_all and not self._told_blind:
            self._told_blind = True
            logger.warning(
                "cannot see other roles' sessions, so the database horizon is unknown: %s",
                GRANT_HINT,
            )
        held = horizon.age_s >= self.warn_s
        if held and horizon.holder != self._warned_holder:
            self._warned_holder = horizon.holder
            logger.warning(
                "database horizon held for %.0fs (%d transactions) by %s: vacuum cannot clean "
                "the daemon's tables and claims slow down until it ends (runbook: "
                "OutboxNotifierDatabaseHorizonHeld)",
                horizon.age_s, horizon.age_xids, horizon.holder or "an unknown holder",
            )  # fmt: skip
        elif not held and self._warned_holder is not None:
            logger.info("database horizon no longer held (was held by %s)", self._warned_holder)
            self._warned_holder = None

    def readiness_detail(self) -> dict[str, Any]:
        """``{"horizon": ...}`` while the horizon is held past ``warn_s`` or unknown, else
        ``{}``. Never a reason to fail readiness (see the module docstring)."""
        horizon = self.last
        if horizon is None:
            return {}
        if horizon.age_s >= self.warn_s:
            detail: dict[str, Any] = {
                "held_s": round(horizon.age_s),
                "held_xids": horizon.age_xids,
                "by": horizon.holder or "unknown",
            }
            if not horizon.sees_all:
                detail["note"] = f"other roles' sessions are not visible: {GRANT_HINT}"
            return {"horizon": detail}
        if not horizon.sees_all:
            return {"horizon": f"unknown: other roles' sessions are not visible: {GRANT_HINT}"}
        return {}
