"""The operator commands ``status``, ``requeue`` and ``replay``: short-lived, synchronous, one
connection.

Each prints for a person at a terminal (or, with ``--json``, for a script) and returns the
process exit code: 0 done; 1 the database is unreachable, the schema is missing, or not
everything asked for was requeued or replayed (a record held by another transaction); 2 (replay)
arguments the database refuses. Nothing printed here ever includes a channel's webhook URL or
secret: the queries never select them, and the error texts of dead letters, which come from
providers, have any URL cut down to its scheme and host.

The filters of a bulk requeue live in one SQL function, ``outbox_notifier.dead_letters_matching``,
which both the dry run and ``outbox_notifier.requeue_dead`` select through, so the two cannot
disagree. Replay's, ``outbox_notifier.replay_matching_v1``, is shared the same way by its dry
run and ``outbox_notifier.replay_v1``.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import msgspec
import psycopg

from outbox_notifier.dbhealth import first_line
from outbox_notifier.settings import Settings
from outbox_notifier.sqlfiles import query

# The command's name in messages and its exit codes (outbox_notifier.cli documents them); the
# CLI and pauses take them from here.
PROG = "outbox-notifier"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

RECENT_DEAD_LETTERS = 10
ERROR_EXCERPT_RUNES = 120

# scheme://host, then the rest of the URL (a webhook path carries the bot's token).
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s'\"<>]*)[^\s'\"<>]*")


class RecordCount(msgspec.Struct, frozen=True, kw_only=True):
    channel: str
    status: str
    count: int
    oldest_age_s: float


class OutboxCounts(msgspec.Struct, frozen=True, kw_only=True):
    pending: int
    relayed: int
    rejected: int
    oldest_pending_age_s: float | None


class StuckSending(msgspec.Struct, frozen=True, kw_only=True):
    count: int  # every record in 'sending'
    lease_expired: int  # of which the lease has expired: the retry loop will take them back
    oldest_expired_for_s: float | None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    channel: str
    error_code: str | None
    error: str | None
    updated_at: datetime


class ActivePause(msgspec.Struct, frozen=True, kw_only=True):
    """An operator pause in force (the ``paused`` view): never a URL."""

    id: int
    scope: str
    paused: str
    reason: str
    paused_by: str
    since: datetime
    until: datetime | None
    ended: bool  # past its end, not yet marked resumed: no longer honoured
    records_waiting: int


class DigestQueue(msgspec.Struct, frozen=True, kw_only=True):
    """A chat-bot target whose records wait for a digest (the ``digest_queues`` view): named by
    its key, provider and host, never its URL."""

    target_key: str
    provider: str | None  # None until the target's first call is on record
    host: str | None
    waiting: int  # pending in the queue
    sending: int  # in the digest in flight
    oldest_age_s: float
    breaker_open: bool


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``status --json`` prints; the keys are stable."""

    records: list[RecordCount]
    outbox: OutboxCounts
    stuck_sending: StuckSending
    dead_letters: list[DeadLetter]  # the most recent, newest first
    pauses: list[ActivePause] = msgspec.field(default_factory=list)  # oldest first
    digest_queues: list[DigestQueue] = msgspec.field(default_factory=list)  # longest wait first


class MatchingDeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    channel: str
    error_code: str | None
    updated_at: datetime


class OperatorError(Exception):
    """The command cannot run; ``str()`` is one line for the operator."""


# -- database ----------------------------------------------------------------------------------


