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
the action URL is absolute, the plain ``text`` otherwise. ``markdown`` is not used: the
summary comes from event payloads and would render links. The robot has no signing; a
channel's ``auth_kind`` is ignored.

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

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome

from . import chat

__all__ = ["WECOM_CODES", "WeComBotProvider"]

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
