from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from outbox_notifier import events
from outbox_notifier.events import (
    EVENT_TYPE,
    EVENT_VERSION,
    REASON_CLASSES,
    EventRejected,
    FeishuNotificationRequested,
    decode_event,
)


def good_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "notification_id": 0,
        "user_id": 42,
        "trigger_id": "trg-1",
        "preview_id": "pv-1",
        "trigger_type": "schedule_adjust",
        "target_type": "preview",
        "target_id": 7,
        "dedupe_key": "preview:pv-1",
        "target_url": "/schedule/preview/pv-1",
        "summary_text": "明天的会议改到下午三点",
        "fallback_text": "",
        "trace_id": "trace-abc",
        "requested_at": "2024-05-01T08:30:00+08:00",
    }
    payload.update(overrides)
    return payload


def encode(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


def decode(payload: Any) -> FeishuNotificationRequested:
    return decode_event(EVENT_TYPE, EVENT_VERSION, encode(payload))


def rejection(payload: bytes, event_type: str = EVENT_TYPE, version: str = "1") -> EventRejected:
    with pytest.raises(EventRejected) as info:
        decode_event(event_type, version, payload)
    assert info.value.reason_class in REASON_CLASSES
    assert "\n" not in info.value.reason
    assert str(info.value) == info.value.reason
    return info.value


def test_good_payload_decodes() -> None:
    event = decode(good_payload())
    assert event == FeishuNotificationRequested(
        notification_id=0,
        user_id=42,
        trigger_id="trg-1",
        preview_id="pv-1",
        trigger_type="schedule_adjust",
        target_type="preview",
        target_id=7,
        dedupe_key="preview:pv-1",
        target_url="/schedule/preview/pv-1",
        summary_text="明天的会议改到下午三点",
        fallback_text="",
        trace_id="trace-abc",
        requested_at=datetime(2024, 5, 1, 8, 30, tzinfo=timezone(timedelta(hours=8))),
    )


def test_minimal_payload_uses_defaults() -> None:
    payload = {
        "user_id": 1,
        "preview_id": "p",
        "dedupe_key": "d",
        "target_url": "/x",
        "requested_at": "2024-05-01T00:00:00Z",
    }
    event = decode(payload)
    assert (event.notification_id, event.target_id) == (0, 0)
    assert (event.trigger_id, event.summary_text, event.fallback_text, event.trace_id) == ("",) * 4
    assert event.requested_at == datetime(2024, 5, 1, tzinfo=UTC)


def test_strings_are_trimmed() -> None:
    event = decode(
        good_payload(
            dedupe_key="  preview:pv-1\t",
            target_url="\n/schedule/preview/pv-1 ",
            preview_id="\u3000pv-1\u3000",  # ideographic space, trimmed by Go's TrimSpace too
            summary_text="  hi  ",
            trace_id=" t ",
        )
    )
    assert event.dedupe_key == "preview:pv-1"
    assert event.target_url == "/schedule/preview/pv-1"
    assert event.preview_id == "pv-1"
    assert event.summary_text == "hi"
    assert event.trace_id == "t"


def test_extra_unknown_field_accepted() -> None:
    event = decode(good_payload(priority="high", nested={"a": [1, 2]}))
    assert event.dedupe_key == "preview:pv-1"


def test_target_id_accepts_json_integer_only() -> None:
    assert decode(good_payload(target_id=9_007_199_254_740_993)).target_id == 9_007_199_254_740_993
    assert rejection(encode(good_payload(target_id="7"))).reason == (
        "invalid payload: Expected `int`, got `str` - at `$.target_id`"
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[]", "payload is not a JSON object"),
        (b'[{"user_id": 1}]', "payload is not a JSON object"),
        (b'"a string"', "payload is not a JSON object"),
        (b"12", "payload is not a JSON object"),
        (b"1.5", "payload is not a JSON object"),
        (b"null", "payload is not a JSON object"),
        (b"true", "payload is not a JSON object"),
        (b"", "payload is not valid JSON: Input data was truncated"),
        (b'{"user_id": ', "payload is not valid JSON: Input data was truncated"),
        (b"garbage", "payload is not valid JSON: JSON is malformed: invalid character (byte 0)"),
    ],
    ids=[
        "array",
        "array-of-object",
        "string",
        "integer",
        "float",
        "null",
        "bool",
        "empty",
        "truncated",
        "garbage",
    ],
)
def test_malformed_payload(raw: bytes, reason: str) -> None:
    rejected = rejection(raw)
    assert rejected.reason == reason
    assert rejected.reason_class == "malformed"