@contextmanager
def _connect(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(settings.dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise OperatorError(f"cannot connect to the database: {first_line(exc)}") from exc
    with conn:
        try:
            yield conn
        except psycopg.errors.UndefinedTable as exc:
            raise OperatorError(
                f"the outbox_notifier schema is missing or old ({first_line(exc)}): "
                "run `outbox-notifier migrate`"
            ) from exc
        except psycopg.errors.UndefinedFunction as exc:
            raise OperatorError(
                f"the outbox_notifier schema is old ({first_line(exc)}): "
                "run `outbox-notifier migrate`"
            ) from exc


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return EXIT_FAILURE


def load_status(conn: psycopg.Connection[Any]) -> StatusReport:
    """Reads the backlog in one read-only snapshot, so the sections agree with each other."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        records = [
            RecordCount(channel=row[0], status=row[1], count=row[2], oldest_age_s=row[3])
            for row in conn.execute(query("status_records")).fetchall()
        ]
        outbox_row = conn.execute(query("status_outbox")).fetchone()
        stuck_row = conn.execute(query("status_stuck_sending")).fetchone()
        dead_rows = conn.execute(
            query("status_dead_letters"), {"limit": RECENT_DEAD_LETTERS}
        ).fetchall()
        pauses = [
            ActivePause(
                id=row[0], scope=row[1], paused=row[2], reason=row[3], paused_by=row[4],
                since=row[5], until=row[6], ended=row[7], records_waiting=row[8],
            )
            for row in conn.execute(query("status_pauses")).fetchall()
        ]  # fmt: skip
        queues = [
            DigestQueue(
                target_key=row[0], provider=row[1], host=row[2], waiting=row[3],
                sending=row[4], oldest_age_s=row[5], breaker_open=row[6],
            )
            for row in conn.execute(query("status_digest_queues")).fetchall()
        ]  # fmt: skip
    assert outbox_row is not None and stuck_row is not None  # aggregates: always one row
    return StatusReport(
        records=records,
        outbox=OutboxCounts(
            pending=outbox_row[0],
            relayed=outbox_row[1],
            rejected=outbox_row[2],
            oldest_pending_age_s=outbox_row[3],
        ),
        stuck_sending=StuckSending(
            count=stuck_row[0], lease_expired=stuck_row[1], oldest_expired_for_s=stuck_row[2]
        ),
        dead_letters=[
            DeadLetter(
                id=row[0],
                channel=row[1],
                error_code=row[2],
                error=short_error(row[3]),
                updated_at=row[4],
            )
            for row in dead_rows
        ],
        pauses=pauses,
        digest_queues=queues,
    )


def short_error(text: str | None) -> str | None:
    """An error text on one line, URLs cut to scheme and host, at most ERROR_EXCERPT_RUNES."""
    if text is None:
        return None
    one_line = " ".join(_URL.sub(r"\1/...", text).split())
    if len(one_line) > ERROR_EXCERPT_RUNES:
        return one_line[: ERROR_EXCERPT_RUNES - 3] + "..."
    return one_line


# -- status ------------------------------------------------------------------------------------


def status(settings: Settings, *, as_json: bool) -> int:
    """Prints the backlog: record counts, the outbox, stuck sends and recent dead letters."""
    try:
        with _connect(settings) as conn:
            report = load_status(conn)
    except OperatorError as exc:
        return _fail(str(exc))
    if as_json:
        print(msgspec.json.encode(report).decode())
    else:
        print(render_status(report), end="")
    return EXIT_OK


def render_status(report: StatusReport) -> str:
    """The human form of `status`: small aligned tables under headings."""
    out: list[str] = []

    out.append("records")
    if report.records:
        out += _table(
            ("channel", "status", "count", "oldest age"),
            [
                (r.channel, r.status, str(r.count), format_age(r.oldest_age_s))
                for r in report.records
            ],
            right=(2,),
        )
    else:
        out.append("  (no records)")

    outbox = report.outbox
    out += ["", "outbox"]
    out += _table(
        ("status", "count", "oldest age"),
        [
            ("pending", str(outbox.pending), format_age(outbox.oldest_pending_age_s)),
            ("relayed", str(outbox.relayed), ""),
            ("rejected", str(outbox.rejected), ""),
        ],
        right=(1,),
    )

    stuck = report.stuck_sending
    out += ["", "stuck in sending"]
    out += _table(
        ("sending", "lease expired", "longest expired for"),
        [
            (
                str(stuck.count),
                str(stuck.lease_expired),
                format_age(stuck.oldest_expired_for_s),
            )
        ],
        right=(0, 1),
    )

    out += ["", "paused by an operator"]
    if report.pauses:
        out += _table(
            ("id", "paused", "waiting", "since", "until", "by", "reason"),
            [
                (
                    str(p.id),
                    p.paused,
                    str(p.records_waiting),
                    _timestamp(p.since),
                    ("ended " if p.ended else "") + (_timestamp(p.until) if p.until else "-"),
                    p.paused_by,
                    p.reason,
                )
                for p in report.pauses
            ],
            right=(0, 2),
        )
    else:
        out.append("  (none)")

    out += ["", "waiting for a digest (chat bots over their budget)"]
    if report.digest_queues:
        out += _table(
            ("target", "provider", "host", "waiting", "sending", "oldest age", "breaker"),
            [
                (
                    q.target_key[:12],
                    q.provider or "-",
                    q.host or "-",
                    str(q.waiting),
                    str(q.sending),
                    format_age(q.oldest_age_s),
                    "open" if q.breaker_open else "",
                )
                for q in report.digest_queues
            ],
            right=(3, 4),
        )
    else:
        out.append("  (none)")

    out += ["", f"recent dead letters (newest {RECENT_DEAD_LETTERS})"]
    if report.dead_letters:
        out += _table(
            ("id", "channel", "error code", "updated at", "error"),
            [
                (
                    str(d.id),
                    d.channel,
                    d.error_code or "",
                    _timestamp(d.updated_at),
                    d.error or "",
                )
                for d in report.dead_letters
            ],
            right=(0,),
        )
    else:
        out.append("  (none)")
    return "\n".join(out) + "\n"


def format_age(seconds: float | None) -> str:
    """``None`` -> ``-``; otherwise the two largest units, e.g. ``3d4h``, ``5m12s``, ``0.4s``."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return "-" + format_age(-seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        amount, whole = divmod(whole, size)
        if amount or parts:
            parts.append(f"{amount}{unit}")
    return "".join(parts[:2])


def _timestamp(value: datetime) -> str:
    return value.isoformat(sep=" ", timespec="seconds")


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()
) -> list[str]:
    """Rows as aligned columns (``right``: column numbers aligned right), indented two spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return ("  " + "  ".join(padded)).rstrip()

    return [line(header), *(line(row) for row in rows)]


# -- requeue -----------------------------------------------------------------------------------

_REFUSALS: dict[str | None, str] = {
    None: "no such record",
    "sent": "status is sent",
    "sending": "it is in flight (status sending)",
    "pending": "it is already pending",
}


class DeadLetterFilters(msgspec.Struct, frozen=True, kw_only=True):
    """Which dead records a bulk requeue takes; None means any. The time range is on
    ``updated_at``, when the record died: ``since`` inclusive, ``until`` exclusive."""

    channel: str | None = None
    error_code: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def given(self) -> bool:
        """Whether any filter is set: a bulk requeue needs one, a requeue by id none."""
        return any(value is not None for value in msgspec.structs.astuple(self))


def requeue(
    settings: Settings,
    filters: DeadLetterFilters,
    *,
    record_id: int | None,
    dry_run: bool,
) -> int:
    """Requeues one record by id, or the dead records matching ``filters``.

    By id: a dead, failed or skipped record goes back to pending with a fresh attempt budget;
    exit 1 with the reason when it cannot. By filters: every matching dead record (exit 1 when
    some were held by another transaction and skipped; run again). ``dry_run`` prints what
    would be requeued and changes nothing.
    """
    try:
        with _connect(settings) as conn:
            if record_id is not None:
                return _requeue_one(conn, record_id, dry_run=dry_run)
            return _requeue_matching(conn, filters, dry_run=dry_run)
    except OperatorError as exc:
        return _fail(str(exc))


def _requeue_one(conn: psycopg.Connection[Any], record_id: int, *, dry_run: bool) -> int:
    params = {"id": record_id}
    if dry_run:
        row = conn.execute(query("record_status"), params).fetchone()
        status_now: str | None = None if row is None else row[0]
        if status_now in ("dead", "failed", "skipped"):
            print(f"would requeue record {record_id} (status {status_now})")
            return EXIT_OK
        print(f"record {record_id} would not be requeued: {_refusal(status_now)}")
        return EXIT_FAILURE
    current: str | None = None
    with conn.transaction():
        row = conn.execute(query("requeue_record"), params).fetchone()
        requeued = row is not None and bool(row[0])
        if not requeued:
            row = conn.execute(query("record_status"), params).fetchone()
            current = None if row is None else row[0]
    if requeued:
        print(f"requeued record {record_id}")
        return EXIT_OK
    print(f"record {record_id} was not requeued: {_refusal(current)}")
    return EXIT_FAILURE


def _refusal(current: str | None) -> str:
    if current in _REFUSALS:
        return _REFUSALS[current]
    # dead, failed or skipped, yet not requeued: it changed or was held by another transaction
    return f"it is held by another transaction (status {current}); try again"


def _requeue_matching(
    conn: psycopg.Connection[Any], filters: DeadLetterFilters, *, dry_run: bool
) -> int:
    if dry_run:
        matching = dead_letters_matching(conn, filters)
        if not matching:
            print("no dead records match")
            return EXIT_OK
        print(f"would requeue {_count(len(matching), 'dead record')}:")
        table = _table(
            ("id", "channel", "error code", "updated at"),
            [
                (str(m.id), m.channel, m.error_code or "", _timestamp(m.updated_at))
                for m in matching
            ],
            right=(0,),
        )
        print("\n".join(table))
        return EXIT_OK

    with conn.transaction():
        matching_ids = [m.id for m in dead_letters_matching(conn, filters)]
        params = msgspec.structs.asdict(filters)
        requeued = [row[0] for row in conn.execute(query("requeue_dead"), params).fetchall()]
    # Rows locked by a worker or another operator are skipped rather than waited for.
    skipped = sorted(set(matching_ids) - set(requeued))
    if not requeued and not skipped:
        print("no dead records match")
        return EXIT_OK
    print(f"requeued {_count(len(requeued), 'dead record')}{_id_list(requeued)}")
    if skipped:
        print(
            f"skipped {_count(len(skipped), 'record')} held by another transaction"
            f"{_id_list(skipped)}; run the command again"
        )
        return EXIT_FAILURE
    return EXIT_OK


def dead_letters_matching(
    conn: psycopg.Connection[Any], filters: DeadLetterFilters
) -> list[MatchingDeadLetter]:
    """The dead records a bulk requeue with these filters would pick."""
    params = msgspec.structs.asdict(filters)
    return [
        MatchingDeadLetter(id=row[0], channel=row[1], error_code=row[2], updated_at=row[3])
        for row in conn.execute(query("dead_letters_matching"), params).fetchall()
    ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _id_list(ids: Sequence[int]) -> str:
    return ": " + ", ".join(str(i) for i in ids) if ids else ""


# -- replay ------------------------------------------------------------------------------------

#: The most records one replay may take (replay_matching_v1 refuses more), and the defaults.
REPLAY_MAX_LIMIT = 10_000
REPLAY_DEFAULT_LIMIT = 1_000
REPLAY_DEFAULT_RATE_PER_S = 10.0


class ReplaySelection(msgspec.Struct, frozen=True, kw_only=True):
    """Which records a replay looks at; None means any. The time range is on ``updated_at``:
    for a sent record its ``sent_at``, for a dead one when it died; ``since`` inclusive,
    ``until`` exclusive. ``target_url`` is a channel's webhook URL, matched by its target."""

    since: datetime
    until: datetime
    user_id: int | None = None
    provider: str | None = None
    target_url: str | None = None
    error_code: str | None = None
    limit: int = REPLAY_DEFAULT_LIMIT


class ReplayCandidate(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    user_id: int
    provider: str
    status: str
    error_code: str | None
    updated_at: datetime
    attempt_count: int


class ReplayReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``replay --json`` prints; the keys are stable."""

    dry_run: bool
    reason: str
    rate_per_s: float
    selected: list[ReplayCandidate]  # what the replay takes (the dry run) or expected to take
    replayed: list[int]  # the ids replayed (empty in a dry run)
    held: list[int]  # selected, but held by another transaction: skipped, run again
    over_limit: int  # sent or dead records of the range beyond the limit: the next run's
    not_replayable: dict[str, int]  # records of the range in another status, by status


def replay_problem(selection: ReplaySelection, *, reason: str, rate_per_s: float) -> str | None:
    """What is wrong with the arguments, in one line (None: nothing). replay_v1 checks the
    same; checking here first lets the command say it without a database round trip."""
    if not selection.until > selection.since:
        return "--until must be after --since"
    if not reason.strip():
        return "--reason is required: it goes into the attempt log"
    if len(reason) > 500:
        return "--reason is longer than 500 characters"
    if not 1 <= selection.limit <= REPLAY_MAX_LIMIT:
        return f"--limit must be between 1 and {REPLAY_MAX_LIMIT}, got {selection.limit}"
    if not 0 < rate_per_s < math.inf:
        return f"--rate must be a positive number of records a second, got {rate_per_s}"
    return None


def replay(
    settings: Settings,
    selection: ReplaySelection,
    *,
    reason: str,
    rate_per_s: float,
    dry_run: bool,
    as_json: bool,
) -> int:
    """Delivers the selected sent and dead records again, as new attempts of the same records.

    Each goes back to ``failed``, due one after another at ``rate_per_s`` so that the delivery
    loop's retry path takes them without crowding out new records, with the attempts of a new
    record (``settings.max_attempts``) on top of those it has made, and ``reason`` on the record
    and on each attempt it makes. ``dry_run`` shows the same selection and changes nothing.
    """
    problem = replay_problem(selection, reason=reason, rate_per_s=rate_per_s)
    if problem:
        print(f"{PROG}: replay: {problem}", file=sys.stderr)
        return EXIT_USAGE
    params: dict[str, Any] = {
        **msgspec.structs.asdict(selection),
        "reason": reason,
        "rate_per_s": rate_per_s,
        "attempts": settings.max_attempts,
    }
    try:
        with _connect(settings) as conn, conn.transaction():
            selected = replay_selection(conn, params)
            left_out = dict(conn.execute(query("replay_left_out"), params).fetchall())
            replayed = (
                []
                if dry_run
                else [row[0] for row in conn.execute(query("replay"), params).fetchall()]
            )
    except psycopg.errors.InvalidParameterValue as exc:
        print(f"{PROG}: {first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OperatorError as exc:
        return _fail(str(exc))
    report = ReplayReport(
        dry_run=dry_run,
        reason=reason,
        rate_per_s=rate_per_s,
        selected=selected,
        replayed=replayed,
        held=[] if dry_run else sorted({c.id for c in selected} - set(replayed)),
        over_limit=sum(n for status, n in left_out.items() if status in ("sent", "dead")),
        not_replayable={s: n for s, n in left_out.items() if s not in ("sent", "dead")},
    )
    if as_json:
        print(msgspec.json.encode(report).decode())
    else:
        print(render_replay(report, selection), end="")
    return EXIT_FAILURE if report.held else EXIT_OK


def replay_selection(
    conn: psycopg.Connection[Any], params: dict[str, Any]
) -> list[ReplayCandidate]:
    """The records a replay with these parameters takes (``ReplaySelection``'s fields)."""
    return [
        ReplayCandidate(
            id=row[0],
            user_id=row[1],
            provider=row[2],
            status=row[3],
            error_code=row[4],
            updated_at=row[5],
            attempt_count=row[6],
        )
        for row in conn.execute(query("replay_selection"), params).fetchall()
    ]


def render_replay(report: ReplayReport, selection: ReplaySelection) -> str:
    """The human form of `replay`: what was (or would be) replayed, then what was left."""
    out: list[str] = []
    statuses = Counter(c.status for c in report.selected)
    mix = ", ".join(f"{statuses[s]} {s}" for s in ("sent", "dead") if statuses[s])
    if report.dry_run:
        if report.selected:
            out.append(
                f"would replay {_count(len(report.selected), 'record')} ({mix}) at "
                f"{report.rate_per_s:g}/s, over {format_age(_spread_s(report))}:"
            )
            out += _table(
                ("id", "user", "provider", "status", "attempts", "error code", "updated at"),
                [
                    (
                        str(c.id),
                        str(c.user_id),
                        c.provider,
                        c.status,
                        str(c.attempt_count),
                        c.error_code or "",
                        _timestamp(c.updated_at),
                    )
                    for c in report.selected
                ],
                right=(0, 1, 4),
            )
        else:
            out.append("no sent or dead records match")
    elif report.replayed:
        out.append(
            f"replayed {_count(len(report.replayed), 'record')} at {report.rate_per_s:g}/s, "
            f"the last due in {format_age(_spread_s(report))}{_id_list(report.replayed)}"
        )
    elif not report.held:
        out.append("no sent or dead records match")
    if report.held:
        out.append(
            f"skipped {_count(len(report.held), 'record')} held by another transaction"
            f"{_id_list(report.held)}; run the command again"
        )
    if report.over_limit:
        out.append(
            f"{_count(report.over_limit, 'more sent or dead record')} "
            f"{'matches' if report.over_limit == 1 else 'match'} beyond --limit "
            f"{selection.limit}: run the command again to take them"
        )
    if report.not_replayable:
        by_status = ", ".join(f"{n} {s}" for s, n in sorted(report.not_replayable.items()))
        total = sum(report.not_replayable.values())
        out.append(
            f"not touched: {_count(total, 'record')} of the range {_is_are(total)} not sent "
            f"or dead ({by_status})"
        )
    return "\n".join(out) + "\n"


def _spread_s(report: ReplayReport) -> float:
    """How long after the replay its last record falls due."""
    taken = len(report.selected) if report.dry_run else len(report.replayed)
    return max(taken - 1, 0) / report.rate_per_s


def _is_are(n: int) -> str:
    return "is" if n == 1 else "are"


# The pieces the other operator commands (outbox_notifier.pauses) share.
connect = _connect
fail = _fail
timestamp = _timestamp
