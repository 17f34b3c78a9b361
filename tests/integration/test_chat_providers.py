"""The DingTalk, WeCom and Slack providers over real HTTP against the local look-alike.

Bodies and DingTalk's signature are checked on the receiving side, as each platform would: the
expected bodies are written out here from the platforms' documented shapes, and the signature
from DingTalk's published algorithm, independently of the providers' code.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier import message
from outbox_notifier.daemon import Daemon, claim_policy
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers import DingTalkBotProvider, SlackWebhookProvider, WeComBotProvider
from outbox_notifier.providers.base import HttpProvider
from outbox_notifier.providers.model import Recipient
from outbox_notifier.settings import Settings
from outbox_notifier.store import RecordStore
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests import provider_support
from tests.support import (
    add_channel,
    enqueue,
    eventually,
    payload,
    records,
    relay_for,
    running,
    settings_for,
)

SECRET = "SEC0123456789abcdef-dingtalk"
TEXT = "Two tasks moved."
LINK = "https://app.example.com/assistant/preview/asp_1"
Made = Callable[..., HttpProvider]


def local(cls: type[HttpProvider], transport: httpx.AsyncBaseTransport, **kw: Any) -> HttpProvider:
    kw.setdefault("frontend_base_url", "https://app.example.com")
    return cls(transport, allowed_schemes=("http",), allowed_hosts=("127.0.0.1",), **kw)


def recipient(url: str, auth_kind: str = "none", secret: str | None = None) -> Recipient:
    return Recipient(enabled=True, webhook_url=url, auth_kind=auth_kind, auth_secret=secret)


def url_of(name: str, srv: FeishuServer) -> str:
    return {"dingtalk": srv.dingtalk_url, "wecom": srv.wecom_url, "slack": srv.slack_url}[name]()


CLASSES: dict[str, type[HttpProvider]] = {
    "dingtalk": DingTalkBotProvider,
    "wecom": WeComBotProvider,
    "slack": SlackWebhookProvider,
}

# The documented bodies: with an absolute action URL (a card with a link), and without.
CARDS: dict[str, dict[str, Any]] = {
    "dingtalk": {
        "msgtype": "actionCard",
        "actionCard": {
            "title": message.MESSAGE_TITLE,
            "text": TEXT,
            "singleTitle": message.MESSAGE_ACTION_TEXT,
            "singleURL": LINK,
        },
    },
    "wecom": {
        "msgtype": "template_card",
        "template_card": {
            "card_type": "text_notice",
            "main_title": {"title": message.MESSAGE_TITLE},
            "sub_title_text": TEXT,
            "jump_list": [{"type": 1, "title": message.MESSAGE_ACTION_TEXT, "url": LINK}],
            "card_action": {"type": 1, "url": LINK},
        },
    },
    "slack": {
        "text": TEXT,
        "blocks": [
            {"type": "section", "text": {"type": "plain_text", "text": TEXT}},
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": message.MESSAGE_ACTION_TEXT},
                        "url": LINK,
                    }
                ],
            },
        ],
    },
}
TEXTS: dict[str, dict[str, Any]] = {
    "dingtalk": {"msgtype": "text", "text": {"content": TEXT}},
    "wecom": {"msgtype": "text", "text": {"content": TEXT}},
    "slack": {
        "text": TEXT,
        "blocks": [{"type": "section", "text": {"type": "plain_text", "text": TEXT}}],
    },
}


@pytest.mark.parametrize("name", list(CLASSES))
async def test_success_sends_the_documented_bodies(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport, name: str
) -> None:
    url = url_of(name, srv)
    card = await local(CLASSES[name], transport).send(
        provider_support.make_delivery(recipient(url))
    )
    text = await local(CLASSES[name], transport, frontend_base_url="").send(
        provider_support.make_delivery(recipient(url))
    )
    assert (card.outcome, text.outcome) == (Outcome.SUCCESS, Outcome.SUCCESS)
    assert [rec.json for rec in srv.requests] == [CARDS[name], TEXTS[name]]
    assert json.loads(card.request_json or b"") == CARDS[name]
    assert srv.count(status=200) == 2  # each answered with its platform's success reply


dingtalk_signature_ok = provider_support.dingtalk_signature_ok


async def test_dingtalk_signs_each_attempt_afresh(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    times = iter([datetime.now(UTC), datetime.fromtimestamp(time.time() + 2.5, UTC)])
    provider = local(DingTalkBotProvider, transport, clock=lambda: next(times))
    signed = recipient(srv.dingtalk_url("tok-1"), "bot_secret", SECRET)
    results = [await provider.send(provider_support.make_delivery(signed)) for _ in range(2)]
    assert [r.outcome for r in results] == [Outcome.SUCCESS, Outcome.SUCCESS]
    first, second = srv.requests
    for rec in (first, second):
        assert rec.path == "/robot/send"
        assert rec.query.startswith("access_token=tok-1&")
        assert dingtalk_signature_ok(rec.query, SECRET, time.time())
    assert parse_qs(first.query)["timestamp"] != parse_qs(second.query)["timestamp"]
    # Neither the secret nor the signature is stored with the record.
    assert all(SECRET.encode() not in (r.request_json or b"") for r in results)
    assert b"sign" not in (results[0].request_json or b"")


async def test_dingtalk_refuses_a_wrong_secret_check(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    provider = local(DingTalkBotProvider, transport, clock=lambda: datetime.now(UTC))
    await provider.send(
        provider_support.make_delivery(recipient(srv.dingtalk_url(), "bot_secret", SECRET))
    )
    (rec,) = srv.requests
    assert not dingtalk_signature_ok(rec.query, SECRET + "x", time.time())
    missing = await provider.send(
        provider_support.make_delivery(recipient(srv.dingtalk_url(), "bot_secret", " "))
    )
    assert (missing.outcome, missing.error_code) == (
        Outcome.PERMANENT_FAIL,
        ErrorCode.PROVIDER_AUTH_FAILED,
    )
    assert len(srv.requests) == 1  # nothing sent without a secret


TEMP, PERM = Outcome.TEMPORARY_FAIL, Outcome.PERMANENT_FAIL
ERRORS: list[tuple[str, Reply, Outcome, ErrorCode, str]] = [
    ("dingtalk", Reply.errcode(130101, "send too fast"), TEMP, ErrorCode.PROVIDER_RATE_LIMITED,
     "dingtalk code 130101: send too fast"),
    ("dingtalk", Reply.errcode(310000, "keywords not in content"), PERM,
     ErrorCode.PROVIDER_AUTH_FAILED, "dingtalk code 310000: keywords not in content"),
    ("dingtalk", Reply.errcode(300001, "token is not exist"), PERM,
     ErrorCode.PROVIDER_AUTH_FAILED, "dingtalk code 300001"),
    ("dingtalk", Reply.errcode(400013, "群已被解散"), PERM, ErrorCode.PAYLOAD_INVALID,
     "dingtalk code 400013"),
    ("wecom", Reply.errcode(45009, "api freq out of limit"), TEMP,
     ErrorCode.PROVIDER_RATE_LIMITED, "wecom code 45009: api freq out of limit"),
    ("wecom", Reply.errcode(93000, "invalid webhook url"), PERM, ErrorCode.PROVIDER_AUTH_FAILED,
     "wecom code 93000"),
    ("wecom", Reply.errcode(40008, "invalid message type"), PERM, ErrorCode.PAYLOAD_INVALID,
     "wecom code 40008"),
    ("wecom", Reply.errcode(44004, "empty content"), PERM, ErrorCode.PAYLOAD_INVALID,
     "wecom code 44004"),
    ("slack", Reply.slack_error(400, "invalid_payload"), PERM, ErrorCode.PAYLOAD_INVALID,
     "HTTP 400: invalid_payload"),
    ("slack", Reply.slack_error(400, "invalid_blocks"), PERM, ErrorCode.PAYLOAD_INVALID,
     "HTTP 400: invalid_blocks"),
    ("slack", Reply.slack_error(403, "action_prohibited"), PERM, ErrorCode.PROVIDER_AUTH_FAILED,
     "HTTP 403: action_prohibited"),
    ("slack", Reply.slack_error(403, "posting_to_general_channel_denied"), PERM,
     ErrorCode.PROVIDER_AUTH_FAILED, "posting_to_general_channel_denied"),
    ("slack", Reply.slack_error(404, "no_service"), PERM, ErrorCode.ENDPOINT_GONE,
     "HTTP 404: endpoint gone, channel to be disabled: no_service"),
    ("slack", Reply.slack_error(404, "channel_not_found"), PERM, ErrorCode.ENDPOINT_GONE,
     "channel_not_found"),
    ("slack", Reply.slack_error(410, "channel_is_archived"), PERM, ErrorCode.ENDPOINT_GONE,
     "channel_is_archived"),
    ("slack", Reply.slack_error(429, "rate_limited", retry_after_s=7), TEMP,
     ErrorCode.PROVIDER_RATE_LIMITED, "HTTP 429: rate_limited"),
    ("slack", Reply.slack_error(500, "rollup_error"), TEMP, ErrorCode.PROVIDER_5XX,
     "HTTP 500: rollup_error"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "reply", "outcome", "code", "said"), ERRORS)
async def test_each_documented_error_maps_to_its_code(
    srv: FeishuServer,
    transport: httpx.AsyncBaseTransport,
    name: str,
    reply: Reply,
    outcome: Outcome,
    code: ErrorCode,
    said: str,
) -> None:
    url = url_of(name, srv)
    srv.script(url.removeprefix(srv.url), [reply])
    result = await local(CLASSES[name], transport).send(
        provider_support.make_delivery(recipient(url))
    )
    assert (result.outcome, result.error_code) == (outcome, code)
    assert said in (result.error_message or ""), result.error_message
    assert result.disable_channel is (code is ErrorCode.ENDPOINT_GONE)
    assert result.retry_after_s == (7.0 if reply.headers.get("Retry-After") else None)
    # The credential in the URL never reaches the message.
    assert url.removeprefix(srv.url).rpartition("/")[2].split("=")[-1] not in (
        result.error_message or ""
    )


LOOK_ALIKES = {
    "dingtalk": "https://oapi.dingtalk.com.evil.example/robot/send?access_token=t",
    "wecom": "https://qyapi.weixin.qq.com.attacker.io/cgi-bin/webhook/send?key=k",
    "slack": "https://hooks.slack.com.phish.example/services/T/B/x",
}
GENUINE = {
    "dingtalk": "https://oapi.dingtalk.com/robot/send?access_token=t",
    "wecom": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k",
    "slack": "https://hooks.slack.com/services/T/B/x",
}


@pytest.mark.parametrize("name", list(CLASSES))
async def test_the_url_policy_refuses_a_look_alike_host(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport, name: str
) -> None:
    provider = CLASSES[name](transport)  # the platform's own URL policy defaults
    assert provider.check_url(GENUINE[name])
    result = await provider.send(provider_support.make_delivery(recipient(LOOK_ALIKES[name])))
    assert (result.outcome, result.error_code) == (Outcome.PERMANENT_FAIL, ErrorCode.INVALID_URL)
    assert "host not allowed" in (result.error_message or "")
    assert result.request_json is None


PACED = [
    ("dingtalk_bot", GENUINE["dingtalk"], 25, 20),
    ("wecom_bot", GENUINE["wecom"], 25, 20),
    ("slack_webhook", GENUINE["slack"], 5, 1),
]


@pytest.mark.parametrize(("provider", "url", "events", "budget"), PACED)
async def test_two_replicas_share_the_default_budget(
    db: str, conn: psycopg.Connection[Any], provider: str, url: str, events: int, budget: int
) -> None:
    add_channel(conn, 1, url, provider=provider)
    for i in range(events):
        enqueue(conn, payload(f"k-{i}"))
    # the default budgets (20/min, 20/min, 1/s), one call per record: digests off, for they
    # carry several records a call (test_digest_delivery)
    off: dict[str, Any] = {
        f"{chat}_digest": False for chat in ("bot", "dingtalk", "wecom", "slack")
    }
    policy = claim_policy(Settings(**off))
    pools = [AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) for _ in range(2)]
    async with pools[0] as one, pools[1] as two:
        await relay_for(RecordStore(one), relay_batch_size=500).relay_once()
        replicas = [RecordStore(one), RecordStore(two)]
        # Both replicas claim at once, twice: together they stay within the window's budget.
        rounds = [
            await asyncio.gather(*(r.claim_records(100, policy) for r in replicas))
            for _ in range(2)
        ]
    claimed = [rec.id for batches in rounds for batch in batches for rec in batch]
    assert len(claimed) == budget
    assert len(set(claimed)) == budget
    waiting = conn.execute(
        "SELECT count(*) FROM outbox_notifier.notification_records"
        " WHERE status = 'pending' AND attempt_count = 0 AND next_retry_at > now()"
    ).fetchone()
    assert waiting == (events - budget,)


async def test_the_daemon_delivers_signed_dingtalk_and_disables_a_gone_slack_channel(
    db: str, conn: psycopg.Connection[Any], srv: FeishuServer
) -> None:
    add_channel(conn, 1, srv.dingtalk_url("d-1"), provider="dingtalk_bot",
                auth_kind="bot_secret", secret=SECRET)  # fmt: skip
    add_channel(conn, 2, srv.slack_url("T/B/gone"), provider="slack_webhook")
    srv.script("/services/T/B/gone", [], then=Reply.slack_error(404, "no_service"))
    enqueue(conn, payload("to-dingtalk", user_id=1))
    enqueue(conn, payload("to-slack", user_id=2))

    def settled() -> bool:
        rows = records(conn)
        return len(rows) == 2 and all(r["status"] in ("sent", "dead") for r in rows)

    async with running(Daemon(settings_for(db))):
        await eventually(settled, what="both records settled")
    by_key = {r["dedupe_key"]: r for r in records(conn)}
    assert by_key["to-dingtalk"]["status"] == "sent"
    (signed,) = srv.requests_to("/robot/send")
    assert dingtalk_signature_ok(signed.query.partition("&")[2], SECRET, time.time())
    gone = by_key["to-slack"]
    assert (gone["status"], gone["last_error_code"]) == ("dead", "endpoint_gone")
    channel = conn.execute(
        "SELECT enabled, disabled_reason FROM outbox_notifier.notification_channels"
        " WHERE user_id = 2"
    ).fetchone()
    assert channel is not None and channel[0] is False and channel[1]
