"""The HTTP client alone: N POSTs, ``concurrency`` at a time, no database. Prints the rate.

``python -m bench.httpalone --url URL [--transport T] [--build json|prebuilt]``

``json`` is ``client.post(url, json=...)``; ``prebuilt`` is what the daemon's provider does:
msgspec-encoded bytes, ``build_request`` then ``send(stream=True)``, body read and closed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import msgspec

from bench.clients import TRANSPORTS, make_client

_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Accept-Encoding": "identity"}


async def run(url: str, *, n: int, concurrency: int, transport: str, build: str) -> float:
    async with make_client(transport, concurrency) as client:

        async def one(i: int) -> None:
            doc = {"notification_id": i, "message": {"summary": "hello"}, "trace_id": str(i)}
            if build == "json":
                response = await client.post(url, json=doc)
                response.raise_for_status()
                return
            request = client.build_request(
                "POST", url, content=msgspec.json.encode(doc), headers=_HEADERS
            )
            response = await client.send(request, stream=True)
            try:
                await response.aread()
            finally:
                await response.aclose()

        async def worker(ids: range) -> None:
            for i in ids:
                await one(i)

        await asyncio.gather(*(worker(range(w, 200, concurrency)) for w in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(range(w, n, concurrency)) for w in range(concurrency)))
        return n / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.httpalone")
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--transport", choices=TRANSPORTS, default="default")
    parser.add_argument("--build", choices=("json", "prebuilt"), default="prebuilt")
    args = parser.parse_args(argv)
    rate = asyncio.run(
        run(
            args.url,
            n=args.n,
            concurrency=args.concurrency,
            transport=args.transport,
            build=args.build,
        )
    )
    print(f"{rate:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
