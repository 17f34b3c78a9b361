from __future__ import annotations

import pytest

from outbox_notifier.message import (
    DEFAULT_FALLBACK_TEMPLATE,
    ERROR_TEXT_MAX_RUNES,
    contains_external_link,
    message_text,
    normalize_template,
    trim_space,
    truncate_runes,
)
from outbox_notifier.settings import Settings

DEFAULT = DEFAULT_FALLBACK_TEMPLATE
SUMMARY_MAX_RUNES = 180  # the seed's defaultSummaryMaxRunes
CJK_200 = "日" * 120 + "程" * 80


def test_constants_match_the_seed() -> None:
    assert DEFAULT_FALLBACK_TEMPLATE == "我为你生成了一份日程调整建议,请回到系统确认是否应用。"
    assert Settings().summary_max_runes == SUMMARY_MAX_RUNES  # the setting's default
    assert ERROR_TEXT_MAX_RUNES == 2000


@pytest.mark.parametrize(
    ("summary", "fallback", "expected"),
    [
        ("会议改到三点", "请查看", ("会议改到三点", "请查看", False)),
        ("  会议改到三点\n", "  请查看 ", ("会议改到三点", "请查看", False)),
        ("", "请查看", ("", "请查看", True)),
        ("   ", "请查看", ("", "请查看", True)),
        ("", "", ("", DEFAULT, True)),
        ("", "  \t", ("", DEFAULT, True)),
        ("会议", "", ("会议", DEFAULT, False)),
        ("详情见 https://evil.example", "请查看", ("", "请查看", True)),
        ("see ftp://x", "fb", ("", "fb", True)),
        ("visit www.example.com", "fb", ("", "fb", True)),
        ("visit WWW.Example.com", "fb", ("", "fb", True)),
        ("visit Www.example.com", "", ("", DEFAULT, True)),
        ("HTTPS://X", "fb", ("", "fb", True)),
        ("www", "fb", ("www", "fb", False)),
        ("a:/b and wwwx", "fb", ("a:/b and wwwx", "fb", False)),
        (CJK_200, "fb", ("日" * 120 + "程" * 60, "fb", False)),
        ("日" * 180, "fb", ("日" * 180, "fb", False)),
        ("日" * 179 + " " + "x", "fb", ("日" * 179, "fb", False)),
        ("😀" * 200, "fb", ("😀" * 180, "fb", False)),
    ],
    ids=[
        "plain",
        "trimmed",
        "empty-summary",
        "blank-summary",
        "both-empty",
        "blank-fallback",
        "summary-kept-default-fallback",
        "https-link",
        "other-scheme",
        "www",
        "www-upper",
        "www-mixed-default-fallback",
        "scheme-upper",
        "www-without-dot",
        "near-misses",
        "cjk-cut-180",
        "cjk-exactly-180",
        "cut-then-trim",
        "astral-code-points",
    ],
)
def test_normalize_template(summary: str, fallback: str, expected: tuple[str, str, bool]) -> None:
    assert normalize_template(summary, fallback, SUMMARY_MAX_RUNES) == expected


def test_normalize_template_custom_limit() -> None:
    assert normalize_template("abcdef", "", 3) == ("abc", DEFAULT, False)


@pytest.mark.parametrize("limit", [0, -1])
def test_normalize_template_rejects_non_positive_limit(limit: int) -> None:
    with pytest.raises(ValueError, match="summary_max_runes must be > 0"):
        normalize_template("a", "b", limit)


URL = "/schedule/preview/1"


@pytest.mark.parametrize(
    ("summary", "fallback", "fallback_used", "target_url", "expected"),
    [
        ("会议改到三点", "fb", False, URL, f"会议改到三点\n{URL}"),
        ("  会议改到三点  ", "fb", False, f"  {URL} ", f"会议改到三点\n{URL}"),
        ("会议改到三点", "请查看", True, URL, f"请查看\n{URL}"),
        ("", "请查看", False, URL, f"请查看\n{URL}"),
        ("", "", False, URL, f"{DEFAULT}\n{URL}"),
        ("", "  ", True, URL, f"{DEFAULT}\n{URL}"),
        ("s", "", True, URL, f"{DEFAULT}\n{URL}"),
        (f"打开 {URL} 查看", "fb", False, URL, f"打开 {URL} 查看"),
        ("s", f"请打开 {URL}", True, URL, f"请打开 {URL}"),
        ("会议", "fb", False, "", "会议"),
        ("会议", "fb", False, "   ", "会议"),
    ],
    ids=[
        "summary-plus-url",
        "trimmed",
        "fallback-used",
        "empty-summary-uses-fallback",
        "default-template",
        "blank-fallback-default-template",
        "fallback-used-but-empty",
        "url-not-duplicated",
        "url-in-fallback-not-duplicated",
        "empty-url",
        "blank-url",
    ],
)
def test_message_text(
    summary: str, fallback: str, fallback_used: bool, target_url: str, expected: str
) -> None:
    assert message_text(summary, fallback, fallback_used, target_url) == expected


def test_message_text_from_normalized_template() -> None:
    summary, fallback, used = normalize_template("见 www.x.com", "", SUMMARY_MAX_RUNES)
    assert message_text(summary, fallback, used, URL) == f"{DEFAULT}\n{URL}"


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        ("abc", 0, ""),
        ("abc", -5, ""),
        ("  abc  ", 10, "abc"),
        ("  abcdef  ", 3, "abc"),
        ("错" * 2500, ERROR_TEXT_MAX_RUNES, "错" * 2000),
        ("e" * 2000, ERROR_TEXT_MAX_RUNES, "e" * 2000),
        (" " + "e" * 2001 + " ", ERROR_TEXT_MAX_RUNES, "e" * 2000),
        ("", 5, ""),
    ],
    ids=["zero", "negative", "trim", "cut", "cjk-2000", "exactly-2000", "trim-then-cut", "empty"],
)
def test_truncate_runes(value: str, limit: int, expected: str) -> None:
    assert truncate_runes(value, limit) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (" \t\n\v\f\r x \r\n", "x"),
        ("\u3000x\u00a0", "x"),
        ("\x85x\u2028", "x"),
        (
            "\x1fx\x1c",
            "\x1fx\x1c",
        ),  # Go's TrimSpace keeps information separators; str.strip doesn't
        ("\u200bx", "\u200bx"),  # zero-width space is not white space in Go either
    ],
    ids=["ascii", "ideographic-nbsp", "nel-line-separator", "info-separators", "zwsp"],
)
def test_trim_space_matches_go(value: str, expected: str) -> None:
    assert trim_space(value) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a://b", True), ("WwW.x", True), ("plain", False), ("", False)],
)
def test_contains_external_link(text: str, expected: bool) -> None:
    assert contains_external_link(text) is expected
