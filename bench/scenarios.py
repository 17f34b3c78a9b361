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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
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
    job_list,
    server_total,
    wait_done,
)
from bench.footprint import Meter, StatementShare, WalShare
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


@dataclass(frozen=True)
class Throughput:
    """One drain of N jobs by one process under test."""

    rate: float  # jobs/s, enqueue commit to the last recorded success (database clock)
    cpu_us: float  # CPU (user + system) of that process per job, from enqueue to done
    rss_mb: float  # its peak RSS (VmHWM)
    loop: str  # "uvloop" or "asyncio", as seen in the process's memory map
    # With a meter (bench.footprint): per job, enqueue included; NaN without one.
    wal_b: float = float("nan")  # WAL bytes
    statement_us: float = float("nan")  # PostgreSQL statement execution time
    wal_shares: tuple[WalShare, ...] = ()  # the WAL by relation and record type (pg_walinspect)
    statement_shares: tuple[StatementShare, ...] = ()  # statement time by statement


def _measure(
    proc: Process,
    n: int,
    start: Callable[[], float],
    done: Callable[[str], float],
    dsn: str,
    meter: Meter | None = None,
) -> Throughput:
    """Times ``start`` (returns the commit time) to ``done`` (polls the run's database at the
    DSN it is given; returns the last success time) and charges the process's CPU over the same
    window to the N jobs; with ``meter``, the database's WAL and statement time too."""
    window = meter.begin(dsn) if meter is not None else None
    cpu_before = proc.cpu_s()
    committed_at = start()
    last_at = done(window.poll_dsn if window is not None else dsn)
    cpu = proc.cpu_s() - cpu_before
    usage = window.end() if window is not None else None
    return Throughput(
        rate=n / (last_at - committed_at),
        cpu_us=cpu / n * 1e6,
        rss_mb=proc.peak_rss_mb(),
        loop=proc.loop_name(),
        wal_b=usage.wal_bytes / n if usage else float("nan"),
        statement_us=usage.exec_ms * 1000 / n if usage else float("nan"),
        wal_shares=usage.wal_shares if usage else (),
        statement_shares=usage.statement_shares if usage else (),
    )


def _last_at(dsn: str, n: int, *, jobs: bool = False, query: str | None = None) -> float:
    progress = wait_done(dsn, n, jobs=jobs, query=query)
    assert progress.last_at is not None
    return progress.last_at


def daemon_throughput(
    dbs: Databases,
    server: RemoteFeishuServer,
    n: int,
    variant: str,
    profile: Path | None = None,
    meter: Meter | None = None,
    settings: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    ordering_keys: int = 0,
) -> Throughput:
    """Records/s from the enqueue commit until the last record is sent, CPU/record, peak RSS;
    ``settings`` are passed to the CLI daemon (``--set``), ``env`` to its environment;
    ``ordering_keys``: every event carries one of that many ordering keys (0: none)."""
    dsn = dbs.new()
    add_channels(dsn, server)
    server.reset()
    proc = Process.start(daemon_args(dsn, variant, settings), env=env)
    profiler = None
    try:
        proc.wait_line("outbox-notifier running")
        if profile is not None:
            profiler = _start_profiler(proc.pid, profile)
            time.sleep(0.5)  # let the profiler attach before the work arrives
        result = _measure(
            proc,
            n,
            lambda: enqueue(dsn, uuid.uuid4().hex[:8], n, ordering_keys),
            lambda poll: _last_at(poll, n),
            dsn,
            meter,
        )
        _stop_profiler(profiler)
    finally:
        _stop_profiler(profiler)
        code = proc.stop()
    if code != 0:
        raise RuntimeError(f"daemon exited {code}:\n" + "\n".join(proc.lines[-20:]))
    if variant != "instant" and server_total(server) < n:
        raise RuntimeError("the server received fewer requests than records sent")
    dbs.drop(dsn)
    return result


def baseline_throughput(
    dbs: Databases,
    server: RemoteFeishuServer,
    n: int,
    transport: str = "aiohttp",
    loop: str = "auto",
    profile: Path | None = None,
    send: str = "client",
    meter: Meter | None = None,
) -> Throughput:
    """Jobs/s of the plain claim + httpx POST + update loop, timed like the daemon."""
    dsn = dbs.new()
    server.reset()
    proc = Process.start(
        ["-m", "bench.baseline", "--dsn", dsn, "--transport", transport, "--loop", loop,
         "--send", send]
    )  # fmt: skip
    profiler = None
    try:
        proc.wait_line("ready")
        if profile is not None:
            profiler = _start_profiler(proc.pid, profile)
            time.sleep(0.5)  # let the profiler attach before the work arrives
        result = _measure(
            proc,
            n,
            lambda: add_jobs(dsn, server, n),
            lambda poll: _last_at(poll, n, jobs=True),
            dsn,
            meter,
        )
    finally:
        _stop_profiler(profiler)
        proc.stop()
    if transport != "none" and server_total(server) < n:
        raise RuntimeError("the server received fewer requests than jobs sent")
    dbs.drop(dsn)
    return result


