"""One function per figure. Each takes the shared servers and returns raw numbers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

from bench.fixtures import (
    USERS,
    Databases,
    Process,
    add_channels,
    add_jobs,
    daemon_args,
    enqueue,
    event_payload,
    server_total,
    wait_done,
)
from outbox_notifier.daemon import claim_policy
from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.settings import Settings
from outbox_notifier.store import RecordStore
from outbox_notifier.testing.feishu_server import FLOW_PREFIX, RemoteFeishuServer


def _start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    # Installed beside this interpreter (a virtualenv's bin/) or on PATH.
    beside = Path(sys.executable).parent / "py-spy"
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is None:
        return
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


def daemon_throughput(
    dbs: Databases,
    server: RemoteFeishuServer,
    n: int,
    variant: str,
    profile: Path | None = None,
) -> tuple[float, float]:
    """Records/s from the enqueue commit until the last record is sent; and peak RSS (MiB)."""
    dsn = dbs.new()
    add_channels(dsn, server)
    server.reset()
    proc = Process.start(daemon_args(dsn, variant))
    profiler = None
    try:
        proc.wait_line("outbox-notifier running")
        if profile is not None:
            profiler = _start_profiler(proc.pid, profile)
            time.sleep(0.5)  # let the profiler attach before the work arrives
        committed_at = enqueue(dsn, uuid.uuid4().hex[:8], n)
        progress = wait_done(dsn, n)
        _stop_profiler(profiler)
        rss = proc.peak_rss_mb()
    finally:
        _stop_profiler(profiler)
        code = proc.stop()
    if code != 0:
        raise RuntimeError(f"daemon exited {code}:\n" + "\n".join(proc.lines[-20:]))
    if variant != "instant" and server_total(server) < n:
        raise RuntimeError("the server received fewer requests than records sent")
    dbs.drop(dsn)
    assert progress.last_at is not None
    return n / (progress.last_at - committed_at), rss


def baseline_throughput(
    dbs: Databases, server: RemoteFeishuServer, n: int, transport: str = "default"
) -> float:
    """Jobs/s of the plain claim + httpx POST + update loop, timed like the daemon."""
    dsn = dbs.new()
    server.reset()
    proc = Process.start(["-m", "bench.baseline", "--dsn", dsn, "--transport", transport])
    try:
        proc.wait_line("ready")
        committed_at = add_jobs(dsn, server, n)
        progress = wait_done(dsn, n, jobs=True)
    finally:
        proc.stop()
    dbs.drop(dsn)
    assert progress.last_at is not None
    return n / (progress.last_at - committed_at)


def http_alone(server: RemoteFeishuServer, n: int, transport: str, build: str) -> float:
    """POSTs/s of one httpx client, 50 concurrent, no database."""
    server.reset()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.httpalone",
            "--url",
            server.flow_url("alone"),
            "--n",
            str(n),
            "--transport",
            transport,
            "--build",
            build,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


async def _offer(dsn: str, run: str, rate: float, duration_s: float) -> dict[str, float]:
    """Enqueues one event per transaction at ``rate``/s; returns trace_id -> commit time."""
    committed: dict[str, float] = {}
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(4)]
    idle: asyncio.Queue[psycopg.AsyncConnection] = asyncio.Queue()
    for conn in conns:
        idle.put_nowait(conn)

    async def one(i: int) -> None:
        trace_id = f"{run}-{i}"
        body = event_payload(run, i, trace_id).decode()
        conn = await idle.get()
        try:
            await conn.execute("SELECT outbox_notifier.enqueue(%s, %s::jsonb)", (EVENT_TYPE, body))
            committed[trace_id] = time.time()
        finally:
            idle.put_nowait(conn)

    total = int(rate * duration_s)
    started = time.monotonic()
    tasks = []
    for i in range(total):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for conn in conns:
        await conn.close()
    return committed


def latency(
    dbs: Databases, server: RemoteFeishuServer, rate: float, duration_s: float
) -> tuple[list[float], float]:
    """Commit-to-receipt latencies (s) at a fixed offered rate, and the rate achieved."""
    dsn = dbs.new()
    add_channels(dsn, server)
    server.reset()
    proc = Process.start(daemon_args(dsn, "cli"))
    run = uuid.uuid4().hex[:8]
    try:
        proc.wait_line("outbox-notifier running")
        time.sleep(1.0)  # listener connected, pool warm
        started = time.monotonic()
        committed = asyncio.run(_offer(dsn, run, rate, duration_s))
        achieved = len(committed) / (time.monotonic() - started)
        wait_done(dsn, len(committed))
    finally:
        proc.stop()
    lat = []
    for rec in server.requests(FLOW_PREFIX):
        doc = rec.json
        if isinstance(doc, dict) and doc.get("trace_id") in committed:
            lat.append(rec.received_at - committed[doc["trace_id"]])
    dbs.drop(dsn)
    if len(lat) != len(committed):
        raise RuntimeError(f"{len(committed)} committed, {len(lat)} received")
    return lat, achieved


_HISTORY = [
    """INSERT INTO outbox_notifier.outbox (event_type, payload, status, created_at, relayed_at)
       SELECT %(type)s, jsonb_build_object('n', g), 'relayed',
              now() - interval '1 day', now() - interval '1 day'
       FROM generate_series(1, %(n)s) g""",
    """INSERT INTO outbox_notifier.notification_records (channel, user_id, preview_id,
           dedupe_key, target_url, summary_text, status, attempt_count, sent_at, trace_id,
           requested_at, outbox_id, created_at, updated_at)
       SELECT 'feishu', g %% %(users)s + 1, 'preview-' || g, 'history-' || g, '/preview/' || g,
              'history', 'sent', 1, now() - interval '1 day', 'trace-' || g,
              now() - interval '1 day', g, now() - interval '1 day', now() - interval '1 day'
       FROM generate_series(1, %(n)s) g""",
    """INSERT INTO outbox_notifier.delivery_attempts (record_id, attempt, started_at,
           duration_ms, outcome, http_status)
       SELECT id, 1, sent_at, 5.0, 'success', 200 FROM outbox_notifier.notification_records""",
]

_PENDING_RECORDS = """
INSERT INTO outbox_notifier.notification_records (channel, user_id, preview_id, dedupe_key,
    target_url, trace_id, requested_at)
