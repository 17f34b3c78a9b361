"""Prometheus collectors on an injected registry, fed with the pipeline's own objects.

Every name starts ``outbox_notifier_``; counters end ``_total``, durations ``_seconds`` and the
one count histogram ``_records`` (records per message).
Label values are bounded: channels (``channel``: the record's logical channel, the dedupe
namespace), providers (``provider``: the platform that made the call), statuses, outcomes,
error codes, reason classes and loop names, never a user id, URL or dedupe key. A value outside
a known set (an error code a new provider invents, say) is exported as ``other`` rather than
growing a new series.

Three kinds of source::

    metrics = Metrics(registry)
    metrics.observe_relay(report)               # events, as the loops produce them
    metrics.track(listener_up=..., in_flight=...)  # process state, read at scrape time
    await metrics.snapshot(maintenance_store)   # database state, every few seconds

Database-wide gauges, decided once, here: the snapshot gauges (records, oldest ages, outbox
backlog, paused targets) and ``database_failing`` describe the database, not this replica, and
*every* replica exports them (every replica takes the snapshot: one cheap query on partial
indexes, and no gap when a replica goes away). So queries must count each fact once per job,
never sum across replicas or alert per instance: the backlog gauges are read from the replica
with the freshest ``snapshot_timestamp_seconds`` (a replica whose snapshot fails keeps stale
values), the others with ``max by (job)``. deploy/prometheus/alerts.yml and the Grafana
dashboard do so, and a test checks it. The horizon and tuple gauges (outbox_notifier.horizon)
are among the others: a replica whose read fails sets them to NaN rather than keeping stale
values, and ``max`` passes over NaN.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from outbox_notifier import __version__, tracing
from outbox_notifier.dbhealth import bounded, first_line
from outbox_notifier.events import REASON_CLASSES
from outbox_notifier.maintenance_store import MaintenanceStore, SnapshotRow, TuplesRow
from outbox_notifier.names import CHANNEL, PROVIDER_NAMES, ErrorCode, Outcome
from outbox_notifier.reports import RelayReport
from outbox_notifier.store import AppliedRecord, AttemptResult, DatabaseError, RescuedRecord

if TYPE_CHECKING:
    from outbox_notifier.horizon import Horizon

logger = logging.getLogger(__name__)

NAMESPACE: Final = "outbox_notifier"
OTHER: Final = "other"

#: Statuses the snapshot counts: live work, each on its partial index (see sql/maintenance.sql).
SNAPSHOT_STATUSES: Final = ("pending", "sending", "failed")
#: The scopes of an operator pause (the pauses table's CHECK): the operator_pauses label.
PAUSE_SCOPES: Final = ("target", "recipient", "provider")
#: The daemon's tables whose tuples are exported from the start (others once seen).
TUPLE_TABLES: Final = ("outbox", "notification_records", "delivery_attempts", "targets")
#: Loop names for ``database_errors_total`` and ``claim_duration_seconds``.
LOOPS: Final = ("relay", "delivery", "apply", "rescue", "listener", "maintenance")
#: Loops whose database calls report to ``database_failing`` (see outbox_notifier.dbhealth).
DATABASE_LOOPS: Final = ("startup", "relay", "delivery", "apply", "rescue")

# A labelled metric whose children Metrics keeps (see Metrics._child).
_Labelled = TypeVar("_Labelled", Counter, Histogram)

_OUTCOMES: Final = frozenset(str(o) for o in Outcome)
_ERROR_CODES: Final = frozenset(str(c) for c in ErrorCode)
_REASON_CLASSES: Final = frozenset(REASON_CLASSES)

# A provider call is capped by the HTTP timeout (5 s by default).
PROVIDER_CALL_BUCKETS_S: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Outbox commit -> sent: milliseconds when all is well, hours through the retry schedule
# (5 attempts, backoff up to 30 min) or an outage.
END_TO_END_BUCKETS_S: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
)  # fmt: skip
CLAIM_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Records one message carries: 1 for a call of its own, up to digest_max_records (20) and a
# few above it for a raised setting.
MESSAGE_RECORDS_BUCKETS: Final = (1, 2, 3, 5, 10, 15, 20, 30, 50)
#: The kinds of message (the ``kind`` label): one record, or several (a digest).
MESSAGE_KINDS: Final = ("single", "digest")


def _bounded(value: str | None, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


class Metrics:
    """Every collector of the daemon, registered on ``registry``.

    ``channels`` are pre-created in every per-channel series, so dashboards and alerts see
    zeros from the start rather than missing data.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        channels: Sequence[str] = (CHANNEL,),
        providers: Sequence[str] = PROVIDER_NAMES,
    ) -> None:
        self.registry = registry
        self.channels: tuple[str, ...] = tuple(channels) or (CHANNEL,)
        self._channel_set = frozenset(self.channels)
        # The provider label is bounded by this set; anything else is exported as "other".
        self.providers: tuple[str, ...] = tuple(providers)
        self._provider_set = frozenset(self.providers)
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Histogram] = {}
        # every collector shares the namespace and this registry
        counter = functools.partial(Counter, namespace=NAMESPACE, registry=registry)
        gauge = functools.partial(Gauge, namespace=NAMESPACE, registry=registry)
        histogram = functools.partial(Histogram, namespace=NAMESPACE, registry=registry)

        # -- relay ---------------------------------------------------------------------------
        self.outbox_relayed = counter(
            "outbox_relayed_total", "Outbox rows turned into notification records (new or reused)."
        )
        self.outbox_rejected = counter(
            "outbox_rejected_total", "Outbox rows rejected, by reason class.", ["reason_class"]
        )
        self.dedupe_hits = counter(
            "dedupe_hits_total", "Outbox rows whose (channel, dedupe_key) already had a record."
        )
        self.fallback_used = counter(
            "fallback_used_total", "Relayed records that use the fallback text."
        )

        # -- delivery ------------------------------------------------------------------------
        self.delivery_attempts = counter(
            "delivery_attempts_total",
            "Delivery attempts (one per record a provider call carried), by provider and outcome.",
            ["channel", "provider", "outcome"],
        )
        self.provider_errors = counter(
            "provider_errors_total",
            "Delivery attempts that did not succeed, by error code.",
            ["channel", "provider", "error_code"],
        )
        self.records_dead = counter(
            "records_dead_total",
            "Records that became dead (no more automatic attempts).",
            ["channel"],
        )
        self.leases_expired = counter(
            "leases_expired_total",
            "Records taken back from 'sending' after their lease expired.",
            ["channel"],
        )
        self.late_results = counter(
            "late_results_total",
            "Provider results discarded because the record's lease had been taken over.",
        )
        self.provider_call_duration = histogram(
            "provider_call_duration_seconds",
            "Duration of one provider call.",
            ["channel", "provider"],
            buckets=PROVIDER_CALL_BUCKETS_S,
        )
        self.end_to_end_latency = histogram(
            "end_to_end_latency_seconds",
            "From the outbox row's commit to the record being sent.",
            ["channel", "provider"],
            buckets=END_TO_END_BUCKETS_S,
        )
        # Messages are calls, attempts are records: a digest is one message and as many
        # attempts (delivery_attempts_total) as the records it carried.
        self.messages = counter(
            "messages_total",
            "Messages the providers were called with, by kind (single: one record; digest: "
            "several) and outcome.",
            ["channel", "provider", "kind", "outcome"],
        )
        self.message_records = histogram(
            "message_records",
            "Records carried by one message (1 for a single, 2 or more for a digest).",
            ["channel", "provider"],
            buckets=MESSAGE_RECORDS_BUCKETS,
        )

        # -- loops ---------------------------------------------------------------------------
        self.claim_duration = histogram(
            "claim_duration_seconds",
            "Duration of one claim (and, for the relay, its writes).",
            ["loop"],
            buckets=CLAIM_BUCKETS_S,
        )
        self.database_errors = counter(
            "database_errors_total", "Database operations that failed, by loop.", ["loop"]
        )
        self.database_failing = gauge(
            "database_failing",
            "1 while the loop's last database call failed (locked, slow or absent database).",
            ["loop"],
        )
        self.listener_reconnects = counter(
            "listener_reconnects_total", "Times the LISTEN connection was lost and opened again."
        )

        # -- state ---------------------------------------------------------------------------
        self.records = gauge(
            "records",
            "Records in pending, sending or failed, by channel and status (snapshot).",
            ["channel", "status"],
        )
        self.oldest_due_record_age = gauge(
            "oldest_due_record_age_seconds",
            "How long the oldest due record (pending, or failed and due) has waited (snapshot).",
            ["channel"],
        )
        self.outbox_pending = gauge("outbox_pending", "Pending outbox rows (snapshot).")
        self.outbox_oldest_pending_age = gauge(
            "outbox_oldest_pending_age_seconds", "Age of the oldest pending outbox row (snapshot)."
        )
        self.snapshot_timestamp = gauge(
            "snapshot_timestamp_seconds", "Unix time of this process's last database snapshot."
        )
        self.listener_up = gauge("listener_up", "1 while the LISTEN connection is open.")
        self.in_flight = gauge("in_flight", "Provider calls in flight in this process.")
        self.paused_targets = gauge(
            "paused_targets", "Delivery targets paused by endpoint protection (snapshot)."
        )
        self.throttled_targets = gauge(
            "throttled_targets",
            "Delivery targets slowed down after answering 429 (snapshot); not failures.",
        )
        # The operator's pauses (0013; never the breaker's, which is paused_targets above).
        self.operator_pauses = gauge(
            "operator_pauses",
            "Active operator pauses by scope: target, recipient, provider (snapshot).",
            ["scope"],
        )
        self.operator_pause_oldest_age = gauge(
            "operator_pause_oldest_age_seconds",
            "How long the oldest active operator pause has been in force (snapshot; 0: none).",
        )
        self.operator_pauses_ended = gauge(
            "operator_pauses_ended",
            "Operator pauses past their end time not yet marked resumed (snapshot).",
        )
        self.operator_paused_records = gauge(
            "operator_paused_records",
            "Records (pending or failed) held by the operator pauses in force (snapshot).",
        )
        # What holds the database back (outbox_notifier.horizon): NaN while unknown.
        self.xmin_horizon_age = gauge(
            "xmin_horizon_age_seconds",
            "How long the oldest transaction holding back vacuum in this database has been "
            "open (snapshot); NaN: unknown (the role cannot see other roles' sessions).",
        )
        self.xmin_horizon_age_xids = gauge(
            "xmin_horizon_age_xids",
            "How many transactions vacuum's horizon lags in this database, replication slots "
            "included (snapshot); NaN: unknown.",
        )
        self.dead_tuples = gauge(
            "dead_tuples",
            "Dead row versions of the daemon's tables, as PostgreSQL's statistics count them "
            "(snapshot).",
            ["table"],
        )
        self.live_tuples = gauge(
            "live_tuples",
            "Live rows of the daemon's tables, as PostgreSQL's statistics count them (snapshot).",
            ["table"],
        )
        self.build_info = Info(
            "build",
            "Version of outbox-notifier and of Python.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.build_info.info({"version": __version__, "python": platform.python_version()})

        self._snapshot_channels: set[str] = set(self.channels)
        self._tuple_tables: set[str] = set(TUPLE_TABLES)
        self._zero_initialise()

    def _zero_initialise(self) -> None:
        for channel in self.channels:
            for provider in self.providers:
                for outcome in sorted(_OUTCOMES):
                    self.delivery_attempts.labels(channel, provider, outcome)
                for code in sorted(_ERROR_CODES):
                    self.provider_errors.labels(channel, provider, code)
                self.provider_call_duration.labels(channel, provider)
                self.end_to_end_latency.labels(channel, provider)
                self.message_records.labels(channel, provider)
                for kind in MESSAGE_KINDS:
                    for outcome in sorted(_OUTCOMES):
                        self.messages.labels(channel, provider, kind, outcome)
            self.records_dead.labels(channel)
            self.leases_expired.labels(channel)
            for status in SNAPSHOT_STATUSES:
                self.records.labels(channel, status).set(0)
            self.oldest_due_record_age.labels(channel).set(0)
        for reason_class in REASON_CLASSES:
            self.outbox_rejected.labels(reason_class)
        for loop in LOOPS:
            self.database_errors.labels(loop)
        for loop in DATABASE_LOOPS:
            self.database_failing.labels(loop).set(0)
        for loop in ("relay", "delivery", "rescue"):
            self.claim_duration.labels(loop)
        for scope in PAUSE_SCOPES:
            self.operator_pauses.labels(scope).set(0)
        # Unknown until the first snapshot: NaN, not a reassuring 0.
        self.apply_horizon(None)
        self.apply_table_tuples(None)

    # -- events ----------------------------------------------------------------------------

    def observe_relay(self, report: RelayReport) -> None:
        """One relay pass."""
        self.outbox_relayed.inc(report.relayed)
        self.dedupe_hits.inc(report.deduplicated)
        self.fallback_used.inc(report.fallback_used)
        for reason_class, count in report.rejected.items():
            self.outbox_rejected.labels(_bounded(reason_class, _REASON_CLASSES)).inc(count)

    def observe_results(
        self, results: Sequence[AttemptResult], records: Sequence[AppliedRecord]
    ) -> None:
        """One batch of attempt results and their records as ``apply_results`` returned them
        (the result completer calls it).

        Every result is an attempt, counted even when it arrived late; a result whose record
        was not applied (status None, or the record is gone) lost its lease (fencing) and is
        counted in ``late_results_total``. A call is counted once, by the result that stands
        for it (``call_records``): a digest's other results are attempts of the same call. A
        record a digest left out (``unsent``) was not attempted and is not counted.
        """
        by_id = {row.id: row for row in records}
        provider_of: dict[int, str] = {}
        traced: dict[int, str] = {}  # record id -> its attempt's traceparent (tracing only)
        child = self._child
        for result in results:
            if result.unsent:
                continue
            record = by_id.get(result.record_id)
            channel = _bounded(None if record is None else record.channel, self._channel_set)
            provider = provider_of[result.record_id] = _bounded(result.provider, self._provider_set)
            if record is None or record.status is None:
                self.late_results.inc()
            outcome = _bounded(result.outcome, _OUTCOMES)
            child(self.delivery_attempts, channel, provider, outcome).inc()
            if result.error_code is not None:
                code = _bounded(result.error_code, _ERROR_CODES)
                child(self.provider_errors, channel, provider, code).inc()
            # A result with no request and no time spent never reached a provider (a missing
            # recipient, a refused URL): it has no call duration to report.
            if result.traceparent is not None:
                traced[result.record_id] = result.traceparent
            called = result.request_json is not None or result.duration_ms > 0
            if called and result.call_records > 0:
                child(self.provider_call_duration, channel, provider).observe(
                    result.duration_ms / 1000.0, _exemplar(result.traceparent)
                )
                kind = "digest" if result.call_records > 1 else "single"
                child(self.messages, channel, provider, kind, outcome).inc()
                child(self.message_records, channel, provider).observe(result.call_records)
        for row in records:
            if row.status == "dead":
                child(self.records_dead, row.channel).inc()
            elif row.status == "sent" and row.latency_s is not None:
                provider = provider_of.get(row.id, OTHER)
                child(self.end_to_end_latency, row.channel, provider).observe(
                    max(row.latency_s, 0.0), _exemplar(traced.get(row.id))
                )

    def _child(self, metric: _Labelled, *labels: str) -> _Labelled:
        """``metric.labels(*labels)``, kept: every label here is from a bounded set, and
        ``labels()`` validates and locks on each call (a few us per result otherwise)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(_Labelled, found)

    def observe_rescued(self, rows: Sequence[RescuedRecord]) -> None:
        """Records taken back from expired leases by one rescue pass."""
        for row in rows:
            self.leases_expired.labels(row.channel).inc()
            if row.status == "dead":
                self.records_dead.labels(row.channel).inc()

    def observe_claim(self, loop: str, seconds: float) -> None:
        self.claim_duration.labels(loop).observe(seconds)

    @contextlib.contextmanager
    def claim_timer(self, loop: str) -> Iterator[None]:
        """Times the block into ``claim_duration_seconds{loop}``; a block that raises is not
        timed (count it with `database_error`)."""
        started = time.perf_counter()
        yield
        self.observe_claim(loop, time.perf_counter() - started)

    def database_error(self, loop: str) -> None:
        self.database_errors.labels(loop).inc()

    def database_failing_changed(self, loop: str, failing: bool) -> None:
        self.database_failing.labels(loop).set(1 if failing else 0)

    def listener_reconnected(self) -> None:
        self.listener_reconnects.inc()

    # -- state -----------------------------------------------------------------------------

    def track(
        self,
        *,
        listener_up: Callable[[], bool] | None = None,
        in_flight: Callable[[], int] | None = None,
        paused_targets: Callable[[], int] | None = None,
    ) -> None:
        """Reads the process's own state at every scrape, so it is never stale.

        A callable that raises (say, before the object it reads exists) exports NaN.
        """
        for gauge, read in (
            (self.listener_up, listener_up),
            (self.in_flight, in_flight),
            (self.paused_targets, paused_targets),
        ):
            if read is not None:
                gauge.set_function(_safe(read))

    async def snapshot(self, store: MaintenanceStore, *, timeout_s: float = 5.0) -> bool:
        """Sets the database gauges from one query; False (and counted) if the query failed."""
        try:
            rows = await bounded(store.metrics_snapshot(), timeout_s)
        except DatabaseError as exc:
            self.database_error("maintenance")
            logger.warning("metrics snapshot failed: %s", first_line(exc))
            return False
        self.apply_snapshot(rows)
        return True

    def apply_snapshot(self, rows: Iterable[SnapshotRow]) -> None:
        """Sets the gauges from the rows of ``metrics_snapshot`` (see sql/maintenance.sql)."""
        counts: dict[tuple[str, str], int] = {}
        oldest: dict[str, float] = {}
        outbox_pending, outbox_age = 0, 0.0
        pauses: dict[str, int] = dict.fromkeys(PAUSE_SCOPES, 0)
        oldest_pause_s, pauses_ended, paused_records = 0.0, 0, 0
        for kind, channel, status, n, age_s in rows:
            if kind == "outbox":
                outbox_pending, outbox_age = n, age_s or 0.0
            elif kind == "operator_pauses" and channel is not None:
                pauses[channel] = n  # the row's channel column is the scope
                oldest_pause_s = max(oldest_pause_s, age_s or 0.0)
            elif kind == "operator_pauses_ended":
                pauses_ended = n
            elif kind == "operator_paused_records":
                paused_records = n
            elif kind == "paused_targets":
                self.paused_targets.set(n)
            elif kind == "throttled_targets":
                self.throttled_targets.set(n)
            elif channel is not None and status is not None:
                counts[(channel, status)] = n
                if age_s is not None:
                    oldest[channel] = max(oldest.get(channel, 0.0), age_s)
        # Channels once seen are set back to zero when their rows are gone, not left stale.
        self._snapshot_channels.update(channel for channel, _ in counts)
        for channel in self._snapshot_channels:
            for status in SNAPSHOT_STATUSES:
                self.records.labels(channel, status).set(counts.get((channel, status), 0))
            self.oldest_due_record_age.labels(channel).set(oldest.get(channel, 0.0))
        self.outbox_pending.set(outbox_pending)
        self.outbox_oldest_pending_age.set(outbox_age)
        for scope, n in pauses.items():
            self.operator_pauses.labels(scope).set(n)
        self.operator_pause_oldest_age.set(oldest_pause_s)
        self.operator_pauses_ended.set(pauses_ended)
        self.operator_paused_records.set(paused_records)
        self.snapshot_timestamp.set(time.time())

    def apply_horizon(self, horizon: Horizon | None) -> None:
        """Sets the horizon gauges; NaN when unknown (no reading, or not every session seen)."""
        if horizon is None or not horizon.sees_all:
            self.xmin_horizon_age.set(math.nan)
            self.xmin_horizon_age_xids.set(math.nan)
            return
        self.xmin_horizon_age.set(max(horizon.age_s, 0.0))
        self.xmin_horizon_age_xids.set(horizon.age_xids)

    def apply_table_tuples(self, rows: Iterable[TuplesRow] | None) -> None:
        """Sets the tuple gauges from ``table_tuples`` rows; NaN for every table when the read
        failed (None) and for a table missing from the rows."""
        found = {table: (live, dead) for table, live, dead in rows or ()}
        self._tuple_tables.update(found)
        for table in self._tuple_tables:
            live, dead = found.get(table, (math.nan, math.nan))
            self.live_tuples.labels(table).set(live)
            self.dead_tuples.labels(table).set(dead)


def _exemplar(traceparent: str | None) -> dict[str, str] | None:
    """The exemplar of a traced call (its attempt's trace and span, when sampled: an exemplar
    must point at a trace that was exported), shown in the OpenMetrics exposition only."""
    ids = tracing.ids_of(traceparent)
    if ids is None or not ids[2]:
        return None
    return {"trace_id": ids[0], "span_id": ids[1]}


def _safe(read: Callable[[], float | int | bool]) -> Callable[[], float]:
    def value() -> float:
        try:
            return float(read())
        except Exception:
            return math.nan

    return value
