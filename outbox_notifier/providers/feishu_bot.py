"""Feishu/Lark group bot provider: posts to a custom bot's webhook in a group chat.

The webhook is ``https://open.feishu.cn/open-apis/bot/v2/hook/<token>`` (Lark:
``open.larksuite.com``); the token in the path is the credential, so the URL's path never
reaches an error message. Two message formats::

    {"msg_type": "text", "content": {"text": "<message_text>"}}

    {"msg_type": "interactive",
     "card": {"header": {"title": {"tag": "plain_text", "content": "<title>"}},
              "elements": [{"tag": "div", "text": {"tag": "plain_text", "content": "<summary>"}},
                           {"tag": "action", "actions": [
                               {"tag": "button", "text": {"tag": "plain_text",
                                                          "content": "<action text>"},
                                "type": "primary", "url": "<action url>"}]}]}}

The card's summary is ``plain_text``, not ``lark_md``: the text comes from event payloads,
and markdown would let it render links and ``<at>`` mentions in the group. The button is
left out when there is no absolute ``http(s)`` action URL (no frontend base URL and a
relative ``target_url``), since Feishu rejects a card whose button URL is not absolute. The text
format has no such switch: Feishu renders ``<at user_id="all">`` tags in a text message, so
a summary holding one would mention the whole group; prefer ``card`` for untrusted text.

Signing: a channel whose ``auth_kind`` is ``bot_secret`` adds top-level ``timestamp``
(epoch seconds, as a string) and ``sign`` = base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}",
msg=b"")). Feishu refuses a timestamp more than an hour off, so both are computed afresh on
every call, never stored with the record. ``request_json`` keeps the body as sent with
``sign`` replaced by ``***``.

Size: Feishu refuses request bodies over 20 KB, so the text is cut (by code points, with a
trailing ellipsis) until the encoded body fits ``request_body_max_bytes``; a message that
cannot fit even with an empty text is a permanent ``payload_invalid`` and nothing is sent.

Digest (several records in one message, when the bot's budget cannot send them one by one),
in the format the single message uses. ``text`` becomes ``post``, Feishu's rich text, which
has a title and a link element (a mention takes an ``at`` element, which is never sent)::

    {"msg_type": "post",
     "content": {"post": {"zh_cn": {"title": "SmartFlow 日程调整建议 (3 条)",
                                    "content": [[{"tag": "text", "text": "1. <message_text> "},
                                                 {"tag": "a", "text": "<action text>",
                                                  "href": "<action url>"}],
                                                [{"tag": "text", "text": "2. ..."}, ...]]}}}}

``card`` keeps its card: the header names the count, and each record has its ``div`` and,
when its link is absolute, its button, in order. Both are signed as a single message, and
kept under ``request_body_max_bytes`` by leaving records out: a digest never cuts a record's
text. The formats are those of Feishu's custom bot guide, "自定义机器人使用指南"
(https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot), which gives the 20 KB
limit too.

Reply mapping. Feishu reports application errors as HTTP 200 with a non-zero ``code``
(``StatusCode`` in older replies), the message in ``msg`` (``StatusMessage``):

==========================================  ==========================================
reply                                       result
==========================================  ==========================================
2xx, ``code`` 0, absent or unreadable body  success
``code`` 11232 (frequency limited)          temporary ``provider_rate_limited``
``code`` 9499 saying "too many request",    temporary ``provider_rate_limited``
"frequency" or "rate"
``code`` 19021 (sign or timestamp), 19001   permanent ``provider_auth_failed``
(token or parameter)
any other ``code`` (19024 keyword, 19002,   permanent ``payload_invalid``
19007, 19022, other 9499 ...)
HTTP 429                                    temporary ``provider_rate_limited``
HTTP 5xx                                    temporary ``provider_5xx``
HTTP 401/403                                permanent ``provider_auth_failed``
other 4xx carrying a ``code``               as that code
other status                                permanent ``payload_invalid``
timeout / transport error                   temporary ``provider_timeout`` /
                                            ``network_error``
==========================================  ==========================================

A code's message reads ``feishu code 19021: sign match fail or timestamp is not within one
hour from current time``. Any temporary result carries the reply's ``Retry-After`` as
``retry_after_s``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Literal, Unpack

import httpx
import msgspec

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome

from . import base, bodies, model, replies, sender

__all__ = [
    "DEFAULT_HOSTS",
    "FEISHU_BODY_MAX_BYTES",
    "FeishuBotProvider",
    "MessageFormat",
    "bot_sign",
    "classify_feishu_code",
]

MessageFormat = Literal["text", "card"]

DEFAULT_HOSTS: tuple[str, ...] = ("open.feishu.cn", "open.larksuite.com")
DEFAULT_PATH_PREFIX = "/open-apis/bot/v2/hook/"

#: Feishu's limit on a custom bot's request body (20 KB).
FEISHU_BODY_MAX_BYTES = 20 * 1024
# Default cap: a margin under the limit, since whether Feishu counts 1000 or 1024 bytes to
# the KB is not documented.
_DEFAULT_REQUEST_BODY_MAX_BYTES = 19_000

CODE_FREQUENCY_LIMITED = 11232
CODE_GENERIC = 9499
_AUTH_CODES = frozenset({19001, 19021})
# Where a reply keeps its code and message (older replies: StatusCode, StatusMessage).
_CODE_FIELDS = (("code", "msg"), ("StatusCode", "StatusMessage"))
_THROTTLING = re.compile(r"too many request|frequen|\brate\b|\brate[\s_-]?limit", re.IGNORECASE)

_MASK = "***"
_ELLIPSIS = "…"


class PlainText(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    content: str


class TextContent(msgspec.Struct, frozen=True, kw_only=True):
    text: str


class PostText(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    text: str


class PostLink(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    text: str
    href: str


class PostBody(msgspec.Struct, frozen=True, kw_only=True):
    title: str
    content: list[list[PostText | PostLink]]


class PostContent(msgspec.Struct, frozen=True, kw_only=True):
    """A ``post`` message's content: its body by language (the single message's, zh_cn)."""

    post: dict[str, PostBody]


class CardHeader(msgspec.Struct, frozen=True, kw_only=True):
    title: PlainText


class CardDiv(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    text: PlainText


class CardButton(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    text: PlainText
    type: str
    url: str


class CardAction(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    actions: list[CardButton]


class Card(msgspec.Struct, frozen=True, kw_only=True):
    header: CardHeader
    elements: list[CardDiv | CardAction]


class BotMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The custom bot's request body; unset fields are left out."""

    timestamp: str | None = None
    sign: str | None = None
    msg_type: str
    content: TextContent | PostContent | None = None
    card: Card | None = None


