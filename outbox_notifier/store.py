"""The pipeline's records: claims, transitions, the attempt log and the schema check.

One of the store modules, the only modules of the daemon that run SQL (``maintenance_store``:
purges, the leader lease, the metrics snapshot; ``connections``: the pool, the start-up probe,
the outbox listener; ``timeouts``: the bounds every statement runs under). Only they, and the
few modules named in tests/unit/test_import_rules.py with their reasons, import the driver.

Every statement comes from ``sql/queries.sql`` and works on whole batches: a claim of N rows, or
the results of N calls, is one statement whatever N is. Arrays go to Postgres as parameters and
are unpacked there with ``unnest``, so there are no per-row round trips.
"""

from __future__ import annotations

import types
import typing
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import LiteralString

import msgspec
import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from outbox_notifier import migrations
from outbox_notifier.names import ErrorCode, Outcome, RecordStatus
from outbox_notifier.records import RecordFields
from outbox_notifier.sqlfiles import query
from outbox_notifier.timeouts import Bounds, SessionTimeouts, StatementTimeouts

_encoder = msgspec.json.Encoder()

# The driver's errors the stages handle, under the store's names, so that no stage imports the
# driver: any database error; the database unreachable or the connection lost; a value refused.
DatabaseError = psycopg.Error
OperationalError = psycopg.OperationalError
ValueRefused = psycopg.DataError
# The schema is not there at all (never migrated, or dropped).
SchemaMissing = (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)
# A function the role may not call, or that the schema does not have: asking again won't help.
NotCallable = (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction)

#: A connection handed out by ``RecordStore.transaction()``.
Connection = AsyncConnection


def _json(value: object) -> str:
    """A batch as one JSON document, unpacked in SQL by ``jsonb_to_recordset``: one parameter
    instead of one array per column, and far cheaper for the driver to send."""
    return _encoder.encode(value).decode()


class OutboxRow(msgspec.Struct, frozen=True):
    """A claimed outbox row; ``payload`` is its JSON text as UTF-8, None when it is larger
    than the claim's ``max_payload_bytes`` (left in the database, ``payload_bytes`` says why)."""

    id: int
    event_type: str
    event_version: str
    payload: bytes | None
    payload_bytes: int
    created_at: datetime


class OutboxClaim(msgspec.Struct, frozen=True):
    """A relay claim: its rows, in id order, and the two transaction ids the relay's cursor
    moves by (``relay_cursor``); both 0 when no row was claimed."""

    rows: list[OutboxRow]
    running_xmin: int
    claim_xid: int


class NewRecord(RecordFields, frozen=True, kw_only=True):
    """A notification record to create from a valid outbox row."""

    outbox_id: int
    summary_text: str
    fallback_text: str
    fallback_used: bool
    requested_at: datetime  # the producer's, from the payload
    outbox_created_at: datetime  # when the outbox row was written: latency starts here
    # Records of one channel and ordering key go out in outbox_id order (claim_due_v1).
    ordering_key: str | None = None


#: The PostgreSQL type of a recordset column by the Python type of the struct field it reads.
_PG_TYPES: dict[object, LiteralString] = {
    int: "bigint",
    str: "text",
    bool: "boolean",
    datetime: "timestamptz",
}


def recordset_columns(struct: type[msgspec.Struct]) -> sql.Composed:
    """``name type, ...`` of a ``jsonb_to_recordset`` reading the struct's JSON encoding."""
    columns = []
    for field in msgspec.structs.fields(struct):
        # an optional field (``T | None``) is a column of T: JSON null reads as NULL
        kind = _optional_of(field.type)
        if kind not in _PG_TYPES:
            raise TypeError(f"{struct.__name__}.{field.name}: no PostgreSQL type for {field.type}")
        columns.append(sql.SQL("{} {}").format(
            sql.Identifier(field.name), sql.SQL(_PG_TYPES[kind])
        ))  # fmt: skip
    return sql.SQL(", ").join(columns)


def _optional_of(kind: object) -> object:
    """``T`` of ``T | None``; any other type unchanged."""
    args = typing.get_args(kind)
    optional = len(args) == 2 and type(None) in args
    if optional and typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(arg for arg in args if arg is not type(None))
    return kind


def field_names(struct: type[msgspec.Struct]) -> sql.Composed:
    return sql.SQL(", ").join(map(sql.Identifier, struct.__struct_fields__))


#: The relay's statement with NewRecord's columns filled in, built once at import.
RELAY_OUTBOX = sql.SQL(query("relay_outbox")).format(
    new_record_columns=recordset_columns(NewRecord), new_record_fields=field_names(NewRecord)
)


