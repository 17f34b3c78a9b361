"""Generic webhook provider: a signed JSON event per notification, Standard Webhooks style.

Each delivery POSTs one event to the channel's URL::

    {"id": "msg_123",                               # the webhook-id header, stable
     "type": "smartflow.schedule_adjustment_ready",
     "timestamp": "2024-01-01T00:00:00Z",           # when this attempt was sent (UTC)
     "data": {"notification_id": 123, "user_id": 7, "preview_id": "...",
              "trigger_id": "...", "trigger_type": "...", "target_type": "...",
              "target_id": 9, "title": "...", "message_text": "...",
              "action_text": "...", "action_url": "https://app.example/preview/9",
              "trace_id": "..."}}                   # trace_id omitted when empty

with the headers of the Standard Webhooks specification:

- ``webhook-id``: ``msg_<record id>``, the same on every attempt, so a receiver can drop
  the duplicates that at-least-once delivery produces;
- ``webhook-timestamp``: epoch seconds of this attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` over ``"{id}.{timestamp}.{body}"``,
  keyed by the base64-decoded secret (after its ``whsec_`` prefix), present when the
  channel's ``auth_kind`` is ``bot_secret`` (the schema's kind for a signing secret). The
  secret field may hold several secrets separated by white space, to rotate without a gap:
  one signature each, space-separated, and the receiver accepts any.

A channel with ``auth_kind`` ``bearer`` gets an ``Authorization: Bearer`` header instead.
Secrets appear in neither ``request_json`` (the body holds none, headers are not stored)
nor an error message.

Reply mapping (redirects are never followed: the URL policy vouches for the URL given, not
for wherever it points):

===================  ==============================================================
status               result
===================  ==============================================================
2xx                  success
3xx                  permanent ``payload_invalid`` ("redirect not followed")
408                  temporary ``provider_timeout``
425, 429             temporary ``provider_rate_limited``
5xx                  temporary ``provider_5xx``
401, 403             permanent ``provider_auth_failed``
410                  permanent ``endpoint_gone`` with ``disable_target``
other                permanent ``payload_invalid``
timeout / transport  temporary ``provider_timeout`` / ``network_error``
===================  ==============================================================

Every temporary result carries the reply's ``Retry-After`` as ``retry_after_s``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import httpx
import msgspec

from outbox_notifier import message

from .base import (
    Delivery,
    ErrorCode,
    HttpProvider,
    Outcome,
    SendResult,
    action_url,
    check_limits,
    is_header_token,
    resolve_target,
    utc_now,
)

__all__ = [
    "SecretInvalid",
    "WebhookData",
    "WebhookEvent",
    "WebhookProvider",
    "classify_webhook_status",
    "parse_secrets",
    "sign",
    "webhook_id",
]

SECRET_PREFIX = "whsec_"


class WebhookData(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The notification itself; ``trace_id`` is the only field left out when empty."""

    notification_id: int
    user_id: int
    preview_id: str
    trigger_id: str
    trigger_type: str
    target_type: str
    target_id: int
    title: str
    message_text: str
    action_text: str
    action_url: str
    trace_id: str = ""


class WebhookEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The event envelope (Standard Webhooks' recommended ``type``/``timestamp``/``data``)."""

    id: str
    type: str
    timestamp: str
    data: WebhookData


_encoder = msgspec.json.Encoder()


class SecretInvalid(ValueError):
    """A signing secret that is not base64; the message never contains the secret."""


def webhook_id(record_id: int) -> str:
    """The ``webhook-id`` of a record: the same on every attempt."""
    return f"msg_{record_id}"


def parse_secrets(raw: str) -> list[bytes]:
    """The keys in a secret field: white-space separated, ``whsec_`` prefix optional, base64.

    Raises ``SecretInvalid`` for an empty field or a secret that is not base64.
    """
    keys: list[bytes] = []
    for position, item in enumerate(raw.split(), start=1):
        # Unpadded base64 is common in the wild: padding is restored before decoding.
        encoded = item.removeprefix(SECRET_PREFIX).rstrip("=")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise SecretInvalid(f"webhook signing secret #{position} is not base64") from None
        if not key:
            raise SecretInvalid(f"webhook signing secret #{position} is empty")
        keys.append(key)
    if not keys:
        raise SecretInvalid("webhook signing secret is empty")
    return keys


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per key, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
        for key in keys
    )


def classify_webhook_status(status: int) -> tuple[Outcome, ErrorCode | None]:
    """Map a receiver's HTTP status to an outcome (see the module docstring)."""
    if 200 <= status < 300:
        return Outcome.SUCCESS, None
    if status == 408:
        return Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_TIMEOUT
    if status in (425, 429):
        return Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_RATE_LIMITED
    if status >= 500:
        return Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_5XX
    if status in (401, 403):
        return Outcome.PERMANENT_FAIL, ErrorCode.PROVIDER_AUTH_FAILED
    if status == 410:
        return Outcome.PERMANENT_FAIL, ErrorCode.ENDPOINT_GONE
    return Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID


