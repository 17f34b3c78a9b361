"""The daemon under a long-open snapshot: steady load, a REPEATABLE READ transaction held open.

An analytics query, a forgotten ``BEGIN`` or a lagging logical slot on the primary keeps every
row version deleted or updated since its snapshot from being vacuumed; a queue whose hot path
walks those versions slows down with the snapshot's age. The run::

    |-- warm-up --|-- before --|------------- held -------------|-- after --|
    load at a steady rate throughout; the snapshot opens and closes at the marks

The warm-up is the daemon's start on fresh tables, not measured with the rest. Until the tables
are first analyzed, the daemon's statements run on plans made when they were empty, which walk
whole indexes, and each call costs more as the tables grow: before migration 0019 that lasted
until autovacuum's first visit (about 70 s here), the apply read 3,000 buffers a batch after
20 s and 16,000 after 60 s (86 once analyzed), and p99 climbed to about 200 ms. Since 0019 the
daemon analyzes them at 1,000 rows, but until autovacuum first vacuums them the dead versions of
every row updated since the start stay in the tables and their indexes, which costs the first
minute some more (the relay's claim 15.6 ms against 4-6 ms after). A daemon that has run for a
few minutes is past both; without the warm-up, its first minute was the "before" window and the
first held one, and a hold on a running daemon was judged by the daemon's start. So the
warm-up lasts until both tables have been analyzed and vacuumed once (at most
``warmup_max_s``), and its figures are reported on their own line.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bench.fixtures import Databases, Process, add_channels, daemon_args, wait_done
from bench.scenarios import offer
from outbox_notifier.testing.feishu_server import RemoteFeishuServer

CLAIM_METRIC = "outbox_notifier_claim_duration_seconds"
CLAIM_LOOPS = ("delivery", "relay")

_DEAD_TUPLES = """
SELECT relname, n_dead_tup FROM pg_stat_user_tables
WHERE schemaname = 'outbox_notifier' AND relname IN ('notification_records', 'outbox')
"""
_LATENCIES = """
SELECT extract(epoch FROM o.created_at)::float8,
       extract(epoch FROM r.sent_at - o.created_at)::float8
FROM outbox_notifier.notification_records r JOIN outbox_notifier.outbox o ON o.id = r.outbox_id
"""


@dataclass(frozen=True)
class Plan:
    rate: float  # events/s offered throughout
    window_s: float  # figures are per window; the phases are whole windows
    before_s: float
    hold_s: float
    after_s: float
    warmup_max_s: float = 0.0  # 0: no warm-up (module docstring)

    def phase(self, start_s: float) -> str:
        """The phase of the window starting ``start_s`` after the load began."""
        if start_s < self.before_s:
            return "before"
        return "held" if start_s < self.before_s + self.hold_s else "after"


@dataclass(frozen=True)
class Sample:
    """The daemon's cumulative claim figures and the tables' dead tuples at one instant."""

    claim_s: dict[str, tuple[float, float]]  # loop -> (sum of seconds, count)
    dead: dict[str, int]  # table -> n_dead_tup


@dataclass
class Window:
    start_s: float
    phase: str
    length_s: float
    latencies_s: list[float] = field(default_factory=list)
    claim_ms: dict[str, float] = field(default_factory=dict)  # loop -> mean claim in the window
    dead: dict[str, int] = field(default_factory=dict)  # at the window's end


def _scrape(client: httpx.Client, metrics_url: str) -> dict[str, tuple[float, float]]:
    found: dict[str, list[float]] = {loop: [0.0, 0.0] for loop in CLAIM_LOOPS}
    text = client.get(metrics_url).text
    for family in text_string_to_metric_families(text):
        if family.name != CLAIM_METRIC:
            continue
        for sample in family.samples:
            loop = sample.labels.get("loop", "")
            if loop in found and sample.name.endswith("_sum"):
                found[loop][0] = sample.value
            elif loop in found and sample.name.endswith("_count"):
                found[loop][1] = sample.value
    return {loop: (v[0], v[1]) for loop, v in found.items()}


def _sample(conn: psycopg.Connection, client: httpx.Client, metrics_url: str) -> Sample:
    dead = {str(name): int(n) for name, n in conn.execute(_DEAD_TUPLES).fetchall()}
    return Sample(claim_s=_scrape(client, metrics_url), dead=dead)


_SETTLED = """
SELECT count(*) = 2 FROM pg_stat_user_tables
WHERE schemaname = 'outbox_notifier' AND relname IN ('notification_records', 'outbox')
  AND coalesce(last_autoanalyze, last_analyze) IS NOT NULL
  AND coalesce(last_autovacuum, last_vacuum) IS NOT NULL
