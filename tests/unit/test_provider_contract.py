"""The contract every provider on the ``HttpProvider`` template keeps, for each entry of
``providers.REGISTRY`` (a provider added there is held to it with no test written here).

Against ``httpx.MockTransport``, with one URL policy for all (``https``, ``HOST`` and its
subdomains, paths under ``/in/``): the request names the daemon and carries the deadline;
a status maps by its family (timeout, transport error, 429 with its ``Retry-After``, 5xx,
401/403, 3xx never followed, 410); the reply body is read up to its cap; neither the URL's
token nor the recipient's secret reaches an error message, the request body or the stored
request; a missing or disabled recipient is skipped and a URL outside the policy refused,
both without a call; and nothing a transport or a reply does makes ``send`` raise, only
cancellation. What differs by provider (bodies, signatures, platform reply codes) is in its
own module.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest

from outbox_notifier import __version__
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers import REGISTRY, ProviderSpec
from outbox_notifier.providers.base import HttpProvider
from outbox_notifier.providers.model import Delivery, Recipient, SendResult
from outbox_notifier.settings import Settings
from tests import provider_support
from tests.provider_support import Handler, mock_transport, raising, recording, reply

HOST = "hooks.example.com"
TOKEN = "path-token-0123456789abcdef"
QUERY_KEY = "query-key-9876543210"
URL = f"https://{HOST}/in/{TOKEN}?key={QUERY_KEY}"
# Base64 behind the Standard Webhooks prefix, so it is a usable secret for every auth kind.
SECRET = "whsec_" + base64.b64encode(b"contract signing key, 32 bytes!").decode()
NOW = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)
NOW_HTTP = "Mon, 01 Jan 2024 00:00:00 GMT"
AUTH_KINDS = ("none", "bearer", "bot_secret")

# The providers whose receiver says "gone for good" with a 410: the rest read it as any
# other 4xx. (Slack's 404 is gone as well: its own table, in its module.)
GONE_ON_410 = frozenset({"webhook", "slack_webhook"})


@pytest.fixture(params=REGISTRY, ids=lambda spec: spec.name)
def spec(request: pytest.FixtureRequest) -> ProviderSpec:
    """Each provider of the registry in turn."""
    assert isinstance(request.param, ProviderSpec)
    return request.param


def make_recipient(
    url: str = URL, auth_kind: str = "none", secret: str | None = None, enabled: bool = True
) -> Recipient:
    return Recipient(enabled=enabled, webhook_url=url, auth_kind=auth_kind, auth_secret=secret)


def make_delivery(recipient: Recipient | None = None) -> Delivery:
    return provider_support.make_delivery(recipient or make_recipient())


def make_provider(
    spec: ProviderSpec, transport: httpx.AsyncBaseTransport, **options: Any
) -> HttpProvider:
    """The provider as the registry builds it (its own options from default settings), under
    the contract's URL policy."""
    kw: dict[str, Any] = {
        "frontend_base_url": "https://app.example.com",
        "allowed_schemes": ("https",),
        "allowed_hosts": (HOST, "127.0.0.1"),
        "path_prefix": "/in/",
        "clock": lambda: NOW,
        **spec.options(Settings()),
    }
    return spec.cls(transport, **(kw | options))


async def send_with(
    spec: ProviderSpec, handler: Handler, delivery: Delivery | None = None, **options: Any
) -> SendResult:
    transport = mock_transport(handler)
    provider = make_provider(spec, transport, **options)
    async with transport:
        return await provider.send(delivery or make_delivery())


# ---------------------------------------------------------------- the request