class WebhookProvider(HttpProvider):
    """Delivers a signed JSON event to the webhook URL configured per user.

    Usage::

        async with httpx.AsyncClient() as client:
            provider = WebhookProvider(
                client,
                frontend_base_url="https://app.example",
                allowed_schemes=("https",),
                allowed_hosts=(),          # any host; the scheme is still enforced
            )
            result = await provider.send(delivery)

    ``client`` is shared and owned by the caller. ``allowed_hosts`` match exactly or as a
    parent domain; empty allows any host. ``clock`` gives the timestamps and the reference
    for ``Retry-After`` dates.
    """

    channel: str = "webhook"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        frontend_base_url: str = "",
        allowed_schemes: tuple[str, ...] = ("https",),
        allowed_hosts: tuple[str, ...] = (),
        path_prefix: str = "/",
        timeout_s: float = 5.0,
        response_body_max_bytes: int = 65536,
        event_type: str = message.EVENT,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        check_limits(timeout_s=timeout_s, response_body_max_bytes=response_body_max_bytes)
        super().__init__(
            client,
            frontend_base_url=frontend_base_url,
            allowed_schemes=allowed_schemes,
            allowed_hosts=allowed_hosts,
            path_prefix=path_prefix,
            timeout_s=timeout_s,
            response_body_max_bytes=response_body_max_bytes,
            clock=clock,
        )
        self._event_type = event_type

    def build_event(self, delivery: Delivery, now: datetime) -> WebhookEvent:
        """The event for ``delivery``, stamped with ``now``."""
        return WebhookEvent(
            id=webhook_id(delivery.record_id),
            type=self._event_type,
            timestamp=now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            data=WebhookData(
                notification_id=delivery.record_id,
                user_id=delivery.user_id,
                preview_id=delivery.preview_id.strip(),
                trigger_id=delivery.trigger_id.strip(),
                trigger_type=delivery.trigger_type.strip(),
                target_type=delivery.target_type.strip(),
                target_id=delivery.target_id,
                title=message.MESSAGE_TITLE,
                message_text=delivery.message_text.strip() or message.DEFAULT_FALLBACK_TEMPLATE,
                action_text=message.MESSAGE_ACTION_TEXT,
                action_url=action_url(self._frontend_base_url, delivery.target_url),
                trace_id=delivery.trace_id.strip(),
            ),
        )

    async def send(self, delivery: Delivery) -> SendResult:
        """Deliver once; every failure is a ``SendResult``, only cancellation propagates."""
        resolved = resolve_target(delivery, self._url_policy, "webhook", url_name="url")
        if isinstance(resolved, SendResult):
            return resolved
        target, url = resolved

        now = self._clock()
        event = self.build_event(delivery, now)
        body = _encoder.encode(event)
        timestamp = int(now.timestamp())
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            # Only raw bytes can be capped before they are read.
            "Accept-Encoding": "identity",
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
        }
        raw_secret = (target.auth_secret or "").strip()
        secrets: tuple[str, ...] = ()
        if target.auth_kind == "bot_secret":
            try:
                keys = parse_secrets(raw_secret)
            except SecretInvalid as exc:
                return _auth_config_fault(str(exc))
            headers["webhook-signature"] = sign(keys, event.id, timestamp, body)
            secrets = tuple(raw_secret.split())
        elif target.auth_kind == "bearer" and raw_secret:
            if not is_header_token(raw_secret):
                return _auth_config_fault(
                    "bearer token has characters not allowed in an HTTP header"
                )
            headers["Authorization"] = "Bearer " + raw_secret
            secrets = (raw_secret,)

        reply = await self._post(
            url, content=body, headers=headers, request_json=body, secrets=secrets
        )
        if isinstance(reply, SendResult):
            return reply

        status = reply.status
        outcome, code = classify_webhook_status(status)
        message: str | None = None
        if outcome is not Outcome.SUCCESS:
            message = f"webhook returned HTTP {status}"
            if 300 <= status < 400:
                message += ": redirect not followed"
            elif code is ErrorCode.ENDPOINT_GONE:
                message += ": endpoint gone, channel to be disabled"
        return SendResult(
            outcome=outcome,
            error_code=code,
            error_message=message,
            http_status=status,
            request_json=body,
            response_body=reply.body,
            response_truncated=reply.truncated,
            retry_after_s=self.retry_after_s(outcome, reply),
            duration_s=reply.duration_s,
            disable_target=code is ErrorCode.ENDPOINT_GONE,
        )


def _auth_config_fault(message: str) -> SendResult:
    # A broken secret is a configuration fault, not worth retrying; nothing is sent.
    return SendResult(
        outcome=Outcome.PERMANENT_FAIL,
        error_code=ErrorCode.PROVIDER_AUTH_FAILED,
        error_message=message,
    )