"""


def _warm_up(dsn: str, run: str, plan: Plan, stats: psycopg.Connection) -> tuple[float, int]:
    """Offers the load until both tables have been analyzed and vacuumed once (or
    ``plan.warmup_max_s`` passed); returns how long that took and how many events it offered."""
    checked_at, settled = 0.0, False

    def done() -> bool:  # called before each event: asks the database once a second
        nonlocal checked_at, settled
        now = time.monotonic()
        if now - checked_at >= 1.0:
            checked_at = now
            settled = bool(stats.execute(_SETTLED).fetchone()[0])  # type: ignore[index]
        return settled

    started = time.monotonic()
    offered = asyncio.run(offer(dsn, f"{run}-warm-up", plan.rate, plan.warmup_max_s, until=done))
    return time.monotonic() - started, len(offered)


def _hold(conn: psycopg.Connection) -> None:
    """Takes a snapshot that stays until ``conn`` ends its transaction: REPEATABLE READ takes
    it at the first statement, so one row is read."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    conn.execute("SELECT id FROM outbox_notifier.outbox LIMIT 1").fetchall()


async def _watch(dsn: str, metrics_url: str, plan: Plan, started: float) -> list[Sample]:
    """Opens the snapshot at the end of ``before`` and releases it after ``hold``; samples the
    daemon and the tables at the load's start and at the end of every window."""
    windows = round((plan.before_s + plan.hold_s + plan.after_s) / plan.window_s)
    samples: list[Sample] = []
    with (
        psycopg.connect(dsn, autocommit=True) as stats,
        psycopg.connect(dsn, autocommit=True) as holder,
        httpx.Client(timeout=10.0) as client,
    ):
        steps = [(started + i * plan.window_s, "sample") for i in range(windows + 1)]
        steps += [
            (started + plan.before_s, "hold"),
            (started + plan.before_s + plan.hold_s, "release"),
        ]
        for at, step in sorted(steps):  # at one instant: "hold"/"release" before "sample"
            await asyncio.sleep(max(at - time.time(), 0.0))
            if step == "hold":
                await asyncio.to_thread(_hold, holder)
            elif step == "release":
                await asyncio.to_thread(holder.execute, "ROLLBACK")
            else:
                samples.append(await asyncio.to_thread(_sample, stats, client, metrics_url))
    return samples


def held_snapshot(
    dbs: Databases, server: RemoteFeishuServer, plan: Plan
) -> tuple[list[Window], float]:
    """Runs the scenario (module docstring) once: one ``Window`` per window of the run, and the
    offered rate the load achieved (events/s)."""
    dsn = dbs.new()
    add_channels(dsn, server)
    server.reset()
    proc = Process.start(daemon_args(dsn, "cli"))
    run = uuid.uuid4().hex[:8]
    duration_s = plan.before_s + plan.hold_s + plan.after_s
    try:
        proc.wait_line("outbox-notifier running")
        port = re.search(r"127\.0\.0\.1:(\d+)", proc.wait_line("serving /metrics"))
        assert port is not None
        metrics_url = f"http://127.0.0.1:{port.group(1)}/metrics"
        time.sleep(1.0)  # listener connected, pool warm

        with (
            psycopg.connect(dsn, autocommit=True) as stats,
            httpx.Client(timeout=10.0) as client,
        ):
            warm_from = _sample(stats, client, metrics_url)
            warm_s, warmed = _warm_up(dsn, run, plan, stats) if plan.warmup_max_s else (0.0, 0)
        started = time.time()

        async def load() -> tuple[int, list[Sample]]:
            committed, samples = await asyncio.gather(
                offer(dsn, run, plan.rate, duration_s),
                _watch(dsn, metrics_url, plan, started),
            )
            return len(committed), samples

        offered, samples = asyncio.run(load())
        achieved = offered / (time.time() - started)
        wait_done(dsn, warmed + offered)  # the warm-up's records count too
        with psycopg.connect(dsn) as conn:
            delivered = conn.execute(_LATENCIES).fetchall()
    finally:
        proc.stop()
    dbs.drop(dsn)
    windows = _windows(plan, started, samples, delivered)
    if warm_s:
        warm = Window(start_s=-warm_s, phase="warm-up", length_s=warm_s)
        warm.latencies_s = [lat for at, lat in delivered if started - warm_s <= at < started]
        _measure(warm, warm_from, samples[0])
        windows.insert(0, warm)
    return windows, achieved


def _windows(
    plan: Plan, started: float, samples: list[Sample], delivered: list[tuple[float, float]]
) -> list[Window]:
    windows = [
        Window(start_s=start_s, phase=plan.phase(start_s), length_s=plan.window_s)
        for start_s in (i * plan.window_s for i in range(len(samples) - 1))
    ]
    for created_at, latency_s in delivered:
        i = int((created_at - started) // plan.window_s)
        if 0 <= i < len(windows):
            windows[i].latencies_s.append(latency_s)
    for window, first, last in zip(windows, samples, samples[1:], strict=False):
        _measure(window, first, last)
    return windows


def _measure(window: Window, first: Sample, last: Sample) -> None:
    """The window's claim means and dead tuples from the samples at its start and end."""
    window.dead = last.dead
    for loop in CLAIM_LOOPS:
        spent = last.claim_s[loop][0] - first.claim_s[loop][0]
        count = last.claim_s[loop][1] - first.claim_s[loop][1]
        window.claim_ms[loop] = spent / count * 1000 if count else float("nan")
