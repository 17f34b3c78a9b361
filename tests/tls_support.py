"""An HTTPS look-alike for the trust and proxy tests, with certificates from ``trustme``."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trustme
from aiohttp import web


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
        await runner.cleanup()
