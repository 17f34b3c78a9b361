"""Peers: other PostgreSQL job queues doing the daemon's job, as their own worker processes.

``python -m bench.peers --system pgqueuer|procrastinate --dsn DSN [--concurrency 50]``

The job is the bare loop's: drain N queued jobs, one POST each (``client.post(url, json=...)``)
to the Feishu look-alike, record success. Every worker uses the yardstick's HTTP stack (httpx
over ``httpx_aiohttp.AiohttpTransport``, on uvloop when installed), so the figures compare the
queues, not the HTTP clients. A reply other than 200 fails the job, which the bench counts as a
failed run. Success is recorded by each queue its own way: pgqueuer deletes the job and logs
``successful`` in ``pgqueuer_log``; procrastinate marks it ``succeeded`` and logs a
``procrastinate_events`` row. The bench times the enqueue commit to the last of those rows.

The packages are benchmark-only (``pip install -e '.[bench]'``); without them the peers section
says so and is skipped. Prints ``ready loop=NAME`` once the worker is connected; runs until
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import signal
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import httpx
import msgspec
import psycopg

from bench.clients import make_client
from outbox_notifier import eventloop

SYSTEMS = ("pgqueuer", "procrastinate")
ENTRYPOINT = "deliver"

# pgqueuer dequeues up to this many jobs per query; its in-flight cap must be >= 2x that.
_PGQ_BATCH = 25

_PROGRESS = {
    "pgqueuer": """
        SELECT count(*) FILTER (WHERE status = 'successful'),
               count(*) FILTER (WHERE status IN ('exception', 'canceled')),
               extract(epoch FROM max(created) FILTER (WHERE status = 'successful'))::float8
        FROM pgqueuer_log""",
    "procrastinate": """
        SELECT count(*) FILTER (WHERE type = 'succeeded'),
               count(*) FILTER (WHERE type = 'failed'),
               extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded'))::float8
        FROM procrastinate_events""",
}


# What each peer's worker imports beyond the project's own dependencies.
_NEEDS = {"pgqueuer": ("pgqueuer", "asyncpg"), "procrastinate": ("procrastinate",)}


def missing() -> dict[str, list[str]]:
    """Peer -> its benchmark-only packages that are not installed (peers lacking none omitted)."""
    out = {}
    for system, needs in _NEEDS.items():
        absent = [name for name in needs if importlib.util.find_spec(name) is None]
        if absent:
            out[system] = absent
    return out


def versions() -> str:
    import importlib.metadata as md

    out = []
    for name in SYSTEMS:
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            out.append(f"{name} absent")
    return ", ".join(out)


def progress_query(system: str) -> str:
    """(done, failed, epoch of the last success) for ``system``'s own completion records."""
    return _PROGRESS[system]


# -- set-up and enqueue, called by the bench in its own process -----------------------------


async def _install(system: str, dsn: str) -> None:
    if system == "pgqueuer":
        from pgqueuer import Queries

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await Queries.from_psycopg_connection(conn).install()
        return
    app = _procrastinate_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def _enqueue(system: str, dsn: str, jobs: Sequence[tuple[str, dict[str, object]]]) -> float:
    """All jobs in one statement through the queue's own batch API (one commit); returns the
    wall-clock time that statement returned, before the connection is closed."""
    if system == "pgqueuer":
        from pgqueuer import Queries

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await Queries.from_psycopg_connection(conn).enqueue(
                [ENTRYPOINT] * len(jobs),
                [msgspec.json.encode({"u": u, "p": p}) for u, p in jobs],
                [0] * len(jobs),
            )
            return time.time()
    app = _procrastinate_app(dsn)
    async with app.open_async():
        await app.configure_task(ENTRYPOINT).batch_defer_async(*({"u": u, "p": p} for u, p in jobs))
        return time.time()


def install(system: str, dsn: str) -> None:
    asyncio.run(_install(system, dsn))


def enqueue(system: str, dsn: str, jobs: Sequence[tuple[str, dict[str, object]]]) -> float:
    """Enqueues ``jobs`` for ``system``; returns the wall-clock time of the commit."""
    return asyncio.run(_enqueue(system, dsn, jobs))


# -- the worker processes ----------------------------------------------------------------------


async def _post(client: httpx.AsyncClient, url: str, payload: object) -> None:
    response = await client.post(url, json=payload)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}")


async def _run_pgqueuer(dsn: str, concurrency: int) -> None:
    # asyncpg, pgqueuer's first driver: over its psycopg driver this worker drained ~45 jobs/s
    # here, about one in-flight cap (50) per dequeue timeout (1 s): a wake-up that does not
    # arrive, which would measure that wait rather than the queue.
    import asyncpg  # type: ignore[import-untyped,unused-ignore]
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

    async with make_client("aiohttp", concurrency) as client:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        conn = await asyncpg.connect(
            host=params.get("host"),
            port=int(params.get("port") or 5432),
            user=params.get("user"),
            password=params.get("password"),
            database=params.get("dbname"),
        )
        manager = QueueManager(Queries(AsyncpgDriver(conn)))

        @manager.entrypoint(ENTRYPOINT)
        async def deliver(job: Job) -> None:
            assert job.payload is not None
            doc = msgspec.json.decode(job.payload)
            await _post(client, doc["u"], doc["p"])

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, manager.shutdown.set)
        print(f"ready loop={eventloop.name()}", flush=True)
        await manager.run(
            batch_size=_PGQ_BATCH,
            max_concurrent_tasks=concurrency,
            # Folding the log into statistics would delete the rows the bench counts.
            log_aggregation_interval=timedelta(0),
            dequeue_timeout=timedelta(seconds=1),
        )


def _procrastinate_app(dsn: str) -> Any:
    import procrastinate

    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))


async def _run_procrastinate(dsn: str, concurrency: int) -> None:
    app = _procrastinate_app(dsn)
    async with make_client("aiohttp", concurrency) as client:

        @app.task(name=ENTRYPOINT)  # type: ignore[untyped-decorator,unused-ignore]
        async def deliver(u: str, p: dict[str, object]) -> None:
            await _post(client, u, p)

        async with app.open_async():
            print(f"ready loop={eventloop.name()}", flush=True)
            with contextlib.suppress(asyncio.CancelledError):
                await app.run_worker_async(
                    concurrency=concurrency, wait=True, install_signal_handlers=True
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--loop", choices=eventloop.CHOICES, default="auto")
    args = parser.parse_args(argv)
    worker = _run_pgqueuer if args.system == "pgqueuer" else _run_procrastinate
    eventloop.run(worker(args.dsn, args.concurrency), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
