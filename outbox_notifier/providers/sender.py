"""The one shared sender: every provider call goes to the transport through ``post_capped``.

It POSTs a prepared request once, under one deadline, reads at most a cap of the reply's raw
bytes, times the call and turns every transport failure (the egress guard's refusal among
them) into a ``SendResult``. ``json_headers`` are the headers every request carries: the
daemon's ``User-Agent`` and no compression, so the cap applies to the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import functools
import time
import types
from collections.abc import Iterable, Mapping

import httpx

from outbox_notifier import __version__
from outbox_notifier.egress import DestinationForbidden
from outbox_notifier.message import ERROR_TEXT_MAX_RUNES
from outbox_notifier.names import ErrorCode, Outcome

from .model import HttpReply, SendResult
from .urls import scrub

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


def truncate(text: str, limit: int = ERROR_TEXT_MAX_RUNES) -> str:
    """Cut ``text`` to ``limit`` characters (code points, like the seed's runes)."""
    return text if len(text) <= limit else text[:limit]


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
