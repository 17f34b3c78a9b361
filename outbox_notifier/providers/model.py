"""What a provider is handed, what it returns, and the request and reply in between.

A provider turns one claimed ``Delivery`` into one ``SendResult``. It never raises for a
delivery problem (bad URL, refused connection, hostile response): every such failure is a
result with an ``Outcome`` and an ``ErrorCode``, so the delivery loop has one code path.
Only ``asyncio.CancelledError`` (shutdown) escapes.

Outcome -> record status, decided by ``backoff.decide`` when the delivery loop makes the
call's ``store.AttemptResult`` and written by the result completer (seed semantics):

- ``SUCCESS`` -> ``sent``
- ``SKIPPED`` -> ``skipped``
- ``PERMANENT_FAIL`` -> ``dead``
- ``TEMPORARY_FAIL`` -> ``failed`` with a backoff, or ``dead`` once attempts run out

An HTTP provider (``base.HttpProvider``) gets there in three steps, each with its type here:
``prepare`` gives a ``PreparedRequest`` (or raises ``NotSent``), the shared sender
(``sender.post_capped``) brings back an ``HttpReply``, and ``classify`` gives its ``Verdict``.

A chat bot can also merge several deliveries to one recipient into one *digest* message:
``prepare_digest`` gives a ``DigestRequest`` (the request and how many of the deliveries it
holds) and ``send_digest`` a ``DigestResult`` (that count and the one call's ``SendResult``,
which stands for each record it holds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

import httpx
import msgspec

from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.records import RecordFields


class Recipient(msgspec.Struct, frozen=True, kw_only=True):
    """Where the user wants the notification: their row in ``notification_channels`` for the
    record's channel (the provider it names is the one making the call).

    ``auth_kind`` is ``'none'``, ``'bearer'`` or ``'bot_secret'``; ``auth_secret`` is the
    token or signing secret and must never reach a log line or an error message.
    """

    enabled: bool
    webhook_url: str
    auth_kind: str
    auth_secret: str | None


class Delivery(RecordFields, frozen=True, kw_only=True):
    """One claimed notification record, as the delivery loop hands it to a provider.

    ``message_text`` is final (fallback and target URL already applied); ``attempt`` is the
    attempt being made (1 for the first call); ``recipient`` is None when the user has no
    row in ``notification_channels`` for the channel.
    """

    record_id: int
    channel: str
    message_text: str
    fallback_used: bool
    attempt: int
    recipient: Recipient | None


class SendResult(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one provider call.

    ``request_json`` is the body that was sent with any secret masked (None when nothing was
    sent); ``response_body`` holds at most the provider's cap of raw response bytes, with
    ``response_truncated`` set when more were left unread. ``retry_after_s`` carries the
    provider's ``Retry-After`` so the retry can honour it; ``retry_at`` carries it instead when
    it is an HTTP date the reply gave no ``Date`` to read against (the database's clock then
    turns it into a delay: the host's clock is never the reference). ``disable_channel`` asks
    the daemon to switch the recipient (the user's channel row) off: the receiver said the
    endpoint is gone for good (HTTP 410), so every later delivery to it would fail the same way.
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
    disable_channel: bool = False


class Provider(Protocol):
    """The client of one platform (Feishu Flow, a chat bot, a signed webhook): what the
    recipient's ``provider`` column names. ``send`` must never raise for a delivery problem."""

    async def send(self, delivery: Delivery) -> SendResult: ...


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


class DigestRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One call carrying the first ``included`` of the deliveries handed to
    ``HttpProvider.prepare_digest`` (oldest first, at least 1); the others were left out to
    keep the platform's limits and wait for the next slot. With ``included == 1`` the
    request is that delivery's single message, exactly as ``prepare`` makes it."""

    request: PreparedRequest
    included: int


class DigestResult(msgspec.Struct, frozen=True, kw_only=True):
    """What ``HttpProvider.send_digest`` did: one call for the first ``included``
    deliveries, whose ``result`` each of those records takes (its own transition and attempt
    row, the call's ``provider_message_id`` shared); the deliveries after them were not sent."""

    included: int
    result: SendResult


class DigestProvider(Provider, Protocol):
    """A provider that can merge deliveries into one message (``digests`` says whether it
    does: a chat bot with its ``<prefix>_digest`` switch on)."""

    digests: bool

    async def send_digest(self, deliveries: Sequence[Delivery]) -> DigestResult: ...


class NotSent(Exception):
    """Raised by ``prepare`` when the call must not be made (a configuration fault, a body
    that cannot fit): a ``PERMANENT_FAIL`` with ``code`` unless ``outcome`` says otherwise."""

    def __init__(
        self, code: ErrorCode, message: str, outcome: Outcome = Outcome.PERMANENT_FAIL
    ) -> None:
        super().__init__(message)
        self.result = SendResult(outcome=outcome, error_code=code, error_message=message)


class HttpReply(msgspec.Struct, frozen=True, kw_only=True):
    """What came back from one ``post_capped`` call."""

    status: int
    headers: Mapping[str, str]  # httpx's, so names match whatever their case
    body: bytes
    truncated: bool
    duration_s: float


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What ``HttpProvider.classify`` makes of a reply. ``HttpProvider.send`` adds the rest of
    the ``SendResult``: status, bodies, timing, ``Retry-After`` for a temporary failure, and
    ``disable_channel`` for ``endpoint_gone``; it truncates ``error_message`` and scrubs it of
    the URL's key and the request's secrets."""

    outcome: Outcome
    error_code: ErrorCode | None = None
    error_message: str | None = None
    provider_message_id: str | None = None
