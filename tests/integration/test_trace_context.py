"""The producer's trace context in SQL: the enqueue overload, its validation, its grants, and
its way from the outbox row to the record and into a traced claim (migration 0012)."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.sqlfiles import query
from outbox_notifier.store import ClaimPolicy, RecordStore
from tests.support import outbox_rows, payload, records, relay_for

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def enqueue_with(
    conn: psycopg.Connection[Any],
    traceparent: str | None,
    tracestate: str | None = None,
    dedupe_key: str = "k",
) -> tuple[int, list[str]]:
    """Enqueues with a trace context; returns the outbox id and the warnings Postgres sent."""
    notices: list[str] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        notices.append(f"{diag.severity_nonlocalized}: {diag.message_primary}")

    conn.add_notice_handler(collect)
    try:
        row = conn.execute(
            "SELECT outbox_notifier.enqueue(%s, %s::jsonb, '1', %s, %s)",
            (
                EVENT_TYPE,
                msgspec.json.encode(payload(dedupe_key)).decode(),
                traceparent,
                tracestate,
            ),
        ).fetchone()
    finally:
        conn.remove_notice_handler(collect)
    assert row is not None
    return int(row[0]), notices


def stored(conn: psycopg.Connection[Any], outbox_id: int) -> tuple[str | None, str | None]:
    row = conn.execute(
        "SELECT traceparent, tracestate FROM outbox_notifier.outbox WHERE id = %s", (outbox_id,)
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.mark.parametrize(
    ("traceparent", "tracestate", "kept"),
    [
        (VALID, STATE, (VALID, STATE)),
        (f" {VALID} ", None, (VALID, None)),
        ("cc" + VALID[2:] + "-later-field", None, ("cc" + VALID[2:] + "-later-field", None)),
        ("", "", (None, None)),
        (None, "rojo=1", (None, None)),  # a tracestate alone means nothing
    ],
)  # fmt: skip
def test_enqueue_keeps_a_valid_context(
    conn: psycopg.Connection[Any],
    traceparent: str | None,
    tracestate: str | None,
    kept: tuple[str | None, str | None],
) -> None:
    outbox_id, notices = enqueue_with(conn, traceparent, tracestate)
    assert stored(conn, outbox_id) == kept
    assert notices == []


@pytest.mark.parametrize(
    ("traceparent", "tracestate", "kept", "what"),
    [
        (VALID.upper(), None, (None, None), "traceparent"),
        ("00-" + "0" * 32 + VALID[35:], None, (None, None), "traceparent"),
        (VALID[:36] + "0" * 16 + "-01", None, (None, None), "traceparent"),
        ("ff" + VALID[2:], None, (None, None), "traceparent"),
        (VALID + "-extra", None, (None, None), "traceparent"),
        ("not a traceparent", "rojo=1", (None, None), "traceparent"),
        (VALID, "x" * 513, (VALID, None), "tracestate"),
        (VALID, "rojo=1\ncongo=2", (VALID, None), "tracestate"),
    ],
)  # fmt: skip
def test_a_malformed_context_is_dropped_with_a_warning_and_the_event_is_kept(
    conn: psycopg.Connection[Any],
    traceparent: str,
    tracestate: str | None,
    kept: tuple[str | None, str | None],
    what: str,
) -> None:
    outbox_id, notices = enqueue_with(conn, traceparent, tracestate)
    assert stored(conn, outbox_id) == kept
    [notice] = notices
    assert notice.startswith(f"WARNING: outbox_notifier.enqueue: {what} ignored")
    assert outbox_rows(conn)[0]["status"] == "pending"


def test_older_producers_calls_resolve_to_the_original_enqueue(
    conn: psycopg.Connection[Any],
) -> None:
    body = msgspec.json.encode(payload("old")).decode()
    for statement in (
        "SELECT outbox_notifier.enqueue(%(t)s, %(p)s::jsonb)",
        "SELECT outbox_notifier.enqueue(%(t)s, %(p)s::jsonb, '1')",
        "SELECT outbox_notifier.enqueue(event_type => %(t)s, payload => %(p)s::jsonb)",
    ):
        conn.execute(statement, {"t": EVENT_TYPE, "p": body})
    assert [stored(conn, row["id"]) for row in outbox_rows(conn)] == [(None, None)] * 3
    named = (
        "SELECT outbox_notifier.enqueue(event_type => %(t)s, payload => %(p)s::jsonb,"
        " event_version => '1', traceparent => %(tp)s)"
    )
    conn.execute(named, {"t": EVENT_TYPE, "p": body, "tp": VALID})
    assert stored(conn, outbox_rows(conn)[-1]["id"]) == (VALID, None)


def test_only_producers_may_call_the_new_enqueue(conn: psycopg.Connection[Any]) -> None:
    signature = "outbox_notifier.enqueue(text, jsonb, text, text, text)"
    row = conn.execute(
        "SELECT has_function_privilege('outbox_notifier_producer', %(f)s, 'EXECUTE'),"
        " has_function_privilege('outbox_notifier_operator', %(f)s, 'EXECUTE'),"
        " p.prosecdef, p.proconfig"
        " FROM pg_proc p WHERE p.oid = %(f)s::regprocedure",
        {"f": signature},
    ).fetchone()
    assert row == (True, False, True, ["search_path=pg_catalog, pg_temp"])


async def test_the_relay_copies_the_context_and_a_traced_claim_reads_it(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    enqueue_with(conn, VALID, "rojo=1", dedupe_key="with")
    enqueue_with(conn, None, dedupe_key="without")
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        await relay_for(store).relay_once()
        assert [(r["traceparent"], r["tracestate"]) for r in records(conn)] == [
            (VALID, "rojo=1"),
            (None, None),
        ]
        claimed = await store.claim_records(10, ClaimPolicy(lease_s=30), traced=True)
    assert [(c.dedupe_key, c.traceparent, c.tracestate) for c in claimed] == [
        ("with", VALID, "rojo=1"),
        ("without", None, None),
    ]
    # the untraced claim is the claim as it was: the daemon that does not trace pays nothing
    assert "trace_contexts_v1" not in query("claim_records")
