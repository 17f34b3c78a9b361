"""httpx clients over the transports the benchmarks compare, and the instant provider."""

from __future__ import annotations

import httpx

from bench.transport import MinimalTransport
from outbox_notifier.providers.base import Delivery, Outcome, SendResult

TRANSPORTS = ("default", "aiohttp", "minimal")

_REPLY = b'{"code":0,"msg":"success","data":{}}'


def make_client(transport: str, concurrency: int, timeout_s: float = 5.0) -> httpx.AsyncClient:
    """An AsyncClient configured like the daemon's, over ``transport``."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    options: dict[str, object] = {
        "timeout": timeout_s,
        "trust_env": False,
        "follow_redirects": False,
    }
    if transport == "default":
        return httpx.AsyncClient(limits=limits, **options)  # type: ignore[arg-type]
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), **options)  # type: ignore[arg-type]
    if transport == "minimal":
        return httpx.AsyncClient(transport=MinimalTransport(concurrency), **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")


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
