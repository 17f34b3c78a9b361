"""Outbox -> notification records.

One relay pass is one transaction: claim a batch of pending outbox rows (``FOR UPDATE SKIP
LOCKED``, so replicas take disjoint batches), decode and validate every payload in Python, then
write all records, relayed marks and rejected marks in a single statement. A row that fails to
decode or validate is rejected with its reason; it never stops the loop and is never dropped.

A batch is bounded by bytes as well as rows: the claim stops before its payloads pass
``batch_bytes`` (one row at least), and leaves a payload over ``max_payload_bytes`` in the
database, so the relay rejects it by its size without ever reading it. A payload is held once,
as the UTF-8 bytes msgspec decodes.

Claims start past a cursor, not at the oldest pending row: the index entries of rows relayed
while a long-open snapshot keeps them would otherwise be read by every claim (``relay_cursor``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

import msgspec

from outbox_notifier import events, message, tracing
from outbox_notifier.dbhealth import bounded, describe
from outbox_notifier.loops import LoopContext
from outbox_notifier.names import CHANNEL
from outbox_notifier.records import record_fields
from outbox_notifier.relay_cursor import RelayCursor
from outbox_notifier.reports import RelayReport as RelayReport  # re-exported
from outbox_notifier.settings import Settings
from outbox_notifier.store import (
    Connection,
    NewRecord,
    OperationalError,
    OutboxRow,
    RecordStore,
    ValueRefused,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class _Sorted:
    records: list[NewRecord]
    rejected: list[tuple[int, str]]
    reason_classes: dict[str, int]


# eq=False: a stage is one object, compared (and hashed) by identity, as Maintenance.
@dataclasses.dataclass(eq=False)
class Relay:
    store: RecordStore
    _: dataclasses.KW_ONLY
    batch_size: int
    batch_bytes: int
    max_payload_bytes: int
    max_attempts: int
    summary_max_runes: int
    # where claims start: past the rows known relayed (relay_cursor.py)
    cursor: RelayCursor = dataclasses.field(default_factory=RelayCursor)

    @classmethod
    def from_settings(cls, settings: Settings, store: RecordStore) -> Relay:
        """The relay the daemon runs: its batch bounds and the records' limits from
        ``settings``."""
        return cls(
            store,
            batch_size=settings.relay_batch_size,
            batch_bytes=settings.relay_batch_bytes,
            max_payload_bytes=settings.max_payload_bytes,
            max_attempts=settings.max_attempts,
            summary_max_runes=settings.summary_max_runes,
        )

    async def run(
        self, ctx: LoopContext, wake: asyncio.Event, created: asyncio.Event, poll_interval_s: float
    ) -> None:
        """Relays batch after batch until stopped; waits for ``wake`` (a NOTIFY) or the poll
        interval when a batch was short, and sets ``created`` when records were created."""
        while ctx.turn("relay"):
            wake.clear()
            try:
                with (
                    ctx.metrics.claim_timer("relay"),
                    tracing.active.database("relay_outbox") as span,
                ):
                    report = await bounded(self.relay_once(), ctx.db_deadline_s)
                    span.rows(report.claimed)
            except OperationalError as exc:
                # Locked, slow or absent: the loop stays alive and keeps trying (/readyz says why).
                logger.warning("relay failed, database unavailable: %s", describe(exc))
                ctx.database_failed("relay", exc)
                await ctx.sleep("relay", 1.0)
                continue
            ctx.db_health.ok("relay")
            ctx.metrics.observe_relay(report)
            if report.created:
                created.set()
            if not report.full:
                await ctx.wait("relay", wake, poll_interval_s)

    async def relay_once(self) -> RelayReport:
        after_id = self.cursor.next_claim_after()
        try:
            return await self._relay(after_id, isolate_rows=False)
        except ValueRefused:
            # A value that passed validation but that Postgres refuses would otherwise fail the
            # whole batch forever. Retry the batch row by row so only the culprit is rejected.
            logger.warning("relay batch refused by the database; retrying row by row")
            return await self._relay(after_id, isolate_rows=True)
        finally:
            self.cursor.claim_ended()

    async def _relay(self, after_id: int, *, isolate_rows: bool) -> RelayReport:
        async with self.store.transaction() as conn:
            claim = await self.store.claim_outbox(
                conn, self.batch_size,
                max_batch_bytes=self.batch_bytes, max_payload_bytes=self.max_payload_bytes,
                after_id=after_id,
            )  # fmt: skip
            rows = claim.rows
            if not rows:
                return RelayReport(0, 0, 0, 0, {})
            batch = self._sort(rows)
            if isolate_rows:
                created = await self._write_one_by_one(conn, batch)
            else:
                created = await self.store.relay(
                    conn, batch.records, batch.rejected,
                    channel=CHANNEL, max_attempts=self.max_attempts,
                )  # fmt: skip
        # committed: only now may the cursor count these rows as relayed
        self.cursor.committed(rows[-1].id, claim.running_xmin, claim.claim_xid)
        for outbox_id, reason in batch.rejected:
            logger.warning("outbox row rejected", extra={"outbox_id": outbox_id, "reason": reason})
        if logger.isEnabledFor(logging.DEBUG):  # one line per row: only when asked for
            for outbox_id, record_id in created:
                logger.debug(
                    "outbox row relayed", extra={"outbox_id": outbox_id, "record_id": record_id}
                )
        return RelayReport(
            claimed=len(rows),
            created=len(created),
            deduplicated=len(batch.records) - len(created),
            fallback_used=sum(1 for r in batch.records if r.fallback_used),
            rejected=batch.reason_classes,
            full=len(rows) >= self.batch_size or self._may_have_hit_budget(rows),
        )

    def _may_have_hit_budget(self, rows: Sequence[OutboxRow]) -> bool:
        """Whether the claim may have stopped at the byte budget rather than for want of rows.
        It stopped there only before a row of at most max_payload_bytes that did not fit, so a
        batch further than that from the budget did not; when in doubt, one more claim."""
        read_bytes = sum(row.payload_bytes for row in rows if row.payload is not None)
        return read_bytes + self.max_payload_bytes > self.batch_bytes

    async def _write_one_by_one(self, conn: Connection, batch: _Sorted) -> list[tuple[int, int]]:
        created: list[tuple[int, int]] = []
        for record in batch.records:
            try:
                async with conn.transaction():  # a savepoint: one bad row rolls back alone
                    created += await self.store.relay(
                        conn, [record], [], channel=CHANNEL, max_attempts=self.max_attempts
                    )
            except ValueRefused as exc:
                reason = f"refused by the database: {str(exc).splitlines()[0]}"
                batch.rejected.append((record.outbox_id, reason))
                batch.reason_classes["invalid"] = batch.reason_classes.get("invalid", 0) + 1
        await self.store.relay(
            conn, [], batch.rejected, channel=CHANNEL, max_attempts=self.max_attempts
        )
        return created

    def _sort(self, rows: Sequence[OutboxRow]) -> _Sorted:
        records: list[NewRecord] = []
        rejected: list[tuple[int, str]] = []
        classes: dict[str, int] = {}
        for row in rows:
            try:
                if row.payload is None:  # over max_payload_bytes: the claim left it behind
                    raise events.too_large(row.payload_bytes, self.max_payload_bytes)
                event = events.decode_event(row.event_type, row.event_version, row.payload)
            except events.EventRejected as exc:
                rejected.append((row.id, exc.reason))
                classes[exc.reason_class] = classes.get(exc.reason_class, 0) + 1
                continue
            except Exception as exc:
                # A decoder bug must cost one row, not the whole outbox behind it.
                logger.exception("unexpected error decoding outbox row %d", row.id)
                rejected.append((row.id, f"could not decode payload: {type(exc).__name__}"))
                classes["malformed"] = classes.get("malformed", 0) + 1
                continue
            summary, fallback, fallback_used = message.normalize_template(
                event.summary_text, event.fallback_text, self.summary_max_runes
            )
            records.append(
                NewRecord(
                    **record_fields(event),
                    outbox_id=row.id,
                    summary_text=summary,
                    fallback_text=fallback,
                    fallback_used=fallback_used,
                    requested_at=event.requested_at,
                    # End-to-end latency starts when the producer wrote the outbox row.
                    outbox_created_at=row.created_at,
                    ordering_key=(
                        None if event.ordering_key is msgspec.UNSET else event.ordering_key
                    ),
                )
            )
        return _Sorted(records, rejected, classes)
