"""Delivery channels: each turns one claimed ``Delivery`` into one ``SendResult``."""

from typing import Final

from .base import (
    PERMANENT_ERROR_CODES,
    RETRYABLE_ERROR_CODES,
    Delivery,
    ErrorCode,
    Outcome,
    Provider,
    SendResult,
    Target,
    UrlPolicy,
    UrlRejected,
    classify_status,
    parse_retry_after,
    read_body_capped,
)
from .feishu_bot import FeishuBotProvider
from .feishu_flow import FeishuFlowProvider
from .webhook import WebhookProvider

#: Every provider name a channel row may select (``notification_channels.provider``): the one
#: list the bounded ``provider`` metric label and the daemon's provider table agree on (a test
#: checks ``daemon.default_providers`` against it). A new provider is added here.
PROVIDER_NAMES: Final = ("feishu_flow", "feishu_bot", "webhook")

__all__ = [
    "PERMANENT_ERROR_CODES",
    "PROVIDER_NAMES",
    "RETRYABLE_ERROR_CODES",
    "Delivery",
    "ErrorCode",
    "FeishuBotProvider",
    "FeishuFlowProvider",
    "Outcome",
    "Provider",
    "SendResult",
    "Target",
    "UrlPolicy",
    "UrlRejected",
    "WebhookProvider",
    "classify_status",
    "parse_retry_after",
    "read_body_capped",
]
