"""Feishu Flow webhook provider: a port of the seed's ``WebhookFeishuProvider``.

Posts a small business JSON (not the group-bot ``msg_type`` protocol) to the webhook
trigger of the user's own Feishu Flow, which then composes the private message. The body
is the seed's, field for field::

    {"event": "smartflow.schedule_adjustment_ready", "version": "1",
     "notification_id": 123, "user_id": 7, "preview_id": "...", "trigger_id": "...",
     "trigger_type": "...", "target_type": "...", "target_id": 9,
     "message": {"title": "...", "summary": "...", "action_text": "...",
                 "action_url": "https://app.example/preview/9"},
     "trace_id": "...",                   # omitted when empty, as in the seed
     "sent_at": "2024-01-01T00:00:00Z"}   # RFC 3339, UTC (the seed used local time)

The user's Flow is built against these field names; changing them breaks every user's flow.

Differences from the seed, each on purpose:

- The URL policy (schemes, hosts with their subdomains, path prefix) is configuration, so
  tests can point at a local server; rejections name only scheme and host, never the path,
  which holds the trigger's secret key.
- ``action_url`` is the target URL itself when no frontend base URL is configured (the seed
  substituted a placeholder domain).
- Redirects are not followed: a redirect could lead off the allowed hosts.
- The whole call, body included, has one deadline of ``timeout_s`` (the seed's
  ``http.Client.Timeout``); the delivery lease must stay longer than it.
- ``provider_message_id`` is taken from the reply when present (``message_id`` at the top
  or under ``data``), else None; the seed made one up from a timestamp.
- A 429's ``Retry-After`` is returned as ``retry_after_s``.

Reply mapping (seed): 2xx whose JSON body carries an integer ``code`` other than 0 is a
permanent ``payload_invalid``; any other 2xx (empty body, non-JSON, no ``code``, a body cut
at the cap) is a success. Other statuses go through ``base.classify_status``. A transport
failure, or a body that cannot be read after the status arrived, is retryable:
``provider_timeout`` for timeouts, ``network_error`` otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from .base import (
    Delivery,
    ErrorCode,
    Outcome,
    SendResult,
    classify_status,
    parse_retry_after,
    read_body_capped,
    truncate,
)

EVENT = "smartflow.schedule_adjustment_ready"
VERSION = "1"
MESSAGE_TITLE = "SmartFlow 日程调整建议"
MESSAGE_ACTION_TEXT = "查看并确认调整"
# The seed's fallback summary; the full-width comma is the correct Chinese punctuation.
DEFAULT_SUMMARY = "我为你生成了一份日程调整建议，请回到系统确认是否应用。"  # noqa: RUF001

# Host names in rejection messages are cut so a garbled URL cannot smuggle a long secret.
_HOST_IN_MESSAGE_MAX_CHARS = 100


class FlowMessage(msgspec.Struct, frozen=True, kw_only=True):
    """The four fields a user's Flow composes its private message from."""

    title: str
    summary: str
    action_text: str
    action_url: str


class FlowPayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The seed's ``FeishuWebhookPayload``; field order is the seed's."""

    event: str
    version: str
    notification_id: int
    user_id: int
    preview_id: str
    trigger_id: str
    trigger_type: str
    target_type: str
    target_id: int
    message: FlowMessage
    trace_id: str = ""  # the only default, so the only field omitted (seed: omitempty)
    sent_at: str


_encoder = msgspec.json.Encoder()


class UrlRejected(ValueError):
    """A webhook URL outside the policy; the message never contains the URL's path."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class FeishuFlowProvider:
    """Delivers to the Feishu Flow webhook trigger configured per user.

    Usage::

        async with httpx.AsyncClient() as client:
            provider = FeishuFlowProvider(
                client,
                frontend_base_url="https://app.example",
                allowed_schemes=("https",),
                allowed_hosts=("feishu.cn",),
                path_prefix="/flow/api/trigger-webhook/",
            )
            result = await provider.send(delivery)

    ``client`` is shared and owned by the caller. ``allowed_hosts`` match exactly or as a
    parent domain (``feishu.cn`` allows ``www.feishu.cn``, never ``feishu.cn.evil.com``).
    ``clock`` exists for tests of ``sent_at`` and ``Retry-After`` dates.
    """

    channel: str = "feishu"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        frontend_base_url: str,
        allowed_schemes: tuple[str, ...],
        allowed_hosts: tuple[str, ...],
        path_prefix: str,
        timeout_s: float = 5.0,
        response_body_max_bytes: int = 65536,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        if response_body_max_bytes < 0:
            raise ValueError(
                f"response_body_max_bytes must not be negative, got {response_body_max_bytes!r}"
            )
        if not allowed_schemes:
            raise ValueError("allowed_schemes must not be empty")
        if not allowed_hosts:
            raise ValueError("allowed_hosts must not be empty")
        self._client = client
        self._frontend_base_url = frontend_base_url.strip().rstrip("/")
        self._allowed_schemes = frozenset(s.strip().lower() for s in allowed_schemes)
        self._allowed_hosts = frozenset(h.strip().strip(".").lower() for h in allowed_hosts)
        self._host_suffixes = tuple("." + h for h in self._allowed_hosts)
        self._path_prefix = path_prefix
        self._timeout_s = timeout_s
        self._timeout = httpx.Timeout(timeout_s)
        self._body_max_bytes = response_body_max_bytes
        self._clock = clock

    def check_url(self, raw_url: str) -> httpx.URL:
        """Parse ``raw_url`` and enforce the URL policy; raise ``UrlRejected`` if outside it."""
        try:
            url = httpx.URL(raw_url.strip())
        except (httpx.InvalidURL, ValueError, TypeError):
            raise UrlRejected("webhook url cannot be parsed") from None
        scheme = url.scheme
        host = url.host.rstrip(".")
        shown = f"{scheme}://{host[:_HOST_IN_MESSAGE_MAX_CHARS]}"
        if scheme not in self._allowed_schemes:
            allowed = ", ".join(sorted(self._allowed_schemes))
            raise UrlRejected(f"webhook url {shown}: scheme {scheme!r} not allowed ({allowed})")
        if not host or (host not in self._allowed_hosts and not host.endswith(self._host_suffixes)):
            raise UrlRejected(f"webhook url {shown}: host not allowed")
        if url.userinfo:
            raise UrlRejected(f"webhook url {shown}: credentials in the url are not allowed")
        if not url.raw_path.decode("ascii").startswith(self._path_prefix):
            raise UrlRejected(f"webhook url {shown}: path must start with {self._path_prefix!r}")
        return url

    def build_payload(self, delivery: Delivery) -> FlowPayload:
        """The seed's body for ``delivery``, stamped with the current time."""
        return FlowPayload(
            event=EVENT,
            version=VERSION,
            notification_id=delivery.record_id,
            user_id=delivery.user_id,
            preview_id=delivery.preview_id.strip(),
            trigger_id=delivery.trigger_id.strip(),
            trigger_type=delivery.trigger_type.strip(),
            target_type=delivery.target_type.strip(),
            target_id=delivery.target_id,
            message=FlowMessage(
                title=MESSAGE_TITLE,
                summary=delivery.message_text.strip() or DEFAULT_SUMMARY,
                action_text=MESSAGE_ACTION_TEXT,
                action_url=self._action_url(delivery.target_url),
            ),
            trace_id=delivery.trace_id.strip(),
            sent_at=self._clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def _action_url(self, target_url: str) -> str:
        target_url = target_url.strip()
        if not self._frontend_base_url or target_url.startswith(("https://", "http://")):
            return target_url
        return self._frontend_base_url + "/" + target_url.lstrip("/")

    async def send(self, delivery: Delivery) -> SendResult:
        """Deliver once; every failure is a ``SendResult``, only cancellation propagates."""
        target = delivery.target
        if target is None:
            return _skipped("user has no feishu channel configured")
        if not target.enabled:
            return _skipped("user's feishu channel is disabled")
        if not target.webhook_url.strip():
            return _skipped("user's feishu channel has no webhook url")
        try:
            url = self.check_url(target.webhook_url)
        except UrlRejected as exc:
            return SendResult(
                outcome=Outcome.PERMANENT_FAIL,
                error_code=ErrorCode.INVALID_URL,
                error_message=truncate(str(exc)),
            )

        body = _encoder.encode(self.build_payload(delivery))
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            # Only raw bytes can be capped before they are read; compression would defeat that.
            "Accept-Encoding": "identity",
        }
        secret = (target.auth_secret or "").strip() if target.auth_kind == "bearer" else ""
        if secret:
            if not _is_header_token(secret):
                # A broken secret is a configuration fault, not worth retrying; and the HTTP
                # layer's own error would quote the value.
                return SendResult(
                    outcome=Outcome.PERMANENT_FAIL,
                    error_code=ErrorCode.PROVIDER_AUTH_FAILED,
                    error_message="bearer token has characters not allowed in an HTTP header",
                )
            headers["Authorization"] = "Bearer " + secret

        started = time.perf_counter()
        status: int | None = None
        try:
            request = self._client.build_request(
                "POST", url, content=body, headers=headers, timeout=self._timeout
            )
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.send(request, stream=True)
                try:
                    status = response.status_code
                    reply, truncated = await read_body_capped(response, self._body_max_bytes)
                finally:
                    await response.aclose()
        except (httpx.TimeoutException, TimeoutError) as exc:
            return _transport_failure(
                ErrorCode.PROVIDER_TIMEOUT, exc, url, secret, body, status, started, self._timeout_s
            )
        except Exception as exc:  # every transport error and anything unforeseen: retry
            return _transport_failure(
                ErrorCode.NETWORK_ERROR, exc, url, secret, body, status, started, self._timeout_s
            )
        duration_s = time.perf_counter() - started

        status = response.status_code
        outcome, code = classify_status(status)
        if outcome is Outcome.SUCCESS:
            rejection, message_id = _inspect_reply(reply)
            if rejection is not None:
                outcome, code = Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID
            return SendResult(
                outcome=outcome,
                error_code=code,
                error_message=rejection,
                provider_message_id=message_id,
                http_status=status,
                request_json=body,
                response_body=reply,
                response_truncated=truncated,
                duration_s=duration_s,
            )
        retry_after_s = None
        if code is ErrorCode.PROVIDER_RATE_LIMITED:
            retry_after_s = parse_retry_after(
                response.headers.get("Retry-After"), now=self._clock()
            )
        return SendResult(
            outcome=outcome,
            error_code=code,
            error_message=f"feishu flow webhook returned HTTP {status}",
            http_status=status,
            request_json=body,
            response_body=reply,
            response_truncated=truncated,
            retry_after_s=retry_after_s,
            duration_s=duration_s,
        )


