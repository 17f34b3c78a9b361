"""The shape the group-chat robots share (DingTalk, WeCom, Slack): a JSON message that is a
card with a link when the action URL is absolute and plain text otherwise, the body stored as
sent (it holds no secret), and a reply whose application code maps through a table.

A digest is the robot's own format for several records (``digest_message``), kept within
the limits its documentation gives (``digest_fits``); DingTalk and WeCom render it as
markdown, by ``markdown_digest``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import httpx
import msgspec

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome

from . import base, bodies, model, replies, sender


def markdown_link(label: str, url: str) -> str:
    """``[label](url)``, the URL's spaces and parentheses percent-encoded: each would end the
    link early (the URL is the action URL, whose target comes from an event payload)."""
    for char, code in ((" ", "%20"), ("(", "%28"), (")", "%29")):
        url = url.replace(char, code)
    return f"[{label}]({url})"


def markdown_digest(entries: Sequence[bodies.DigestEntry]) -> str:
    """The markdown of a digest (DingTalk's ``markdown.text``, WeCom's ``markdown.content``)::

        ### SmartFlow 日程调整建议 (2 条)

        1. <text of the oldest record>
        [查看并确认调整](<its action url>)

        2. <text of the next record>
        [查看并确认调整](<its action url>)

    A record's line breaks become markdown hard breaks (two spaces and a new line), so the
    text keeps its lines; nothing of the text is dropped. The link is left out when it is not
    absolute (the text then ends with the target URL, as the seed's rules append it).
    """
    parts = [f"### {message.digest_title(len(entries))}"]
    for number, entry in enumerate(entries, 1):
        lines = [f"{number}. {entry.text}".replace("\n", "  \n")]
        if entry.link is not None:
            lines.append(markdown_link(message.MESSAGE_ACTION_TEXT, entry.link))
        parts.append("  \n".join(lines))
    return "\n\n".join(parts)


class ChatBotProvider(base.HttpProvider):
    """A ``base.HttpProvider`` whose subclass gives ``text_message``, ``card_message`` and,
    for a coded reply, ``codes`` (application code -> result) read from ``code_fields``; for
    digests ``digest_message`` and ``digest_fits``. A robot that signs overrides
    ``request``, which the single message and the digest share."""

    can_digest = True
    code_label: ClassVar[str]
    codes: ClassVar[Mapping[int, tuple[Outcome, ErrorCode]]] = {}
    code_fields: ClassVar[tuple[tuple[str, str], ...]] = (("errcode", "errmsg"),)

    def text_message(self, text: str) -> dict[str, object]:
        """The body without a link button."""
        return {"msgtype": "text", "text": {"content": text}}

    def card_message(self, text: str, link: str) -> dict[str, object]:
        """The body with a button (or card action) to ``link``, an absolute URL."""
        raise NotImplementedError

    def build_message(self, delivery: model.Delivery) -> dict[str, object]:
        """The body for ``delivery``: a card when its link is absolute, else text."""
        text = bodies.message_text(delivery)
        link = self.button_link(delivery)
        return self.text_message(text) if link is None else self.card_message(text, link)

    def digest_message(self, entries: Sequence[bodies.DigestEntry]) -> dict[str, object]:
        """The body of a digest of ``entries``, oldest first: a title naming the count, then
        each record's text and link."""
        raise NotImplementedError

    def digest_fits(self, body: dict[str, object], encoded: bytes) -> bool:
        """Whether the digest ``body`` (``encoded`` as it would be sent) keeps the platform's
        limits."""
        raise NotImplementedError

    def request(
        self, body: bytes, recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest:
        """The call that posts ``body`` to ``url``: stored as sent (it holds no secret)."""
        return model.PreparedRequest(url=url, body=body, headers=sender.json_headers(), stored=body)

    def prepare(
        self, delivery: model.Delivery, recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest:
        return self.request(msgspec.json.encode(self.build_message(delivery)), recipient, url)

    def digest_request(
        self, deliveries: Sequence[model.Delivery], recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest | None:
        body = self.digest_message(self.digest_entries(deliveries))
        encoded = msgspec.json.encode(body)
        if not self.digest_fits(body, encoded):
            return None
        return self.request(encoded, recipient, url)

    def code_result(self, code: int, msg: str) -> tuple[Outcome, ErrorCode | None]:
        """A non-zero reply code's result, from ``codes``: a code not in it is a permanent
        ``payload_invalid``."""
        return self.codes.get(code, (Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID))

    def classify(self, reply: model.HttpReply) -> model.Verdict:
        return replies.coded_verdict(reply, self.code_label, self.code_result, *self.code_fields)
