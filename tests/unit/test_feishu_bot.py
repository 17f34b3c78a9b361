"""FeishuBotProvider against ``httpx.MockTransport``: body, signing, size cap, Feishu's codes.

The transport boundary is the only thing replaced; request building, signing, the URL
policy and classification all run for real. What every provider keeps (status families,
transport failures, Retry-After, the body cap, secrets, recipients, the URL policy) is in
``test_provider_contract``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers import feishu_bot
from outbox_notifier.providers.feishu_bot import FeishuBotProvider, MessageFormat
from outbox_notifier.providers.model import Delivery, Recipient, SendResult
from tests import provider_support
from tests.provider_support import Handler, mock_transport, recording, reply

TOKEN = "b0t-hook-token-0123456789abcdef"
SECRET = "bot-signing-secret-XYZ"
WEBHOOK = f"https://open.feishu.cn/open-apis/bot/v2/hook/{TOKEN}"
NOW = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)
NOW_HTTP = "Mon, 01 Jan 2024 00:00:00 GMT"
NOW_TS = "1704067200"
DELIVERY_FIELDS: dict[str, Any] = {
    "record_id": 321,
    "channel": "feishu_bot",
    "message_text": "Two tasks moved.\n/assistant/preview/asp_1",
}


expected_sign = provider_support.feishu_sign


def make_recipient(
    url: str = WEBHOOK, auth_kind: str = "none", secret: str | None = None, enabled: bool = True
) -> Recipient:
    return Recipient(enabled=enabled, webhook_url=url, auth_kind=auth_kind, auth_secret=secret)


def make_delivery(recipient: Recipient | None = None, **overrides: Any) -> Delivery:
    recipient = recipient if recipient is not None else make_recipient()
    return provider_support.make_delivery(recipient, **(DELIVERY_FIELDS | overrides))


async def send_with(
    handler: Handler,
    delivery: Delivery | None = None,
    *,
    clock: Callable[[], datetime] = lambda: NOW,
    **kw: Any,
) -> SendResult:
    transport = mock_transport(handler)
    kw.setdefault("frontend_base_url", "https://app.example.com/")
    provider = FeishuBotProvider(transport, clock=clock, **kw)
    async with transport:
        return await provider.send(delivery or make_delivery())


async def capture(
    delivery: Delivery | None = None, **kw: Any
) -> tuple[list[httpx.Request], SendResult]:
    seen, handler = recording(200, json={"code": 0, "msg": "success", "data": {}})
    result = await send_with(handler, delivery, **kw)
    return seen, result


# ---------------------------------------------------------------- body


async def test_text_body() -> None:
    seen, result = await capture()
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == WEBHOOK
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(request.content) == {
        "msg_type": "text",
        "content": {"text": "Two tasks moved.\n/assistant/preview/asp_1"},
    }
    assert result.outcome is Outcome.SUCCESS
    assert result.request_json == request.content


async def test_card_body() -> None:
    seen, _ = await capture(message_format="card")
    body = json.loads(seen[0].content)
    assert body == {
        "msg_type": "interactive",
        "card": {
            "header": {"title": {"tag": "plain_text", "content": "SmartFlow 日程调整建议"}},
            "elements": [
                {
                    "tag": "div",
                    "text": {
                        "tag": "plain_text",
                        "content": "Two tasks moved.\n/assistant/preview/asp_1",
                    },
                },
                {
                    "tag": "action",
                    "actions": [
                        {
                            "tag": "button",
                            "text": {"tag": "plain_text", "content": "查看并确认调整"},
                            "type": "primary",
                            "url": "https://app.example.com/assistant/preview/asp_1",
                        }
                    ],
                },
            ],
        },
    }


async def test_card_without_absolute_action_url_has_no_button() -> None:
    seen, result = await capture(message_format="card", frontend_base_url="")
    elements = json.loads(seen[0].content)["card"]["elements"]
    assert [e["tag"] for e in elements] == ["div"]
    assert result.outcome is Outcome.SUCCESS


async def test_empty_text_gets_the_default_summary() -> None:
    seen, _ = await capture(make_delivery(message_text="   "))
    assert json.loads(seen[0].content)["content"]["text"] == message.DEFAULT_FALLBACK_TEMPLATE


# ---------------------------------------------------------------- signing


def test_bot_sign_matches_the_formula() -> None:
    assert feishu_bot.bot_sign(SECRET, NOW_TS) == expected_sign(NOW_TS, SECRET)
    # A known vector, so both implementations cannot drift together.
    assert feishu_bot.bot_sign("secret", "1599360473") == (
        base64.b64encode(hmac.new(b"1599360473\nsecret", b"", hashlib.sha256).digest()).decode()
    )


@pytest.mark.parametrize("fmt", ["text", "card"])
async def test_signed_body_and_masked_request_json(fmt: MessageFormat) -> None:
    recipient = make_recipient(auth_kind="bot_secret", secret=f"  {SECRET} ")
    seen, result = await capture(make_delivery(recipient), message_format=fmt)
    sent = json.loads(seen[0].content)
    assert list(sent)[:3] == ["timestamp", "sign", "msg_type"]
    assert sent["timestamp"] == NOW_TS
    assert sent["sign"] == expected_sign(NOW_TS, SECRET)

    assert result.request_json is not None
    stored = json.loads(result.request_json)
    assert stored["sign"] == "***"
    assert {k: v for k, v in stored.items() if k != "sign"} == {
        k: v for k, v in sent.items() if k != "sign"
    }
    assert sent["sign"].encode() not in result.request_json
    assert SECRET.encode() not in result.request_json
    assert TOKEN.encode() not in result.request_json


async def test_unsigned_when_auth_kind_is_not_bot_secret() -> None:
    seen, _ = await capture(make_delivery(make_recipient(auth_kind="bearer", secret=SECRET)))
    sent = json.loads(seen[0].content)
    assert "sign" not in sent
    assert "timestamp" not in sent
    assert "Authorization" not in seen[0].headers


async def test_signature_is_recomputed_on_every_call() -> None:
    now = [NOW]
    seen, handler = recording(200, json={"code": 11232, "msg": "frequency limited"})
    transport = mock_transport(handler)
    provider = FeishuBotProvider(transport, clock=lambda: now[0])
    delivery = make_delivery(make_recipient(auth_kind="bot_secret", secret=SECRET))
    async with transport:
        await provider.send(delivery)
        now[0] = NOW + timedelta(minutes=30, seconds=7)
        await provider.send(msgspec.structs.replace(delivery, attempt=2))
    first, second = (json.loads(r.content) for r in seen)
    assert first["timestamp"] == NOW_TS
    assert second["timestamp"] == str(int(NOW_TS) + 1807)
    assert first["sign"] == expected_sign(first["timestamp"], SECRET)
    assert second["sign"] == expected_sign(second["timestamp"], SECRET)
    assert first["sign"] != second["sign"]


async def test_bot_secret_without_secret_fails_without_a_call() -> None:
    seen, result = await capture(make_delivery(make_recipient(auth_kind="bot_secret", secret=" ")))
    assert seen == []
    assert result.outcome is Outcome.PERMANENT_FAIL
    assert result.error_code == ErrorCode.PROVIDER_AUTH_FAILED


# ---------------------------------------------------------------- size cap


@pytest.mark.parametrize("fmt", ["text", "card"])
@pytest.mark.parametrize(
    "text",
    [
        "a" * 50_000,
        "日程" * 20_000,  # 3 bytes a code point in UTF-8
        "😀" * 20_000,  # 4 bytes, outside the BMP
        '\x01"\\' * 10_000,  # JSON escapes: up to 6 bytes a code point
    ],
)
async def test_oversize_text_is_cut_to_fit(fmt: MessageFormat, text: str) -> None:
    recipient = make_recipient(auth_kind="bot_secret", secret=SECRET)
    seen, result = await capture(make_delivery(recipient, message_text=text), message_format=fmt)
    (request,) = seen
    assert len(request.content) <= 19_000
    assert len(request.content) > 19_000 - 8  # cut no more than a code point's worth
    body = json.loads(request.content)
    sent = body["content"]["text"] if fmt == "text" else body["card"]["elements"][0]["text"]
    if fmt == "card":
        sent = sent["content"]
    assert sent.endswith("…")
    assert text.startswith(sent[:-1])
    assert body["sign"] == expected_sign(NOW_TS, SECRET)
    assert result.outcome is Outcome.SUCCESS


async def test_request_body_cap_is_configurable() -> None:
    seen, _ = await capture(make_delivery(message_text="x" * 1000), request_body_max_bytes=200)
    assert len(seen[0].content) <= 200
    assert json.loads(seen[0].content)["content"]["text"].endswith("…")


async def test_text_that_fits_is_not_cut() -> None:
    text = "y" * 18_000
    seen, _ = await capture(make_delivery(message_text=text))
    assert json.loads(seen[0].content)["content"]["text"] == text


async def test_message_that_cannot_fit_is_not_sent() -> None:
    huge_url = "https://app.example.com/" + "p" * 30_000
    seen, result = await capture(make_delivery(target_url=huge_url), message_format="card")
    assert seen == []
    assert result.outcome is Outcome.PERMANENT_FAIL
    assert result.error_code == ErrorCode.PAYLOAD_INVALID


@pytest.mark.parametrize("bad", [0, -1, 20 * 1024 + 1])
def test_request_body_cap_is_validated(bad: int) -> None:
    with pytest.raises(ValueError, match="request_body_max_bytes"):
        FeishuBotProvider(httpx.AsyncHTTPTransport(), request_body_max_bytes=bad)


# ---------------------------------------------------------------- reply mapping


def feishu(code: int, msg: str, key: str = "code", msg_key: str = "msg") -> bytes:
    return json.dumps({key: code, msg_key: msg, "data": {}}).encode()


SIGN_FAIL = "sign match fail or timestamp is not within one hour from current time"


@pytest.mark.parametrize(
    ("status", "content", "outcome", "code", "message"),
    [
        (200, feishu(0, "success"), Outcome.SUCCESS, None, None),
        (200, b"", Outcome.SUCCESS, None, None),
        (200, b"<html>ok</html>", Outcome.SUCCESS, None, None),
        (200, b'{"msg":"no code"}', Outcome.SUCCESS, None, None),
        (200, b'{"StatusCode":0,"StatusMessage":"success"}', Outcome.SUCCESS, None, None),
        (204, b"", Outcome.SUCCESS, None, None),
        (
            200,
            feishu(11232, "frequency limited psm[lark.oapi.app_platform_runtime]appID[1]"),
            Outcome.TEMPORARY_FAIL,
            "provider_rate_limited",
            "feishu code 11232: frequency limited",
        ),
        (
            200,
            feishu(9499, "too many request"),
            Outcome.TEMPORARY_FAIL,
            "provider_rate_limited",
            "feishu code 9499: too many request",
        ),
        (
            200,
            feishu(9499, "request trigger frequency limit"),
            Outcome.TEMPORARY_FAIL,
            "provider_rate_limited",
            "feishu code 9499",
        ),
        (
            200,
            feishu(9499, "Rate limited, retry later"),
            Outcome.TEMPORARY_FAIL,
            "provider_rate_limited",
            "feishu code 9499",
        ),
        (
            200,
            feishu(9499, "Bad Request"),
            Outcome.PERMANENT_FAIL,
            "payload_invalid",
            "feishu code 9499: Bad Request",
        ),
        (
            200,
            feishu(9499, "separate generated fields"),  # "rate" inside words is not throttling
            Outcome.PERMANENT_FAIL,
            "payload_invalid",
            "feishu code 9499",
        ),
        (
            200,
            feishu(19021, SIGN_FAIL),
            Outcome.PERMANENT_FAIL,
            "provider_auth_failed",
            f"feishu code 19021: {SIGN_FAIL}",
        ),
        (
            200,
            feishu(19001, "param invalid: incoming webhook access token invalid"),
            Outcome.PERMANENT_FAIL,
            "provider_auth_failed",
            "feishu code 19001: param invalid",
        ),
        (
            200,
            feishu(19024, "Key Words Not Found"),
            Outcome.PERMANENT_FAIL,
            "payload_invalid",
            "feishu code 19024: Key Words Not Found",
        ),
        (200, feishu(19002, "params error"), Outcome.PERMANENT_FAIL, "payload_invalid", "19002"),
        (200, feishu(19007, "bot not in chat"), Outcome.PERMANENT_FAIL, "payload_invalid", "19007"),
        (200, feishu(19022, "ip not allowed"), Outcome.PERMANENT_FAIL, "payload_invalid", "19022"),
        (200, feishu(12345, "new thing"), Outcome.PERMANENT_FAIL, "payload_invalid", "12345"),
        (
            200,
            feishu(19021, SIGN_FAIL, "StatusCode", "StatusMessage"),
            Outcome.PERMANENT_FAIL,
            "provider_auth_failed",
            f"feishu code 19021: {SIGN_FAIL}",
        ),
        (
            200,
            feishu(11232, "frequency limited", "StatusCode", "StatusMessage"),
            Outcome.TEMPORARY_FAIL,
            "provider_rate_limited",
            "feishu code 11232",
        ),
        (
            400,
            feishu(11232, "frequency limited"),
            Outcome.TEMPORARY_FAIL,
            "provider_rate_limited",
            "feishu code 11232: frequency limited (HTTP 400)",
        ),
        (
            400,
            feishu(19021, SIGN_FAIL),
            Outcome.PERMANENT_FAIL,
            "provider_auth_failed",
            "(HTTP 400)",
        ),
        (404, b"not found", Outcome.PERMANENT_FAIL, "payload_invalid", "HTTP 404"),
        (
            429,
            feishu(11232, "frequency limited"),
            Outcome.TEMPORARY_FAIL,
            "provider_rate_limited",
            "HTTP 429, feishu code 11232",
        ),
        (502, feishu(19021, SIGN_FAIL), Outcome.TEMPORARY_FAIL, "provider_5xx", "HTTP 502"),
    ],
)
async def test_reply_mapping(
    status: int, content: bytes, outcome: Outcome, code: str | None, message: str | None
) -> None:
    result = await send_with(reply(status, content))
    provider_support.assert_reply_mapped(
        result, status=status, body=content, outcome=outcome, code=code, said=message,
        unsaid=(TOKEN,),
    )  # fmt: skip


def test_classify_feishu_code() -> None:
    classify = feishu_bot.classify_feishu_code
    assert classify(0, "") == (Outcome.SUCCESS, None)
    assert classify(11232, "") == (Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_RATE_LIMITED)
    assert classify(19021, "") == (Outcome.PERMANENT_FAIL, ErrorCode.PROVIDER_AUTH_FAILED)
    assert classify(9499, "") == (Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID)


async def test_provider_message_id_from_reply() -> None:
    found = await send_with(reply(200, b'{"code":0,"data":{"message_id":"om_7"}}'))
    assert found.provider_message_id == "om_7"


@pytest.mark.parametrize(
    ("status", "content", "header", "expected"),
    [
        (200, feishu(11232, "frequency limited"), "3", 3.0),
        (200, feishu(19021, SIGN_FAIL), "3", None),  # permanent: nothing to wait for
    ],
)
async def test_retry_after(
    status: int, content: bytes, header: str | None, expected: float | None
) -> None:
    # the reply's own Date is the reference for an HTTP-date Retry-After
    headers = {"Retry-After": header, "Date": NOW_HTTP} if header is not None else None
    result = await send_with(reply(status, content, headers))
    assert result.retry_after_s == expected


# ------------------------------------------------------------- recipients and URL policy


@pytest.mark.parametrize(
    "url",
    [
        f"https://feishu.cn/open-apis/bot/v2/hook/{TOKEN}",  # parent of an allowed host
        f"https://open.feishu.cn/flow/api/trigger-webhook/{TOKEN}",
    ],
)
async def test_url_policy_violations_are_invalid_url(url: str) -> None:
    seen, result = await capture(make_delivery(make_recipient(url=url)))
    provider_support.assert_not_called(
        seen, result, outcome=Outcome.PERMANENT_FAIL, code=ErrorCode.INVALID_URL, unsaid=(TOKEN,)
    )


@pytest.mark.parametrize(
    "url",
    [
        WEBHOOK,
        f"https://open.larksuite.com/open-apis/bot/v2/hook/{TOKEN}",
        f"https://OPEN.FEISHU.CN./open-apis/bot/v2/hook/{TOKEN}",
    ],
)
async def test_url_policy_accepts_feishu_and_lark(url: str) -> None:
    seen, result = await capture(make_delivery(make_recipient(url=url)))
    assert len(seen) == 1
    assert result.outcome is Outcome.SUCCESS


def test_hosts_may_not_be_empty() -> None:
    with pytest.raises(ValueError, match="allowed_hosts"):
        FeishuBotProvider(httpx.AsyncHTTPTransport(), allowed_hosts=())


def test_message_format_is_validated() -> None:
    with pytest.raises(ValueError, match="message_format"):
        FeishuBotProvider(httpx.AsyncHTTPTransport(), message_format="post")  # type: ignore[arg-type]


def _all_strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _all_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _all_strings(v)


async def test_token_never_in_the_request_body() -> None:
    seen, result = await capture(message_format="card")
    assert all(TOKEN not in s for s in _all_strings(json.loads(seen[0].content)))
    assert result.request_json is not None
    assert TOKEN.encode() not in result.request_json