_encoder = msgspec.json.Encoder()


def _button(link: str) -> CardAction:
    """The card's action element: one button to ``link``, an absolute URL."""
    label = PlainText(tag="plain_text", content=message.MESSAGE_ACTION_TEXT)
    button = CardButton(tag="button", text=label, type="primary", url=link)
    return CardAction(tag="action", actions=[button])


def _card(title: str, elements: list[CardDiv | CardAction]) -> BotMessage:
    header = CardHeader(title=PlainText(tag="plain_text", content=title))
    return BotMessage(msg_type="interactive", card=Card(header=header, elements=elements))


def bot_sign(secret: str, timestamp: str) -> str:
    """Feishu's signature: base64 of HMAC-SHA256 keyed by ``timestamp + "\\n" + secret`` over
    an empty message."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode("ascii")


def classify_feishu_code(code: int, msg: str) -> tuple[Outcome, ErrorCode | None]:
    """Map a Feishu application ``code`` (with its ``msg``) to an outcome."""
    if code == 0:
        return Outcome.SUCCESS, None
    if code == CODE_FREQUENCY_LIMITED or (code == CODE_GENERIC and _THROTTLING.search(msg)):
        return Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_RATE_LIMITED
    if code in _AUTH_CODES:
        return Outcome.PERMANENT_FAIL, ErrorCode.PROVIDER_AUTH_FAILED
    return Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID


class FeishuBotProvider(base.HttpProvider):
    """Delivers to a Feishu/Lark custom group bot configured per user.

    Options and usage as ``base.HttpProvider``, plus the request body cap and the message
    format (``text`` or ``card``); the URL policy defaults to Feishu's and Lark's bot
    endpoints. ``clock`` gives the signing timestamp and the reference for ``Retry-After``.
    """

    label = "feishu bot"
    can_digest = True
    default_hosts = DEFAULT_HOSTS
    default_path_prefix = DEFAULT_PATH_PREFIX

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        request_body_max_bytes: int = _DEFAULT_REQUEST_BODY_MAX_BYTES,
        message_format: MessageFormat = "text",
        **options: Unpack[base.HttpOptions],
    ) -> None:
        if not 0 < request_body_max_bytes <= FEISHU_BODY_MAX_BYTES:
            raise ValueError(
                f"request_body_max_bytes must be in 1..{FEISHU_BODY_MAX_BYTES}, "
                f"got {request_body_max_bytes!r}"
            )
        if message_format not in ("text", "card"):
            raise ValueError(f"message_format must be 'text' or 'card', got {message_format!r}")
        super().__init__(transport, **options)
        self._request_max_bytes = request_body_max_bytes
        self._format: MessageFormat = message_format

    def build_message(self, delivery: model.Delivery, text: str | None = None) -> BotMessage:
        """The unsigned body for ``delivery``; ``text`` overrides its (summary) text."""
        if text is None:
            text = bodies.message_text(delivery)
        if self._format == "text":
            return BotMessage(msg_type="text", content=TextContent(text=text))
        elements: list[CardDiv | CardAction] = [
            CardDiv(tag="div", text=PlainText(tag="plain_text", content=text))
        ]
        link = self.button_link(delivery)
        if link is not None:
            elements.append(_button(link))
        return _card(message.MESSAGE_TITLE, elements)

    def digest_message(self, entries: Sequence[bodies.DigestEntry]) -> BotMessage:
        """The unsigned digest of ``entries``: a ``post`` (format ``text``) or a card."""
        title = message.digest_title(len(entries))
        if self._format == "text":
            paragraphs: list[list[PostText | PostLink]] = []
            for number, entry in enumerate(entries, 1):
                paragraph: list[PostText | PostLink] = [
                    PostText(tag="text", text=f"{number}. {entry.text} ")
                ]
                if entry.link is not None:
                    paragraph.append(
                        PostLink(tag="a", text=message.MESSAGE_ACTION_TEXT, href=entry.link)
                    )
                paragraphs.append(paragraph)
            post = PostContent(post={"zh_cn": PostBody(title=title, content=paragraphs)})
            return BotMessage(msg_type="post", content=post)
        elements: list[CardDiv | CardAction] = []
        for number, entry in enumerate(entries, 1):
            text = f"{number}. {entry.text}"
            elements.append(CardDiv(tag="div", text=PlainText(tag="plain_text", content=text)))
            if entry.link is not None:
                elements.append(_button(entry.link))
        return _card(title, elements)

    def _fit(self, delivery: model.Delivery, signed: BotMessage) -> BotMessage | None:
        """``signed``, its text cut if it must be for the encoded body to fit the size cap;
        None when even an empty text does not fit."""
        if len(_encoder.encode(signed)) <= self._request_max_bytes:
            return signed
        text = bodies.message_text(delivery)

        def cut(n: int) -> BotMessage:
            message = self.build_message(delivery, text[:n] + _ELLIPSIS)
            return msgspec.structs.replace(message, timestamp=signed.timestamp, sign=signed.sign)

        def fits(n: int) -> bool:
            return len(_encoder.encode(cut(n))) <= self._request_max_bytes

        if not fits(0):
            return None
        # Largest n that fits, by bisection: the encoded size grows with n, though not by a
        # fixed number of bytes per code point (UTF-8 widths and JSON escapes vary).
        low, high = 0, len(text) - 1
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        return cut(low)

    def _sign(self, unsigned: BotMessage, recipient: model.Recipient) -> tuple[BotMessage, str]:
        """``unsigned`` with its ``timestamp`` and ``sign`` when the channel signs, and the
        secret (empty when it does not)."""
        secret = base.signing_secret(recipient, self.label)
        if secret is None:
            return unsigned, ""
        # Fresh on every call: Feishu refuses a timestamp more than an hour off.
        timestamp = str(int(self._clock().timestamp()))
        signed = msgspec.structs.replace(
            unsigned, timestamp=timestamp, sign=bot_sign(secret, timestamp)
        )
        return signed, secret

    def _request(
        self, signed: BotMessage, body: bytes, secret: str, url: httpx.URL
    ) -> model.PreparedRequest:
        """The call posting ``body`` (``signed``, encoded) to ``url``."""
        # What the record keeps: the body as sent, but never a usable signature.
        stored = _encoder.encode(msgspec.structs.replace(signed, sign=_MASK)) if secret else body
        return model.PreparedRequest(
            url=url, body=body, headers=sender.json_headers(), stored=stored, secrets=(secret,)
        )

    def prepare(
        self, delivery: model.Delivery, recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest:
        signed, secret = self._sign(self.build_message(delivery), recipient)
        fitted = self._fit(delivery, signed)
        if fitted is None:
            raise model.NotSent(
                ErrorCode.PAYLOAD_INVALID,
                f"feishu bot message exceeds {self._request_max_bytes} bytes "
                "even with its text cut",
            )
        return self._request(fitted, _encoder.encode(fitted), secret, url)

    def digest_request(
        self, deliveries: Sequence[model.Delivery], recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest | None:
        entries = self.digest_entries(deliveries)
        signed, secret = self._sign(self.digest_message(entries), recipient)
        body = _encoder.encode(signed)
        if len(body) > self._request_max_bytes:
            return None
        return self._request(signed, body, secret, url)

    def classify(self, reply: model.HttpReply) -> model.Verdict:
        """2xx (Feishu's usual way) or a 4xx carrying a Feishu code: the code decides; 429 and
        5xx stay as the status says, whatever the body."""
        return replies.coded_verdict(
            reply, "feishu bot webhook", classify_feishu_code, *_CODE_FIELDS, code_label="feishu"
        )
