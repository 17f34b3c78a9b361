"""An HTTPS look-alike for the trust and proxy tests, with certificates from ``trustme``, and
one provider call through the daemon's HTTP stack to it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trustme
from aiohttp import web

from outbox_notifier.httpclient import EgressConfig, build_transport
from outbox_notifier.providers.model import HttpReply, SendResult
from outbox_notifier.providers.sender import post_capped


@asynccontextmanager
async def tls_server(ca: trustme.CA, port: int = 0) -> AsyncIterator[str]:
    """An HTTPS look-alike on loopback whose certificate ``ca`` signed; yields its base URL."""

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"code": 0, "msg": "success", "data": {}})

    app = web.Application()
    app.router.add_post("/{tail:.*}", ok)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=context)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        # Let the peers (the client, or a proxy relaying its close) hang up first: a TLS
        # connection the server has to shut down itself waits for the peer's close_notify,
        # and one still waiting when the test's loop closes leaks its socket.
        deadline = asyncio.get_running_loop().time() + 5.0
        while runner.server is not None and runner.server.connections:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        await runner.cleanup()


async def post_once(
    config: EgressConfig, url: str, env: dict[str, str] | None = None
) -> HttpReply | SendResult:
    """One JSON POST to ``url`` as a provider makes it: the reply, or the failure it maps to."""
    async with build_transport(config, env=env or {}) as transport:
        return await post_capped(
            transport,
            httpx.URL(url),
            content=b"{}",
            headers={"Content-Type": "application/json"},
            timeout_s=5,
            response_body_max_bytes=1024,
            request_json=b"{}",
        )
