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
at the cap) is a success. Other statuses go through ``base.classify_status``. A transport
failure, or a body that cannot be read after the status arrived, is retryable:
``provider_timeout`` for timeouts, ``network_error`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
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
    UrlRejected,
    action_url,
    check_limits,
    classify_status,
    decode_json_object,
    is_header_token,
    reply_message_id,
    resolve_target,
    truncate,
    utc_now,
)

__all__ = ["FeishuFlowProvider", "FlowMessage", "FlowPayload", "UrlRejected"]

EVENT = message.EVENT
VERSION = message.EVENT_VERSION


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


class FeishuFlowProvider(HttpProvider):
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
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        check_limits(timeout_s=timeout_s, response_body_max_bytes=response_body_max_bytes)
        if not allowed_schemes:
            raise ValueError("allowed_schemes must not be empty")
        if not allowed_hosts:
            raise ValueError("allowed_hosts must not be empty")
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
                title=message.MESSAGE_TITLE,
                summary=delivery.message_text.strip() or message.DEFAULT_FALLBACK_TEMPLATE,
                action_text=message.MESSAGE_ACTION_TEXT,
                action_url=action_url(self._frontend_base_url, delivery.target_url),
            ),
            trace_id=delivery.trace_id.strip(),
            sent_at=self._clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    async def send(self, delivery: Delivery) -> SendResult:
        """Deliver once; every failure is a ``SendResult``, only cancellation propagates."""
        resolved = resolve_target(delivery, self._url_policy, "feishu")
        if isinstance(resolved, SendResult):
            return resolved
        target, url = resolved

        body = _encoder.encode(self.build_payload(delivery))
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            # Only raw bytes can be capped before they are read; compression would defeat that.
            "Accept-Encoding": "identity",
        }
        secret = (target.auth_secret or "").strip() if target.auth_kind == "bearer" else ""
        if secret:
            if not is_header_token(secret):
                # A broken secret is a configuration fault, not worth retrying; and the HTTP
                # layer's own error would quote the value.
                return SendResult(
                    outcome=Outcome.PERMANENT_FAIL,
                    error_code=ErrorCode.PROVIDER_AUTH_FAILED,
                    error_message="bearer token has characters not allowed in an HTTP header",
                )
            headers["Authorization"] = "Bearer " + secret

        reply = await self._post(
            url, content=body, headers=headers, request_json=body, secrets=(secret,)
        )
        if isinstance(reply, SendResult):
            return reply

        status = reply.status
        outcome, code = classify_status(status)
        if outcome is Outcome.SUCCESS:
            rejection, message_id = _inspect_reply(reply.body)
            if rejection is not None:
                outcome, code = Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID
            return SendResult(
                outcome=outcome,
                error_code=code,
                error_message=rejection,
                provider_message_id=message_id,
                http_status=status,
                request_json=body,
                response_body=reply.body,
                response_truncated=reply.truncated,
                duration_s=reply.duration_s,
            )
        return SendResult(
            outcome=outcome,
            error_code=code,
            error_message=f"feishu flow webhook returned HTTP {status}",
            http_status=status,
            request_json=body,
            response_body=reply.body,
            response_truncated=reply.truncated,
            retry_after_s=self.retry_after_s(outcome, reply),
            duration_s=reply.duration_s,
        )


def _inspect_reply(reply: bytes) -> tuple[str | None, str | None]:
    """``(rejection message, provider message id)`` from a 2xx reply body.

    As in the seed, only a JSON object whose ``code`` is an integer other than 0 rejects;
    anything unreadable counts as accepted.
    """
    parsed = decode_json_object(reply)
    if parsed is None:
        return None, None
    code = parsed.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        msg = parsed.get("msg")
        text = f"feishu flow webhook rejected the request: code={code}"
        if isinstance(msg, str) and msg.strip():
            text += f" msg={msg.strip()}"
        return truncate(text), None
    return None, reply_message_id(parsed)