async def test_the_request_names_the_daemon_and_carries_the_timeout(spec: ProviderSpec) -> None:
    """The request goes to the transport as built: no client adds a User-Agent or a timeout,
    so the provider sets both (the transport bounds connect, read, write and pool with it)."""
    seen, handler = recording(200)
    result = await send_with(spec, handler, timeout_s=2.5)
    assert result.outcome is Outcome.SUCCESS
    [request] = seen
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json; charset=utf-8"
    assert request.headers["user-agent"] == f"outbox-notifier/{__version__}"
    assert request.headers["accept-encoding"] == "identity"
    assert request.extensions["timeout"] == {
        "connect": 2.5, "read": 2.5, "write": 2.5, "pool": 2.5,
    }  # fmt: skip


# ---------------------------------------------------------------- status mapping

OK, TEMP, PERM = Outcome.SUCCESS, Outcome.TEMPORARY_FAIL, Outcome.PERMANENT_FAIL
STATUSES: list[tuple[int, Outcome, ErrorCode | None]] = [
    (200, OK, None),
    (201, OK, None),
    (202, OK, None),
    (204, OK, None),
    (301, PERM, ErrorCode.PAYLOAD_INVALID),
    (302, PERM, ErrorCode.PAYLOAD_INVALID),
    (307, PERM, ErrorCode.PAYLOAD_INVALID),
    (308, PERM, ErrorCode.PAYLOAD_INVALID),
    (400, PERM, ErrorCode.PAYLOAD_INVALID),
    (413, PERM, ErrorCode.PAYLOAD_INVALID),
    (422, PERM, ErrorCode.PAYLOAD_INVALID),
    (401, PERM, ErrorCode.PROVIDER_AUTH_FAILED),
    (403, PERM, ErrorCode.PROVIDER_AUTH_FAILED),
    (429, TEMP, ErrorCode.PROVIDER_RATE_LIMITED),
    (500, TEMP, ErrorCode.PROVIDER_5XX),
    (502, TEMP, ErrorCode.PROVIDER_5XX),
    (503, TEMP, ErrorCode.PROVIDER_5XX),
    (599, TEMP, ErrorCode.PROVIDER_5XX),
]


@pytest.mark.parametrize(("status", "outcome", "code"), STATUSES)
async def test_status_mapping(
    spec: ProviderSpec, status: int, outcome: Outcome, code: ErrorCode | None
) -> None:
    result = await send_with(spec, reply(status, b"oops"))
    said = None if outcome is Outcome.SUCCESS else f"HTTP {status}"
    provider_support.assert_reply_mapped(
        result, status=status, body=b"oops", outcome=outcome, code=code, said=said,
        unsaid=(TOKEN, QUERY_KEY),
    )  # fmt: skip
    assert result.disable_channel is False
    assert (result.retry_after_s, result.retry_at) == (None, None)
    if 300 <= status < 400:
        assert result.error_message is not None
        assert "redirect not followed" in result.error_message


async def test_410_is_endpoint_gone_where_the_provider_says_so(spec: ProviderSpec) -> None:
    result = await send_with(spec, reply(410, b""))
    assert result.outcome is Outcome.PERMANENT_FAIL
    if spec.name in GONE_ON_410:
        assert result.error_code is ErrorCode.ENDPOINT_GONE
        assert result.error_message is not None
        assert "endpoint gone, channel to be disabled" in result.error_message
    else:
        assert result.error_code is ErrorCode.PAYLOAD_INVALID
    # the recipient is switched off for endpoint_gone, and only for it
    assert result.disable_channel is (result.error_code is ErrorCode.ENDPOINT_GONE)


@pytest.mark.parametrize(
    ("status", "location"),
    [(302, "https://evil.example/steal"), (307, "http://169.254.169.254/latest")],
)
async def test_a_redirect_is_not_followed(spec: ProviderSpec, status: int, location: str) -> None:
    seen, handler = recording(status, headers={"Location": location})
    result = await send_with(spec, handler)
    assert len(seen) == 1
    assert result.outcome is Outcome.PERMANENT_FAIL
    assert result.error_code is ErrorCode.PAYLOAD_INVALID
    assert result.error_message is not None
    assert "redirect not followed" in result.error_message