def test_trailing_data_is_malformed() -> None:
    rejected = rejection(encode(good_payload()) + b" {}")
    assert rejected.reason.startswith(
        "payload is not valid JSON: JSON is malformed: trailing characters (byte "
    )
    assert rejected.reason_class == "malformed"


def _without(field: str) -> dict[str, Any]:
    payload = good_payload()
    del payload[field]
    return payload


NUL = "\x00"


NOT_A_PATH = "target_url must be a relative path starting with '/'"
A_LINK = "target_url must be a relative path, not a link to another host"


@pytest.mark.parametrize(
    ("target_url", "reason"),
    [
        ("javascript:alert(1)", NOT_A_PATH),
        ("JaVaScRiPt:alert(1)", NOT_A_PATH),
        ("data:text/html,<script>alert(1)</script>", NOT_A_PATH),
        ("assistant/preview/1", NOT_A_PATH),
        ("/\\evil.example", "target_url must not contain backslashes"),
        ("/a\\b", "target_url must not contain backslashes"),
        ("///evil.example", A_LINK),
        ("/a\rb", "target_url must not contain control characters"),
        ("/a\nSet-Cookie: x", "target_url must not contain control characters"),
        ("/a\tb", "target_url must not contain control characters"),
        ("/a\x7fb", "target_url must not contain control characters"),
        ("/a\x00b", "target_url must not contain NUL characters"),
        ("/" + "a" * 2048, "target_url is too long (2049 > 2048 characters)"),
    ],
)
def test_target_url_hardening(target_url: str, reason: str) -> None:
    rejected = rejection(encode(good_payload(target_url=target_url)))
    assert rejected.reason == f"invalid payload: {reason}"
    assert rejected.reason_class == "invalid"


