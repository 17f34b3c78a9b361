"""The plain loop the daemon is compared with, as its own process.

``python -m bench.baseline --dsn DSN [--transport aiohttp|default|minimal|none] [--loop L]
[--send client|transport]``: claim 100 jobs (``FOR UPDATE SKIP LOCKED``), POST each with
``httpx.AsyncClient.post(json=...)``, 50 at a time, mark the batch sent in one statement; repeat.
No relay, no attempt log, no fencing: the least work a relay to HTTP can do. ``--transport none``
skips the POST (the database side of the loop alone). ``--send transport`` posts the way the
daemon's providers do instead: msgspec-encoded bytes in an ``httpx.Request`` handed straight to
the transport, the body read from its stream. Prints ``ready loop=NAME`` once connected; runs
until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import httpx
import msgspec
import psycopg

from bench.clients import TRANSPORTS, make_client, make_transport
from outbox_notifier import eventloop

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url         text        NOT NULL,
    payload     jsonb       NOT NULL,
    status      text        NOT NULL DEFAULT 'pending',
    http_status integer,
    sent_at     timestamptz
);
CREATE INDEX IF NOT EXISTS jobs_pending_idx ON bench.jobs (id) WHERE status = 'pending';
"""

CLAIM = """
UPDATE bench.jobs j SET status = 'sending'
WHERE j.id IN (SELECT id FROM bench.jobs WHERE status = 'pending'
               ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING j.id, j.url, j.payload
"""

FINISH = """
UPDATE bench.jobs j SET status = 'sent', sent_at = now(), http_status = r.http_status
FROM unnest(%(ids)s::bigint[], %(statuses)s::integer[]) AS r(id, http_status)
WHERE j.id = r.id
"""


Post = Callable[[str, object], Awaitable[int]]

_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Accept-Encoding": "identity"}
_TIMEOUTS = {"timeout": httpx.Timeout(5.0).as_dict()}


def _client_post(client: httpx.AsyncClient) -> Post:
    async def post(url: str, payload: object) -> int:
        return (await client.post(url, json=payload)).status_code

    return post


def _transport_post(transport: httpx.AsyncBaseTransport) -> Post:
    async def post(url: str, payload: object) -> int:
        request = httpx.Request(
            "POST", url, content=msgspec.json.encode(payload), headers=_HEADERS,
            extensions=_TIMEOUTS,
        )  # fmt: skip
        response = await transport.handle_async_request(request)
        try:
            assert isinstance(response.stream, httpx.AsyncByteStream)
            async for _ in response.stream:
                pass
        finally:
            await response.aclose()
        return response.status_code

    return post


async def _post(post: Post | None, limit: asyncio.Semaphore, url: str, payload: object) -> int:
    if post is None:  # no HTTP: the loop's database work alone
        return 200
    async with limit:
        try:
            return await post(url, payload)
        except httpx.HTTPError:
            return 0


async def run(dsn: str, *, batch: int, concurrency: int, transport: str, send: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    limit = asyncio.Semaphore(concurrency)
    name = "default" if transport == "none" else transport
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        make_client(name, concurrency) as client,
        make_transport(name, concurrency) as bare,
    ):
        post = None
        if transport != "none":
            post = _transport_post(bare) if send == "transport" else _client_post(client)
        print(f"ready loop={eventloop.name()}", flush=True)
        while not stop.is_set():
            rows = await (await conn.execute(CLAIM, {"limit": batch})).fetchall()
            if not rows:
                await asyncio.sleep(0.01)
                continue
            statuses = await asyncio.gather(*(_post(post, limit, u, p) for _, u, p in rows))
            await conn.execute(FINISH, {"ids": [r[0] for r in rows], "statuses": statuses})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--transport", choices=(*TRANSPORTS, "none"), default="aiohttp")
    parser.add_argument("--loop", choices=eventloop.CHOICES, default="auto")
    parser.add_argument("--send", choices=("client", "transport"), default="client")
    args = parser.parse_args(argv)
    eventloop.run(
        run(
            args.dsn,
            batch=args.batch,
            concurrency=args.concurrency,
            transport=args.transport,
            send=args.send,
        ),
        args.loop,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