# ---------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("status", "header", "expected"),
    [
        (429, "7", 7.0),
        (429, "0", 0.0),
        (429, "Mon, 01 Jan 2024 00:00:30 GMT", 30.0),
        (429, "Mon, 01 Jan 2024 00:01:00 GMT", 60.0),
        (429, "Sun, 31 Dec 2023 23:59:00 GMT", 0.0),  # already past
        (429, "soon", None),
        (429, None, None),
        (500, "3", 3.0),
        (503, "120", 120.0),
        (400, "5", None),  # permanent: nothing to wait for
        (403, "5", None),
    ],
)
async def test_retry_after_is_honoured_on_every_temporary_failure(
    spec: ProviderSpec, status: int, header: str | None, expected: float | None
) -> None:
    # the reply's own Date is the reference for an HTTP-date Retry-After
    headers = {"Retry-After": header, "Date": NOW_HTTP} if header is not None else None
    result = await send_with(spec, reply(status, b"", headers))
    assert result.outcome is (Outcome.TEMPORARY_FAIL if status >= 429 else Outcome.PERMANENT_FAIL)
    assert result.retry_after_s == expected
    assert result.retry_at is None


async def test_a_retry_after_date_without_a_date_header_travels_as_retry_at(
    spec: ProviderSpec,
) -> None:
    later = "Mon, 01 Jan 2024 00:00:30 GMT"
    result = await send_with(spec, reply(429, b"", {"Retry-After": later}))
    assert result.retry_after_s is None
    assert result.retry_at == datetime(2024, 1, 1, 0, 0, 30, tzinfo=UTC)
    dated = await send_with(spec, reply(429, b"", {"Retry-After": later, "Date": NOW_HTTP}))
    assert (dated.retry_after_s, dated.retry_at) == (30.0, None)


# ---------------------------------------------------------------- timeouts and transport errors


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ReadTimeout("read timed out"), ErrorCode.PROVIDER_TIMEOUT),
        (httpx.ConnectTimeout(""), ErrorCode.PROVIDER_TIMEOUT),
        (httpx.PoolTimeout("pool"), ErrorCode.PROVIDER_TIMEOUT),
        (httpx.ConnectError("[Errno 111] Connection refused"), ErrorCode.NETWORK_ERROR),
        (httpx.RemoteProtocolError("peer closed"), ErrorCode.NETWORK_ERROR),
        (httpx.ReadError("reset"), ErrorCode.NETWORK_ERROR),
        (RuntimeError("unexpected"), ErrorCode.NETWORK_ERROR),
    ],
)
async def test_transport_failures_are_temporary(
    spec: ProviderSpec, exc: BaseException, code: ErrorCode
) -> None:
    result = await send_with(spec, raising(exc))
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert result.error_code is code
    assert result.error_message is not None
    assert type(exc).__name__ in result.error_message
    assert result.http_status is None
    assert result.request_json is not None


async def test_the_deadline_covers_a_stalled_server(spec: ProviderSpec) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200)

    result = await send_with(spec, handler, timeout_s=0.05)
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert result.error_code is ErrorCode.PROVIDER_TIMEOUT
    assert result.duration_s < 5


async def test_a_body_trickling_past_the_deadline_times_out_with_its_status(
    spec: ProviderSpec,
) -> None:
    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"code":'
        await asyncio.sleep(10)
        yield b"0}"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=slow_body())

    result = await send_with(spec, handler, timeout_s=0.05)
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert result.error_code is ErrorCode.PROVIDER_TIMEOUT
    assert result.http_status == 200


# ---------------------------------------------------------------- the capped response body


async def test_a_huge_response_body_is_capped_not_read_whole(spec: ProviderSpec) -> None:
    chunk = b"x" * 1024
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        while True:
            produced += 1
            yield chunk

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, content=endless())

    result = await send_with(spec, handler, response_body_max_bytes=4096 + 100)
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert result.error_code is ErrorCode.PROVIDER_5XX
    assert result.response_body == b"x" * (4096 + 100)
    assert result.response_truncated is True
    assert produced <= 6


