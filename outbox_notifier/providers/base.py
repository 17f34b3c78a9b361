"""What every provider shares: the delivery it is handed and the result it returns.

A provider turns one claimed ``Delivery`` into one ``SendResult``. It never raises for a
delivery problem (bad URL, refused connection, hostile response): every such failure is a
result with an ``Outcome`` and an ``ErrorCode``, so the delivery loop has one code path.
Only ``asyncio.CancelledError`` (shutdown) escapes.

Outcome -> record status, applied by the delivery loop (seed semantics):

- ``SUCCESS`` -> ``sent``
- ``SKIPPED`` -> ``skipped``
- ``PERMANENT_FAIL`` -> ``dead``
- ``TEMPORARY_FAIL`` -> ``failed`` with a backoff, or ``dead`` once attempts run out
"""

from __future__ import annotations

import enum
import math
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol

import httpx
import msgspec

#: Longest error message kept on a result (the seed truncates to 2000 runes).
ERROR_MESSAGE_MAX_CHARS = 2000


class Outcome(enum.StrEnum):
    """How one provider call ended (contract names)."""

    SUCCESS = "success"
    TEMPORARY_FAIL = "temporary_fail"
    PERMANENT_FAIL = "permanent_fail"
    SKIPPED = "skipped"


class ErrorCode(enum.StrEnum):
    """Why a provider call did not succeed (contract names, as in the seed)."""

    # retryable
    PROVIDER_TIMEOUT = "provider_timeout"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    PROVIDER_5XX = "provider_5xx"
    NETWORK_ERROR = "network_error"
    SENDING_LEASE_EXPIRED = "sending_lease_expired"
    # permanent
    RECIPIENT_MISSING = "recipient_missing"
    INVALID_URL = "invalid_url"
    PROVIDER_AUTH_FAILED = "provider_auth_failed"
    PAYLOAD_INVALID = "payload_invalid"


RETRYABLE_ERROR_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.PROVIDER_TIMEOUT,
        ErrorCode.PROVIDER_RATE_LIMITED,
        ErrorCode.PROVIDER_5XX,
        ErrorCode.NETWORK_ERROR,
        ErrorCode.SENDING_LEASE_EXPIRED,
    }
)
PERMANENT_ERROR_CODES: frozenset[ErrorCode] = frozenset(set(ErrorCode) - RETRYABLE_ERROR_CODES)


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """The user's row in ``notification_channels`` for the delivery's channel.

    ``auth_kind`` is ``'none'``, ``'bearer'`` or ``'bot_secret'``; ``auth_secret`` is the
    token or signing secret and must never reach a log line or an error message.
    """

    enabled: bool
    webhook_url: str
    auth_kind: str
    auth_secret: str | None


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One claimed notification record, as the delivery loop hands it to a provider.

    ``message_text`` is final (fallback and target URL already applied); ``attempt`` is the
    attempt being made (1 for the first call); ``target`` is None when the user has no
    channel row.
    """

    record_id: int
    channel: str
    user_id: int
    trigger_id: str
    preview_id: str
    trigger_type: str
    target_type: str
    target_id: int
    target_url: str
    message_text: str
    fallback_used: bool
    trace_id: str
    attempt: int
    dedupe_key: str
    target: Target | None


class SendResult(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one provider call.

    ``request_json`` is the body that was sent with any secret masked (None when nothing was
    sent); ``response_body`` holds at most the provider's cap of raw response bytes, with
    ``response_truncated`` set when more were left unread. ``retry_after_s`` carries the
    provider's ``Retry-After`` so the retry can honour it.
    """

    outcome: Outcome
    error_code: str | None = None
    error_message: str | None = None
    provider_message_id: str | None = None
    http_status: int | None = None
    request_json: bytes | None = None
    response_body: bytes | None = None
    response_truncated: bool = False
    retry_after_s: float | None = None
    duration_s: float = 0.0


class Provider(Protocol):
    """A delivery channel. ``send`` must never raise for a delivery problem."""

    channel: str

    async def send(self, delivery: Delivery) -> SendResult: ...


def classify_status(status: int) -> tuple[Outcome, ErrorCode | None]:
    """Map an HTTP status to an outcome, as the seed's webhook provider does.

    2xx is a success as far as the status goes (a provider may still reject in the body);
    429 and 5xx are retryable; 401/403 and everything else (including 1xx and 3xx, since
    redirects are not followed) are permanent.
    """
    if 200 <= status < 300:
        return Outcome.SUCCESS, None
    if status == 429:
        return Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_RATE_LIMITED
    if status >= 500:
        return Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_5XX
    if status in (401, 403):
        return Outcome.PERMANENT_FAIL, ErrorCode.PROVIDER_AUTH_FAILED
    return Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID


_DELTA_SECONDS = re.compile(r"\d{1,12}(?:\.\d{1,9})?")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Returns None when the header is absent or unreadable; a date in the past gives 0.0.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, delta) if math.isfinite(delta) else None


async def read_body_capped(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """Read at most ``max_bytes`` of a streamed response; return ``(body, truncated)``.

    Reads raw bytes (no content decoding), so neither a huge body nor a compression bomb
    is ever held in memory; the caller closes the response, which drops the connection
    when the body was cut short.
    """
    if response.is_stream_consumed:
        # Already read whole by someone else; still hand back no more than the cap.
        content = response.content
        return content[:max_bytes], len(content) > max_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        remaining = max_bytes - size
        if len(chunk) > remaining:
            chunks.append(chunk[:remaining])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def truncate(text: str, limit: int = ERROR_MESSAGE_MAX_CHARS) -> str:
    """Cut ``text`` to ``limit`` characters (code points, like the seed's runes)."""
    return text if len(text) <= limit else text[:limit]
