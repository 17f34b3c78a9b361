"""DingTalk custom robot provider: posts to a group robot's webhook.

The webhook is ``https://oapi.dingtalk.com/robot/send?access_token=<token>``; the token in the
query is the credential, and the sender masks a URL's query in every error message. Bodies::

    {"msgtype": "text", "text": {"content": "<message_text>"}}

    {"msgtype": "actionCard",
     "actionCard": {"title": "<title>", "text": "<message_text>",
                    "singleTitle": "<action text>", "singleURL": "<action url>"}}

The ``actionCard`` (one button to the action URL) is sent when the action URL is absolute,
the plain ``text`` otherwise. Mentions are never made (DingTalk mentions only through an ``at``
field, which is not sent). The card's text is DingTalk markdown: the seed's rules already send
the fallback text for a summary holding ``://`` or ``www.``, but other markdown in a summary
(emphasis, headings) does render; the plain ``text`` body has no such effect.

Digest (several records in one message, when the robot's 20 a minute cannot send them one by
one): DingTalk's own advice for many messages is to merge them into one ``markdown`` message
as a summary, and that is its shape::

    {"msgtype": "markdown",
     "markdown": {"title": "SmartFlow 日程调整建议 (3 条)",
                  "text": "### SmartFlow 日程调整建议 (3 条)\n\n1. <message_text>  \n"
                          "[查看并确认调整](<action url>)\n\n2. ..."}}

(``chat.markdown_digest``). DingTalk limits a message to 20000 bytes: the encoded body is
kept within ``DINGTALK_BODY_MAX_BYTES`` by leaving records out, never by cutting one. The
message types and the limits are on "自定义机器人发送群消息" (cited below) and
https://open.dingtalk.com/document/development/robot-message-type (消息类型). The markdown
renders what markdown a record's text holds, as the card's text does.

Signing (a channel whose ``auth_kind`` is ``bot_secret``, the robot's "sign" security
setting): query parameters ``timestamp`` (epoch milliseconds) and ``sign`` = base64 of
HMAC-SHA256 keyed by the secret over ``timestamp + "\\n" + secret``, URL-encoded as a query
value. DingTalk refuses a timestamp more than an hour off, so both are made afresh on every
call; the stored request is the body, which holds neither.

Reply mapping: DingTalk answers HTTP 200 with ``errcode``/``errmsg``. The code table below
follows the custom robot's documentation, "自定义机器人发送群消息" and its error codes:
https://open.dingtalk.com/document/orgapp/custom-robots-send-group-messages and
https://open.dingtalk.com/document/orgapp/custom-robot-access (security settings).

=============================================  =========================================
reply                                          result
=============================================  =========================================
``errcode`` 0                                  success
130101 (send too fast, throttled)              temporary ``provider_rate_limited``
310000 (keyword, sign or IP check failed)      permanent ``provider_auth_failed``
300001 (token is not exist / invalid token)    permanent ``provider_auth_failed``
400xxx (parameter errors) and any other code   permanent ``payload_invalid``
HTTP 429 / 5xx / 401, 403 / other              as ``replies.status_verdict``
=============================================  =========================================
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

import httpx
import msgspec

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome

from . import base, bodies, chat, model

__all__ = ["DINGTALK_BODY_MAX_BYTES", "DINGTALK_CODES", "DingTalkBotProvider", "dingtalk_sign"]

#: DingTalk's limit on a robot message, in bytes of the request body (UTF-8).
DINGTALK_BODY_MAX_BYTES = 20_000

_RATE_LIMITED = (Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_RATE_LIMITED)
_AUTH_FAILED = (Outcome.PERMANENT_FAIL, ErrorCode.PROVIDER_AUTH_FAILED)

#: ``errcode`` -> result, from the documentation cited in the module docstring; a code not
#: here (the 400xxx parameter errors among them) is a permanent ``payload_invalid``.
DINGTALK_CODES = {130101: _RATE_LIMITED, 310000: _AUTH_FAILED, 300001: _AUTH_FAILED}


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's signature (before URL encoding): base64 of HMAC-SHA256 keyed by the secret
    over ``timestamp + "\\n" + secret``."""
    signed = f"{timestamp_ms}\n{secret}".encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


class DingTalkBotProvider(chat.ChatBotProvider):
    """Delivers to a DingTalk custom robot configured per user (options as ``HttpProvider``;
    the URL policy defaults to DingTalk's robot endpoint)."""

    label = "dingtalk bot"
    default_hosts = ("oapi.dingtalk.com",)
    default_path_prefix = "/robot/send"
    code_label = "dingtalk"
    codes = DINGTALK_CODES

    def card_message(self, text: str, link: str) -> dict[str, object]:
        card = {
            "title": message.MESSAGE_TITLE,
            "text": text,
            "singleTitle": message.MESSAGE_ACTION_TEXT,
            "singleURL": link,
        }
        return {"msgtype": "actionCard", "actionCard": card}

    def digest_message(self, entries: Sequence[bodies.DigestEntry]) -> dict[str, object]:
        title = message.digest_title(len(entries))
        return {
            "msgtype": "markdown",
            "markdown": {"title": title, "text": chat.markdown_digest(entries)},
        }

    def digest_fits(self, body: dict[str, object], encoded: bytes) -> bool:
        return len(encoded) <= DINGTALK_BODY_MAX_BYTES

    def request(
        self, body: bytes, recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest:
        request = super().request(body, recipient, url)
        secret = base.signing_secret(recipient, self.label)
        if secret is None:
            return request
        # Fresh on every call: DingTalk refuses a timestamp more than an hour off. The body
        # holds no secret (the signature travels in the query), so it is stored as sent.
        timestamp_ms = int(self._clock().timestamp() * 1000)
        sign = dingtalk_sign(secret, timestamp_ms)
        signed = url.copy_merge_params({"timestamp": str(timestamp_ms), "sign": sign})
        return msgspec.structs.replace(request, url=signed, secrets=(secret, sign))