async def test_a_body_exactly_at_the_cap_is_not_truncated(spec: ProviderSpec) -> None:
    result = await send_with(spec, reply(200, b"a" * 64), response_body_max_bytes=64)
    assert result.response_body == b"a" * 64
    assert result.response_truncated is False


# ---------------------------------------------------------------- secrets


def assert_no_secret(text: str | bytes | None) -> None:
    """Neither the URL's token nor its query key nor the secret (with or without its prefix)."""
    assert text is not None
    blob = text.encode() if isinstance(text, str) else text
    for secret in (TOKEN, QUERY_KEY, SECRET, SECRET.removeprefix("whsec_")):
        assert secret.encode() not in blob, secret


@pytest.mark.parametrize("auth_kind", AUTH_KINDS)
async def test_no_secret_in_the_request_body_or_the_stored_request(
    spec: ProviderSpec, auth_kind: str
) -> None:
    seen, handler = recording(200)
    delivery = make_delivery(make_recipient(auth_kind=auth_kind, secret=SECRET))
    result = await send_with(spec, handler, delivery)
    assert result.outcome is Outcome.SUCCESS
    [request] = seen
    assert_no_secret(request.content)
    assert_no_secret(result.request_json)


@pytest.mark.parametrize("auth_kind", AUTH_KINDS)
@pytest.mark.parametrize("exc_type", [httpx.ReadTimeout, httpx.ConnectError, RuntimeError])
async def test_no_secret_in_the_error_text_of_a_failed_call(
    spec: ProviderSpec, auth_kind: str, exc_type: type[Exception]
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        # A transport error quoting all it was handed: the URL, the headers, the body.
        raise exc_type(f"cannot reach {request.url} {dict(request.headers)} {request.content!r}")

    delivery = make_delivery(make_recipient(auth_kind=auth_kind, secret=SECRET))
    result = await send_with(spec, handler, delivery)
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert_no_secret(result.error_message)
    assert_no_secret(result.request_json)


@pytest.mark.parametrize("auth_kind", AUTH_KINDS)
async def test_a_digest_is_one_call_with_no_secret_or_none_at_all(
    spec: ProviderSpec, auth_kind: str
) -> None:
    """A provider that digests sends several records in one call, keeping secrets out of
    the body and the stored request as a single message does; one that does not says so."""
    seen, handler = recording(200)
    transport = mock_transport(handler)
    provider = make_provider(spec, transport)
    to = make_recipient(auth_kind=auth_kind, secret=SECRET)
    deliveries = [
        msgspec.structs.replace(make_delivery(to), record_id=i, dedupe_key=f"dk-{i}")
        for i in (1, 2, 3)
    ]
    if not provider.digests:
        assert not spec.can_digest
        with pytest.raises(ValueError, match="does not digest"):
            await provider.send_digest(deliveries)
        return
    async with transport:
        done = await provider.send_digest(deliveries)
    assert (done.included, done.result.outcome) == (3, Outcome.SUCCESS)
    [request] = seen
    assert_no_secret(request.content)
    assert_no_secret(done.result.request_json)


# ---------------------------------------------------------------- recipients and the URL policy


@pytest.mark.parametrize("case", ["none", "disabled", "no url"])
async def test_a_missing_or_disabled_recipient_is_skipped_without_a_call(
    spec: ProviderSpec, case: str
) -> None:
    seen, handler = recording(200)
    transport = mock_transport(handler)
    provider = make_provider(spec, transport)
    # the message, stored as the record's last error, names the channel by the label
    recipient, reason = {
        "none": (None, f"no {provider.label} channel"),
        "disabled": (make_recipient(enabled=False), "disabled"),
        "no url": (make_recipient(url="  "), f"no {provider.url_label}"),
    }[case]
    async with transport:
        result = await provider.send(msgspec.structs.replace(make_delivery(), recipient=recipient))
    provider_support.assert_not_called(
        seen, result, outcome=Outcome.SKIPPED, code=ErrorCode.RECIPIENT_MISSING
    )
    assert result.error_message is not None
    assert reason in result.error_message
    assert result.request_json is None


@pytest.mark.parametrize(
    "url",
    [
        f"http://{HOST}/in/{TOKEN}",  # scheme
        f"ftp://{HOST}/in/{TOKEN}",
        f"https://evil.com/in/{TOKEN}",  # foreign host
        f"https://{HOST}.evil.com/in/{TOKEN}",  # suffix trick
        f"https://evil{HOST}/in/{TOKEN}",  # not a subdomain
        f"https://example.com/in/{TOKEN}",  # parent of an allowed host
        f"https://{HOST}@evil.com/in/{TOKEN}",  # userinfo trick
        f"https://user:pw@{HOST}/in/{TOKEN}",  # credentials
        f"https://{HOST}/out/{TOKEN}",  # path prefix
        f"https://{HOST}/in/../admin/{TOKEN}",  # traversal
        f"{HOST}/in/{TOKEN}",  # no scheme
        f"https://[bad/in/{TOKEN}",  # unparsable
    ],
)
async def test_a_url_outside_the_policy_is_invalid_url_without_a_call(
    spec: ProviderSpec, url: str
) -> None:
    seen, handler = recording(200)
    result = await send_with(spec, handler, make_delivery(make_recipient(url=url)))
    provider_support.assert_not_called(
        seen, result, outcome=Outcome.PERMANENT_FAIL, code=ErrorCode.INVALID_URL, unsaid=(TOKEN,)
    )
    assert result.request_json is None


@pytest.mark.parametrize(
    "url",
    [
        URL,
        f"https://www.{HOST}/in/{TOKEN}",  # a subdomain
        f"https://{HOST.upper()}./in/{TOKEN}",  # case and the root's dot
        f"https://127.0.0.1:8443/in/{TOKEN}?x=1",
    ],
)
async def test_a_url_inside_the_policy_is_called(spec: ProviderSpec, url: str) -> None:
    seen, handler = recording(200)
    result = await send_with(spec, handler, make_delivery(make_recipient(url=url)))
    assert len(seen) == 1
    assert result.outcome is Outcome.SUCCESS


# ---------------------------------------------------------------- never raises


async def _undecodable(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"\xff\xfe\x00{", headers={"Content-Type": "text/html"})


async def _wrong_types(request: httpx.Request) -> httpx.Response:
    body = b'{"code":true,"msg":5,"errcode":"x","errmsg":[],"StatusCode":1.5,"data":7}'
    return httpx.Response(400, content=body, headers={"Retry-After": "9" * 40, "Date": "never"})


async def _informational(request: httpx.Request) -> httpx.Response:
    return httpx.Response(100)


@pytest.mark.parametrize(
    "handler",
    [
        _undecodable,
        _wrong_types,
        _informational,
        raising(ValueError("a bug in a transport")),
        raising(OSError("[Errno 24] Too many open files")),
        raising(KeyError("x")),
        raising(httpx.InvalidURL("bad")),
    ],
    ids=["undecodable", "wrong-types", "informational", "value", "os", "key", "invalid-url"],
)
async def test_send_never_raises_for_a_delivery_problem(
    spec: ProviderSpec, handler: Handler
) -> None:
    result = await send_with(spec, handler)
    assert isinstance(result, SendResult)
    assert result.outcome in (Outcome.SUCCESS, Outcome.TEMPORARY_FAIL, Outcome.PERMANENT_FAIL)


async def test_only_cancellation_propagates(spec: ProviderSpec) -> None:
    with pytest.raises(asyncio.CancelledError):
        await send_with(spec, raising(asyncio.CancelledError()))
