"""WebhookProvider against ``httpx.MockTransport``: event body, signatures, reply mapping.

Signatures are checked with the ``standardwebhooks`` reference library, not with the
provider's own code. What every provider keeps (status families, transport failures,
Retry-After, the body cap, secrets, recipients, the URL policy) is in
``test_provider_contract``; the statuses only a webhook reads its own way are here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from outbox_notifier.names import PERMANENT_ERROR_CODES, ErrorCode, Outcome
from outbox_notifier.providers import webhook
from outbox_notifier.providers.model import Delivery, Recipient, SendResult
from outbox_notifier.providers.webhook import WebhookProvider
from tests import provider_support
from tests.provider_support import Handler, mock_transport, recording, reply

URL_KEY = "url-path-key-0123456789"
URL = f"https://hooks.example.com/in/{URL_KEY}?sig=q-s3cr3t"
NOW = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)
NOW_HTTP = "Mon, 01 Jan 2024 00:00:00 GMT"
SECRET_A = "whsec_" + base64.b64encode(b"first signing key, 32 bytes long").decode()
SECRET_B = "whsec_" + base64.b64encode(b"second key for the rotation....").decode()
DELIVERY_FIELDS: dict[str, Any] = {"record_id": 555, "channel": "webhook"}


def make_recipient(
    url: str = URL, auth_kind: str = "bot_secret", secret: str | None = SECRET_A
) -> Recipient:
    return Recipient(enabled=True, webhook_url=url, auth_kind=auth_kind, auth_secret=secret)


def make_delivery(recipient: Recipient | None = None, **overrides: Any) -> Delivery:
    recipient = recipient if recipient is not None else make_recipient()
    return provider_support.make_delivery(recipient, **(DELIVERY_FIELDS | overrides))


def make_provider(
    handler: Handler, *, clock: Callable[[], datetime] = lambda: NOW, **kw: Any
) -> tuple[WebhookProvider, httpx.AsyncBaseTransport]:
    transport = mock_transport(handler)
    kw.setdefault("frontend_base_url", "https://app.example.com")
    return WebhookProvider(transport, clock=clock, **kw), transport


async def send_with(handler: Handler, delivery: Delivery | None = None, **kw: Any) -> SendResult:
    provider, transport = make_provider(handler, **kw)
    async with transport:
        return await provider.send(delivery or make_delivery())


async def capture(
    delivery: Delivery | None = None, **kw: Any
) -> tuple[list[httpx.Request], SendResult]:
    seen, handler = recording(204)
    result = await send_with(handler, delivery, **kw)
    return seen, result


def reference_signature(secret: str, request: httpx.Request) -> str:
    """The signature the reference library computes for this request's id, time and body."""
    timestamp = datetime.fromtimestamp(int(request.headers["webhook-timestamp"]), tz=UTC)
    return Webhook(secret).sign(request.headers["webhook-id"], timestamp, request.content.decode())


# ---------------------------------------------------------------- body and headers


async def test_event_body_and_headers() -> None:
    seen, result = await capture()
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert request.headers["webhook-id"] == "msg_555"
    assert request.headers["webhook-timestamp"] == "1704067200"
    body = json.loads(request.content)
    assert body == {
        "id": "msg_555",
        "type": "smartflow.schedule_adjustment_ready",
        "timestamp": "2024-01-01T00:00:00Z",
        "data": {
            "notification_id": 555,
            "user_id": 7,
            "preview_id": "asp_1",
            "trigger_id": "trg_1",
            "trigger_type": "important_urgent_task",
            "target_type": "task_pool",
            "target_id": 19,
            "title": "SmartFlow 日程调整建议",
            "message_text": "Two tasks moved.",
            "action_text": "查看并确认调整",
            "action_url": "https://app.example.com/assistant/preview/asp_1",
            "trace_id": "trace-abc",
        },
    }
    assert result.outcome is Outcome.SUCCESS
    assert result.request_json == request.content


async def test_empty_trace_id_is_omitted() -> None:
    seen, _ = await capture(make_delivery(trace_id=""))
    assert "trace_id" not in json.loads(seen[0].content)["data"]


async def test_webhook_id_is_stable_across_attempts() -> None:
    now = [NOW]
    seen, handler = recording(503)
    provider, transport = make_provider(handler, clock=lambda: now[0])
    delivery = make_delivery()
    async with transport:
        await provider.send(delivery)
        now[0] = NOW + timedelta(minutes=3)
        await provider.send(msgspec.structs.replace(delivery, attempt=2))
    first, second = seen
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "msg_555"
    assert json.loads(first.content)["id"] == json.loads(second.content)["id"] == "msg_555"
    assert int(second.headers["webhook-timestamp"]) - int(first.headers["webhook-timestamp"]) == 180
    # Each attempt is signed afresh over its own timestamp.
    for request in seen:
        assert request.headers["webhook-signature"] == reference_signature(SECRET_A, request)


# ---------------------------------------------------------------- signatures


async def test_signature_matches_the_reference_library() -> None:
    seen, result = await capture()
    (request,) = seen
    signature = request.headers["webhook-signature"]
    assert signature.startswith("v1,")
    assert " " not in signature
    assert signature == reference_signature(SECRET_A, request)
    assert result.request_json is not None
    for secret in (SECRET_A, SECRET_A.removeprefix("whsec_")):
        assert secret.encode() not in result.request_json


async def test_signature_verifies_with_the_reference_library_at_real_time() -> None:
    seen, _ = await capture(clock=lambda: datetime.now(UTC))
    (request,) = seen
    payload = Webhook(SECRET_A).verify(request.content, dict(request.headers))
    assert payload["id"] == "msg_555"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(request.content, dict(request.headers))


