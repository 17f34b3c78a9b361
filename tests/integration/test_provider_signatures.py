"""The bot and webhook providers over real HTTP against the local Feishu look-alike.

Signatures are verified on the receiving side, as a receiver would: the bot's from Feishu's
published formula (written out here, independently of the provider), the webhook's with the
``standardwebhooks`` reference library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers.feishu_bot import FeishuBotProvider
from outbox_notifier.providers.model import Delivery, Recipient
from outbox_notifier.providers.webhook import WebhookProvider
from outbox_notifier.testing.feishu_server import FeishuServer, Recorded, Reply
from tests import provider_support

BOT_TOKEN = "it-bot-token-5f1c"
BOT_SECRET = "it-bot-secret-0a9b"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"integration webhook key 32 bytes").decode()
OLD_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"the key being rotated out").decode()
SIGN_FAIL = "sign match fail or timestamp is not within one hour from current time"


DELIVERY_FIELDS: dict[str, Any] = {
    "record_id": 4242,
    "channel": "feishu_bot",
    "trace_id": "trace-it",
    "dedupe_key": "dk-it",
}


def delivery(recipient: Recipient, **overrides: Any) -> Delivery:
    return provider_support.make_delivery(recipient, **(DELIVERY_FIELDS | overrides))


def bot_provider(transport: httpx.AsyncBaseTransport, **kw: Any) -> FeishuBotProvider:
    return FeishuBotProvider(
        transport,
        frontend_base_url="https://app.example.com",
        allowed_schemes=("http",),
        allowed_hosts=("127.0.0.1",),
        **kw,
    )


def webhook_provider(transport: httpx.AsyncBaseTransport) -> WebhookProvider:
    return WebhookProvider(
        transport,
        frontend_base_url="https://app.example.com",
        allowed_schemes=("http",),
        allowed_hosts=("127.0.0.1",),
        path_prefix="/hooks/",
    )


def signed_bot(srv: FeishuServer) -> Recipient:
    return Recipient(
        enabled=True,
        webhook_url=srv.bot_url(BOT_TOKEN),
        auth_kind="bot_secret",
        auth_secret=BOT_SECRET,
    )


def webhook_recipient(
    srv: FeishuServer, secret: str = WEBHOOK_SECRET, path: str = "a"
) -> Recipient:
    return Recipient(
        enabled=True,
        webhook_url=f"{srv.url}/hooks/{path}",
        auth_kind="bot_secret",
        auth_secret=secret,
    )


def feishu_signature_ok(rec: Recorded, secret: str) -> bool:
    """What Feishu checks: HMAC-SHA256 keyed by "timestamp\\nsecret" over nothing, base64."""
    doc = rec.json
    assert isinstance(doc, dict)
    timestamp, sign = doc["timestamp"], doc["sign"]
    assert isinstance(timestamp, str)
    assert abs(int(timestamp) - time.time()) < 3600
    key = f"{timestamp}\n{secret}".encode()
    expected = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
    return hmac.compare_digest(expected, str(sign))


# ---------------------------------------------------------------- feishu bot


@pytest.mark.parametrize("fmt", ["text", "card"])
async def test_bot_signature_verifies(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport, fmt: Any
) -> None:
    result = await bot_provider(transport, message_format=fmt).send(delivery(signed_bot(srv)))
    assert result.outcome is Outcome.SUCCESS
    (rec,) = srv.requests
    assert rec.path == f"/open-apis/bot/v2/hook/{BOT_TOKEN}"
    assert feishu_signature_ok(rec, BOT_SECRET)
    assert not feishu_signature_ok(rec, BOT_SECRET + "x")
    doc = rec.json
    assert isinstance(doc, dict)
    assert doc["msg_type"] == ("text" if fmt == "text" else "interactive")
    assert result.request_json is not None
    assert json.loads(result.request_json)["sign"] == "***"


async def test_bot_frequency_limited_is_temporary(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    srv.script(BOT_TOKEN, [Reply.feishu_error(11232, "frequency limited")])
    result = await bot_provider(transport).send(delivery(signed_bot(srv)))
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert result.error_code == ErrorCode.PROVIDER_RATE_LIMITED
    assert result.http_status == 200


async def test_bot_sign_failure_is_permanent_with_the_code(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    srv.script(BOT_TOKEN, [Reply.feishu_error(19021, SIGN_FAIL)])
    result = await bot_provider(transport).send(delivery(signed_bot(srv)))
    assert result.outcome is Outcome.PERMANENT_FAIL
    assert result.error_code == ErrorCode.PROVIDER_AUTH_FAILED
    assert result.error_message == f"feishu code 19021: {SIGN_FAIL}"
    assert BOT_TOKEN not in result.error_message


async def test_bot_429_honours_retry_after(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    srv.script(BOT_TOKEN, [Reply.rate_limited(7)])
    result = await bot_provider(transport).send(delivery(signed_bot(srv)))
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert result.error_code == ErrorCode.PROVIDER_RATE_LIMITED
    assert result.http_status == 429
    assert result.retry_after_s == 7


async def test_bot_signs_each_attempt_afresh(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    provider = bot_provider(transport)
    recipient = signed_bot(srv)
    srv.script(BOT_TOKEN, [Reply.feishu_error(11232, "frequency limited")])
    first = await provider.send(delivery(recipient))
    second = await provider.send(delivery(recipient, attempt=2))
    assert first.outcome is Outcome.TEMPORARY_FAIL
    assert second.outcome is Outcome.SUCCESS
    assert all(feishu_signature_ok(rec, BOT_SECRET) for rec in srv.requests)


# ---------------------------------------------------------------- generic webhook


async def test_webhook_signature_verifies_with_the_reference_library(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    result = await webhook_provider(transport).send(delivery(webhook_recipient(srv)))
    assert result.outcome is Outcome.SUCCESS
    (rec,) = srv.requests
    assert rec.path == "/hooks/a"
    payload = Webhook(WEBHOOK_SECRET).verify(rec.body, rec.headers)
    assert payload["id"] == rec.headers["webhook-id"] == "msg_4242"
    assert payload["data"]["notification_id"] == 4242
    assert result.request_json == rec.body


async def test_webhook_rotation_verifies_with_either_secret(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    recipient = webhook_recipient(srv, secret=f"{WEBHOOK_SECRET} {OLD_WEBHOOK_SECRET}")
    result = await webhook_provider(transport).send(delivery(recipient))
    assert result.outcome is Outcome.SUCCESS
    (rec,) = srv.requests
    assert len(rec.headers["webhook-signature"].split(" ")) == 2
    for secret in (WEBHOOK_SECRET, OLD_WEBHOOK_SECRET):
        Webhook(secret).verify(rec.body, rec.headers)


async def test_webhook_gone_disables_the_target(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    srv.script("/hooks/gone", [Reply(status=410, body=b"")])
    result = await webhook_provider(transport).send(delivery(webhook_recipient(srv, path="gone")))
    assert result.outcome is Outcome.PERMANENT_FAIL
    assert result.error_code == ErrorCode.ENDPOINT_GONE
    assert result.http_status == 410
    assert result.disable_channel is True


async def test_webhook_429_honours_retry_after(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    srv.script("/hooks/busy", [Reply.rate_limited(7)])
    result = await webhook_provider(transport).send(delivery(webhook_recipient(srv, path="busy")))
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert result.error_code == ErrorCode.PROVIDER_RATE_LIMITED
    assert result.retry_after_s == 7
    assert result.disable_channel is False


async def test_webhook_redirect_is_not_followed(
    srv: FeishuServer, transport: httpx.AsyncBaseTransport
) -> None:
    srv.script("/hooks/moved", [Reply(status=302, headers={"Location": f"{srv.url}/hooks/a"})])
    result = await webhook_provider(transport).send(delivery(webhook_recipient(srv, path="moved")))
    assert result.outcome is Outcome.PERMANENT_FAIL
    assert result.error_code == ErrorCode.PAYLOAD_INVALID
    assert result.error_message is not None
    assert "redirect not followed" in result.error_message
    assert [rec.path for rec in srv.requests] == ["/hooks/moved"]
