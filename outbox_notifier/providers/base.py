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

import asyncio
import functools
import math
import re
import time
import types
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Protocol, TypedDict

import httpx
import msgspec

from outbox_notifier import __version__, message
from outbox_notifier.egress import DestinationForbidden
from outbox_notifier.message import ERROR_TEXT_MAX_RUNES
from outbox_notifier.names import (  # re-exported: providers and their tests use them from here
    PERMANENT_ERROR_CODES as PERMANENT_ERROR_CODES,
)
from outbox_notifier.names import (
    RETRYABLE_ERROR_CODES as RETRYABLE_ERROR_CODES,
)
from outbox_notifier.names import ErrorCode as ErrorCode
from outbox_notifier.names import Outcome as Outcome

from .urls import UrlPolicy as UrlPolicy  # re-exported, as are the two below
from .urls import UrlRejected as UrlRejected
from .urls import scrub as scrub


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
    provider's ``Retry-After`` so the retry can honour it; ``retry_at`` carries it instead when
    it is an HTTP date the reply gave no ``Date`` to read against (the database's clock then
    turns it into a delay: the host's clock is never the reference). ``disable_target`` asks
    the daemon to disable the user's channel: the receiver said the endpoint is gone for good
    (HTTP 410), so every later delivery to it would fail the same way.
    """

    outcome: Outcome
    error_code: ErrorCode | None = None
    error_message: str | None = None
    provider_message_id: str | None = None
    http_status: int | None = None
    request_json: bytes | None = None
    response_body: bytes | None = None
    response_truncated: bool = False
    retry_after_s: float | None = None
    retry_at: datetime | None = None
    duration_s: float = 0.0
    disable_target: bool = False


class Provider(Protocol):
    """A delivery channel. ``send`` must never raise for a delivery problem."""

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
    # The transport's own byte stream: ``aiter_raw`` would add a re-chunker, a timer and two
    # generator layers per chunk on the way, with nothing to gain from them here.
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):
        raise TypeError("an async transport answered with a sync body")
    async for chunk in stream:
        remaining = max_bytes - size
        if len(chunk) > remaining:
            chunks.append(chunk[:remaining])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def truncate(text: str, limit: int = ERROR_TEXT_MAX_RUNES) -> str:
    """Cut ``text`` to ``limit`` characters (code points, like the seed's runes)."""
    return text if len(text) <= limit else text[:limit]


def skipped(reason: str) -> SendResult:
    """The result for a user without a usable channel: nothing was sent."""
    return SendResult(
        outcome=Outcome.SKIPPED, error_code=ErrorCode.RECIPIENT_MISSING, error_message=reason
    )


def utc_now() -> datetime:
    """The current time in UTC: every provider's default clock."""
    return datetime.now(UTC)


def check_limits(*, timeout_s: float, response_body_max_bytes: int) -> None:
    """Raise ``ValueError`` for a non-positive ``timeout_s`` or a negative body cap."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if response_body_max_bytes < 0:
        raise ValueError(
            f"response_body_max_bytes must not be negative, got {response_body_max_bytes!r}"
        )


def action_url(frontend_base_url: str, target_url: str) -> str:
    """The link a message offers: ``target_url`` joined to ``frontend_base_url``.

    ``frontend_base_url`` comes without a trailing slash; when it is empty, or the target is
    already an absolute ``http(s)`` URL, the (stripped) target is the link itself.
    """
    target_url = target_url.strip()
    if not frontend_base_url or target_url.startswith(("https://", "http://")):
        return target_url
    return frontend_base_url + "/" + target_url.lstrip("/")


def is_header_token(value: str) -> bool:
    """Visible ASCII only: no spaces, control characters or line breaks."""
    return value.isascii() and all(0x21 <= ord(c) <= 0x7E for c in value)


def resolve_target(
    delivery: Delivery, policy: UrlPolicy, what: str, *, url_name: str = "webhook url"
) -> tuple[Target, httpx.URL] | SendResult:
    """The delivery's target and its checked URL, or the result that ends the call unsent.

    No target, a disabled one or one without a URL is ``skipped`` (the messages name the
    channel as ``what`` and its URL as ``url_name``); a URL outside ``policy`` is a permanent
    ``invalid_url``, its message naming only scheme and host.
    """
    target = delivery.target
    if target is None:
        return skipped(f"user has no {what} channel configured")
    if not target.enabled:
        return skipped(f"user's {what} channel is disabled")
    if not target.webhook_url.strip():
        return skipped(f"user's {what} channel has no {url_name}")
    try:
        url = policy.check(target.webhook_url)
    except UrlRejected as exc:
        return SendResult(
            outcome=Outcome.PERMANENT_FAIL,
            error_code=ErrorCode.INVALID_URL,
            error_message=truncate(str(exc)),
        )
    return target, url


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


class HttpReply(msgspec.Struct, frozen=True, kw_only=True):
    """What came back from one ``post_capped`` call."""

    status: int
    headers: Mapping[str, str]  # httpx's, so names match whatever their case
    body: bytes
    truncated: bool
    duration_s: float


@functools.lru_cache(maxsize=64)
def _timeouts(timeout_s: float) -> Mapping[str, float | None]:
    # The transport's per-phase bounds (connect, read, write, pool), as httpx passes them;
    # read-only, since every request of this timeout shares it.
    return types.MappingProxyType(httpx.Timeout(timeout_s).as_dict())


async def post_capped(
    transport: httpx.AsyncBaseTransport,
    url: httpx.URL,
    *,
    content: bytes,
    headers: Mapping[str, str],
    timeout_s: float,
    response_body_max_bytes: int,
    request_json: bytes | None,
    secrets: Iterable[str] = (),
) -> HttpReply | SendResult:
    """POST ``content`` once; the reply with its body capped, or a retryable failure result.

    The whole call, body included, has one deadline of ``timeout_s``; the delivery lease must
    stay longer than it. The request goes to ``transport`` as built here: no client layer adds
    cookies, auth or redirects (a redirect could lead off the allowed hosts, so a 3xx is
    only ever a reply). A transport failure, or a body that cannot
    be read after the status arrived, is a ``TEMPORARY_FAIL`` result (``provider_timeout``
    for timeouts, ``network_error`` otherwise) carrying ``request_json``; its message has the
    URL's path and query and ``secrets`` masked. A destination the egress guard refused is a
    ``PERMANENT_FAIL`` ``destination_forbidden`` with no ``request_json``: nothing was sent.
    Only cancellation propagates.
    """
    started = time.perf_counter()
    status: int | None = None
    try:
        request = httpx.Request(
            "POST",
            url,
            content=content,
            headers=headers,
            extensions={"timeout": _timeouts(timeout_s)},
        )
        async with asyncio.timeout(timeout_s):
            response = await transport.handle_async_request(request)
            try:
                status = response.status_code
                body, truncated = await read_body_capped(response, response_body_max_bytes)
            finally:
                await response.aclose()
    except DestinationForbidden as exc:
        return SendResult(
            outcome=Outcome.PERMANENT_FAIL,
            error_code=ErrorCode.DESTINATION_FORBIDDEN,
            error_message=truncate(str(exc)),
            duration_s=time.perf_counter() - started,
        )
    except (httpx.TimeoutException, TimeoutError) as exc:
        code = ErrorCode.PROVIDER_TIMEOUT
        kind = type(exc).__name__
        detail = str(exc) or f"no reply within {timeout_s:g}s"
    except Exception as exc:  # every transport error and anything unforeseen: retry
        code = ErrorCode.NETWORK_ERROR
        kind = type(exc).__name__
        detail = str(exc)
    else:
        return HttpReply(
            status=response.status_code,
            headers=response.headers,
            body=body,
            truncated=truncated,
            duration_s=time.perf_counter() - started,
        )
    message = f"{kind}: {detail}" if detail else kind
    if status is not None:
        message = f"HTTP {status}, reading the reply failed: {message}"
    return SendResult(
        outcome=Outcome.TEMPORARY_FAIL,
        error_code=code,
        error_message=truncate(scrub(message, url, secrets)),
        http_status=status,
        request_json=request_json,
        duration_s=time.perf_counter() - started,
    )


# -- the provider template: prepare, one shared sender, classify --------------------------


class PreparedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One provider call, ready to send: what ``HttpProvider.prepare`` returns.

    ``url`` is the final URL, query parameters included (a provider may sign into them);
    ``stored`` is the request as the record keeps it (``provider_request_json``), with every
    secret masked; ``secrets`` are masked in any error message the call produces.
    """

    url: httpx.URL
    body: bytes
    headers: Mapping[str, str]
    stored: bytes
    secrets: tuple[str, ...] = ()


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What ``HttpProvider.classify`` makes of a reply. The sender adds the rest of the
    ``SendResult``: status, bodies, timing, ``Retry-After`` for a temporary failure, and
    ``disable_target`` for ``endpoint_gone``. ``error_message`` is truncated and scrubbed of
    the URL's key and the request's secrets by the sender."""

    outcome: Outcome
    error_code: ErrorCode | None = None
    error_message: str | None = None
    provider_message_id: str | None = None


class NotSent(Exception):
    """Raised by ``prepare`` when the call must not be made (a configuration fault, a body
    that cannot fit): a ``PERMANENT_FAIL`` with ``code`` unless ``outcome`` says otherwise."""

    def __init__(
        self, code: ErrorCode, message: str, outcome: Outcome = Outcome.PERMANENT_FAIL
    ) -> None:
        super().__init__(message)
        self.result = SendResult(outcome=outcome, error_code=code, error_message=message)


USER_AGENT = f"outbox-notifier/{__version__}"


def json_headers(**extra: str) -> dict[str, str]:
    """Headers of a JSON POST, plus ``extra``."""
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": USER_AGENT,
        # Only raw bytes can be capped before they are read; compression would defeat that.
        "Accept-Encoding": "identity",
        **extra,
    }


def bearer_auth(target: Target) -> dict[str, str]:
    """The ``Authorization`` header of a ``bearer`` channel with a token, else none.

    Raises ``NotSent`` for a token that cannot be a header value: a configuration fault, not
    worth retrying, and the HTTP layer's own error would quote the value.
    """
    token = (target.auth_secret or "").strip() if target.auth_kind == "bearer" else ""
    if not token:
        return {}
    if not is_header_token(token):
        raise NotSent(
            ErrorCode.PROVIDER_AUTH_FAILED,
            "bearer token has characters not allowed in an HTTP header",
        )
    return {"Authorization": "Bearer " + token}


def status_verdict(
    status: int,
    label: str,
    special: Mapping[int, tuple[Outcome, ErrorCode]] | None = None,
) -> Verdict:
    """The verdict of an HTTP status by its family (``classify_status``), ``special`` statuses
    first. A failure reads ``"<label> returned HTTP <status>"``, with the reason for a
    redirect (never followed) or ``endpoint_gone`` (the channel is disabled)."""
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
    codes: Mapping[int, tuple[Outcome, ErrorCode]],
    *fields: tuple[str, str],
) -> Verdict:
    """The verdict of a provider that answers with an application code (``status_and_code``):
    a non-zero code maps through ``codes``, any code not in it is a permanent
    ``payload_invalid``; 429 and 5xx stay as the status says. The message reads
    ``"<label> code <code>: <msg>"``, plus the status when it is not 2xx."""
    verdict, coded = status_and_code(reply, label, *fields)
    if coded is None:
        return verdict
    said = f"{label} code {coded.code}: {coded.msg}" if coded.msg else f"{label} code {coded.code}"
    if verdict.outcome is Outcome.TEMPORARY_FAIL:
        return Verdict(
            outcome=verdict.outcome,
            error_code=verdict.error_code,
            error_message=f"{verdict.error_message}, {said}",
        )
    outcome, code = codes.get(coded.code, (Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID))
    if not 200 <= reply.status < 300:
        said += f" (HTTP {reply.status})"
    return Verdict(outcome=outcome, error_code=code, error_message=said)


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


def rfc3339(when: datetime) -> str:
    """``when`` in UTC to the second, as ``2024-01-01T00:00:00Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class HttpOptions(TypedDict, total=False):
    """``HttpProvider``'s options, for a subclass that adds its own (``**options``)."""

    frontend_base_url: str
    allowed_schemes: Iterable[str]
    allowed_hosts: Iterable[str] | None
    path_prefix: str | None
    timeout_s: float
    response_body_max_bytes: int
    clock: Callable[[], datetime]


class HttpProvider:
    """The template of a webhook-calling provider: ``send`` resolves the channel and checks
    its URL, asks ``prepare`` for the request, sends it once through the shared sender
    (``post_capped``: deadline, body cap, timing, transport errors, the egress guard), and
    asks ``classify`` what the reply means. A subclass writes only those two steps and sets
    ``label`` (messages name the channel by it) and its URL policy defaults.

    Usage (any subclass; a subclass may add options of its own)::

        async with build_transport(EgressConfig()) as transport:  # outbox_notifier.httpclient
            provider = FeishuFlowProvider(
                transport,
                frontend_base_url="https://app.example",
                allowed_schemes=("https",),
                allowed_hosts=("feishu.cn",),
                path_prefix="/flow/api/trigger-webhook/",
            )
            result = await provider.send(delivery)

    ``transport`` is shared and owned by the caller (the daemon's is
    ``httpclient.EgressTransport``; a test may hand in ``httpx.MockTransport``).
    ``allowed_hosts`` match exactly or as a parent domain; an empty tuple allows any host
    only where ``any_host`` is set. ``clock`` gives timestamps (a ``Retry-After`` date is read
    against the reply's ``Date``, never against it).
    """

    label: ClassVar[str]
    url_label: ClassVar[str] = "webhook url"
    default_hosts: ClassVar[tuple[str, ...]] = ()
    default_path_prefix: ClassVar[str] = "/"
    # A URL that is itself a credential must only ever go to known hosts.
    any_host: ClassVar[bool] = False

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        frontend_base_url: str = "",
        allowed_schemes: Iterable[str] = ("https",),
        allowed_hosts: Iterable[str] | None = None,
        path_prefix: str | None = None,
        timeout_s: float = 5.0,
        response_body_max_bytes: int = 65536,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        check_limits(timeout_s=timeout_s, response_body_max_bytes=response_body_max_bytes)
        schemes = tuple(allowed_schemes)
        if not schemes:
            raise ValueError("allowed_schemes must not be empty")
        hosts = self.default_hosts if allowed_hosts is None else tuple(allowed_hosts)
        if not hosts and not self.any_host:
            raise ValueError("allowed_hosts must not be empty")
        self._transport = transport
        self._frontend_base_url = frontend_base_url.strip().rstrip("/")
        self._url_policy = UrlPolicy(
            schemes=schemes,
            hosts=hosts,
            path_prefix=self.default_path_prefix if path_prefix is None else path_prefix,
        )
        self._timeout_s = timeout_s
        self._response_max_bytes = response_body_max_bytes
        self._clock = clock

    def check_url(self, raw_url: str) -> httpx.URL:
        """Parse ``raw_url`` and enforce the URL policy; raise ``UrlRejected`` if outside it."""
        return self._url_policy.check(raw_url)

    def action_url(self, delivery: Delivery) -> str:
        """The link the message offers (see ``action_url``)."""
        return action_url(self._frontend_base_url, delivery.target_url)

    def message_fields(self, delivery: Delivery) -> dict[str, Any]:
        """``title``, ``action_text`` and ``action_url`` of the message, as keywords; each body
        names its text field itself (``summary``, ``message_text``)."""
        return {
            "title": message.MESSAGE_TITLE,
            "action_text": message.MESSAGE_ACTION_TEXT,
            "action_url": self.action_url(delivery),
        }

    def button_link(self, delivery: Delivery) -> str | None:
        """The action URL when it is an absolute ``http(s)`` URL, else None: chat platforms
        refuse a button whose link is relative."""
        link = self.action_url(delivery)
        return link if link.startswith(("https://", "http://")) else None

    def prepare(self, delivery: Delivery, target: Target, url: httpx.URL) -> PreparedRequest:
        """The request for ``delivery`` to ``url`` (already checked); raise ``NotSent`` when
        no call may be made."""
        raise NotImplementedError

    def classify(self, reply: HttpReply) -> Verdict:
        """What the reply (status, headers, capped body) means."""
        raise NotImplementedError

    async def send(self, delivery: Delivery) -> SendResult:
        """Deliver once; every failure is a ``SendResult``, only cancellation propagates."""
        resolved = resolve_target(delivery, self._url_policy, self.label, url_name=self.url_label)
        if isinstance(resolved, SendResult):
            return resolved
        try:
            request = self.prepare(delivery, *resolved)
        except NotSent as exc:
            return exc.result
        # Whatever a provider signs with, a credential in a header is never quoted either.
        auth = request.headers.get("Authorization", "").partition(" ")[2]
        secrets = (*request.secrets, auth) if auth else request.secrets
        reply = await post_capped(
            self._transport,
            request.url,
            content=request.body,
            headers=request.headers,
            timeout_s=self._timeout_s,
            response_body_max_bytes=self._response_max_bytes,
            request_json=request.stored,
            secrets=secrets,
        )
        if isinstance(reply, SendResult):
            return reply
        verdict = self.classify(reply)
        text = verdict.error_message
        # A temporary failure honours Retry-After, 429 and 5xx alike: a 503 may say it too.
        wait = (
            parse_retry_after(reply.headers.get("Retry-After"), date=reply.headers.get("Date"))
            if verdict.outcome is Outcome.TEMPORARY_FAIL
            else None
        )
        return SendResult(
            outcome=verdict.outcome,
            error_code=verdict.error_code,
            error_message=truncate(scrub(text, request.url, secrets)) if text else None,
            provider_message_id=verdict.provider_message_id,
            http_status=reply.status,
            request_json=request.stored,
            response_body=reply.body,
            response_truncated=reply.truncated,
            retry_after_s=wait if isinstance(wait, float) else None,
            retry_at=wait if isinstance(wait, datetime) else None,
            duration_s=reply.duration_s,
            disable_target=verdict.error_code is ErrorCode.ENDPOINT_GONE,
        )
