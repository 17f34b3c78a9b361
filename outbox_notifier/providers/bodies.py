"""What every provider's request body says, whatever its format: the notification's ids, the
text, the link it offers and the time stamp; and what a digest says of each record."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from outbox_notifier import message

from .model import Delivery


class NotificationFields(msgspec.Struct, frozen=True, kw_only=True):
    """The ids every provider's body carries, first and in this order."""

    notification_id: int
    user_id: int
    preview_id: str
    trigger_id: str
    trigger_type: str
    target_type: str
    target_id: int


def notification_fields(delivery: Delivery) -> dict[str, Any]:
    """``NotificationFields`` of ``delivery`` as keywords (texts trimmed)."""
    return {
        "notification_id": delivery.record_id,
        "user_id": delivery.user_id,
        "preview_id": delivery.preview_id.strip(),
        "trigger_id": delivery.trigger_id.strip(),
        "trigger_type": delivery.trigger_type.strip(),
        "target_type": delivery.target_type.strip(),
        "target_id": delivery.target_id,
    }


def message_text(delivery: Delivery) -> str:
    """The text to send: the delivery's, or the seed's default when it is blank."""
    return delivery.message_text.strip() or message.DEFAULT_FALLBACK_TEMPLATE


class DigestEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One record's part of a digest: its text (``message_text``, never cut: the seed's rules,
    fallback and 180 runes, are all the cutting a record's text gets) and the link its single
    message's button opens, None when that link is not absolute (the single message then has
    no button either, and the text already ends with the target URL)."""

    text: str
    link: str | None


def action_url(frontend_base_url: str, target_url: str) -> str:
    """The link a message offers: ``target_url`` joined to ``frontend_base_url``.

    ``frontend_base_url`` comes without a trailing slash; when it is empty, or the target is
    already an absolute ``http(s)`` URL, the (stripped) target is the link itself.
    """
    target_url = target_url.strip()
    if not frontend_base_url or target_url.startswith(("https://", "http://")):
        return target_url
    return frontend_base_url + "/" + target_url.lstrip("/")


def rfc3339(when: datetime) -> str:
    """``when`` in UTC to the second, as ``2024-01-01T00:00:00Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
