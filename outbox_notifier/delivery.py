"""Claim -> provider calls -> apply results; and the rescue of expired leases.

The delivery loop keeps up to ``concurrency`` provider calls in flight. It claims only as many
records as it has free slots, so a claimed record's lease starts ticking when its call starts,
not while it waits in a queue. Claims are one statement (row locks and advisory try-locks are
taken and released inside it); calls run with no transaction and no lock held; results are
applied in batches by a separate task, each guarded by its fencing token.

Invariant: ``lease_s`` must exceed the provider timeout plus the time a result waits to be
applied, or a slow-but-alive call would be rescued and sent a second time. The settings enforce
``lease_s > http_timeout_s``; results wait milliseconds, and at most ``apply_retry_s`` per retry
while the database is away.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from outbox_notifier import backoff, message
from outbox_notifier.dbhealth import DatabaseHealth, bounded, first_line
from outbox_notifier.loops import wait_any
from outbox_notifier.names import RecordStatus
from outbox_notifier.providers.base import (
    Delivery,
    ErrorCode,
    Outcome,
    Provider,
    SendResult,
    Target,
)
from outbox_notifier.store import (
    Applied,
    ClaimedRecord,
    ClaimPolicy,
    DatabaseError,
    OperationalError,
    RecordStore,
    Rescued,
    Result,
    ValueRefused,
)

if TYPE_CHECKING:
    from outbox_notifier.metrics import Metrics

logger = logging.getLogger(__name__)


_STATUS_BY_OUTCOME: dict[Outcome, RecordStatus] = {
    Outcome.SUCCESS: "sent",
    Outcome.SKIPPED: "skipped",
    Outcome.PERMANENT_FAIL: "dead",
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try again after a temporary failure (the seed's defaults)."""

    max_attempts: int = 5
    base_s: float = 300.0
    max_s: float = 1800.0
    retry_after_max_s: float = 3600.0

    def delays_s(self, attempts: int) -> list[float]:
        """Backoff delay after attempt 1..attempts, for statements that schedule in SQL."""
        return [backoff.retry_delay_s(n, self.base_s, self.max_s) for n in range(1, attempts + 1)]


def decide(
    record: ClaimedRecord, result: SendResult, policy: RetryPolicy
) -> tuple[RecordStatus, float | None]:
    """The record's next status after a call, and the delay before a retry (seed semantics)."""
    status = _STATUS_BY_OUTCOME.get(result.outcome)
    if status is not None:
        return status, None
    if backoff.after_temporary_failure(
        record.attempt_count, record.max_attempts, policy.max_attempts
    ):
        return "dead", None
    delay = backoff.next_delay_s(
        record.attempt_count, policy.base_s, policy.max_s,
        result.retry_after_s, policy.retry_after_max_s,
    )  # fmt: skip
    return "failed", delay


def to_delivery(record: ClaimedRecord) -> Delivery:
    target = None
    if record.webhook_url is not None:
        target = Target(
            enabled=bool(record.channel_enabled),
            webhook_url=record.webhook_url,
            auth_kind=record.auth_kind or "none",
            auth_secret=record.auth_secret,
        )
    return Delivery(
        record_id=record.id,
        channel=record.channel,
        user_id=record.user_id,
        trigger_id=record.trigger_id,
        preview_id=record.preview_id,
        trigger_type=record.trigger_type,
        target_type=record.target_type,
        target_id=record.target_id,
        target_url=record.target_url,
        message_text=message.message_text(
            record.summary_text, record.fallback_text, record.fallback_used, record.target_url
        ),
        fallback_used=record.fallback_used,
        trace_id=record.trace_id,
        attempt=record.attempt_count,
        dedupe_key=record.dedupe_key,
        target=target,
    )


# A late result whose record was purged meanwhile: nothing is known about it any more.
_GONE = Applied(id=0, channel="", status=None)

_LOG_LEVEL_BY_STATUS: dict[RecordStatus, int] = {
    "sent": logging.DEBUG,
    "failed": logging.INFO,
    "skipped": logging.INFO,
    "dead": logging.WARNING,
}


