"""What a reply means: the classifiers a provider's ``classify`` is built from.

``status_verdict`` judges an HTTP status by its family (``classify_status``, the seed's
mapping), with a provider's special statuses first; ``coded_verdict`` and ``status_and_code``
read the application code many platforms put in the body of an HTTP 200 (``reply_code``).
``parse_retry_after`` reads the ``Retry-After`` header a temporary failure honours.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import msgspec

from outbox_notifier.names import ErrorCode, Outcome

from .model import HttpReply, Verdict


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


def _http_date(value: str | None) -> datetime | None:
    """An HTTP date (RFC 9110: IMF-fixdate, or the obsolete forms) as an aware datetime."""
    if not value or not value.strip():
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_retry_after(value: str | None, *, date: str | None = None) -> float | datetime | None:
    """What a ``Retry-After`` header asks for: seconds to wait, or the time to come back.

    Delta-seconds are returned as they are. An HTTP date is read against the reply's own
    ``Date`` header (``date``), the sender's clock against the sender's clock, so neither
    clock's error moves the wait; a date in the past gives 0.0. Without a readable ``Date`` the
    date itself is returned: the caller must measure it against a clock it trusts (the daemon
    hands it to the database), never the host's. None when the header is absent or unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    sent = _http_date(date)
    if sent is None:
        return when
    try:
        delta = (when - sent).total_seconds()
    except OverflowError:
        return None
    return max(0.0, delta) if math.isfinite(delta) else None


def decode_json_object(reply: bytes) -> dict[str, Any] | None:
    """A reply body's JSON object; None for an empty, unreadable or non-object body."""
    if not reply.strip():
        return None
    try:
        parsed: Any = msgspec.json.decode(reply)
    except msgspec.DecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def reply_message_id(parsed: dict[str, Any]) -> str | None:
    """A non-empty string ``message_id`` at the top of a reply object or under ``data``."""
    for holder in (parsed, parsed.get("data")):
        if isinstance(holder, dict):
            value = holder.get("message_id")
            if isinstance(value, str) and value:
                return value
    return None


def status_verdict(
    status: int,
    label: str,
    special: Mapping[int, tuple[Outcome, ErrorCode]] | None = None,
) -> Verdict:
    """The verdict of an HTTP status by its family (``classify_status``), ``special`` statuses
    first. A failure reads ``"<label> returned HTTP <status>"``, with the reason for a
    redirect (never followed) or ``endpoint_gone`` (the recipient is switched off)."""
    outcome, code = (special or {}).get(status) or classify_status(status)
    if outcome is Outcome.SUCCESS:
        return Verdict(outcome=outcome)
    message = f"{label} returned HTTP {status}"
    if 300 <= status < 400:
        message += ": redirect not followed"
    elif code is ErrorCode.ENDPOINT_GONE:
        message += ": endpoint gone, channel to be disabled"
    return Verdict(outcome=outcome, error_code=code, error_message=message)


class ReplyCode(msgspec.Struct, frozen=True, kw_only=True):
    """An application error code a provider puts in its reply body (often in an HTTP 200)."""

    code: int
    msg: str


def reply_code(body: bytes, *fields: tuple[str, str]) -> ReplyCode | None:
    """The first integer code (and its message, stripped) among ``fields``, each a
    ``(code key, message key)`` pair of a JSON object body; None when there is none.
    A boolean is not a code, and a non-string message is empty."""
    parsed = decode_json_object(body)
    if parsed is None:
        return None
    for code_key, msg_key in fields or (("code", "msg"),):
        code = parsed.get(code_key)
        if isinstance(code, int) and not isinstance(code, bool):
            msg = parsed.get(msg_key)
            return ReplyCode(code=code, msg=msg.strip() if isinstance(msg, str) else "")
    return None


def body_message_id(body: bytes) -> str | None:
    """``reply_message_id`` of a reply body; None when it is no JSON object."""
    parsed = decode_json_object(body)
    return None if parsed is None else reply_message_id(parsed)


def status_and_code(
    reply: HttpReply, label: str, *fields: tuple[str, str]
) -> tuple[Verdict, ReplyCode | None]:
    """For a provider that answers with an application code in the body (often in an HTTP
    200): the status's verdict (``status_verdict``) and the reply's non-zero code, if any
    (``reply_code``). A 2xx without such a code is a success carrying the reply's message id.
    """
    verdict = status_verdict(reply.status, label)
    coded = reply_code(reply.body, *fields)
    if coded is not None and coded.code == 0:
        coded = None
    if coded is None and verdict.outcome is Outcome.SUCCESS:
        verdict = Verdict(outcome=Outcome.SUCCESS, provider_message_id=body_message_id(reply.body))
    return verdict, coded


def coded_verdict(
    reply: HttpReply,
    label: str,
    judge: Callable[[int, str], tuple[Outcome, ErrorCode | None]],
    *fields: tuple[str, str],
    code_label: str | None = None,
) -> Verdict:
    """The verdict of a provider that answers with an application code (``status_and_code``):
    ``judge`` gives a non-zero code's result from the code and its message; 429 and 5xx stay
    as the status says. A status's message names ``label``, a code's reads
    ``"<code_label> code <code>: <msg>"`` (``code_label`` defaults to ``label``), plus the
    status when it is not 2xx."""
    verdict, coded = status_and_code(reply, label, *fields)
    if coded is None:
        return verdict
    name = label if code_label is None else code_label
    said = f"{name} code {coded.code}: {coded.msg}" if coded.msg else f"{name} code {coded.code}"
    if verdict.outcome is Outcome.TEMPORARY_FAIL:
        return msgspec.structs.replace(verdict, error_message=f"{verdict.error_message}, {said}")
    outcome, code = judge(coded.code, coded.msg)
    if not 200 <= reply.status < 300:
        said += f" (HTTP {reply.status})"
    return Verdict(outcome=outcome, error_code=code, error_message=said)
