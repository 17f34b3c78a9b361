"""One retention pass with the project's own code, as its own process, timed per phase.

``python -m bench.purge --dsn DSN --max-age-s S [--batch-size N] [--pause-factor F]``

Runs ``outbox_notifier.retention.purge_once`` on a pool (a connection per batch, each batch its
own transaction), as the daemon's maintenance loop does on the leader replica: first the
terminal records older than ``S`` seconds (their delivery attempts go by cascade), then the
finished outbox rows older than ``S``. Each phase is one ``purge_once`` call whose other age
is set so far back that it matches nothing. Prints one JSON line with the wall-clock start and
end of each phase and the rows each deleted.

Its own process so that neither the daemon's event loop nor the bench's load generator shares
an interpreter with it; the bench offers load while this runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import msgspec
from psycopg_pool import AsyncConnectionPool

from outbox_notifier import retention
from outbox_notifier.maintenance_store import MaintenanceStore

# An age that matches no row: about 317 years (now() minus it stays a valid timestamp).
_NEVER_S = 1e10


async def run(dsn: str, max_age_s: float, batch_size: int, pause_factor: float) -> dict[str, float]:
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
    ) as pool:
        await pool.wait()
        store = MaintenanceStore(pool)

        async def purge(*, outbox_s: float, records_s: float) -> retention.RetentionReport:
            return await retention.purge_once(
                store,
                outbox_max_age_s=outbox_s,
                records_max_age_s=records_s,
                batch_size=batch_size,
                pause_factor=pause_factor,
            )

        records_started = time.time()
        records = await purge(outbox_s=_NEVER_S, records_s=max_age_s)
        records_finished = time.time()
        outbox = await purge(outbox_s=max_age_s, records_s=_NEVER_S)
        outbox_finished = time.time()
    return {
        "records_started": records_started,
        "records_finished": records_finished,
        "records_deleted": records.records_deleted,
        "outbox_finished": outbox_finished,
        "outbox_deleted": outbox.outbox_deleted,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.purge")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--max-age-s", type=float, required=True)
    parser.add_argument("--batch-size", type=int, default=retention.DEFAULT_BATCH_SIZE)
    parser.add_argument("--pause-factor", type=float, default=retention.DEFAULT_PAUSE_FACTOR)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.dsn, args.max_age_s, args.batch_size, args.pause_factor))
    print(msgspec.json.encode(report).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
