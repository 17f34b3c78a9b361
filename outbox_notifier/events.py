"""Outbox event contract: payload structs, their validation, and the one decode entry point.

An outbox row is ``(event_type, event_version, payload)``. :func:`decode_event` turns it into a
validated :class:`FeishuNotificationRequested` or raises :class:`EventRejected`, whose ``reason``
is the one line stored on the rejected row and whose ``reason_class`` is a bounded metric label.

Validation and normalisation live in ``FeishuNotificationRequested.__post_init__``, so a struct
built directly (in tests, by the demo) obeys the same rules as a decoded one. ``__post_init__``
trims every string field (Go's ``strings.TrimSpace``, as the seed did before storing) through
``msgspec.structs.force_setattr``, the documented way to finish a frozen struct; msgspec turns the
``ValueError`` raised there into a ``ValidationError`` while decoding.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final, Literal

import msgspec

from outbox_notifier.message import trim_space

EVENT_TYPE: Final = "notification.feishu.requested"
EVENT_VERSION: Final = "1"

ReasonClass = Literal["unknown_type", "unsupported_version", "malformed", "invalid", "too_large"]
REASON_CLASSES: Final[tuple[ReasonClass, ...]] = (
    "unknown_type",
    "unsupported_version",
    "malformed",
    "invalid",
    "too_large",
)
"""Every ``EventRejected.reason_class``: label values a metric can pre-create."""

#: ``target_url`` becomes a link in users' chat messages, so it is held to a narrow shape.
TARGET_URL_MAX_CHARS: Final = 2048
#: The longest ``ordering_key`` (after trimming): it is an index key, compared on every claim.
ORDERING_KEY_MAX_CHARS: Final = 256
# Control characters (C0, DEL, C1): CR/LF would split headers or lines, TAB and NUL confuse
# URL parsers and chat clients.
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Limits on stored text, checked after trimming. Postgres would take more, but a hostile or buggy
# producer must not be able to write megabyte rows or megabyte log lines through us.
_STRING_MAX_CHARS: Final[dict[str, int]] = {
    "trigger_id": 256,
    "preview_id": 256,
    "trigger_type": 256,
    "target_type": 256,
    "dedupe_key": 512,
    "target_url": TARGET_URL_MAX_CHARS,
    "summary_text": 10_000,
    "fallback_text": 10_000,
    "trace_id": 256,
}
_REQUIRED_STRINGS: Final = ("preview_id", "dedupe_key", "target_url")
# The ids land in bigint columns; a larger JSON integer would fail the insert instead of being
# rejected here with a reason.
_BIGINT_MIN: Final = -(2**63)
_BIGINT_MAX: Final = 2**63 - 1
# Event type/version are echoed into the reason; cut what a producer sent before quoting it.
_ECHO_MAX_CHARS: Final = 100


class FeishuNotificationRequested(msgspec.Struct, frozen=True, kw_only=True):
    """Payload of ``notification.feishu.requested`` version ``1`` (the seed's payload).

    Unknown fields are ignored, so producers may add fields before consumers know them. JSON
    ``null`` is not accepted for any field; leave an optional field out instead.

    Rules (each violation is a ``ValueError`` naming the field):

    - ``user_id > 0``; ``notification_id``, ``user_id`` and ``target_id`` fit a Postgres bigint.
      ``target_id`` is a JSON integer (not a string of digits, not ``1.0``), as in the seed.
    - ``preview_id``, ``dedupe_key`` and ``target_url`` are non-empty after trimming.
    - ``target_url`` is a path relative to the product (it becomes a link in users' chat):
      it starts with exactly one ``/`` and holds no scheme (``javascript:``, ``data:``), no
      ``://``, no backslash and no control character (CR, LF, TAB, NUL ...).
    - ``requested_at`` is an RFC 3339 timestamp with an offset (``Z`` or ``+08:00``).
    - After trimming, ``dedupe_key`` has at most 512 characters, ``target_url`` 2048,
      ``summary_text`` and ``fallback_text`` 10000, every other string 256.
    - No string contains NUL (``\\x00``), which Postgres ``text`` cannot store.
    - ``ordering_key`` (optional, additive): when present, 1 to 256 characters after trimming.
      Records of one channel and ordering key are delivered in the order of their outbox rows
      (``claim_due_v1``); absent, the record is delivered as soon as it can be, as before.
    """

    notification_id: int = 0
    user_id: int
    trigger_id: str = ""
    preview_id: str
    trigger_type: str = ""
    target_type: str = ""
    target_id: int = 0
    dedupe_key: str
    target_url: str
    summary_text: str = ""
    fallback_text: str = ""
    trace_id: str = ""
    requested_at: datetime
    # UNSET, not "": a key sent empty is refused, a key left out is no key (null is refused
    # by the type, as for every other field).
    ordering_key: str | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        for name in ("notification_id", "user_id", "target_id"):
            number: int = getattr(self, name)
            if not _BIGINT_MIN <= number <= _BIGINT_MAX:
                raise ValueError(f"{name} is out of range for a 64-bit integer")
        if self.user_id <= 0:
            raise ValueError("user_id must be > 0")

        for name, max_chars in _STRING_MAX_CHARS.items():
            raw: str = getattr(self, name)
            value = trim_space(raw)
            if value != raw:
                msgspec.structs.force_setattr(self, name, value)
            if "\x00" in value:
                raise ValueError(f"{name} must not contain NUL characters")
            if len(value) > max_chars:
                raise ValueError(f"{name} is too long ({len(value)} > {max_chars} characters)")

        for name in _REQUIRED_STRINGS:
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        _check_target_url(self.target_url)

        if self.ordering_key is not msgspec.UNSET:
            _check_ordering_key(self, self.ordering_key)

        # utcoffset() rather than tzinfo: a tzinfo may still answer None.
        if self.requested_at.utcoffset() is None:
            raise ValueError("requested_at must be timezone-aware (RFC 3339 with an offset)")


def _check_ordering_key(event: FeishuNotificationRequested, raw: str) -> None:
    """Trims ``ordering_key`` in place; raises ``ValueError`` unless it is 1 to
    `ORDERING_KEY_MAX_CHARS` characters without NUL."""
    value = trim_space(raw)
    if value != raw:
        msgspec.structs.force_setattr(event, "ordering_key", value)
    if not value:
        raise ValueError("ordering_key must not be empty when present (leave it out instead)")
    if "\x00" in value:
        raise ValueError("ordering_key must not contain NUL characters")
    if len(value) > ORDERING_KEY_MAX_CHARS:
        raise ValueError(
            f"ordering_key is too long ({len(value)} > {ORDERING_KEY_MAX_CHARS} characters)"
        )


def _check_target_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is a plain relative path (see the struct's rules).

    ``/\\evil.example`` and ``//evil.example`` are read by browsers as links to another
    host, and anything not starting with ``/`` may carry a scheme (``javascript:``).
    """
    if _CONTROL_CHARS.search(url):
        raise ValueError("target_url must not contain control characters")
    if "\\" in url:
        raise ValueError("target_url must not contain backslashes")
    if not url.startswith("/"):
        raise ValueError("target_url must be a relative path starting with '/'")
    if url.startswith("//") or "://" in url:
        raise ValueError("target_url must be a relative path, not a link to another host")


class EventRejected(Exception):
    """An outbox row that cannot become a notification; the row is marked ``rejected``.

    ``reason`` is one readable line for the row's ``error`` column and the log, e.g.
    ``invalid payload: user_id must be > 0``. ``reason_class`` is one of :data:`REASON_CLASSES`:

    - ``unknown_type``: no consumer for the event type;
    - ``unsupported_version``: known type, unknown version;
    - ``malformed``: the payload is not JSON, or not a JSON object;
    - ``invalid``: a JSON object that breaks the contract (missing field, wrong type, a rule);
    - ``too_large``: a payload over ``max_payload_bytes``, never read (see :func:`too_large`).
    """

    def __init__(self, reason: str, reason_class: ReasonClass) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reason_class: ReasonClass = reason_class


_decoder: Final = msgspec.json.Decoder(FeishuNotificationRequested)


def _quote(value: str) -> str:
    """Quote producer-supplied text for a reason: bounded, escapes kept on one line."""
    if len(value) > _ECHO_MAX_CHARS:
        return repr(value[:_ECHO_MAX_CHARS]) + "..."
    return repr(value)


def too_large(payload_bytes: int, max_payload_bytes: int) -> EventRejected:
    """The rejection of a payload the claim left in the database for its size."""
    return EventRejected(
        f"payload is {payload_bytes:,} bytes; max_payload_bytes is {max_payload_bytes:,}",
        "too_large",
    )


def decode_event(
    event_type: str, event_version: str, payload: bytes
) -> FeishuNotificationRequested:
    """Decode and validate one outbox row's payload (JSON bytes).

    Type and version must match :data:`EVENT_TYPE` and :data:`EVENT_VERSION` exactly. Raises
    :class:`EventRejected`; never anything else for bad input.
    """
    if event_type != EVENT_TYPE:
        raise EventRejected(f"unknown event type {_quote(event_type)}", "unknown_type")
    if event_version != EVENT_VERSION:
        raise EventRejected(
            f"unsupported event_version {_quote(event_version)} for {EVENT_TYPE}",
            "unsupported_version",
        )
    try:
        return _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        message = str(exc)
        # msgspec's wording when the top-level value has the wrong type; only the root has no
        # "- at `$...`" suffix.
        if message.startswith("Expected `object`, got `") and " - at `" not in message:
            raise EventRejected("payload is not a JSON object", "malformed") from exc
        raise EventRejected(f"invalid payload: {message}", "invalid") from exc
    except msgspec.DecodeError as exc:
        raise EventRejected(f"payload is not valid JSON: {exc}", "malformed") from exc
    except RecursionError as exc:
        # jsonb accepts nesting thousands of levels deep; the decoder recurses into unknown
        # fields and runs out of stack. Such a row is refused, not allowed to stop the relay.
        raise EventRejected("payload is nested too deeply", "malformed") from exc
