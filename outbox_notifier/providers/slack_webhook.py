"""Slack incoming webhook provider: posts a Block Kit message to a channel's webhook.

The webhook is ``https://hooks.slack.com/services/T.../B.../<secret>``; the path is the
credential, and the sender masks a URL's path in every error message. Body::

    {"text": "<message_text>",                 # the notification's plain-text fallback
     "blocks": [{"type": "section", "text": {"type": "plain_text", "text": "<message_text>"}},
                {"type": "actions", "elements": [
                    {"type": "button", "text": {"type": "plain_text", "text": "<action text>"},
                     "url": "<action url>"}]}]}

``plain_text`` rather than ``mrkdwn``: the text comes from event payloads, and mrkdwn would
render links and ``<!channel>`` mentions. The ``actions`` block is left out when the action URL
is not absolute. Incoming webhooks have no signing; a channel's ``auth_kind`` is ignored.

Digest (several records in one message, when the webhook's one a second cannot send them one
by one): a ``header`` block naming the count, then one ``section`` per record, oldest first,
its button as the section's accessory (none when the link is not absolute)::

    {"text": "SmartFlow 日程调整建议 (3 条)",   # the notification's plain-text fallback
     "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "<title>"}},
                {"type": "section", "text": {"type": "plain_text", "text": "<message_text>"},
                 "accessory": {"type": "button", "text": {...}, "url": "<action url>"}},
                ...]}

Block Kit's limits, from https://api.slack.com/reference/block-kit/blocks (a message holds
at most 50 blocks; a section's text at most 3000 characters, a header's 150) and
https://api.slack.com/reference/block-kit/block-elements#button (a button's URL at most
3000 characters): records are left out to keep them, never cut.

Reply mapping: Slack answers ``200 ok`` in plain text, and an error as an HTTP status with a
short text code in the body. The table below follows Slack's "Sending messages using incoming
webhooks", section "Handling errors":
https://api.slack.com/messaging/webhooks#handling_errors

======================================================  ===================================
reply                                                   result
======================================================  ===================================
2xx (``ok``)                                            success
400 ``invalid_payload``, ``invalid_blocks``, ...        permanent ``payload_invalid``
403 ``action_prohibited``,                              permanent ``provider_auth_failed``
``posting_to_general_channel_denied``, ...
404 ``no_service``, ``channel_not_found``, ...          permanent ``endpoint_gone``
410 ``channel_is_archived``                             permanent ``endpoint_gone``
429 (with ``Retry-After``)                              temporary ``provider_rate_limited``
5xx                                                     temporary ``provider_5xx``
======================================================  ===================================

``endpoint_gone`` disables the channel, as for a webhook's 410: a removed webhook or an
archived channel refuses every later message the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

import msgspec

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome

from . import bodies, chat, model, replies

__all__ = ["SLACK_STATUSES", "SlackWebhookProvider"]

#: Block Kit's limits (characters, blocks), from the pages cited in the module docstring.
MAX_BLOCKS = 50
SECTION_TEXT_MAX_CHARS = 3000
BUTTON_URL_MAX_CHARS = 3000

_GONE = (Outcome.PERMANENT_FAIL, ErrorCode.ENDPOINT_GONE)
#: Statuses that differ from ``replies.classify_status``, from the page cited above.
SLACK_STATUSES = {404: _GONE, 410: _GONE}
# Slack's error bodies are short snake_case codes; anything else is not quoted.
_ERROR_TOKEN = re.compile(rb"[a-z0-9_]{1,64}")


def _section(text: str) -> dict[str, object]:
    return {"type": "section", "text": {"type": "plain_text", "text": text}}


def _button(link: str) -> dict[str, object]:
    label = {"type": "plain_text", "text": message.MESSAGE_ACTION_TEXT}
    return {"type": "button", "text": label, "url": link}


class SlackWebhookProvider(chat.ChatBotProvider):
    """Delivers to a Slack incoming webhook configured per user (options as
    ``HttpProvider``; the URL policy defaults to Slack's webhook endpoint)."""

    label = "slack webhook"
    default_hosts = ("hooks.slack.com",)
    default_path_prefix = "/services/"

    def text_message(self, text: str) -> dict[str, object]:
        return {"text": text, "blocks": [_section(text)]}

    def card_message(self, text: str, link: str) -> dict[str, object]:
        actions = {"type": "actions", "elements": [_button(link)]}
        return {"text": text, "blocks": [_section(text), actions]}

    def digest_message(self, entries: Sequence[bodies.DigestEntry]) -> dict[str, object]:
        title = message.digest_title(len(entries))
        blocks: list[dict[str, object]] = [
            {"type": "header", "text": {"type": "plain_text", "text": title}}
        ]
        for entry in entries:
            section = _section(entry.text)
            if entry.link is not None:
                section["accessory"] = _button(entry.link)
            blocks.append(section)
        return {"text": title, "blocks": blocks}

    def digest_fits(self, body: dict[str, object], encoded: bytes) -> bool:
        # Slack counts characters, not bytes. The header (the title, a few dozen characters)
        # is always within its 150.
        blocks = cast(list[dict[str, Any]], body["blocks"])
        sections = blocks[1:]
        return len(blocks) <= MAX_BLOCKS and all(
            len(section["text"]["text"]) <= SECTION_TEXT_MAX_CHARS
            and len(section.get("accessory", {}).get("url", "")) <= BUTTON_URL_MAX_CHARS
            for section in sections
        )

    def classify(self, reply: model.HttpReply) -> model.Verdict:
        verdict = replies.status_verdict(reply.status, "slack webhook", SLACK_STATUSES)
        said = reply.body.strip()
        if verdict.error_message is None or not _ERROR_TOKEN.fullmatch(said):
            return verdict
        return msgspec.structs.replace(
            verdict, error_message=f"{verdict.error_message}: {said.decode('ascii')}"
        )
