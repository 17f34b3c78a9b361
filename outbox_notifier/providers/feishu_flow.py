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
- A temporary failure's ``Retry-After`` (429 or 5xx) is returned as ``retry_after_s``.

Reply mapping (seed): 2xx whose JSON body carries an integer ``code`` other than 0 is a
permanent ``payload_invalid``; any other 2xx (empty body, non-JSON, no ``code``, a body cut
at the cap) is a success. Other statuses go through ``replies.classify_status``. Transport
failures are the shared sender's (``sender.post_capped``).
"""

from __future__ import annotations

import httpx
import msgspec

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome

from . import base, bodies, model, replies, sender

__all__ = ["FeishuFlowProvider", "FlowMessage", "FlowPayload"]

EVENT = message.EVENT
VERSION = message.EVENT_VERSION


class FlowMessage(msgspec.Struct, frozen=True, kw_only=True):
    """The four fields a user's Flow composes its private message from."""

    title: str
    summary: str
    action_text: str
    action_url: str


#: The seed's ``FeishuWebhookPayload``. Its field order is the seed's: the ids of
#: ``bodies.NotificationFields`` sit between ``version`` and ``message``, where no subclass can put
#: them, so the struct is built around that struct's fields rather than repeating them.
FlowPayload = msgspec.defstruct(
    "FlowPayload",
    [
        ("event", str),
        ("version", str),
        *((field.name, field.type) for field in msgspec.structs.fields(bodies.NotificationFields)),
        ("message", FlowMessage),
        ("trace_id", str, ""),  # the only default, so the only field omitted (seed: omitempty)
        ("sent_at", str),
    ],
    module=__name__,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
)


_encoder = msgspec.json.Encoder()


class FeishuFlowProvider(base.HttpProvider):
    """Delivers to the Feishu Flow webhook trigger configured per user.

    Options and usage as ``base.HttpProvider``; hosts and path default to Feishu's (and
    Lark's) Flow triggers. ``clock`` exists for tests of ``sent_at`` and ``Retry-After``.
    """

    label = "feishu"
    default_hosts = ("feishu.cn", "larksuite.com", "feishu-boe.cn")
    default_path_prefix = "/flow/api/trigger-webhook/"

    def build_payload(self, delivery: model.Delivery) -> msgspec.Struct:
        """The seed's body for ``delivery``, stamped with the current time."""
        return FlowPayload(
            event=EVENT,
            version=VERSION,
            **bodies.notification_fields(delivery),
            message=FlowMessage(
                summary=bodies.message_text(delivery), **self.message_fields(delivery)
            ),
            trace_id=delivery.trace_id.strip(),
            sent_at=bodies.rfc3339(self._clock()),
        )

    def prepare(
        self, delivery: model.Delivery, recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest:
        body = _encoder.encode(self.build_payload(delivery))
        headers = sender.json_headers(**base.bearer_auth(recipient))
        return model.PreparedRequest(url=url, body=body, headers=headers, stored=body)

    def classify(self, reply: model.HttpReply) -> model.Verdict:
        """As in the seed: after a 2xx status, only a JSON object whose ``code`` is an integer
        other than 0 rejects; anything unreadable counts as accepted."""
        verdict, rejected = replies.status_and_code(reply, "feishu flow webhook")
        if rejected is None or verdict.outcome is not Outcome.SUCCESS:
            return verdict
        text = f"feishu flow webhook rejected the request: code={rejected.code}"
        return model.Verdict(
            outcome=Outcome.PERMANENT_FAIL,
            error_code=ErrorCode.PAYLOAD_INVALID,
            error_message=f"{text} msg={rejected.msg}" if rejected.msg else text,
        )