def _is_header_token(value: str) -> bool:
    """Visible ASCII only: no spaces, control characters or line breaks."""
    return value.isascii() and all(0x21 <= ord(c) <= 0x7E for c in value)


def _skipped(reason: str) -> SendResult:
    return SendResult(
        outcome=Outcome.SKIPPED, error_code=ErrorCode.RECIPIENT_MISSING, error_message=reason
    )


def _transport_failure(
    code: ErrorCode,
    exc: BaseException,
    url: httpx.URL,
    secret: str,
    body: bytes,
    status: int | None,
    started: float,
    timeout_s: float,
) -> SendResult:
    detail = str(exc) or (
        f"no reply within {timeout_s:g}s" if code is ErrorCode.PROVIDER_TIMEOUT else ""
    )
    message = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if status is not None:
        message = f"HTTP {status}, reading the reply failed: {message}"
    return SendResult(
        outcome=Outcome.TEMPORARY_FAIL,
        error_code=code,
        error_message=truncate(_scrub(message, url, secret)),
        http_status=status,
        request_json=body,
        duration_s=time.perf_counter() - started,
    )


def _scrub(message: str, url: httpx.URL, secret: str) -> str:
    """Mask the webhook's path (its key) and the bearer token should an exception quote them."""
    for path in (url.raw_path.decode("ascii"), url.path):
        if len(path) > 1 and path in message:
            message = message.replace(path, "/****")
    if secret and secret in message:
        message = message.replace(secret, "****")
    return message


def _inspect_reply(reply: bytes) -> tuple[str | None, str | None]:
    """``(rejection message, provider message id)`` from a 2xx reply body.

    As in the seed, only a JSON object whose ``code`` is an integer other than 0 rejects;
    anything unreadable counts as accepted.
    """
    if not reply.strip():
        return None, None
    try:
        parsed: Any = msgspec.json.decode(reply)
    except msgspec.DecodeError:
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    code = parsed.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        msg = parsed.get("msg")
        text = f"feishu flow webhook rejected the request: code={code}"
        if isinstance(msg, str) and msg.strip():
            text += f" msg={msg.strip()}"
        return truncate(text), None
    return None, _message_id(parsed)


def _message_id(parsed: dict[str, Any]) -> str | None:
    for holder in (parsed, parsed.get("data")):
        if isinstance(holder, dict):
            value = holder.get("message_id")
            if isinstance(value, str) and value:
                return value
    return None
