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
    classify_status,
    parse_retry_after,
    read_body_capped,
)
from .feishu_flow import FeishuFlowProvider

__all__ = [
    "PERMANENT_ERROR_CODES",
    "RETRYABLE_ERROR_CODES",
    "Delivery",
    "ErrorCode",
    "FeishuFlowProvider",
    "Outcome",
    "Provider",
    "SendResult",
    "Target",
    "classify_status",
    "parse_retry_after",
    "read_body_capped",
]