def dedupe_key_hash(dedupe_key: str) -> str:
    """A short, stable stand-in for a dedupe key in logs (keys may carry business data)."""
    return hashlib.sha256(dedupe_key.encode()).hexdigest()[:12]


def _log_fields(result: Result, record: Applied) -> dict[str, object]:
    return {
        "record_id": result.record_id,
        "trace_id": record.trace_id,
        "dedupe_key_hash": dedupe_key_hash(record.dedupe_key),
        "attempt": result.attempt,
        "error_code": result.error_code,
    }


def _pg_text(value: str) -> str:
    # Postgres text cannot hold NUL; a hostile response must not make the whole batch fail.
    return value.replace("\x00", "\ufffd")


def _response_json(result: SendResult) -> str | None:
    """The response as stored in provider_response_json: JSON as sent, else a JSON string."""
    body = result.response_body
    if body is None:
        return None
    if b"\\u0000" not in body:
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError:
            pass
        else:
            return body.decode()
    return msgspec.json.encode(_pg_text(body.decode("utf-8", "replace"))).decode()


def to_result(
    record: ClaimedRecord, sent: SendResult, policy: RetryPolicy, started_at: datetime
) -> Result:
    status, delay_s = decide(record, sent, policy)
    error = None
    if sent.error_message and status != "sent":
        error = _pg_text(message.truncate_runes(sent.error_message, message.ERROR_TEXT_MAX_RUNES))
    response = _response_json(sent)
    return Result(
        record_id=record.id,
        lease_token=record.lease_token,
        attempt=record.attempt_count,
        disable_channel=sent.disable_target,
        provider=record.provider,
        status=status,
        outcome=sent.outcome,
        error_code=None if status == "sent" else sent.error_code,
        error=error,
        delay_s=delay_s,
        # an HTTP-date Retry-After with no Date to read it against: timed by the database
        retry_at=sent.retry_at,
        retry_after_s=sent.retry_after_s,
        provider_message_id=(
            None if sent.provider_message_id is None else _pg_text(sent.provider_message_id)
        ),
        request_json=sent.request_json.decode() if sent.request_json is not None else None,
        response_json=response,
        http_status=sent.http_status,
        started_at=started_at,
        duration_ms=sent.duration_s * 1000.0,
    )


async def call_provider(provider: Provider | None, delivery: Delivery) -> SendResult:
    """One provider call; whatever goes wrong becomes a SendResult (the seed's fallback)."""
    if provider is None:
        return SendResult(
            outcome=Outcome.SKIPPED,
            error_code=ErrorCode.RECIPIENT_MISSING,
            error_message=f"no provider for channel {delivery.channel!r}",
        )
    started = time.perf_counter()
    try:
        return await provider.send(delivery)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a provider bug must not lose the record: retry it later
        logger.exception("provider raised", extra={"record_id": delivery.record_id})
        return SendResult(
            outcome=Outcome.TEMPORARY_FAIL,
            error_code=ErrorCode.NETWORK_ERROR,
            error_message=f"{type(exc).__name__}: {exc}",
            duration_s=time.perf_counter() - started,
        )


