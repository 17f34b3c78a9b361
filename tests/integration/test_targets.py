"""Bot and webhook targets through the running daemon: error codes, Retry-After, 410, pausing."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from outbox_notifier.daemon import Daemon
from outbox_notifier.testing.feishu_server import BOT_PREFIX, FeishuServer, Reply
from tests.support import (
    add_channel,
    attempts,
    enqueue,
    eventually,
    payload,
    records,
    running,
    settings_for,
)


@pytest.fixture
async def server() -> Any:
    async with FeishuServer() as srv:
        yield srv


def _record(conn: psycopg.Connection[Any], dedupe_key: str) -> dict[str, Any] | None:
    return next((r for r in records(conn) if r["dedupe_key"] == dedupe_key), None)


def _status(conn: psycopg.Connection[Any], dedupe_key: str) -> str | None:
    record = _record(conn, dedupe_key)
    return None if record is None else record["status"]


async def test_bot_frequency_limit_is_retried_and_bad_signature_is_dead(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.bot_url("busy"), provider="feishu_bot")
    add_channel(conn, 2, server.bot_url("badsig"), provider="feishu_bot",
                auth_kind="bot_secret", secret="s3cret")  # fmt: skip
    server.script(BOT_PREFIX + "busy", [Reply.feishu_error(11232, "frequency limited")])
    server.script(BOT_PREFIX + "badsig", [], then=Reply.feishu_error(19021, "sign match fail"))
    enqueue(conn, payload("busy", user_id=1))
    enqueue(conn, payload("badsig", user_id=2))
    settings = settings_for(db, retry_base_s=0.3, retry_max_s=0.5)
    async with running(Daemon(settings)):
        await eventually(lambda: _status(conn, "busy") == "sent", what="busy sent on retry")
        await eventually(lambda: _status(conn, "badsig") == "dead", what="badsig dead")
    busy = _record(conn, "busy")
    assert busy is not None and busy["attempt_count"] == 2
    assert [a["error_code"] for a in attempts(conn, busy["id"])] == [
        "provider_rate_limited",
        None,
    ]
    dead = _record(conn, "badsig")
    assert dead is not None
    assert dead["attempt_count"] == 1
    assert dead["last_error_code"] == "provider_auth_failed"
    assert "19021" in dead["last_error"]
    # The signature never reaches the stored request.
    assert dead["provider_request_json"]["sign"] == "***"
    assert "s3cret" not in str(dead["provider_request_json"])


async def test_retry_after_schedules_the_next_attempt(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.url + "/hooks/a", provider="webhook")
    server.script("/hooks/a", [Reply(status=429, headers={"Retry-After": "7"})])
    enqueue(conn, payload("ra"))
    async with running(Daemon(settings_for(db))):
        await eventually(lambda: _status(conn, "ra") == "failed", what="failed")
    record = _record(conn, "ra")
    assert record is not None
    assert record["last_error_code"] == "provider_rate_limited"
    delay = (record["next_retry_at"] - record["updated_at"]).total_seconds()
    assert 6.9 <= delay <= 7.1


def _assert_disabled_on_410(conn: psycopg.Connection[Any]) -> None:
    channel = conn.execute(
        "SELECT enabled, disabled_reason FROM outbox_notifier.notification_channels"
    ).fetchone()
    assert channel is not None
    assert channel[0] is False
    assert "410" in channel[1]


async def test_gone_webhook_disables_the_channel(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.url + "/hooks/gone", provider="webhook")
    server.script("/hooks/gone", [], then=Reply(status=410))
    enqueue(conn, payload("gone-1"))
    async with running(Daemon(settings_for(db))):
        await eventually(lambda: _status(conn, "gone-1") == "dead", what="dead on 410")
        _assert_disabled_on_410(conn)
        # The next event for this user is skipped without calling the dead endpoint.
        enqueue(conn, payload("gone-2"))
        await eventually(lambda: _status(conn, "gone-2") == "skipped", what="skipped")
    assert server.count("/hooks/gone") == 1
    assert _record(conn, "gone-1")["last_error_code"] == "endpoint_gone"  # type: ignore[index]


async def test_failing_target_is_paused_while_others_flow_then_probed(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.url + "/hooks/down", provider="webhook")
    add_channel(conn, 2, server.url + "/hooks/up", provider="webhook")
    server.script("/hooks/down", [], then=Reply(status=503))
    for i in range(10):
        enqueue(conn, payload(f"down-{i}", user_id=1))
    settings = settings_for(
        db, breaker_failures=3, breaker_min_calls=3, breaker_cooloff_s=2.0, retry_base_s=0.2,
        retry_max_s=0.2, max_attempts=50,
    )  # fmt: skip
    async with running(Daemon(settings)):
        await eventually(lambda: server.count("/hooks/down") >= 3, what="three failures")
        await asyncio.sleep(0.5)
        paused_at = server.count("/hooks/down")
        health = conn.execute(
            "SELECT paused, breaker_open, host, last_error_code, throttled"
            " FROM outbox_notifier.target_health WHERE paused"
        ).fetchall()
        assert health == [(True, True, "127.0.0.1", "provider_5xx", False)]
        # While paused, the failing target gets nothing and another target flows.
        for i in range(5):
            enqueue(conn, payload(f"up-{i}", user_id=2))
        await eventually(lambda: server.count("/hooks/up") == 5, what="other target flows")
        assert server.count("/hooks/down") == paused_at
        # After the cool-off one probe goes through; it fails, so the target pauses again.
        await eventually(lambda: server.count("/hooks/down") == paused_at + 1, timeout_s=5,
                         what="one probe")  # fmt: skip
        await asyncio.sleep(0.7)
        assert server.count("/hooks/down") == paused_at + 1
        # The target recovers: the next probe succeeds and the backlog drains.
        server.clear_scripts()
        await eventually(
            lambda: all(_status(conn, f"down-{i}") == "sent" for i in range(10)),
            timeout_s=15,
            what="backlog drained after recovery",
        )
    # Held-back records spent no attempts: only real calls were counted.
    total_attempts = sum(r["attempt_count"] for r in records(conn) if r["dedupe_key"][:4] == "down")
    assert total_attempts == server.count("/hooks/down")


async def test_gone_disable_is_retried_with_the_result_it_belongs_to(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    """The disable used to be a separate step after the result was stored, outside its retry:
    when that step failed the channel stayed enabled for good. Here the first two attempts to
    disable the channel fail; the result and the disable are retried together and both land."""
    conn.execute(
        """
        CREATE SEQUENCE public.disable_failures;
        CREATE FUNCTION public.fail_first_disables() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- A sequence, not a table: its count survives the rollback it causes.
            IF OLD.enabled AND NOT NEW.enabled AND nextval('public.disable_failures') <= 2 THEN
                RAISE EXCEPTION 'injected failure while disabling a channel';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_first_disables BEFORE UPDATE
            ON outbox_notifier.notification_channels
            FOR EACH ROW EXECUTE FUNCTION public.fail_first_disables();
        """
    )
    add_channel(conn, 1, server.url + "/hooks/gone", provider="webhook")
    server.script("/hooks/gone", [], then=Reply(status=410))
    enqueue(conn, payload("gone-retried"))
    async with running(Daemon(settings_for(db))):
        await eventually(lambda: _status(conn, "gone-retried") == "dead", what="dead on 410")
    _assert_disabled_on_410(conn)
    # Both injected failures happened, and the third try went through.
    assert conn.execute("SELECT last_value FROM public.disable_failures").fetchone() == (3,)
    assert server.count("/hooks/gone") == 1
