"""FeishuFlowProvider against ``httpx.MockTransport``: the seed's body and reply mapping.

The transport boundary is the only thing replaced; request building, URL policy, body
capping and classification all run for real. What every provider keeps (status families,
transport failures, Retry-After, the body cap, secrets, recipients, the URL policy) is in
``test_provider_contract``; the ``replies`` helpers the seed's mapping is built on are here.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from outbox_notifier import message, names
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers import replies
from outbox_notifier.providers.feishu_flow import FeishuFlowProvider
from outbox_notifier.providers.model import Delivery, Recipient, SendResult
from tests import provider_support
from tests.provider_support import Handler, mock_transport, recording, reply

TOKEN = "s3cr3t-trigger-key-0123456789"
WEBHOOK = f"https://www.feishu.cn/flow/api/trigger-webhook/{TOKEN}"
NOW = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)
NOW_HTTP = "Mon, 01 Jan 2024 00:00:00 GMT"
DELIVERY_FIELDS: dict[str, Any] = {
    "record_id": 123,
    "channel": "feishu",
    "message_text": "Two tasks moved.\n/assistant/preview/asp_1",
}


def make_delivery(recipient: Recipient | None = None, **overrides: Any) -> Delivery:
    if recipient is None:
        recipient = Recipient(enabled=True, webhook_url=WEBHOOK, auth_kind="none", auth_secret=None)
    return provider_support.make_delivery(recipient, **(DELIVERY_FIELDS | overrides))


def make_provider(
    handler: Handler,
    *,
    response_body_max_bytes: int = 65536,
    frontend_base_url: str = "https://app.example.com/",
) -> tuple[FeishuFlowProvider, httpx.AsyncBaseTransport]:
    transport = mock_transport(handler)
    provider = FeishuFlowProvider(
        transport,
        frontend_base_url=frontend_base_url,
        allowed_schemes=("https",),
        allowed_hosts=("feishu.cn", "127.0.0.1"),
        path_prefix="/flow/api/trigger-webhook/",
        response_body_max_bytes=response_body_max_bytes,
        clock=lambda: NOW,
    )
    return provider, transport


async def send_with(handler: Handler, delivery: Delivery | None = None, **kw: Any) -> SendResult:
    provider, transport = make_provider(handler, **kw)
    async with transport:
        return await provider.send(delivery or make_delivery())


@pytest.mark.parametrize(
    ("status", "content", "outcome", "code"),
    [
        (200, b'{"code":0,"msg":"success","data":{}}', Outcome.SUCCESS, None),
        (200, b"", Outcome.SUCCESS, None),
        (200, b"<html>ok</html>", Outcome.SUCCESS, None),
        (200, b'{"msg":"no code field"}', Outcome.SUCCESS, None),
        (200, b'["not", "an", "object"]', Outcome.SUCCESS, None),
        (200, b'{"code":"1234"}', Outcome.SUCCESS, None),
        (204, b"", Outcome.SUCCESS, None),
        (200, b'{"code":1234,"msg":"bad params"}', Outcome.PERMANENT_FAIL, "payload_invalid"),
        (201, b'{"code":-1}', Outcome.PERMANENT_FAIL, "payload_invalid"),
        (400, b'{"code":0}', Outcome.PERMANENT_FAIL, "payload_invalid"),
        (404, b"", Outcome.PERMANENT_FAIL, "payload_invalid"),
    ],
)
async def test_status_and_body_mapping(
    status: int, content: bytes, outcome: Outcome, code: str | None
) -> None:
    result = await send_with(reply(status, content))
    provider_support.assert_reply_mapped(
        result, status=status, body=content, outcome=outcome, code=code, unsaid=(TOKEN,)
    )


async def test_code_rejection_message_has_code_and_msg() -> None:
    result = await send_with(reply(200, b'{"code":1234,"msg":"bad params"}'))
    assert result.error_message is not None
    assert "1234" in result.error_message
    assert "bad params" in result.error_message


async def test_provider_message_id_from_reply() -> None:
    found = await send_with(reply(200, b'{"code":0,"data":{"message_id":"om_42"}}'))
    assert found.provider_message_id == "om_42"
    absent = await send_with(reply(200, b'{"code":0,"data":{}}'))
    assert absent.provider_message_id is None


@pytest.mark.parametrize(
    "url",
    [
        f"https://evilfeishu.cn/flow/api/trigger-webhook/{TOKEN}",  # not a subdomain
        f"https://www.feishu.cn/open-apis/bot/v2/hook/{TOKEN}",  # wrong path prefix
    ],
)
async def test_url_policy_violations_are_invalid_url(url: str) -> None:
    calls, handler = recording(200)
    recipient = Recipient(enabled=True, webhook_url=url, auth_kind="none", auth_secret=None)
    result = await send_with(handler, make_delivery(recipient))
    provider_support.assert_not_called(
        calls, result, outcome=Outcome.PERMANENT_FAIL, code=ErrorCode.INVALID_URL, unsaid=(TOKEN,)
    )


async def test_local_http_allowed_when_configured() -> None:
    transport = mock_transport(reply(200))
    provider = FeishuFlowProvider(
        transport,
        frontend_base_url="",
        allowed_schemes=("http", "https"),
        allowed_hosts=("127.0.0.1",),
        path_prefix="/flow/api/trigger-webhook/",
    )
    recipient = Recipient(
        enabled=True,
        webhook_url=f"http://127.0.0.1:8080/flow/api/trigger-webhook/{TOKEN}",
        auth_kind="none",
        auth_secret=None,
    )
    async with transport:
        result = await provider.send(make_delivery(recipient))
    assert result.outcome is Outcome.SUCCESS


async def capture(delivery: Delivery, **kw: Any) -> tuple[httpx.Request, SendResult]:
    seen, handler = recording(200, json={"code": 0})
    result = await send_with(handler, delivery, **kw)
    assert len(seen) == 1
    return seen[0], result


@pytest.mark.parametrize(
    ("auth_kind", "secret", "expected"),
    [
        ("bearer", "tok-xyz", "Bearer tok-xyz"),
        ("bearer", "", None),
        ("none", "tok-xyz", None),
    ],
)
async def test_bearer_header(auth_kind: str, secret: str, expected: str | None) -> None:
    recipient = Recipient(
        enabled=True, webhook_url=WEBHOOK, auth_kind=auth_kind, auth_secret=secret
    )
    request, result = await capture(make_delivery(recipient))
    assert request.headers.get("Authorization") == expected
    assert result.request_json is not None
    if secret:
        assert secret.encode() not in result.request_json


async def test_request_body_is_the_seeds() -> None:
    request, result = await capture(make_delivery())
    assert request.method == "POST"
    assert str(request.url) == WEBHOOK
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert request.content == result.request_json
    body = json.loads(request.content)
    assert list(body) == [
        "event",
        "version",
        "notification_id",
        "user_id",
        "preview_id",
        "trigger_id",
        "trigger_type",
        "target_type",
        "target_id",
        "message",
        "trace_id",
        "sent_at",
    ]
    assert body == {
        "event": "smartflow.schedule_adjustment_ready",
        "version": "1",
        "notification_id": 123,
        "user_id": 7,
        "preview_id": "asp_1",
        "trigger_id": "trg_1",
        "trigger_type": "important_urgent_task",
        "target_type": "task_pool",
        "target_id": 19,
        "message": {
            "title": "SmartFlow 日程调整建议",
            "summary": "Two tasks moved.\n/assistant/preview/asp_1",
            "action_text": "查看并确认调整",
            "action_url": "https://app.example.com/assistant/preview/asp_1",
        },
        "trace_id": "trace-abc",
        "sent_at": "2024-01-01T00:00:00Z",
    }


async def test_body_omits_empty_trace_id_and_fills_empty_summary() -> None:
    request, _ = await capture(make_delivery(trace_id="", message_text="  "))
    body = json.loads(request.content)
    assert "trace_id" not in body
    assert body["message"]["summary"] == message.DEFAULT_FALLBACK_TEMPLATE


async def test_action_url_without_frontend_base_is_the_target_url() -> None:
    request, _ = await capture(make_delivery(), frontend_base_url="")
    assert json.loads(request.content)["message"]["action_url"] == "/assistant/preview/asp_1"


async def test_2xx_body_cut_at_the_cap_is_a_success() -> None:
    big = b'{"code":1234,"msg":"' + b"y" * 10_000 + b'"}'
    result = await send_with(reply(200, big), response_body_max_bytes=100)
    assert result.outcome is Outcome.SUCCESS
    assert result.response_body == big[:100]
    assert result.response_truncated is True


async def test_error_messages_are_truncated() -> None:
    msg = "m" * 5000
    result = await send_with(reply(200, json.dumps({"code": 9, "msg": msg}).encode()))
    assert result.error_message is not None
    assert len(result.error_message) == 2000


def test_classify_status() -> None:
    assert replies.classify_status(200) == (Outcome.SUCCESS, None)
    assert replies.classify_status(429) == (Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_RATE_LIMITED)
    assert replies.classify_status(599) == (Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_5XX)
    assert replies.classify_status(401) == (Outcome.PERMANENT_FAIL, ErrorCode.PROVIDER_AUTH_FAILED)
    assert replies.classify_status(418) == (Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), ("1.5", 1.5), (" 7 ", 7.0), ("-1", None), ("inf", None), ("1_000", None)],
)
def test_parse_retry_after_seconds(value: str, expected: float | None) -> None:
    assert replies.parse_retry_after(value, date=NOW_HTTP) == expected


@pytest.mark.parametrize(
    ("value", "date", "expected"),
    [
        # 30 s after the reply's own Date, whatever time it is here
        ("Mon, 01 Jan 2024 00:00:30 GMT", "Mon, 01 Jan 2024 00:00:00 GMT", 30.0),
        ("Mon, 01 Jan 2024 01:00:30 GMT", "Mon, 01 Jan 2024 01:00:00 GMT", 30.0),
        # the obsolete RFC 850 and asctime forms, on either header
        ("Monday, 01-Jan-24 00:00:30 GMT", "Mon Jan  1 00:00:00 2024", 30.0),
        ("Mon, 01 Jan 2024 00:00:00 GMT", "Mon, 01 Jan 2024 00:00:30 GMT", 0.0),  # past
        ("Mon, 01 Jan 2024 00:00:30 GMT", " Mon, 01 Jan 2024 00:00:29 GMT ", 1.0),
    ],
)
def test_retry_after_date_is_read_against_the_replys_date(
    value: str, date: str, expected: float
) -> None:
    assert replies.parse_retry_after(value, date=date) == expected


@pytest.mark.parametrize("date", [None, "", "yesterday", "Mon, 99 Jan 2024 00:00:00 GMT"])
def test_retry_after_date_without_a_readable_date_is_returned_as_the_time_itself(
    date: str | None,
) -> None:
    # No reference on the reply: the time goes to the database, whose clock the retries use.
    when = replies.parse_retry_after("Mon, 01 Jan 2024 00:00:30 GMT", date=date)
    assert when == datetime(2024, 1, 1, 0, 0, 30, tzinfo=UTC)


def test_error_code_partition() -> None:
    assert set(ErrorCode) == names.RETRYABLE_ERROR_CODES | names.PERMANENT_ERROR_CODES
    assert not names.RETRYABLE_ERROR_CODES & names.PERMANENT_ERROR_CODES
    assert ErrorCode.SENDING_LEASE_EXPIRED in names.RETRYABLE_ERROR_CODES


async def test_bad_bearer_token_is_rejected_without_a_call() -> None:
    calls, handler = recording(200)

    secret = "tok\nInjected: yes"
    recipient = Recipient(enabled=True, webhook_url=WEBHOOK, auth_kind="bearer", auth_secret=secret)
    result = await send_with(handler, make_delivery(recipient))
    assert result.outcome is Outcome.PERMANENT_FAIL
    assert result.error_code == ErrorCode.PROVIDER_AUTH_FAILED
    assert result.error_message is not None
    assert "Injected" not in result.error_message
    assert calls == []