async def test_two_secrets_give_two_signatures_for_rotation() -> None:
    recipient = make_recipient(secret=f"  {SECRET_A}   {SECRET_B} ")
    seen, _ = await capture(make_delivery(recipient), clock=lambda: datetime.now(UTC))
    (request,) = seen
    parts = request.headers["webhook-signature"].split(" ")
    assert parts == [reference_signature(SECRET_A, request), reference_signature(SECRET_B, request)]
    # A receiver holding either secret accepts the message.
    for secret in (SECRET_A, SECRET_B):
        Webhook(secret).verify(request.content, dict(request.headers))


async def test_secret_without_prefix_and_unpadded_is_accepted() -> None:
    raw = base64.b64encode(b"key!").decode().rstrip("=")
    seen, _ = await capture(make_delivery(make_recipient(secret=raw)))
    assert seen[0].headers["webhook-signature"] == reference_signature(raw, seen[0])


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_c2VjcmV0cGFydA!!",
        "whsec_%%%%secretpart",
        f"{SECRET_A} whsec_secretpart*",  # one good, one bad: still refused
        "whsec_",
        "   ",
    ],
)
async def test_bad_secret_fails_without_a_call(secret: str) -> None:
    seen, result = await capture(make_delivery(make_recipient(secret=secret)))
    assert seen == []
    assert result.outcome is Outcome.PERMANENT_FAIL
    assert result.error_code == ErrorCode.PROVIDER_AUTH_FAILED
    assert result.error_message is not None
    assert "secret" in result.error_message
    assert "secretpart" not in result.error_message
    assert "c2VjcmV0cGFydA" not in result.error_message


async def test_unsigned_when_auth_kind_is_none() -> None:
    seen, _ = await capture(make_delivery(make_recipient(auth_kind="none", secret=None)))
    assert "webhook-signature" not in seen[0].headers
    assert seen[0].headers["webhook-id"] == "msg_555"


async def test_bearer_token() -> None:
    seen, result = await capture(make_delivery(make_recipient(auth_kind="bearer", secret="tok-1")))
    assert seen[0].headers["Authorization"] == "Bearer tok-1"
    assert "webhook-signature" not in seen[0].headers
    assert result.request_json is not None
    assert b"tok-1" not in result.request_json


# ---------------------------------------------------------------- reply mapping


@pytest.mark.parametrize(
    ("status", "outcome", "code", "message"),
    [
        (404, Outcome.PERMANENT_FAIL, "payload_invalid", "HTTP 404"),
        (408, Outcome.TEMPORARY_FAIL, "provider_timeout", "HTTP 408"),
        (410, Outcome.PERMANENT_FAIL, "endpoint_gone", "HTTP 410"),
        (425, Outcome.TEMPORARY_FAIL, "provider_rate_limited", "HTTP 425"),
    ],
)
async def test_status_mapping(
    status: int, outcome: Outcome, code: str | None, message: str | None
) -> None:
    result = await send_with(reply(status, b'{"ok":false}'))
    provider_support.assert_reply_mapped(
        result, status=status, body=b'{"ok":false}', outcome=outcome, code=code, said=message,
        unsaid=(URL_KEY,),
    )  # fmt: skip
    assert result.disable_channel is (status == 410)


def test_endpoint_gone_is_a_permanent_code() -> None:
    assert ErrorCode.ENDPOINT_GONE in PERMANENT_ERROR_CODES
    assert webhook.classify_webhook_status(410) == (
        Outcome.PERMANENT_FAIL,
        ErrorCode.ENDPOINT_GONE,
    )


@pytest.mark.parametrize(
    ("status", "header", "expected"),
    [
        (425, "2", 2.0),
        (408, "1", 1.0),
    ],
)
async def test_retry_after(status: int, header: str | None, expected: float | None) -> None:
    # the reply's own Date is the reference for an HTTP-date Retry-After
    headers = {"Retry-After": header, "Date": NOW_HTTP} if header is not None else None
    result = await send_with(reply(status, b"", headers))
    assert result.retry_after_s == expected


# ------------------------------------------------------------- recipients and URL policy


@pytest.mark.parametrize(
    ("url", "kw"),
    [
        (f"http://hooks.example.com/in/{URL_KEY}", {}),  # scheme, with any host allowed
        (f"https://evil.com/in/{URL_KEY}", {"allowed_hosts": ("example.com",)}),
        (f"https://hooks.example.com/out/{URL_KEY}", {"path_prefix": "/in/"}),
    ],
)
async def test_url_policy_violations_are_invalid_url(url: str, kw: dict[str, Any]) -> None:
    seen, result = await capture(make_delivery(make_recipient(url=url)), **kw)
    provider_support.assert_not_called(
        seen, result, outcome=Outcome.PERMANENT_FAIL, code=ErrorCode.INVALID_URL,
        unsaid=(URL_KEY,),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("url", "kw"),
    [
        (URL, {}),
        ("https://anything.test/", {}),
        (f"https://hooks.example.com/in/{URL_KEY}", {"allowed_hosts": ("example.com",)}),
        (
            f"http://127.0.0.1:8080/in/{URL_KEY}",
            {"allowed_schemes": ("http", "https"), "path_prefix": "/in/"},
        ),
    ],
)
async def test_url_policy_accepts(url: str, kw: dict[str, Any]) -> None:
    seen, result = await capture(make_delivery(make_recipient(url=url)), **kw)
    assert len(seen) == 1
    assert result.outcome is Outcome.SUCCESS
