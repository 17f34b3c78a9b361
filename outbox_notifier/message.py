"""Message text rules, ported from the seed service.

Pure functions, no I/O. Lengths are counted in code points: indexing a Python ``str`` is by code
point, which is what Go's ``[]rune`` conversion counts, so a cut at N runes in the seed is ``s[:N]``
here.

Trimming follows Go's ``strings.TrimSpace`` exactly (see :func:`trim_space`), not ``str.strip``,
so a record built here holds the same text the seed would have stored.
"""

from __future__ import annotations

from typing import Final

DEFAULT_FALLBACK_TEMPLATE: Final = "我为你生成了一份日程调整建议,请回到系统确认是否应用。"
"""The seed's ``defaultFallbackTemplate``: used when an event carries no usable fallback text."""

#: What every provider's message is about: the event name and version the Flow body and the
#: webhook carry, the title and the action label.
EVENT: Final = "smartflow.schedule_adjustment_ready"
EVENT_VERSION: Final = "1"
MESSAGE_TITLE: Final = "SmartFlow 日程调整建议"
MESSAGE_ACTION_TEXT: Final = "查看并确认调整"
#: A digest's title (one message for several records, chat bots only), naming the count in
#: the single message's language: ``digest_title(3)`` is ``SmartFlow 日程调整建议 (3 条)``.
DIGEST_TITLE: Final = MESSAGE_TITLE + " ({count} 条)"

ERROR_TEXT_MAX_RUNES: Final = 2000
"""Provider error text is cut to this many code points before it is stored (seed: 2000)."""

# Go's unicode.IsSpace set, which strings.TrimSpace uses. str.strip() differs: it also strips
# U+001C..U+001F (information separators), which Go keeps.
_GO_SPACE: Final = (
    "\t\n\v\f\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def trim_space(value: str) -> str:
    """Strip leading and trailing white space as Go's ``strings.TrimSpace`` does."""
    return value.strip(_GO_SPACE)


def contains_external_link(text: str) -> bool:
    """Whether ``text`` looks like it carries a link: ``://`` or ``www.``, case-insensitively.

    Summaries are shown as-is by every provider; a link in them could point anywhere, so such a
    summary is replaced by the fallback text (the seed's ``containsExternalLink``).
    """
    lowered = trim_space(text).lower()
    return "://" in lowered or "www." in lowered


def normalize_template(
    summary_text: str, fallback_text: str, summary_max_runes: int
) -> tuple[str, str, bool]:
    """Return ``(summary, fallback, fallback_used)`` as stored on a new record.

    The seed's ``normalizeMessageTemplate``:

    - fallback is trimmed, or :data:`DEFAULT_FALLBACK_TEMPLATE` when empty;
    - an empty summary, or one containing a link, becomes ``""`` with ``fallback_used=True``;
    - otherwise the summary is cut to ``summary_max_runes`` code points and trimmed again.

    ``summary_max_runes`` must be positive (the settings validate it; the seed silently replaced a
    non-positive value by 180).
    """
    if summary_max_runes <= 0:
        raise ValueError(f"summary_max_runes must be > 0, got {summary_max_runes}")
    fallback = trim_space(fallback_text) or DEFAULT_FALLBACK_TEMPLATE
    summary = trim_space(summary_text)
    if not summary or contains_external_link(summary):
        return "", fallback, True
    return trim_space(summary[:summary_max_runes]), fallback, False


def message_text(
    summary_text: str, fallback_text: str, fallback_used: bool, target_url: str
) -> str:
    """Build the text sent to the user, as the seed's ``buildSendRequest``.

    The trimmed summary, or the trimmed fallback when ``fallback_used`` or the summary is empty, or
    :data:`DEFAULT_FALLBACK_TEMPLATE` when both are empty. The trimmed target URL is appended on a
    new line unless the text already contains it.
    """
    text = trim_space(summary_text)
    if fallback_used or not text:
        text = trim_space(fallback_text)
    if not text:
        text = DEFAULT_FALLBACK_TEMPLATE
    url = trim_space(target_url)
    if url not in text:
        text = trim_space(text) + "\n" + url
    return trim_space(text)


def digest_title(count: int) -> str:
    """The title of a digest of ``count`` records (:data:`DIGEST_TITLE`)."""
    return DIGEST_TITLE.format(count=count)


def truncate_runes(value: str, limit: int) -> str:
    """Trim ``value``, then keep at most ``limit`` code points (``""`` when ``limit <= 0``).

    The seed's ``truncateText``; used for error text with :data:`ERROR_TEXT_MAX_RUNES`.
    """
    if limit <= 0:
        return ""
    return trim_space(value)[:limit]
