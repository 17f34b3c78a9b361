"""A batch of results goes back to Postgres in one statement: record transitions, the attempt
log, a 410's channel disable and the endpoint-protection bookkeeping commit together."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any, ClassVar, LiteralString

import psycopg
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.daemon import claim_policy, http_transport
from outbox_notifier.delivery import call_provider, to_delivery, to_result
from outbox_notifier.providers import default_providers
from outbox_notifier.sqlfiles import query
from outbox_notifier.store import RecordStore
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