@pytest.mark.parametrize(
    "target_url", ["/", "/assistant/preview/asp_1?tab=diff#top", "/x/y:z", "/%5Cencoded"]
)
def test_plain_relative_paths_pass(target_url: str) -> None:
    event = decode_event(EVENT_TYPE, EVENT_VERSION, encode(good_payload(target_url=target_url)))
    assert event.target_url == target_url


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_without("user_id"), "Object missing required field `user_id`"),
        (_without("dedupe_key"), "Object missing required field `dedupe_key`"),
        (_without("requested_at"), "Object missing required field `requested_at`"),
        (good_payload(user_id="42"), "Expected `int`, got `str` - at `$.user_id`"),
        (good_payload(user_id=4.2), "Expected `int`, got `float` - at `$.user_id`"),
        (good_payload(user_id=True), "Expected `int`, got `bool` - at `$.user_id`"),
        (good_payload(user_id=None), "Expected `int`, got `null` - at `$.user_id`"),
        (good_payload(summary_text=None), "Expected `str`, got `null` - at `$.summary_text`"),
        (good_payload(dedupe_key=5), "Expected `str`, got `int` - at `$.dedupe_key`"),
        (good_payload(user_id=0), "user_id must be > 0"),
        (good_payload(user_id=-3), "user_id must be > 0"),
        (good_payload(user_id=2**63), "user_id is out of range for a 64-bit integer"),
        (good_payload(target_id=-(2**63) - 1), "target_id is out of range for a 64-bit integer"),
        (
            good_payload(notification_id=10**30),
            "notification_id is out of range for a 64-bit integer",
        ),
        (good_payload(dedupe_key=""), "dedupe_key must not be empty"),
        (good_payload(dedupe_key="   "), "dedupe_key must not be empty"),
        (good_payload(preview_id=""), "preview_id must not be empty"),
        (good_payload(target_url=" \t"), "target_url must not be empty"),
        (good_payload(target_url="https://evil.example/x"), NOT_A_PATH),
        (good_payload(target_url="/go?to=http://evil"), A_LINK),
        (good_payload(target_url="//evil.example/x"), A_LINK),
        (good_payload(target_url="  //evil.example/x"), A_LINK),
        (good_payload(dedupe_key=f"a{NUL}b"), "dedupe_key must not contain NUL characters"),
        (good_payload(summary_text=f"hi{NUL}"), "summary_text must not contain NUL characters"),
        (good_payload(trace_id=NUL), "trace_id must not contain NUL characters"),
        (good_payload(dedupe_key="k" * 513), "dedupe_key is too long (513 > 512 characters)"),
        (
            good_payload(target_url="/" + "u" * 2048),
            "target_url is too long (2049 > 2048 characters)",
        ),
        (
            good_payload(summary_text="总" * 10_001),
            "summary_text is too long (10001 > 10000 characters)",
        ),
        (
            good_payload(fallback_text="f" * 10_001),
            "fallback_text is too long (10001 > 10000 characters)",
        ),
        (good_payload(trigger_id="t" * 257), "trigger_id is too long (257 > 256 characters)"),
        (good_payload(trace_id="t" * 257), "trace_id is too long (257 > 256 characters)"),
        (
            good_payload(requested_at="2024-05-01T08:30:00"),
            "requested_at must be timezone-aware (RFC 3339 with an offset)",
        ),
        (
            good_payload(requested_at="yesterday"),
            "Invalid RFC3339 encoded datetime - at `$.requested_at`",
        ),
        (
            good_payload(requested_at=1714523400),
            "Expected `datetime`, got `int` - at `$.requested_at`",
        ),
    ],
    ids=[
        "missing-user_id",
        "missing-dedupe_key",
        "missing-requested_at",
        "user_id-str",
        "user_id-float",
        "user_id-bool",
        "user_id-null",
        "summary-null",
        "dedupe_key-int",
        "user_id-0",
        "user_id-negative",
        "user_id-over-bigint",
        "target_id-under-bigint",
        "notification_id-huge",
        "empty-dedupe_key",
        "blank-dedupe_key",
        "empty-preview_id",
        "blank-target_url",
        "absolute-url",
        "embedded-scheme",
        "protocol-relative-url",
        "protocol-relative-url-padded",
        "nul-dedupe_key",
        "nul-summary",
        "nul-trace_id",
        "oversize-dedupe_key",
        "oversize-target_url",
        "oversize-summary",
        "oversize-fallback",
        "oversize-trigger_id",
        "oversize-trace_id",
        "naive-requested_at",
        "garbage-requested_at",
        "numeric-requested_at",
    ],
)
def test_invalid_payload(payload: dict[str, Any], reason: str) -> None:
    rejected = rejection(encode(payload))
    assert rejected.reason == f"invalid payload: {reason}"
    assert rejected.reason_class == "invalid"


def test_size_limits_apply_after_trimming() -> None:
    event = decode(good_payload(dedupe_key="  " + "k" * 512 + "  "))
    assert len(event.dedupe_key) == 512


@pytest.mark.parametrize(
    ("event_type", "version", "reason", "reason_class"),
    [
        ("x", "1", "unknown event type 'x'", "unknown_type"),
        ("", "1", "unknown event type ''", "unknown_type"),
        (
            "Notification.Feishu.Requested",
            "1",
            "unknown event type 'Notification.Feishu.Requested'",
            "unknown_type",
        ),
        ("bad\nline", "1", "unknown event type 'bad\\nline'", "unknown_type"),
        ("t" * 500, "1", "unknown event type '" + "t" * 100 + "'...", "unknown_type"),
        (
            EVENT_TYPE,
            "2",
            "unsupported event_version '2' for notification.feishu.requested",
            "unsupported_version",
        ),
        (
            EVENT_TYPE,
            "1.0",
            "unsupported event_version '1.0' for notification.feishu.requested",
            "unsupported_version",
        ),
        (
            EVENT_TYPE,
            "",
            "unsupported event_version '' for notification.feishu.requested",
            "unsupported_version",
        ),
    ],
    ids=[
        "unknown",
        "empty-type",
        "type-case",
        "type-newline",
        "type-long",
        "version-2",
        "version-1.0",
        "version-empty",
    ],
)
def test_type_and_version(event_type: str, version: str, reason: str, reason_class: str) -> None:
    rejected = rejection(encode(good_payload()), event_type=event_type, version=version)
    assert rejected.reason == reason
    assert rejected.reason_class == reason_class


