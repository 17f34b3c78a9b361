"""The template of an HTTP provider: ``HttpProvider`` prepares, sends and classifies.

A dispatch is *prepared* by the provider (``prepare``: URL, headers, body, signature, as a
``model.PreparedRequest``), *sent* once by the shared sender (``sender.post_capped``) and
*classified* by the provider (``classify``: a ``model.Verdict``, mostly from the classifiers
in ``replies``); ``HttpProvider.send`` resolves the recipient before and assembles the
``model.SendResult`` after. A platform's module writes only the first and last steps.

A chat bot adds one step for digests (several records to one recipient in one message, when
its budget cannot send them one by one): ``digest_request`` builds the message for a run of
deliveries, or says it breaks the platform's limits; ``prepare_digest`` finds the longest run,
oldest first, that fits, and ``send_digest`` sends it like ``send`` sends one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, TypedDict

import httpx

from outbox_notifier import message, tracing
from outbox_notifier.names import ErrorCode, Outcome

from .bodies import DigestEntry, action_url, message_text
from .model import (
    Delivery,
    DigestRequest,
    DigestResult,
    HttpReply,
    NotSent,
    PreparedRequest,
    Recipient,
    SendResult,
    Verdict,
)
from .replies import parse_retry_after
from .sender import post_capped, truncate
from .urls import UrlPolicy, UrlRejected, scrub


def skipped(reason: str) -> SendResult:
    """The result for a user without a usable recipient: nothing was sent."""
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


def is_header_token(value: str) -> bool:
    """Visible ASCII only: no spaces, control characters or line breaks."""
    return value.isascii() and all(0x21 <= ord(c) <= 0x7E for c in value)


def resolve_recipient(
    delivery: Delivery, policy: UrlPolicy, what: str, *, url_name: str = "webhook url"
) -> tuple[Recipient, httpx.URL] | SendResult:
    """The delivery's recipient and its checked URL, or the result that ends the call unsent.

    No recipient, a disabled one or one without a URL is ``skipped`` (the messages, stored in
    ``last_error``, speak of the user's channel as ``what`` and of its URL as ``url_name``); a
    URL outside ``policy`` is a permanent ``invalid_url``, its message naming only scheme and
    host.
    """
    recipient = delivery.recipient
    if recipient is None:
        return skipped(f"user has no {what} channel configured")
    if not recipient.enabled:
        return skipped(f"user's {what} channel is disabled")
    if not recipient.webhook_url.strip():
        return skipped(f"user's {what} channel has no {url_name}")
    try:
        url = policy.check(recipient.webhook_url)
    except UrlRejected as exc:
        return SendResult(
            outcome=Outcome.PERMANENT_FAIL,
            error_code=ErrorCode.INVALID_URL,
            error_message=truncate(str(exc)),
        )
    return recipient, url


def bearer_auth(recipient: Recipient) -> dict[str, str]:
    """The ``Authorization`` header of a ``bearer`` recipient with a token, else none.

    Raises ``NotSent`` for a token that cannot be a header value: a configuration fault, not
    worth retrying, and the HTTP layer's own error would quote the value.
    """
    token = (recipient.auth_secret or "").strip() if recipient.auth_kind == "bearer" else ""
    if not token:
        return {}
    if not is_header_token(token):
        raise NotSent(
            ErrorCode.PROVIDER_AUTH_FAILED,
            "bearer token has characters not allowed in an HTTP header",
        )
    return {"Authorization": "Bearer " + token}


def signing_secret(recipient: Recipient, label: str) -> str | None:
    """The secret a ``bot_secret`` recipient signs with (stripped); None for a recipient that
    does not sign.

    Raises ``NotSent`` for one that signs without a secret: a configuration fault, not worth
    retrying. ``label`` names the channel in the message.
    """
    if recipient.auth_kind != "bot_secret":
        return None
    secret = (recipient.auth_secret or "").strip()
    if not secret:
        raise NotSent(
            ErrorCode.PROVIDER_AUTH_FAILED, f"{label} channel wants signing but has no secret"
        )
    return secret


class HttpOptions(TypedDict, total=False):
    """``HttpProvider``'s options, for a subclass that adds its own (``**options``)."""

    frontend_base_url: str
    allowed_schemes: Iterable[str]
    allowed_hosts: Iterable[str] | None
    path_prefix: str | None
    timeout_s: float
    response_body_max_bytes: int
    clock: Callable[[], datetime]
    digest: bool | None
    digest_max_records: int


#: ``digest_max_records`` unless told otherwise (the setting's default).
DIGEST_MAX_RECORDS = 20


class HttpProvider:
    """The template of a webhook-calling provider: ``send`` resolves the recipient and checks
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
    against the reply's ``Date``, never against it). ``digest`` switches digests on or off for
    a provider that can make them (``can_digest``; None: as it can, True for one that cannot
    is an error), ``digest_max_records`` caps the records of one digest.
    """

    label: ClassVar[str]
    url_label: ClassVar[str] = "webhook url"
    default_hosts: ClassVar[tuple[str, ...]] = ()
    default_path_prefix: ClassVar[str] = "/"
    # A URL that is itself a credential must only ever go to known hosts.
    any_host: ClassVar[bool] = False
    # Whether the platform takes a digest: the chat bots do; the Flow webhook and the signed
    # webhook do not, their receivers expecting one event per call.
    can_digest: ClassVar[bool] = False
    #: Whether this provider merges records into digests: ``can_digest`` and switched on.
    digests: bool

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
        digest: bool | None = None,
        digest_max_records: int = DIGEST_MAX_RECORDS,
    ) -> None:
        check_limits(timeout_s=timeout_s, response_body_max_bytes=response_body_max_bytes)
        if digest and not self.can_digest:
            raise ValueError(f"a {self.label} provider cannot digest")
        if digest_max_records < 1:
            raise ValueError(f"digest_max_records must be >= 1, got {digest_max_records!r}")
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
        self.digests = self.can_digest if digest is None else digest
        self._digest_max_records = digest_max_records

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

    def digest_entries(self, deliveries: Sequence[Delivery]) -> list[DigestEntry]:
        """Each delivery's text and link as its single message has them, for a digest."""
        return [
            DigestEntry(text=message_text(delivery), link=self.button_link(delivery))
            for delivery in deliveries
        ]

    def prepare(self, delivery: Delivery, recipient: Recipient, url: httpx.URL) -> PreparedRequest:
        """The request for ``delivery`` to ``url`` (already checked); raise ``NotSent`` when
        no call may be made."""
        raise NotImplementedError

    def digest_request(
        self, deliveries: Sequence[Delivery], recipient: Recipient, url: httpx.URL
    ) -> PreparedRequest | None:
        """One request holding every one of ``deliveries`` (two or more) in the platform's
        digest format, signed as ``prepare`` signs; None when it would break one of the
        platform's limits (the body's or a field's encoded size, a count of blocks). Adding a
        delivery never makes a request fit that did not: ``prepare_digest`` relies on it."""
        raise NotImplementedError

    def prepare_digest(
        self, deliveries: Sequence[Delivery], recipient: Recipient, url: httpx.URL
    ) -> DigestRequest:
        """The digest of the longest run of ``deliveries`` (oldest first, as given; at most
        ``digest_max_records``) that fits the platform's limits, and how many it holds.

        A record's text is never cut to make room: the records that do not fit wait for
        the next slot. The first always goes: when no two fit, the request is its single
        message (``prepare``: what it would have been sent as alone, cut to the platform's
        size where the single message is). Raises ``NotSent`` as ``prepare`` does, and
        ``ValueError`` for no deliveries or a provider that does not digest (``digests``).
        """
        if not self.digests:
            raise ValueError(f"this {self.label} provider does not digest")
        if not deliveries:
            raise ValueError("a digest needs at least one delivery")
        run = deliveries[: self._digest_max_records]
        # The longest run that fits, by bisection: a run fits only if each shorter one does.
        fitted: DigestRequest | None = None
        low, high = 2, len(run)
        while low <= high:
            mid = (low + high) // 2
            request = self.digest_request(run[:mid], recipient, url)
            if request is None:
                high = mid - 1
            else:
                fitted = DigestRequest(request=request, included=mid)
                low = mid + 1
        if fitted is None:
            return DigestRequest(request=self.prepare(run[0], recipient, url), included=1)
        return fitted

    def classify(self, reply: HttpReply) -> Verdict:
        """What the reply (status, headers, capped body) means."""
        raise NotImplementedError

    async def send(self, delivery: Delivery) -> SendResult:
        """Deliver once; every failure is a ``SendResult``, only cancellation propagates."""
        resolved = resolve_recipient(
            delivery, self._url_policy, self.label, url_name=self.url_label
        )
        if isinstance(resolved, SendResult):
            return resolved
        try:
            request = self.prepare(delivery, *resolved)
        except NotSent as exc:
            return exc.result
        return await self._call(request)

    async def send_digest(self, deliveries: Sequence[Delivery]) -> DigestResult:
        """Deliver the longest run of ``deliveries`` that fits one digest (``prepare_digest``)
        in one call; the result stands for each of the first ``included`` records, and the
        rest were not sent. Every failure is a result, as with ``send``.

        The deliveries must share one recipient (the digest goes to one target, signed with
        one secret): ``ValueError`` otherwise, and for an empty sequence or a provider that
        does not digest. A call that ends before a request exists (no usable recipient, a URL
        outside the policy, ``NotSent``) answers for the first record alone; the rest get
        the same answer from their own calls, alone or in the next digest.
        """
        if not deliveries:
            raise ValueError("a digest needs at least one delivery")
        if not self.digests:
            raise ValueError(f"this {self.label} provider does not digest")
        first = deliveries[0]
        if any(delivery.recipient != first.recipient for delivery in deliveries[1:]):
            raise ValueError("the deliveries of one digest must share their recipient")
        resolved = resolve_recipient(first, self._url_policy, self.label, url_name=self.url_label)
        if isinstance(resolved, SendResult):
            return DigestResult(included=1, result=resolved)
        try:
            digest = self.prepare_digest(deliveries, *resolved)
        except NotSent as exc:
            return DigestResult(included=1, result=exc.result)
        return DigestResult(included=digest.included, result=await self._call(digest.request))

    async def _call(self, request: PreparedRequest) -> SendResult:
        """Send ``request`` once through the shared sender and classify the reply."""
        # Whatever a provider signs with, a credential in a header is never quoted either.
        auth = request.headers.get("Authorization", "").partition(" ")[2]
        secrets = (*request.secrets, auth) if auth else request.secrets
        # A no-op unless tracing is on; the span shows the URL redacted (otel_tracing).
        with tracing.active.http_call(request.url, self._url_policy.path_prefix) as span:
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
                span.failed(str(reply.error_code or ErrorCode.NETWORK_ERROR))
            else:
                span.replied(reply.status)
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
            disable_channel=verdict.error_code is ErrorCode.ENDPOINT_GONE,
        )
