"""The result completer: provider results back into Postgres, in batches, none lost.

The delivery loop hands each call's `AttemptResult` to `ResultCompleter.put` and goes on; the
completer applies them with one ``apply_results`` statement per batch (a commit, so a WAL flush,
per batch rather than per record). A batch goes when it holds ``batch_size`` results, or when no
more are on their way, or ``linger_s`` after its first result while more are (bounded added
latency).

A batch is retried every ``retry_s`` while the database is away, by any database error: dropping
it would let the leases expire and send every record in it a second time. If the daemon stops
first, the leases expire and the rescue counts the calls as temporary failures. An apply
abandoned at ``db_deadline_s`` may still commit; its retry is then fenced off (the lease token
is gone) and logged as a late result, never applied twice. A value Postgres refuses is retried
result by result, so only the culprit is lost.

Back-pressure: while more than ``backlog_max`` results wait (the database is slow), `has_room`
is unset and the delivery loop claims nothing new; calls in flight still finish and their
results queue up. Nothing is ever dropped.

Usage::

    completer = ResultCompleter(store, claim_policy, batch_size=500, linger_s=0.005)
    task = asyncio.create_task(completer.run(ctx))
    completer.put(result, more_due=True)
    ...
    completer.finish()  # applies everything queued, then run() returns
    await task
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from outbox_notifier import tracing
from outbox_notifier.dbhealth import bounded, first_line
from outbox_notifier.names import RecordStatus
from outbox_notifier.store import (
    AppliedRecord,
    AttemptResult,
    ClaimPolicy,
    DatabaseError,
    RecordStore,
    ValueRefused,
)

if TYPE_CHECKING:
    from outbox_notifier.loops import LoopContext

logger = logging.getLogger(__name__)

# A late result whose record was purged meanwhile: nothing is known about it any more.
_GONE = AppliedRecord(id=0, channel="", status=None)

_LOG_LEVEL_BY_STATUS: dict[RecordStatus, int] = {
    "sent": logging.DEBUG,
    "failed": logging.INFO,
    "skipped": logging.INFO,
    "dead": logging.WARNING,
}


def dedupe_key_hash(dedupe_key: str) -> str:
    """A short, stable stand-in for a dedupe key in logs (keys may carry business data)."""
    return hashlib.sha256(dedupe_key.encode()).hexdigest()[:12]


def _log_fields(result: AttemptResult, record: AppliedRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "record_id": result.record_id,
        "trace_id": record.trace_id,
        "dedupe_key_hash": dedupe_key_hash(record.dedupe_key),
        "attempt": result.attempt,
        "error_code": result.error_code,
    }
    ids = tracing.ids_of(result.traceparent)
    if ids is not None:
        # Tracing: the line points at the attempt's span; the payload's own trace id, when it
        # says something else, is kept beside it.
        if record.trace_id and record.trace_id != ids[0]:
            fields["payload_trace_id"] = record.trace_id
        fields["trace_id"], fields["span_id"] = ids[0], ids[1]
    return fields


def _room() -> asyncio.Event:
    room = asyncio.Event()
    room.set()  # an empty backlog has room
    return room


# eq=False: a stage is one object, compared (and hashed) by identity, as the loops' stages.
@dataclasses.dataclass(eq=False)
class ResultCompleter:
    """Applies results in batches until `finish`; see the module docstring.

    ``released``, when given, is set when a finished record released the next of its ordering
    key, or a result woke the head of its target's digest queue: the delivery loop's wake, so
    that record is claimed at once rather than at the next poll."""

    store: RecordStore
    claim_policy: ClaimPolicy
    _: dataclasses.KW_ONLY
    batch_size: int = 500
    linger_s: float = 0.005
    retry_s: float = 1.0
    backlog_max: int = 5000
    released: asyncio.Event | None = None
    has_room: asyncio.Event = dataclasses.field(default_factory=_room, init=False)
    # None is the end-of-work marker finish() sends.
    _results: asyncio.Queue[AttemptResult | None] = dataclasses.field(
        default_factory=asyncio.Queue, init=False
    )
    _more_due: bool = dataclasses.field(default=False, init=False)
    _applying: int = dataclasses.field(default=0, init=False)

    @property
    def backlog(self) -> int:
        """Results not stored yet: queued, and in the batch being applied."""
        return self._results.qsize() + self._applying

    def put(self, result: AttemptResult, *, more_due: bool = False) -> None:
        """Queues a result; ``more_due``: more results are on their way (calls in flight), so
        the batch may linger for them."""
        self._more_due = more_due
        self._results.put_nowait(result)
        self._note_backlog()

    def finish(self) -> None:
        """`run` applies what is queued, then returns."""
        self._results.put_nowait(None)

    async def run(self, ctx: LoopContext) -> None:
        """Applies batches until it takes the end-of-work marker. It does not watch
        ``ctx.stop``: at shutdown it is what lands the results of the drained calls."""
        done = False
        while not done:
            batch, done = await self._next_batch()
            if batch:
                self._applying = len(batch)
                try:
                    await self._apply_until_stored(ctx, batch)
                finally:
                    self._applying = 0
                    self._note_backlog()

    def _note_backlog(self) -> None:
        if self.backlog > self.backlog_max:
            self.has_room.clear()
        else:
            self.has_room.set()

    async def _next_batch(self) -> tuple[list[AttemptResult], bool]:
        """The next results to apply, and whether the end-of-work marker came with them."""
        batch: list[AttemptResult] = []
        item = await self._results.get()
        deadline: float | None = None
        while item is not None:
            batch.append(item)
            if len(batch) >= self.batch_size:
                return batch, False
            if not self._results.empty():
                item = self._results.get_nowait()
                continue
            if not self._more_due or self.linger_s <= 0:
                return batch, False
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.linger_s
            try:
                # Queue.get leaves the item queued when cancelled, so a timeout loses nothing.
                async with asyncio.timeout_at(deadline):
                    item = await self._results.get()
            except TimeoutError:
                return batch, False
        return batch, True

    async def _apply_until_stored(self, ctx: LoopContext, batch: list[AttemptResult]) -> None:
        while True:
            try:
                await self._apply(ctx, batch)
                ctx.db_health.ok("apply")
                return
            except DatabaseError as exc:
                logger.warning("applying results failed, retrying: %s", first_line(exc))
                ctx.database_failed("apply", exc)
                await asyncio.sleep(self.retry_s)

    async def _apply(self, ctx: LoopContext, batch: Sequence[AttemptResult]) -> None:
        # One statement stores the results, their 410 disables and the pacing and breaker
        # bookkeeping: they commit together or are retried together.
        try:
            with tracing.active.database("apply_results") as span:
                stored = await bounded(
                    self.store.apply_results(batch, self.claim_policy), ctx.db_deadline_s
                )
                span.rows(len(batch))
            records, tripped = stored.records, stored.tripped
            if stored.woke and self.released is not None:
                # the target's next digest can go now: claim it without waiting for a poll
                self.released.set()
        except ValueRefused:
            # Should not happen (text is sanitised), but one bad value must not block the rest.
            records, tripped = [], []
            for result in batch:
                try:
                    one = await bounded(
                        self.store.apply_results([result], self.claim_policy), ctx.db_deadline_s
                    )
                except ValueRefused:
                    logger.exception("result refused", extra={"record_id": result.record_id})
                else:
                    records += one.records
                    tripped += one.tripped
        self._account(ctx, batch, records)
        await self._release_next_in_order(ctx, records)
        for key in tripped:
            # "paused" is the word an operator searches for (the TargetPaused alert, the
            # targets.paused_until column); in code the state is the breaker's, "tripped".
            logger.warning(
                "breaker tripped: target paused after repeated failures",
                extra={"target": key[:12]},
            )

    async def _release_next_in_order(
        self, ctx: LoopContext, records: Sequence[AppliedRecord]
    ) -> None:
        """Ordering keys: the record after each keyed record this batch finished may go now.
        Best effort: a failure leaves it to the end of its hold (claim_due_v1)."""
        finished = [row.id for row in records if row.ordered and row.finished]
        if not finished:
            return
        try:
            released = await bounded(self.store.release_next_in_order(finished), ctx.db_deadline_s)
        except DatabaseError as exc:
            logger.warning("releasing the next records in order failed: %s", first_line(exc))
            return
        if released and self.released is not None:
            self.released.set()

    def _account(
        self, ctx: LoopContext, batch: Sequence[AttemptResult], records: Sequence[AppliedRecord]
    ) -> None:
        ctx.metrics.observe_results(batch, records)
        by_id = {row.id: row for row in records}
        for result in batch:
            record = by_id.get(result.record_id)
            if record is None or record.status is None:
                logger.warning(
                    "late result discarded: the record's lease was taken over",
                    extra=_log_fields(result, record or _GONE),
                )
            elif result.unsent:
                logger.debug(
                    "record left out of its digest by the platform's limits: waits for the next",
                    extra=_log_fields(result, record),
                )
            else:
                # Sent is the hot path: DEBUG, so a busy daemon is not slowed by its own logs.
                level = _LOG_LEVEL_BY_STATUS.get(record.status, logging.INFO)
                if logger.isEnabledFor(level):
                    logger.log(
                        level, "record %s: %s", record.status, result.error_code or "ok",
                        extra=_log_fields(result, record),
                    )  # fmt: skip
