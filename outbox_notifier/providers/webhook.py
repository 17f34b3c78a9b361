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
  the repeats that at-least-once delivery produces;
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
410                  permanent ``endpoint_gone`` with ``disable_channel``
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
from collections.abc import Sequence
from datetime import datetime
from typing import Unpack

import httpx
import msgspec

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome

from . import base, bodies, model, replies, sender

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


class WebhookData(bodies.NotificationFields, frozen=True, kw_only=True, omit_defaults=True):
    """The notification itself; ``trace_id`` is the only field left out when empty."""

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


_SPECIAL_STATUSES = {
    408: (Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_TIMEOUT),
    425: (Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_RATE_LIMITED),
    410: (Outcome.PERMANENT_FAIL, ErrorCode.ENDPOINT_GONE),
}


def classify_webhook_status(status: int) -> tuple[Outcome, ErrorCode | None]:
    """Map a receiver's HTTP status to an outcome (see the module docstring)."""
    verdict = replies.status_verdict(status, "webhook", _SPECIAL_STATUSES)
    return verdict.outcome, verdict.error_code


class WebhookProvider(base.HttpProvider):
    """Delivers a signed JSON event to the webhook URL configured per user.

    Options and usage as ``base.HttpProvider``, plus the event's ``type``; any host is
    allowed by default (``allowed_hosts=()``), the schemes are still enforced.
    """

    label = "webhook"
    url_label = "url"
    any_host = True

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        event_type: str = message.EVENT,
        **options: Unpack[base.HttpOptions],
    ) -> None:
        super().__init__(transport, **options)
        self._event_type = event_type

    def build_event(self, delivery: model.Delivery, now: datetime) -> WebhookEvent:
        """The event for ``delivery``, stamped with ``now``."""
        return WebhookEvent(
            id=webhook_id(delivery.record_id),
            type=self._event_type,
            timestamp=bodies.rfc3339(now),
            data=WebhookData(
                **bodies.notification_fields(delivery),
                message_text=bodies.message_text(delivery),
                **self.message_fields(delivery),
                trace_id=delivery.trace_id.strip(),
            ),
        )

    def prepare(
        self, delivery: model.Delivery, recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest:
        now = self._clock()
        event = self.build_event(delivery, now)
        body = _encoder.encode(event)
        timestamp = int(now.timestamp())
        headers = {"webhook-id": event.id, "webhook-timestamp": str(timestamp)}
        secrets: tuple[str, ...] = ()
        if recipient.auth_kind == "bot_secret":
            raw_secret = (recipient.auth_secret or "").strip()
            try:
                keys = parse_secrets(raw_secret)
            except SecretInvalid as exc:
                # A broken secret is a configuration fault, not worth retrying.
                raise model.NotSent(ErrorCode.PROVIDER_AUTH_FAILED, str(exc)) from None
            headers["webhook-signature"] = sign(keys, event.id, timestamp, body)
            secrets = tuple(raw_secret.split())
        else:
            headers |= base.bearer_auth(recipient)
        # The body holds no secret and headers are not stored: what was sent is kept.
        return model.PreparedRequest(
            url=url, body=body, headers=sender.json_headers(**headers), stored=body, secrets=secrets
        )

    def classify(self, reply: model.HttpReply) -> model.Verdict:
        return replies.status_verdict(reply.status, "webhook", _SPECIAL_STATUSES)