def test_type_is_checked_before_payload() -> None:
    assert rejection(b"garbage", event_type="other").reason_class == "unknown_type"
    assert rejection(b"garbage", version="9").reason_class == "unsupported_version"


def test_direct_construction_is_validated_and_trimmed() -> None:
    when = datetime(2024, 5, 1, tzinfo=UTC)
    event = FeishuNotificationRequested(
        user_id=1, preview_id=" p ", dedupe_key=" d ", target_url=" /x ", requested_at=when
    )
    assert (event.preview_id, event.dedupe_key, event.target_url) == ("p", "d", "/x")
    with pytest.raises(ValueError, match="requested_at must be timezone-aware"):
        FeishuNotificationRequested(
            user_id=1,
            preview_id="p",
            dedupe_key="d",
            target_url="/x",
            requested_at=datetime(2024, 5, 1),
        )
    with pytest.raises(ValueError, match="user_id must be > 0"):
        FeishuNotificationRequested(
            user_id=0, preview_id="p", dedupe_key="d", target_url="/x", requested_at=when
        )


def test_struct_is_frozen() -> None:
    event = decode(good_payload())
    with pytest.raises(AttributeError):
        event.user_id = 5  # type: ignore[misc]


def test_roundtrip_through_msgspec_encode() -> None:
    event = decode(good_payload())
    assert decode_event(EVENT_TYPE, EVENT_VERSION, msgspec.json.encode(event)) == event


def test_reason_classes_are_bounded() -> None:
    assert set(REASON_CLASSES) == {
        "unknown_type", "unsupported_version", "malformed", "invalid", "too_large"
    }  # fmt: skip
    assert events.EVENT_TYPE == "notification.feishu.requested"
    assert events.EVENT_VERSION == "1"


# -- ordering_key (optional, additive) --------------------------------------------------------


def test_ordering_key_is_optional_and_absent_means_no_key() -> None:
    assert decode(good_payload()).ordering_key is msgspec.UNSET


def test_ordering_key_is_trimmed_and_bounded() -> None:
    assert decode(good_payload(ordering_key="  task:19 ")).ordering_key == "task:19"
    longest = "k" * events.ORDERING_KEY_MAX_CHARS
    assert decode(good_payload(ordering_key=f" {longest} ")).ordering_key == longest


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "ordering_key must not be empty when present (leave it out instead)"),
        ("  \t", "ordering_key must not be empty when present (leave it out instead)"),
        ("k" * 257, "ordering_key is too long (257 > 256 characters)"),
        ("a\x00b", "ordering_key must not contain NUL characters"),
        (None, "Expected `str`, got `null` - at `$.ordering_key`"),
        (19, "Expected `str`, got `int` - at `$.ordering_key`"),
    ],
    ids=["empty", "blank", "oversize", "nul", "null", "number"],
)
def test_a_bad_ordering_key_rejects_the_row_with_a_reason(value: object, reason: str) -> None:
    rejected = rejection(encode(good_payload(ordering_key=value)))
    assert rejected.reason == f"invalid payload: {reason}"
    assert rejected.reason_class == "invalid"


def test_an_event_with_an_ordering_key_roundtrips() -> None:
    event = decode(good_payload(ordering_key="task:19"))
    assert decode_event(EVENT_TYPE, EVENT_VERSION, msgspec.json.encode(event)) == event
