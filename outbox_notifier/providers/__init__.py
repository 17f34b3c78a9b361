"""Delivery channels: each turns one claimed ``Delivery`` into one ``SendResult``."""

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

__all__ = [
    "PERMANENT_ERROR_CODES",
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
