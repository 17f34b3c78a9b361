"""Helpers shared by the provider tests: deliveries and ``httpx.MockTransport`` handlers."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs

import httpx

from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers.model import Delivery, Recipient, SendResult

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def make_delivery(recipient: Recipient | None, **overrides: Any) -> Delivery:
    """A claimed delivery to ``recipient`` with the provider tests' usual fields.

    ``overrides`` replace any field; each test module passes its own ``record_id``,
    ``channel`` and whatever else its expectations are written against.
    """
    fields: dict[str, Any] = {
        "record_id": 1,
        "channel": "feishu",
        "user_id": 7,
        "trigger_id": "trg_1",
        "preview_id": "asp_1",
        "trigger_type": "important_urgent_task",
        "target_type": "task_pool",
        "target_id": 19,
        "target_url": "/assistant/preview/asp_1",
        "message_text": "Two tasks moved.",
        "fallback_used": False,
        "trace_id": "trace-abc",
        "attempt": 1,
        "dedupe_key": "dk-1",
        "recipient": recipient,
    }
    fields.update(overrides)
    return Delivery(**fields)


def feishu_sign(timestamp: str, secret: str) -> str:
    """Feishu's bot signature, written out independently of the provider: HMAC-SHA256 keyed
    by ``timestamp + "\n" + secret`` over nothing, base64."""
    string_to_sign = timestamp + "\n" + secret
    digest = hmac.new(string_to_sign.encode("utf-8"), digestmod=hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def dingtalk_signature_ok(query: str, secret: str, now: float) -> bool:
    """DingTalk's check: ``sign`` = base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}"))
    in ms, URL-encoded in the query, within an hour of now."""
    params = parse_qs(query, strict_parsing=True)
    (timestamp,), (sign,) = params["timestamp"], params["sign"]
    assert abs(int(timestamp) / 1000 - now) < 3600
    string_to_sign = f"{timestamp}\n{secret}".encode()
    digest = hmac.new(secret.encode(), string_to_sign, hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(digest).decode(), sign)


def mock_transport(handler: Handler) -> httpx.MockTransport:
    """A transport whose every request goes to ``handler``."""
    return httpx.MockTransport(handler)


def reply(status: int, content: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    """A handler answering every request with ``status``, ``content`` and ``headers``."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers=headers)

    return handler


def raising(exc: BaseException) -> Handler:
    """A handler raising ``exc`` for every request."""

    async def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def recording(status: int, **response: Any) -> tuple[list[httpx.Request], Handler]:
    """A handler that keeps every request in the returned list and answers ``status``.

    ``response`` goes to each ``httpx.Response`` (``json=``, ``headers=`` ...).
    """
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, **response)

    return seen, handler


def assert_reply_mapped(
    result: SendResult,
    *,
    status: int,
    body: bytes,
    outcome: Outcome,
    code: str | None,
    said: str | None = None,
    unsaid: tuple[str, ...] = (),
) -> None:
    """``result`` is the call's answer to a ``status`` reply with ``body``: ``outcome`` and
    ``code``, the reply kept whole (not cut at the cap) beside the stored request, the channel
    disabled only for ``endpoint_gone``; a success has no message, a failure's says ``said``
    and none of ``unsaid`` (the URL's key, a secret)."""
    assert result.outcome is outcome
    assert result.error_code == code
    assert result.http_status == status
    assert result.response_body == body
    assert result.response_truncated is False
    assert result.request_json is not None
    assert result.duration_s >= 0
    assert result.disable_channel is (result.error_code is ErrorCode.ENDPOINT_GONE)
    if outcome is Outcome.SUCCESS:
        assert result.error_message is None
        return
    assert result.error_message
    if said is not None:
        assert said in result.error_message
    for secret in unsaid:
        assert secret not in result.error_message


def assert_not_called(
    seen: list[httpx.Request],
    result: SendResult,
    *,
    outcome: Outcome,
    code: ErrorCode,
    unsaid: tuple[str, ...] = (),
) -> None:
    """The call ended before the transport (``seen`` stayed empty) with ``outcome`` and
    ``code`` and a message free of ``unsaid`` (the URL's key, a secret)."""
    assert seen == []
    assert result.outcome is outcome
    assert result.error_code is code
    assert result.error_message
    for secret in unsaid:
        assert secret not in result.error_message
