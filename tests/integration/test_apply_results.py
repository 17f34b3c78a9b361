"""A batch of results goes back to Postgres in one statement: record transitions, the attempt
log, a 410's channel disable and the endpoint-protection bookkeeping commit together."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any, ClassVar, LiteralString

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.daemon import claim_policy, http_transport
from outbox_notifier.delivery import call_provider, to_delivery, to_result
from outbox_notifier.providers import default_providers
from outbox_notifier.sqlfiles import query
from outbox_notifier.store import AttemptResult, RecordStore, apply_params
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.support import (
    add_channel,
    enqueue,
    loop_context,
    payload,
    records,
    relay_for,
    scalar,
    settings_for,
)


class _CountingConnection(psycopg.AsyncConnection[Any]):
    """Records every statement the store sends (the store runs each through ``execute``)."""

    sent: ClassVar[list[str]] = []

    async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(str(query))
        return await super().execute(query, *args, **kwargs)


async def test_a_result_batch_is_one_statement(db: str, conn: psycopg.Connection[Any]) -> None:
    async with FeishuServer() as server:
        server.script("/flow/api/trigger-webhook/ok", [], then=Reply(status=200))
        server.script("/hooks/gone", [], then=Reply(status=410))
        server.script("/flow/api/trigger-webhook/busy", [], then=Reply(status=503))
        add_channel(conn, 1, server.flow_url("ok"))
        add_channel(conn, 2, server.url + "/hooks/gone", provider="webhook")
        add_channel(conn, 3, server.flow_url("busy"))
        for user, token in ((1, "ok"), (2, "gone"), (3, "busy")):
            enqueue(conn, payload(f"k-{token}", user))
        settings = settings_for(db, breaker_failures=1, breaker_min_calls=1)
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            db, connection_class=_CountingConnection, kwargs={"autocommit": True}, min_size=1
        )
        async with pool:
            store = RecordStore(pool)
            relay = relay_for(store, relay_batch_size=10)
            assert (await relay.relay_once()).created == 3
            transport = http_transport(settings)
            claims = claim_policy(settings)
            completer = ResultCompleter(store, claims)
            try:
                providers = default_providers(settings, transport)
                _CountingConnection.sent.clear()
                claimed = await store.claim_records(10, claims)
                assert len(claimed) == 3
                for record in claimed:
                    sent = await call_provider(providers, record.provider, to_delivery(record))
                    started_at = datetime.now(UTC)
                    rng = random.Random(record.id)
                    completer.put(to_result(record, sent, RetryPolicy(), started_at, rng))
                completer.finish()
                await completer.run(loop_context())
            finally:
                await transport.aclose()

    claim: LiteralString = query("claim_records")
    apply: LiteralString = query("apply_results")
    assert _CountingConnection.sent == [claim, apply], [
        s.split("\n")[0] for s in _CountingConnection.sent
    ]
    status = {r["dedupe_key"]: r["status"] for r in records(conn)}
    assert status == {"k-ok": "sent", "k-gone": "dead", "k-busy": "failed"}
    # the 410's disable and the temporary failure's bookkeeping came with that one statement
    assert (
        scalar(
            conn,
            "SELECT enabled FROM outbox_notifier.notification_channels WHERE user_id = 2",
        )
        is False
    )
    # breaker_failures = breaker_min_calls = 1: the busy target's one failure paused it
    assert conn.execute(
        "SELECT paused, breaker_open, last_error_code FROM outbox_notifier.target_health"
        " WHERE target_key = outbox_notifier.target_key(%s)",
        (server.flow_url("busy"),),
    ).fetchall() == [(True, True, "provider_5xx")]
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.delivery_attempts") == 3


# Text a request's JSON must carry through unchanged: quotes, a backslash, a newline, a tab,
# non-ASCII and a character outside the BMP.
_AWKWARD = 'He said "move it" \\ twice\nat 10:00\t日程 🚀'


async def _sent_through(
    db: str, conn: psycopg.Connection[Any], store: RecordStore, keys: list[str]
) -> tuple[list[AttemptResult], list[bytes]]:
    """Relays, claims and calls the records of ``keys`` (one Flow server that accepts them),
    without applying the results: the results, and the bodies the server received."""
    async with FeishuServer() as server:
        add_channel(conn, 1, server.flow_url("ok"))
        for key in keys:
            enqueue(conn, payload(key, summary_text=_AWKWARD))
        settings = settings_for(db)
        assert (await relay_for(store).relay_once()).created == len(keys)
        transport = http_transport(settings)
        try:
            providers = default_providers(settings, transport)
            results = []
            for record in await store.claim_records(10, claim_policy(settings)):
                sent = await call_provider(providers, record.provider, to_delivery(record))
                rng = random.Random(record.id)
                results.append(to_result(record, sent, RetryPolicy(), datetime.now(UTC), rng))
        finally:
            await transport.aclose()
        return results, [r.body for r in server.requests]


async def test_the_request_is_kept_as_the_json_object_that_was_sent(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        results, bodies = await _sent_through(db, conn, store, ["k-raw"])
        applied = await store.apply_results(results, claim_policy(settings_for(db)))
    assert [r.status for r in applied.records] == ["sent"]
    (kept,) = conn.execute(
        "SELECT provider_request_json, jsonb_typeof(provider_request_json)"
        " FROM outbox_notifier.notification_records"
    ).fetchall()
    # an object equal to the body the server received, not a string holding it
    assert kept == (json.loads(bodies[0]), "object")
    assert _AWKWARD in kept[0]["message"]["summary"]


async def test_a_daemon_of_an_earlier_build_still_applies_through_v1(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    # An earlier 0.2.0 build calls apply_results_v1 with each request as a JSON string; 0020
    # made v1 call v2. The result is the same record, attempt and stored request.
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        results, bodies = await _sent_through(db, conn, RecordStore(pool), ["k-old", "k-none"])
    documents = json.loads(msgspec.json.encode(results))
    documents[0]["request_json"] = json.dumps(documents[0]["request_json"])
    # a result without a request (nothing was sent) keeps what the record had: here nothing
    documents[1]["request_json"] = None
    params = apply_params(results, claim_policy(settings_for(db)))
    params["results"] = json.dumps(documents)
    rows = conn.execute(
        "SELECT record_id, status FROM outbox_notifier.apply_results_v1("
        " %(results)s::jsonb, %(host_now)s::timestamptz, %(retry_after_max_s)s, %(window_s)s,"
        " %(min_calls)s::integer, %(breaker_failures)s::integer, %(failure_ratio)s,"
        " %(cooloff_s)s, %(slowdown_s)s) ORDER BY record_id",
        params,
    ).fetchall()
    assert rows == [(results[0].record_id, "sent"), (results[1].record_id, "sent")]
    kept = conn.execute(
        "SELECT provider_request_json, jsonb_typeof(provider_request_json)"
        " FROM outbox_notifier.notification_records ORDER BY id"
    ).fetchall()
    assert kept == [(json.loads(bodies[0]), "object"), (None, None)]
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.delivery_attempts") == 2