class ClaimedRecord(RecordFields, frozen=True):
    """A record claimed for delivery, with its recipient: the user's row in
    ``notification_channels`` (None fields when there is none). Built from a row of
    ``claim_records`` by position: the ``RecordFields`` first, then these."""

    id: int
    channel: str
    summary_text: str
    fallback_text: str
    fallback_used: bool
    attempt_count: int
    max_attempts: int
    lease_token: int
    recipient_enabled: bool | None
    webhook_url: str | None
    auth_kind: str | None
    auth_secret: str | None
    provider: str
    # The digest call this record goes out in, shared by the digest's records (claimed
    # together, one per target and claim); None: a call of its own.
    message_id: int | None = None
    # The record's W3C trace context: read only by a daemon that traces (claim_records with
    # ``traced``); the claim functions' columns end before them.
    traceparent: str | None = None
    tracestate: str | None = None


class Pacing(msgspec.Struct, frozen=True, kw_only=True):
    """How often one target may be called, by all replicas together (claims wait for it).

    ``per_s``/``per_min`` give, by provider name, the most calls one target may receive in any
    second / minute (0: no limit); ``margin_s`` widens those windows for network jitter. A 429
    throttles its target until its Retry-After (at most ``retry_after_max_s``, which bounds a
    record's Retry-After as well), then halves its budget for ``slowdown_s`` (``slow_per_s``
    calls a second for a target with none). A 429 is pacing, never a failure of the breaker.
    """

    per_s: dict[str, int] = msgspec.field(default_factory=dict)
    per_min: dict[str, int] = msgspec.field(default_factory=dict)
    margin_s: float = 0.05
    slowdown_s: float = 60.0
    slow_per_s: int = 5
    retry_after_max_s: float = 3600.0


class Breaker(msgspec.Struct, frozen=True, kw_only=True):
    """When a failing target is left alone: its breaker opens (the target is *tripped*: no claim
    calls it) for ``cooloff_s`` when, over the calls that started in the last ``window_s``, at
    least ``min_calls`` were made, at least ``min_failures`` failed and the failures reach
    ``failure_ratio``. The database keeps the state in ``targets.paused_until`` (the contract's
    name); in code it is the breaker's, so an operator's pause is never confused with it.
    """

    min_failures: int = 5
    cooloff_s: float = 60.0
    window_s: float = 30.0
    min_calls: int = 20
    failure_ratio: float = 0.5


class Digests(msgspec.Struct, frozen=True, kw_only=True):
    """Which providers' records are merged into digests when their target's budget cannot
    send them one call each (``providers``: the chat bots whose ``<prefix>_digest`` is on),
    and the most records one digest carries."""

    providers: tuple[str, ...] = ()
    max_records: int = 20


class ClaimPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What every claim applies: the lease, per-target ``pacing``, the ``breaker`` and
    ``digests``.

    ``durable`` makes a claim wait for its WAL flush (the ``durable_claims`` setting; see
    claim_records in the SQL).
    """

    lease_s: float
    pacing: Pacing = msgspec.field(default_factory=Pacing)
    breaker: Breaker = msgspec.field(default_factory=Breaker)
    digests: Digests = msgspec.field(default_factory=Digests)
    durable: bool = False


def claim_params(policy: ClaimPolicy) -> dict[str, object]:
    """The claim's parameters from ``policy``. The arrays go as PostgreSQL array literals, cast
    in the statement: psycopg would otherwise inspect each list on every claim to pick its
    element type."""
    pacing, breaker = policy.pacing, policy.breaker
    paced = sorted(set(pacing.per_s) | set(pacing.per_min))
    return {
        "lease_s": policy.lease_s,
        "paced": _array_literal(paced),
        "per_s": _array_literal([pacing.per_s.get(p, 0) for p in paced]),
        "per_min": _array_literal([pacing.per_min.get(p, 0) for p in paced]),
        "margin_s": pacing.margin_s,
        "breaker_failures": breaker.min_failures,
        "cooloff_s": breaker.cooloff_s,
        "slow_per_s": pacing.slow_per_s,
        "digest": _array_literal(sorted(policy.digests.providers)),
        "digest_max_records": policy.digests.max_records,
        "durable": policy.durable,
    }


def apply_params(results: Sequence[AttemptResult], policy: ClaimPolicy) -> dict[str, object]:
    """The parameters of ``apply_results`` for a batch of ``results`` under ``policy``."""
    pacing, breaker = policy.pacing, policy.breaker
    return {
        "results": _json(results),
        "host_now": datetime.now(UTC),
        "breaker_failures": breaker.min_failures,
        "cooloff_s": breaker.cooloff_s,
        "window_s": breaker.window_s,
        "min_calls": breaker.min_calls,
        "failure_ratio": breaker.failure_ratio,
        "slowdown_s": pacing.slowdown_s,
        "retry_after_max_s": pacing.retry_after_max_s,
    }


def _array_literal(values: Sequence[str] | Sequence[int]) -> str:
    """``values`` as a one-dimensional PostgreSQL array literal, every element quoted."""
    quoted = ('"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
    return "{" + ",".join(quoted) + "}"


class AttemptResult(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt's result: what the provider call produced, and the status it leads to, as
    ``apply_results`` will write it (one ``delivery_attempts`` row, one record transition).

    The record's channel, user, trace id and dedupe key, and the target the call went to, are
    not carried: ``apply_results`` derives them from ``record_id`` in the database.
    """

    record_id: int
    lease_token: int
    attempt: int
    provider: str = ""  # the provider that made the call (a metric label)
    status: RecordStatus
    outcome: Outcome
    error_code: ErrorCode | None
    error: str | None
    delay_s: float | None
    # A Retry-After date that could not be read against the reply's Date header: the delay
    # is taken from the database clock instead (apply_results), so the host's clock moves
    # nothing. retry_after_s: the provider's Retry-After in seconds, for the target's throttle.
    retry_at: datetime | None = None
    retry_after_s: float | None = None
    disable_channel: bool = False  # the target answered 410 Gone: switch the recipient off
    provider_message_id: str | None
    # The request as sent (secrets masked), JSON the daemon's encoders made: written into the
    # batch document as the JSON value it is, so the database parses it once (0020).
    request_json: msgspec.Raw | None
    response_json: str | None
    http_status: int | None
    started_at: datetime
    duration_ms: float
    # The W3C traceparent of the call's delivery span (a daemon that traces): kept by a record
    # that has no trace context yet, and the metrics' exemplar.
    traceparent: str | None = None
    # Digests: the call's message id, shared by the results of one digest (None: the call
    # carried this record alone). call_records: how many records the call carried, on the one
    # result that stands for the call in the target's bookkeeping (the breaker, the throttle)
    # and the per-call metrics; 0 on a digest's other results, which do not count it again.
    # unsent: the call did not carry this record (the digest left it out to keep the
    # platform's limits): no attempt is logged, and it goes back to waiting with its attempt
    # not spent (only record_id, lease_token and status are read). alone_next: its next call
    # carries it alone (the digest was refused for its payload).
    message_id: int | None = None
    call_records: int = 1
    unsent: bool = False
    alone_next: bool = False


class AppliedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt result's record after ``apply_results``: what logging and metrics need.

    ``status`` is None for a late result (its worker had lost the lease): it was logged as an
    attempt but not applied.
    """

    id: int
    channel: str
    status: RecordStatus | None
    latency_s: float | None = None
    trace_id: str = ""
    dedupe_key: str = ""
    ordered: bool = False  # the record has an ordering key

    @property
    def finished(self) -> bool:
        """Applied, and terminal: nothing more will be tried without an operator."""
        return self.status in ("sent", "dead", "skipped")

    @property
    def applied(self) -> bool:
        return self.status is not None


class AppliedResults(msgspec.Struct, frozen=True, kw_only=True):
    """What one ``apply_results`` statement returned for a batch of attempt results."""

    records: list[AppliedRecord]  # one per result whose record still exists
    tripped: list[str]  # keys of the targets whose breaker this batch opened
    woke: bool = False  # the batch made records of a digest queue due (a woken head, left-outs)

    @property
    def applied(self) -> list[AppliedRecord]:
        return [row for row in self.records if row.applied]


class RescuedRecord(msgspec.Struct, frozen=True):
    """A record whose lease expired, as ``rescue_expired_leases`` left it (failed or dead)."""

    id: int
    channel: str
    status: str


class RecordStore:
    """Batch statements over a connection pool whose connections are in autocommit mode.

    Every statement is bounded by the ``timeouts``: one autocommit round trip on a connection
    that carries them for its session (``session``), else a short transaction of its own that
    sets them first (see ``outbox_notifier.timeouts``). The relay, which must claim and write in
    one transaction, runs inside ``transaction()``.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection],
        *,
        timeouts: StatementTimeouts | None = None,
        session: SessionTimeouts | None = None,
    ) -> None:
        self.pool = pool
        self.timeouts = timeouts
        self.session = session
        self._bounds = Bounds(timeouts, session)
        self._claim_params: tuple[ClaimPolicy, dict[str, object]] | None = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.pool.connection() as conn, self._bounds.transaction(conn):
            yield conn

    @asynccontextmanager
    async def _statement(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one bounded statement (``timeouts.Bounds.statement``)."""
        async with self.pool.connection() as conn, self._bounds.statement(conn):
            yield conn

    # -- relay -----------------------------------------------------------------------------

    async def claim_outbox(
        self,
        conn: AsyncConnection,
        limit: int,
        *,
        max_batch_bytes: int,
        max_payload_bytes: int,
        after_id: int = 0,
    ) -> OutboxClaim:
        """Up to ``limit`` pending rows past ``after_id`` (the relay's cursor; 0 sweeps from
        the start) whose payloads total at most ``max_batch_bytes`` (at least one row), a
        payload over ``max_payload_bytes`` left out."""
        params = {
            "limit": limit,
            "max_batch_bytes": max_batch_bytes,
            "max_payload_bytes": max_payload_bytes,
            "after_id": after_id,
        }
        # binary: the payload's bytea arrives as bytes, not as hex text to decode
        cur = await conn.execute(query("claim_outbox"), params, binary=True)
        fetched = await cur.fetchall()
        if not fetched:
            return OutboxClaim([], 0, 0)
        return OutboxClaim([OutboxRow(*row[:6]) for row in fetched], fetched[0][6], fetched[0][7])

    async def relay(
        self,
        conn: AsyncConnection,
        records: Sequence[NewRecord],
        rejected: Sequence[tuple[int, str]],
        *,
        channel: str,
        max_attempts: int,
    ) -> list[tuple[int, int]]:
        """Writes a relay batch; returns (outbox_id, record_id) of the records created."""
        params = {
            "channel": channel,
            "max_attempts": max_attempts,
            "records": _json(records),
            "rejected": _json([{"id": i, "reason": reason} for i, reason in rejected]),
        }
        cur = await conn.execute(RELAY_OUTBOX, params)
        return [(row[0], row[1]) for row in await cur.fetchall()]

    # -- delivery --------------------------------------------------------------------------

    async def claim_records(
        self, limit: int, policy: ClaimPolicy, *, after_id: int = 0, traced: bool = False
    ) -> list[ClaimedRecord]:
        """Claims up to ``limit`` due records; first attempts only past ``after_id`` (the
        caller's cursor; 0 sweeps from the start, see ``claim_records`` in the SQL);
        ``traced``: with their trace contexts."""
        # The policy's part of the parameters is the same on every claim: built once.
        if self._claim_params is None or self._claim_params[0] is not policy:
            self._claim_params = (policy, claim_params(policy))
        params = {"limit": limit, "after_id": after_id, **self._claim_params[1]}
        statement = query("claim_records_traced" if traced else "claim_records")
        async with self._statement() as conn:
            cur = await conn.execute(statement, params)
            return [ClaimedRecord(*row) for row in await cur.fetchall()]

    async def seconds_until_next_due(self) -> float | None:
        """When the earliest deferred or failed record becomes due (None: nothing waits)."""
        async with self._statement() as conn:
            row = await (await conn.execute(query("next_due"))).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def apply_results(
        self, results: Sequence[AttemptResult], policy: ClaimPolicy
    ) -> AppliedResults:
        """Applies a batch of results, their 410 disables and the pacing and breaker
        bookkeeping in one statement (see ``apply_results`` in the SQL)."""
        async with self._statement() as conn:
            cur = await conn.execute(query("apply_results"), apply_params(results, policy))
            rows = await cur.fetchall()
        tripped: list[str] = (rows[0][6] or []) if rows else []
        return AppliedResults(
            woke=bool(rows and rows[0][8]),
            records=[
                AppliedRecord(
                    id=row[0],
                    channel=row[1],
                    status=row[2],
                    latency_s=None if row[3] is None else float(row[3]),
                    trace_id=row[4] or "",
                    dedupe_key=row[5],
                    ordered=row[7],
                )
                for row in rows
            ],
            tripped=tripped,
        )

    async def release_next_in_order(self, record_ids: Sequence[int]) -> int:
        """Makes the record after each of these finished keyed records in its ordering key
        due now (see ``release_next_in_order`` in the SQL); returns how many were released.

        Two statements in one transaction: the first locks those records, waiting for a claim
        that may be deferring one of them behind the head it saw still sending; the second,
        with a snapshot taken after that claim committed, releases them."""
        params = {"ids": list(record_ids)}
        async with self.transaction() as conn:
            await conn.execute(query("lock_next_in_order"), params)
            cur = await conn.execute(query("release_next_in_order"), params)
            return cur.rowcount

    async def rescue_expired_leases(
        self, limit: int, delays_s: Sequence[float], jitter: float
    ) -> list[RescuedRecord]:
        """Rescues up to ``limit`` expired leases; the delay after attempt n is ``delays_s[n]``
        times a factor drawn per record from ``[1 - jitter, 1 + jitter)``."""
        params = {"limit": limit, "delays_s": list(delays_s), "jitter": jitter}
        async with self._statement() as conn:
            cur = await conn.execute(query("rescue_expired_leases"), params)
            return [RescuedRecord(*row) for row in await cur.fetchall()]

    async def schema_compatibility(
        self, daemon_version: int | None = None
    ) -> migrations.Compatibility:
        async with self._statement() as conn:
            return await migrations.compatibility(conn, daemon_version)
