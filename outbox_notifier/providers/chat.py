"""The shape the group-chat robots share (DingTalk, WeCom, Slack): a JSON message that is a
card with a link when the action URL is absolute and plain text otherwise, the body stored as
sent (it holds no secret), and a reply whose application code maps through a table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import httpx
import msgspec

from outbox_notifier.names import ErrorCode, Outcome

from . import base, bodies, model, replies, sender


class ChatBotProvider(base.HttpProvider):
    """A ``base.HttpProvider`` whose subclass gives ``text_message``, ``card_message`` and,
    for a coded reply, ``codes`` (application code -> result) read from ``code_fields``."""

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

    def prepare(
        self, delivery: model.Delivery, recipient: model.Recipient, url: httpx.URL
    ) -> model.PreparedRequest:
        body = msgspec.json.encode(self.build_message(delivery))
        return model.PreparedRequest(url=url, body=body, headers=sender.json_headers(), stored=body)

    def classify(self, reply: model.HttpReply) -> model.Verdict:
        return replies.coded_verdict(reply, self.code_label, self.codes, *self.code_fields)
