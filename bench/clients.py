"""httpx clients over the transports the benchmarks compare, and the instant provider."""

from __future__ import annotations

import httpx

from bench.transport import MinimalTransport
from outbox_notifier.names import Outcome
from outbox_notifier.providers.model import Delivery, SendResult

TRANSPORTS = ("default", "aiohttp", "minimal")

_REPLY = b'{"code":0,"msg":"success","data":{}}'


def make_transport(transport: str, concurrency: int) -> httpx.AsyncBaseTransport:
    """The httpx transport named ``transport``, pooled for ``concurrency`` connections."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if transport == "default":
        return httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return AiohttpTransport(limits=limits)
    if transport == "minimal":
        return MinimalTransport(concurrency)
    raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")


def make_client(transport: str, concurrency: int, timeout_s: float = 5.0) -> httpx.AsyncClient:
    """An AsyncClient over ``transport`` (``make_transport``), no redirects, no environment."""
    return httpx.AsyncClient(
        transport=make_transport(transport, concurrency),
        timeout=timeout_s,
        trust_env=False,
        follow_redirects=False,
    )


class InstantProvider:
    """Answers every delivery at once with a Feishu-like success: the database side alone."""

    channel = "feishu"

    async def send(self, delivery: Delivery) -> SendResult:
        return SendResult(
            outcome=Outcome.SUCCESS,
            http_status=200,
            request_json=b'{"notification_id":%d}' % delivery.record_id,
            response_body=_REPLY,
        )