class Deliverer:
    """The delivery loop. ``run()`` until ``stop`` is set; ``wake`` cuts an idle wait short."""

    def __init__(
        self,
        store: RecordStore,
        providers: Mapping[str, Provider],
        policy: RetryPolicy,
        claim_policy: ClaimPolicy,
        *,
        batch_size: int,
        concurrency: int,
        apply_batch_size: int = 500,
        apply_linger_s: float = 0.005,
        apply_retry_s: float = 1.0,
        metrics: Metrics | None = None,
        db_deadline_s: float | None = None,
        db_health: DatabaseHealth | None = None,
    ) -> None:
        self.store = store
        self.providers = providers
        self.policy = policy
        self.claim_policy = claim_policy
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.apply_batch_size = apply_batch_size
        self.apply_linger_s = apply_linger_s
        self.apply_retry_s = apply_retry_s
        self.metrics = metrics
        # Each database call is abandoned after db_deadline_s (see outbox_notifier.dbhealth).
        self.db_deadline_s = db_deadline_s
        self.db_health = db_health or DatabaseHealth()
        self.last_progress = time.monotonic()
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        # None is the end-of-work marker _drain() sends the applier.
        self._results: asyncio.Queue[Result | None] = asyncio.Queue()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def run(self, stop: asyncio.Event, wake: asyncio.Event, poll_interval_s: float) -> None:
        applier = asyncio.create_task(self._apply_forever(), name="apply-results")
        try:
            while not stop.is_set():
                self.last_progress = time.monotonic()
                if applier.done():  # only a bug ends it; results must keep landing
                    logger.error("result applier stopped (%r); restarting it", applier)
                    applier = asyncio.create_task(self._apply_forever(), name="apply-results")
                free = self.concurrency - len(self._inflight)
                # Claim in chunks rather than one record per freed slot: fewer, larger claims.
                if free < max(1, self.concurrency // 4) and self._inflight:
                    self._slot_freed.clear()
                    self.last_progress = time.monotonic() + poll_interval_s
                    await wait_any(stop, self._slot_freed, timeout_s=poll_interval_s)
                    continue
                wanted = min(self.batch_size, free)
                wake.clear()
                claimed = await self._claim(wanted)
                if claimed is None:
                    await wait_any(stop, timeout_s=self.apply_retry_s)
                    continue
                for record in claimed:
                    self._start(record)
                if len(claimed) < wanted:
                    idle_s = await self._idle_s(poll_interval_s)
                    self.last_progress = time.monotonic() + idle_s  # waiting on purpose
                    await wait_any(stop, wake, timeout_s=idle_s)
        finally:
            await self._drain(applier)

    async def deliver_once(self) -> int:
        """Claims one batch, delivers it and applies the results (tests and tools)."""
        claimed = await self.store.claim_records(self.batch_size, self.claim_policy)
        results = await asyncio.gather(*(self._call(r) for r in claimed))
        if results:
            await self._apply(results)
        return len(claimed)

    async def _claim(self, limit: int) -> list[ClaimedRecord] | None:
        started = time.perf_counter()
        try:
            claimed = await bounded(
                self.store.claim_records(limit, self.claim_policy), self.db_deadline_s
            )
        except OperationalError as exc:
            logger.warning("claim failed, database unavailable: %s", first_line(exc))
            self.db_health.failed("delivery", exc)
            if self.metrics is not None:
                self.metrics.database_error("delivery")
            return None
        self.db_health.ok("delivery")
        if self.metrics is not None:
            self.metrics.observe_claim("delivery", time.perf_counter() - started)
        return claimed

    async def _idle_s(self, poll_interval_s: float) -> float:
        """How long to wait after a short claim: the poll interval, or less when a deferred or
        failed record falls due sooner (pacing and retries then run on time)."""
        try:
            due_in = await bounded(self.store.seconds_until_next_due(), self.db_deadline_s)
        except OperationalError:
            return poll_interval_s
        if due_in is None:
            return poll_interval_s
        return min(poll_interval_s, max(due_in, 0.01))

    def _start(self, record: ClaimedRecord) -> None:
        task = asyncio.create_task(self._deliver(record))
        self._inflight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_freed.set()

    async def _deliver(self, record: ClaimedRecord) -> None:
        self._results.put_nowait(await self._call(record))

    async def _call(self, record: ClaimedRecord) -> Result:
        started_at = datetime.now(UTC)
        sent = await call_provider(self.providers.get(record.provider), to_delivery(record))
        return to_result(record, sent, self.policy, started_at)

    async def _apply_forever(self) -> None:
        """Applies results in batches until it takes the end-of-work marker."""
        done = False
        while not done:
            batch, done = await self._next_batch()
            if batch:
                await self._apply_until_stored(batch)

    async def _next_batch(self) -> tuple[list[Result], bool]:
        """The next results to apply, and whether the end-of-work marker came with them.

        Each apply is a commit, and so a WAL flush: applying every result as it lands made
        about one commit per few records under load. While other calls are in flight, more
        results are due within milliseconds, so the batch waits up to ``apply_linger_s`` for
        them (bounded added latency); with nothing in flight it goes at once.
        """
        batch: list[Result] = []
        item = await self._results.get()
        deadline: float | None = None
        while item is not None:
            batch.append(item)
            if len(batch) >= self.apply_batch_size:
                return batch, False
            if not self._results.empty():
                item = self._results.get_nowait()
                continue
            if not self._inflight or self.apply_linger_s <= 0:
                return batch, False
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.apply_linger_s
            try:
                # Queue.get leaves the item queued when cancelled, so a timeout loses nothing.
                async with asyncio.timeout_at(deadline):
                    item = await self._results.get()
            except TimeoutError:
                return batch, False
        return batch, True

    async def _apply_until_stored(self, batch: list[Result]) -> None:
        # A result is kept and retried while the database is away; if the daemon stops first,
        # the lease expires and the rescue counts the call as a temporary failure. An apply
        # abandoned at db_deadline_s may still commit; its retry is then fenced off (the
        # lease token is gone) and logged as a late result, never applied twice.
        while True:
            try:
                await self._apply(batch)
                self.db_health.ok("apply")
                return
            except DatabaseError as exc:
                # Any database error, not only a lost connection: dropping the batch would let
                # the leases expire and send every record in it a second time.
                logger.warning("applying results failed, retrying: %s", first_line(exc))
                self.db_health.failed("apply", exc)
                if self.metrics is not None:
                    self.metrics.database_error("apply")
                await asyncio.sleep(self.apply_retry_s)

    async def _apply(self, batch: Sequence[Result]) -> None:
        # One statement stores the results, their 410 disables and the pacing bookkeeping:
        # they commit together or are retried together.
        try:
            stored = await bounded(
                self.store.apply_results(batch, self.claim_policy), self.db_deadline_s
            )
            records, paused = stored.records, stored.paused
        except ValueRefused:
            # Should not happen (text is sanitised), but one bad value must not block the rest.
            records, paused = [], []
            for result in batch:
                try:
                    one = await self.store.apply_results([result], self.claim_policy)
                except ValueRefused:
                    logger.exception("result refused", extra={"record_id": result.record_id})
                else:
                    records += one.records
                    paused += one.paused
        self._account(batch, records)
        for key in paused:
            logger.warning("target paused after repeated failures", extra={"target": key[:12]})

    def _account(self, batch: Sequence[Result], records: Sequence[Applied]) -> None:
        if self.metrics is not None:
            self.metrics.observe_results(batch, records)
        by_id = {row.id: row for row in records}
        for result in batch:
            record = by_id.get(result.record_id)
            if record is None or record.status is None:
                logger.warning(
                    "late result discarded: the record's lease was taken over",
                    extra=_log_fields(result, record or _GONE),
                )
            else:
                # Sent is the hot path: DEBUG, so a busy daemon is not slowed by its own logs.
                level = _LOG_LEVEL_BY_STATUS.get(record.status, logging.INFO)
                if logger.isEnabledFor(level):
                    logger.log(
                        level, "record %s: %s", record.status, result.error_code or "ok",
                        extra=_log_fields(result, record),
                    )  # fmt: skip

    async def _drain(self, applier: asyncio.Task[None]) -> None:
        """Lets in-flight calls finish and their results land; the caller bounds the time."""
        try:
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
            # The applier may be in the middle of a batch: let it finish everything queued,
            # then stop at the marker (cancelling it here would lose results it holds).
            if applier.done():  # it crashed on a bug: a fresh one drains the queue
                applier = asyncio.create_task(self._apply_forever(), name="apply-results")
            self._results.put_nowait(None)
            await applier
        finally:
            applier.cancel()
            for task in self._inflight:
                task.cancel()


async def rescue_expired_leases(
    store: RecordStore, policy: RetryPolicy, *, limit: int = 500
) -> list[Rescued]:
    """Takes back records stuck in 'sending' past their lease (their worker died)."""
    rescued = await store.rescue_expired_leases(limit, policy.delays_s(policy.max_attempts))
    for row in rescued:
        logger.warning(
            "lease expired while sending; record is now %s", row.status,
            extra={"record_id": row.id},
        )  # fmt: skip
    return rescued
