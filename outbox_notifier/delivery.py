"""The delivery loop: claim -> provider calls -> results to the completer.

The delivery loop keeps up to ``concurrency`` provider calls in flight. It claims only as many
records as it has free slots, so a claimed record's lease starts ticking when its call starts,
not while it waits in a queue. Claims are one statement (row locks and advisory try-locks are
taken and released inside it); calls run with no transaction and no lock held; each call's
result goes to the `ResultCompleter` (``outbox_notifier.completer``), which applies results in
batches, each guarded by its fencing token. While the completer is behind (its backlog over its
bound), the loop claims nothing new.

The claim's cursor: each claim looks for first attempts only past the highest record id the
previous claim took, so its index scan starts where the last one stopped instead of walking again
over the entries of every record claimed since the oldest open snapshot (which that snapshot keeps
from being cleaned up: under a long-held one the walk grew with every record delivered). A record
below the cursor that is still pending (its row or key was held by another replica or loop at
the claim, another replica's relay committed it after a higher id, an operator requeued it) is
taken by the sweep: every ``sweep_s`` a claim starts from 0 instead. Under a long-held snapshot a
sweep walks every entry the snapshot keeps, so a slow sweep spaces out the next ones
(``sweeps``); in between, every ``sweep_s`` a claim starts from where the cursor was at the
previous such claim, so a record another replica's relay committed late still goes within a
second or two.

Digests: the claim returns the records of a chat-bot target over its budget as one call, rows
sharing a ``message_id`` (claim_due_v1, migration 0015). The loop sends them with the provider's
``send_digest``, one call and one task, and every record gets its own result: the call's, or,
for a record the message could not hold (the platform's limits), a return to waiting with its
attempt not spent, first in its target's queue for the next message.

Invariant: ``lease_s`` must exceed the provider timeout plus the time a result waits to be
applied, or a slow-but-alive call would be rescued and sent a second time. The settings enforce
``lease_s > http_timeout_s``; results wait milliseconds, and at most the completer's
``retry_s`` per retry while the database is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final, TypeVar

import msgspec

from outbox_notifier import backoff, message, tracing
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.dbhealth import bounded, first_line
from outbox_notifier.loops import LoopContext
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers import digester
from outbox_notifier.providers.model import (
    Delivery,
    DigestProvider,
    DigestResult,
    Provider,
    Recipient,
    SendResult,
)
from outbox_notifier.records import record_fields
from outbox_notifier.store import (
    AttemptResult,
    ClaimedRecord,
    ClaimPolicy,
    OperationalError,
    RecordStore,
)
from outbox_notifier.sweeps import SweepSchedule

logger = logging.getLogger(__name__)

#: Answers a digest gets before any message is made that hold for every record sharing its
#: recipient: the channel row missing or off, its URL outside the policy, its signing secret
#: missing. (A body too large is the first record's own: the others go on without it.)
RECIPIENT_WIDE: Final = frozenset(
    {ErrorCode.RECIPIENT_MISSING, ErrorCode.INVALID_URL, ErrorCode.PROVIDER_AUTH_FAILED}
)


def to_delivery(record: ClaimedRecord) -> Delivery:
    """The claimed record as its provider sees it: the message text built, the recipient
    (None when the user has no row for the channel), the attempt being made."""
    recipient = None
    if record.webhook_url is not None:
        recipient = Recipient(
            enabled=bool(record.recipient_enabled),
            webhook_url=record.webhook_url,
            auth_kind=record.auth_kind or "none",
            auth_secret=record.auth_secret,
        )
    return Delivery(
        **record_fields(record),
        record_id=record.id,
        channel=record.channel,
        message_text=message.message_text(
            record.summary_text, record.fallback_text, record.fallback_used, record.target_url
        ),
        fallback_used=record.fallback_used,
        attempt=record.attempt_count,
        recipient=recipient,
    )


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
    record: ClaimedRecord,
    sent: SendResult,
    policy: backoff.RetryPolicy,
    started_at: datetime,
    rng: random.Random,
    *,
    traceparent: str | None = None,
    message_id: int | None = None,
    records_in_call: int = 1,
    counts_call: bool = True,
) -> AttemptResult:
    """The call's result as it will be stored, with the record's transition decided;
    ``traceparent``: the context of the attempt's span, when tracing. A digest's call
    (``records_in_call`` > 1) gives each of its records a result with the call's
    ``message_id``; one of them, ``counts_call``, stands for the call (see AttemptResult's
    ``call_records``)."""
    transition = backoff.decide(
        sent.outcome,
        attempt_count=record.attempt_count,
        max_attempts=record.max_attempts,
        retry_after_s=sent.retry_after_s,
        policy=policy,
        rng=rng,
        error_code=sent.error_code,
        records_in_call=records_in_call,
    )
    status = transition.status
    error = None
    if sent.error_message and status != "sent":
        error = _pg_text(message.truncate_runes(sent.error_message, message.ERROR_TEXT_MAX_RUNES))
    response = _response_json(sent)
    return AttemptResult(
        record_id=record.id,
        lease_token=record.lease_token,
        attempt=record.attempt_count,
        disable_channel=sent.disable_channel,
        provider=record.provider,
        status=status,
        outcome=sent.outcome,
        error_code=None if status == "sent" else sent.error_code,
        error=error,
        delay_s=(
            transition.delay_s
            if isinstance(transition, backoff.Retry | backoff.RetryAlone)
            else None
        ),
        # an HTTP-date Retry-After with no Date to read it against: timed by the database
        retry_at=sent.retry_at,
        retry_after_s=sent.retry_after_s,
        provider_message_id=(
            None if sent.provider_message_id is None else _pg_text(sent.provider_message_id)
        ),
        request_json=None if sent.request_json is None else msgspec.Raw(sent.request_json),
        response_json=response,
        http_status=sent.http_status,
        started_at=started_at,
        duration_ms=sent.duration_s * 1000.0,
        traceparent=traceparent,
        message_id=message_id,
        call_records=records_in_call if counts_call else 0,
        alone_next=isinstance(transition, backoff.RetryAlone),
    )


def unsent_result(record: ClaimedRecord, started_at: datetime) -> AttemptResult:
    """The result of a digest's record that its message could not hold (the platform's
    limits): no call carried it, so no attempt is logged and its attempt is not spent; it
    waits, first in its target's queue, for the next message. The call's fields are empty and
    not read (``AttemptResult.unsent``)."""
    return AttemptResult(
        record_id=record.id,
        lease_token=record.lease_token,
        attempt=record.attempt_count,
        provider=record.provider,
        status="pending",
        outcome=Outcome.SKIPPED,
        error_code=None,
        error=None,
        delay_s=None,
        provider_message_id=None,
        request_json=None,
        response_json=None,
        http_status=None,
        started_at=started_at,
        duration_ms=0.0,
        call_records=0,
        unsent=True,
    )


def calls_of(claimed: Sequence[ClaimedRecord]) -> list[list[ClaimedRecord]]:
    """The claimed records by the call that carries them: the rows of one digest (one
    ``message_id``) together, oldest first; every other record alone. In record order."""
    calls: list[list[ClaimedRecord]] = []
    digests: dict[int, list[ClaimedRecord]] = {}
    for record in sorted(claimed, key=lambda r: r.id):
        if record.message_id is None:
            calls.append([record])
        elif record.message_id in digests:
            digests[record.message_id].append(record)
        else:
            calls.append(digests.setdefault(record.message_id, [record]))
    return calls


async def call_digest(
    provider: DigestProvider, name: str, deliveries: Sequence[Delivery]
) -> DigestResult:
    """One digest call by ``provider`` (named ``name``); whatever goes wrong becomes a result
    for the first delivery alone, as `call_provider` makes one."""
    made = await _guarded(
        lambda: provider.send_digest(deliveries), name, deliveries[0].record_id, "on a digest"
    )
    return DigestResult(included=1, result=made) if isinstance(made, SendResult) else made


async def call_provider(
    providers: Mapping[str, Provider], name: str, delivery: Delivery
) -> SendResult:
    """One call by the provider ``name`` (the recipient's ``provider`` column); whatever goes
    wrong becomes a SendResult (the seed's fallback)."""
    provider = providers.get(name)
    if provider is None:
        return SendResult(
            outcome=Outcome.SKIPPED,
            error_code=ErrorCode.RECIPIENT_MISSING,
            error_message=f"no provider {name!r} in this daemon",
        )
    return await _guarded(lambda: provider.send(delivery), name, delivery.record_id)


_Sent = TypeVar("_Sent")


async def _guarded(
    call: Callable[[], Awaitable[_Sent]], name: str, record_id: int, what: str = ""
) -> _Sent | SendResult:
    """What ``call`` to the provider ``name`` returns or, when the provider raises, a temporary
    failure (the seed's fallback), logged with its traceback: a provider bug must not lose the
    record, which is retried later. Cancellation is not a failure and propagates."""
    started = time.perf_counter()
    try:
        return await call()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception(
            "provider %s raised%s", name, f" {what}" if what else "",
            extra={"record_id": record_id, "provider": name},
        )  # fmt: skip
        return SendResult(
            outcome=Outcome.TEMPORARY_FAIL,
            error_code=ErrorCode.NETWORK_ERROR,
            error_message=f"{type(exc).__name__}: {exc}",
            duration_s=time.perf_counter() - started,
        )


# eq=False: a stage is one object, compared (and hashed) by identity, as Relay and Maintenance.
@dataclasses.dataclass(eq=False)
class Deliverer:
    """The delivery loop. ``run(ctx, wake, poll_interval_s)`` until ``ctx.stop`` is set;
    ``wake`` cuts an idle wait short. Results go to ``completer``, which ``run`` runs beside the
    loop and drains at the end.

    ``rng`` draws the backoff jitter (`backoff.decide`); tests seed it.
    """

    store: RecordStore
    providers: Mapping[str, Provider]
    policy: backoff.RetryPolicy
    claim_policy: ClaimPolicy
    completer: ResultCompleter
    _: dataclasses.KW_ONLY
    batch_size: int
    concurrency: int
    claim_retry_s: float = 1.0
    sweep_s: float = 1.0
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    _after_id: int = dataclasses.field(default=0, init=False)  # the cursor (module docstring)
    _sweeps: SweepSchedule = dataclasses.field(init=False)
    # the trailing claims: where the next one starts, and when the last one ran
    _trail_from: int = dataclasses.field(default=0, init=False)
    _trailed_at: float = dataclasses.field(default=-math.inf, init=False)
    _inflight: set[asyncio.Task[None]] = dataclasses.field(default_factory=set, init=False)
    _slot_freed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self._sweeps = SweepSchedule(self.sweep_s)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def run(self, ctx: LoopContext, wake: asyncio.Event, poll_interval_s: float) -> None:
        completer = self._start_completer(ctx)
        try:
            while ctx.turn("delivery"):
                if completer.done():  # only a bug ends it; results must keep landing
                    logger.error("result completer stopped (%r); restarting it", completer)
                    completer = self._start_completer(ctx)
                if not self.completer.has_room.is_set():
                    # The database takes results slower than the calls make them: claim nothing
                    # new until the completer catches up (the calls in flight go on).
                    await ctx.wait("delivery", self.completer.has_room, poll_interval_s)
                    continue
                free = self.concurrency - len(self._inflight)
                # Claim in chunks rather than one record per freed slot: fewer, larger claims.
                if free < max(1, self.concurrency // 4) and self._inflight:
                    self._slot_freed.clear()
                    await ctx.wait("delivery", self._slot_freed, poll_interval_s)
                    continue
                wanted = min(self.batch_size, free)
                wake.clear()
                claimed = await self._claim(ctx, wanted)
                if claimed is None:
                    await ctx.sleep("delivery", self.claim_retry_s)
                    continue
                for call in calls_of(claimed):
                    self._start(call)
                # A short claim that took something may have left due records behind it: the
                # ones it held (pacing, an operator pause, the ordering rule) are deferred now,
                # so the next claim reaches past them at once. Only an empty claim waits.
                if not claimed:
                    await ctx.wait("delivery", wake, await self._idle_s(ctx, poll_interval_s))
        finally:
            await self._drain(ctx, completer)

    def _start_completer(self, ctx: LoopContext) -> asyncio.Task[None]:
        return asyncio.create_task(self.completer.run(ctx), name="complete-results")

    async def _claim(self, ctx: LoopContext, limit: int) -> list[ClaimedRecord] | None:
        now = time.monotonic()
        after_id = self._after_id
        sweeping = self._sweeps.begin()
        if sweeping:
            after_id, self._trail_from, self._trailed_at = 0, self._after_id, now
        elif now - self._trailed_at >= self.sweep_s:
            after_id, self._trail_from, self._trailed_at = self._trail_from, self._after_id, now
        try:
            tracer = tracing.active
            with ctx.metrics.claim_timer("delivery"), tracer.database("claim_records") as span:
                claimed = await bounded(
                    self.store.claim_records(
                        limit, self.claim_policy, after_id=after_id, traced=tracer.enabled
                    ),
                    ctx.db_deadline_s,
                )
                span.rows(len(claimed))
        except OperationalError as exc:
            logger.warning("claim failed, database unavailable: %s", first_line(exc))
            ctx.database_failed("delivery", exc)
            return None
        finally:
            if sweeping:
                self._sweeps.end()
        ctx.db_health.ok("delivery")
        if claimed:
            # Every first attempt the scan could see up to here was taken or skipped (a skipped
            # one waits for the sweep); retries and deferred records come in any id order, and
            # none of them can be higher than a first attempt the scan did not reach.
            self._after_id = max(self._after_id, *(record.id for record in claimed))
        return claimed

    async def _idle_s(self, ctx: LoopContext, poll_interval_s: float) -> float:
        """How long to wait after a short claim: the poll interval, or less when a deferred or
        failed record falls due sooner (pacing and retries then run on time)."""
        try:
            due_in = await bounded(self.store.seconds_until_next_due(), ctx.db_deadline_s)
        except OperationalError:
            return poll_interval_s
        if due_in is None:
            return poll_interval_s
        return min(poll_interval_s, max(due_in, 0.01))

    def _start(self, call: Sequence[ClaimedRecord]) -> None:
        deliver = self._deliver(call[0]) if len(call) == 1 else self._deliver_digest(call)
        task = asyncio.create_task(deliver)
        self._inflight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_freed.set()

    async def _deliver(self, record: ClaimedRecord) -> None:
        started_at = datetime.now(UTC)
        # A no-op unless tracing is on (outbox_notifier.tracing): nothing is spent per record.
        with tracing.active.process(record) as span:  # fmt: skip
            sent = await call_provider(self.providers, record.provider, to_delivery(record))
            result = to_result(
                record, sent, self.policy, started_at, self.rng, traceparent=span.traceparent()
            )
            span.finished(result.outcome, result.error_code, result.status)
        # This call is still in the in-flight set: more are due if any other is.
        self.completer.put(result, more_due=len(self._inflight) > 1)

    async def _deliver_digest(self, records: Sequence[ClaimedRecord]) -> None:
        """One call for the records of a digest, oldest first. The message holds what the
        platform's limits allow of the leading records that share the first one's recipient
        (users whose channels name one robot alike); the rest wait for the next message. A
        provider here that does not digest (this daemon's setting differs from the claimer's)
        sends the first record alone."""
        started_at = datetime.now(UTC)
        first = records[0]
        deliveries = [to_delivery(record) for record in records]
        shared = list(
            itertools.takewhile(lambda d: d.recipient == deliveries[0].recipient, deliveries)
        )
        provider = self.providers.get(first.provider)
        merger = digester(provider) if provider is not None else None
        results: list[AttemptResult] = []
        # Tracing: the call is a child of the first record's attempt span; each other record
        # the call carried has an attempt span of its own, with the call's outcome.
        with tracing.active.process(first) as span:
            if merger is None or len(shared) == 1:
                sent = await call_provider(self.providers, first.provider, deliveries[0])
                included = 1
            else:
                digest = await call_digest(merger, first.provider, shared)
                sent, included = digest.result, digest.included
            # No message was made, for a reason of the recipient's: every record sharing it
            # gets the answer now, as its own call would, rather than a slot of the budget each.
            no_message = sent.http_status is None and sent.request_json is None
            answered = len(shared) if no_message and sent.error_code in RECIPIENT_WIDE else included
            for number, record in enumerate(records[:answered]):
                own_span = (
                    tracing.active.process(record) if number else contextlib.nullcontext(span)
                )
                with own_span as own:
                    result = to_result(
                        record, sent, self.policy, started_at, self.rng,
                        traceparent=own.traceparent(),
                        message_id=first.message_id if included > 1 else None,
                        counts_call=number == 0,
                        records_in_call=included,
                    )  # fmt: skip
                    own.finished(result.outcome, result.error_code, result.status)
                results.append(result)
        results += [unsent_result(record, started_at) for record in records[answered:]]
        # One after the other, so that they reach one batch; more are due after the last one
        # if any other call is in flight (this one still is in the set).
        for number, result in enumerate(results, 1):
            more = number < len(results) or len(self._inflight) > 1
            self.completer.put(result, more_due=more)

    async def _drain(self, ctx: LoopContext, completer: asyncio.Task[None]) -> None:
        """Lets in-flight calls finish and their results land; the caller bounds the time."""
        try:
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
            # The completer may be in the middle of a batch: let it apply everything queued,
            # then stop at the marker (cancelling it here would lose results it holds).
            if completer.done():  # it crashed on a bug: a fresh one drains the queue
                completer = self._start_completer(ctx)
            self.completer.finish()
            await completer
        finally:
            completer.cancel()
            for task in self._inflight:
                task.cancel()