SELECT 'feishu', g %% %(users)s + 1, 'p', %(run)s || '-' || g, '/preview/1', 't', now()
FROM generate_series(1, 100) g
"""
_FINISH_RECORDS = """
UPDATE outbox_notifier.notification_records
SET status = 'sent', sent_at = now(), lease_expires_at = NULL, lease_token = NULL
WHERE status = 'sending'
"""


def fill_history(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in _HISTORY:
            conn.execute(statement, {"n": n, "type": EVENT_TYPE, "users": USERS})
        conn.execute("VACUUM ANALYZE")


async def _claim_latency(dsn: str, reps: int) -> tuple[float, float]:
    """Median ms of claim_records(100) and of claim_outbox(100), each on 100 fresh rows."""
    records_ms: list[float] = []
    outbox_ms: list[float] = []
    payload = event_payload("scale", 1).decode()
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    ) as pool:
        store = RecordStore(pool)
        async with pool.connection() as conn:
            for rep in range(reps):
                await conn.execute(_PENDING_RECORDS, {"run": f"scale-{rep}", "users": USERS})
                started = time.perf_counter()
                claimed = await store.claim_records(100, claim_policy(Settings()))
                records_ms.append((time.perf_counter() - started) * 1000)
                assert len(claimed) == 100, len(claimed)
                await conn.execute(_FINISH_RECORDS)

                await conn.execute(
                    "SELECT outbox_notifier.enqueue(%s, %s::jsonb) FROM generate_series(1, 100)",
                    (EVENT_TYPE, payload),
                )
                async with store.transaction() as tx:
                    started = time.perf_counter()
                    rows = await store.claim_outbox(tx, 100)
                    outbox_ms.append((time.perf_counter() - started) * 1000)
                    await tx.execute(
                        "UPDATE outbox_notifier.outbox SET status = 'relayed', relayed_at = now()"
                        " WHERE id = ANY(%s)",
                        ([r.id for r in rows],),
                    )
    return statistics.median(records_ms), statistics.median(outbox_ms)


def claim_latency(dbs: Databases, history: int, reps: int) -> tuple[float, float]:
    dsn = dbs.new()
    try:
        if history:
            fill_history(dsn, history)
        return asyncio.run(_claim_latency(dsn, reps))
    finally:
        with contextlib.suppress(psycopg.Error):
            dbs.drop(dsn)