def peer_throughput(
    dbs: Databases, server: RemoteFeishuServer, n: int, system: str, meter: Meter | None = None
) -> Throughput:
    """Jobs/s of another PostgreSQL queue (``bench.peers``) doing the bare loop's job."""
    from bench import peers

    dsn = dbs.new()
    server.reset()
    peers.install(system, dsn)
    jobs = job_list(server, n)
    proc = Process.start(["-m", "bench.peers", "--system", system, "--dsn", dsn])
    try:
        proc.wait_line("ready")
        time.sleep(0.5)  # let the worker finish its start-up queries before the work arrives
        result = _measure(
            proc,
            n,
            lambda: peers.enqueue(system, dsn, jobs),
            lambda poll: _last_at(poll, n, query=peers.progress_query(system)),
            dsn,
            meter,
        )
    except Exception as exc:
        raise RuntimeError(f"{system}: {exc}\n" + "\n".join(proc.lines[-20:])) from exc
    finally:
        proc.stop()
    if server_total(server) < n:
        raise RuntimeError(f"{system}: the server received fewer requests than jobs done")
    dbs.drop(dsn)
    return result


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


async def offer(
    dsn: str,
    run: str,
    rate: float,
    duration_s: float,
    until: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Enqueues one event per transaction at ``rate``/s for ``duration_s`` or until ``until()``
    turns true, whichever is first; returns trace_id -> wall-clock time its commit returned."""
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
        if until is not None and until():
            break
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for conn in conns:
        await conn.close()
    return committed


def _receipts(server: RemoteFeishuServer, committed: dict[str, float]) -> dict[str, float]:
    """trace_id -> receipt - commit (s) of every offered event; raises unless all arrived."""
    lat: dict[str, float] = {}
    for rec in server.requests(FLOW_PREFIX):
        doc = rec.json
        if isinstance(doc, dict) and doc.get("trace_id") in committed:
            lat[doc["trace_id"]] = rec.received_at - committed[doc["trace_id"]]
    if len(lat) != len(committed):
        raise RuntimeError(f"{len(committed)} committed, {len(lat)} received")
    return lat


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
        committed = asyncio.run(offer(dsn, run, rate, duration_s))
        achieved = len(committed) / (time.monotonic() - started)
        wait_done(dsn, len(committed))
    finally:
        proc.stop()
    lat = list(_receipts(server, committed).values())
    dbs.drop(dsn)
    return lat, achieved


@dataclass(frozen=True)
class PurgeUnderLoad:
    records_per_s: float  # finished records deleted per second, their attempts with them
    outbox_per_s: float  # finished outbox rows deleted per second
    records_deleted: int
    latencies: list[float]  # commit-to-receipt (s) of the events committed during the purge
    achieved: float  # offered events/s over the whole run


def purge_under_load(
    dbs: Databases, server: RemoteFeishuServer, history: int, rate: float
) -> PurgeUnderLoad:
    """The daemon delivers ``rate`` events/s while ``bench.purge`` (the project's retention
    code, in its own process) deletes ``history`` day-old finished records with their attempts
    and outbox rows; latency counts the events committed while the purge ran."""
    dsn = dbs.new()
    add_channels(dsn, server)
    fill_history(dsn, history)
    server.reset()
    proc = Process.start(daemon_args(dsn, "cli"))
    run = uuid.uuid4().hex[:8]
    state: dict[str, Process] = {}  # the purge process, once started
    try:
        proc.wait_line("outbox-notifier running")
        time.sleep(1.0)
        # Load first, purge a second later: the purge starts on a daemon already in its stride.
        purge_at = time.monotonic() + 1.0

        def purge_done() -> bool:
            if "p" not in state:
                if time.monotonic() < purge_at:
                    return False
                state["p"] = Process.start(
                    ["-m", "bench.purge", "--dsn", dsn, "--max-age-s", "3600"]
                )
            return state["p"].popen.poll() is not None

        started = time.monotonic()
        # At most an hour of load; the purge ends it long before.
        committed = asyncio.run(offer(dsn, run, rate, 3600.0, until=purge_done))
        achieved = len(committed) / (time.monotonic() - started)
        purge = state["p"]
        if purge.popen.wait() != 0:
            raise RuntimeError("purge failed:\n" + "\n".join(purge.lines[-20:]))
        wait_done(dsn, len(committed))
    finally:
        proc.stop()
        if "p" in state:
            state["p"].stop()
    report = msgspec.json.decode(purge.lines[-1])
    if report["records_deleted"] < history:
        raise RuntimeError(f"purge deleted {report['records_deleted']} of {history} records")
    during = [
        v
        for t, v in _receipts(server, committed).items()
        if report["records_started"] <= committed[t] <= report["outbox_finished"]
    ]
    dbs.drop(dsn)
    return PurgeUnderLoad(
        records_per_s=report["records_deleted"]
        / (report["records_finished"] - report["records_started"]),
        outbox_per_s=report["outbox_deleted"]
        / max(report["outbox_finished"] - report["records_finished"], 1e-9),
        records_deleted=report["records_deleted"],
        latencies=during,
        achieved=achieved,
    )


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
                    defaults = Settings()
                    claim = await store.claim_outbox(
                        tx, 100,
                        max_batch_bytes=defaults.relay_batch_bytes,
                        max_payload_bytes=defaults.max_payload_bytes,
                    )  # fmt: skip
                    outbox_ms.append((time.perf_counter() - started) * 1000)
                    await tx.execute(
                        "UPDATE outbox_notifier.outbox SET status = 'relayed', relayed_at = now()"
                        " WHERE id = ANY(%s)",
                        ([r.id for r in claim.rows],),
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
