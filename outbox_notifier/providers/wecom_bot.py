"""WeCom (企业微信) group robot provider: posts to a group robot's webhook.

The webhook is ``https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=<key>``; the key in the
query is the credential, and the sender masks a URL's query in every error message. Bodies::

    {"msgtype": "text", "text": {"content": "<message_text>"}}

    {"msgtype": "template_card",
     "template_card": {"card_type": "text_notice",
                       "main_title": {"title": "<title>"},
                       "sub_title_text": "<message_text>",
                       "jump_list": [{"type": 1, "title": "<action text>", "url": "<action url>"}],
                       "card_action": {"type": 1, "url": "<action url>"}}}

The ``template_card`` (the card opens the action URL, and a jump link names it) is sent when
the action URL is absolute, the plain ``text`` otherwise. ``markdown`` is not used for one
record: the summary comes from event payloads and would render links. The robot has no
signing; a channel's ``auth_kind`` is ignored.

Digest (several records in one message, when the robot's 20 a minute cannot send them one by
one): ``markdown`` after all, the one robot format with a link per record (a card takes at
most three jump links)::

    {"msgtype": "markdown",
     "markdown": {"content": "### SmartFlow 日程调整建议 (3 条)\n\n1. <message_text>  \n"
                             "[查看并确认调整](<action url>)\n\n2. ..."}}

(``chat.markdown_digest``). The seed's rules already replace a summary holding ``://`` or
``www.`` by the fallback text, so a summary brings no link of its own; other markdown in it
renders. WeCom takes at most 4096 bytes of UTF-8 in ``markdown.content``
(``WECOM_MARKDOWN_MAX_BYTES``, same page as below): records are left out to keep it, never
cut.

Reply mapping: WeCom answers HTTP 200 with ``errcode``/``errmsg``. The code table below follows
the group robot documentation and the global error code list:
https://developer.work.weixin.qq.com/document/path/91770 (群机器人配置说明) and
https://developer.work.weixin.qq.com/document/path/90313 (全局错误码).

===============================================  =======================================
reply                                            result
===============================================  =======================================
``errcode`` 0                                    success
45009 (API frequency limit exceeded)             temporary ``provider_rate_limited``
93000 (invalid webhook URL / key)                permanent ``provider_auth_failed``
40008, 44004, 40058 ... (invalid message) and    permanent ``payload_invalid``
any other code
HTTP 429 / 5xx / 401, 403 / other                as ``replies.status_verdict``
===============================================  =======================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome

from . import bodies, chat

__all__ = ["WECOM_CODES", "WECOM_MARKDOWN_MAX_BYTES", "WeComBotProvider"]

#: WeCom's limit on a markdown message's ``content``, in bytes of UTF-8.
WECOM_MARKDOWN_MAX_BYTES = 4096

#: ``errcode`` -> result, from the documentation cited in the module docstring; a code not
#: here (40008 invalid message type, 44004 empty text, ...) is a permanent ``payload_invalid``.
WECOM_CODES = {
    45009: (Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_RATE_LIMITED),
    93000: (Outcome.PERMANENT_FAIL, ErrorCode.PROVIDER_AUTH_FAILED),
}


class WeComBotProvider(chat.ChatBotProvider):
    """Delivers to a WeCom group robot configured per user (options as ``HttpProvider``;
    the URL policy defaults to WeCom's robot endpoint)."""

    label = "wecom bot"
    default_hosts = ("qyapi.weixin.qq.com",)
    default_path_prefix = "/cgi-bin/webhook/send"
    code_label = "wecom"
    codes = WECOM_CODES

    def card_message(self, text: str, link: str) -> dict[str, object]:
        card = {
            "card_type": "text_notice",
            "main_title": {"title": message.MESSAGE_TITLE},
            "sub_title_text": text,
            "jump_list": [{"type": 1, "title": message.MESSAGE_ACTION_TEXT, "url": link}],
            "card_action": {"type": 1, "url": link},
        }
        return {"msgtype": "template_card", "template_card": card}

    def digest_message(self, entries: Sequence[bodies.DigestEntry]) -> dict[str, object]:
        return {"msgtype": "markdown", "markdown": {"content": chat.markdown_digest(entries)}}

    def digest_fits(self, body: dict[str, object], encoded: bytes) -> bool:
        # The limit is on the field, not the body: JSON escapes do not count.
        content = cast(dict[str, str], body["markdown"])["content"]
        return len(content.encode()) <= WECOM_MARKDOWN_MAX_BYTES
