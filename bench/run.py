"""``python -m bench``: every figure of the performance targets in one run, printed as tables.

Options: ``--quick`` (a smoke run of every section in a few minutes), ``--dsn`` (an existing
server instead of a private fsync-on cluster), ``--runs``, ``--jobs``, ``--hold-s`` (how long the
snapshot section holds its snapshot), ``--profile DIR`` (one extra profiled throughput run per
daemon variant, if py-spy is installed), ``--only`` (a subset of sections; ``transports`` and
``http`` run only when named).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import operator
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench import digests, footprint, peers, scenarios, snapshot
from bench.fixtures import Databases, feishu_server
from bench.otlp_sink import otlp_sink
from outbox_notifier.testing.feishu_server import RemoteFeishuServer
from outbox_notifier.testing.postgres import throwaway_server

SECTIONS = (
    "throughput", "tracing", "peers", "database", "latency", "purge", "scale", "footprint",
    "snapshot", "ordering", "digests", "transports", "http",
)  # fmt: skip
DEFAULT_SECTIONS = SECTIONS[:11]  # the last two compare HTTP stacks; run them by name
# The ordering section: every record carries an ordering key, RECORDS_PER_KEY records a key.
RECORDS_PER_KEY = 4
# The yardstick posting as the daemon's providers do (a built request straight to the
# transport): the like-for-like comparison for the pipeline's own cost.
BARE_TRANSPORT = "bare loop, requests built for the transport (as the daemon sends)"


@dataclass(frozen=True)
class Mode:
    name: str
    jobs: int
    runs: int
    http_posts: int
    rate: float
    duration_s: float
    history: int
    claim_reps: int
    snapshot: snapshot.Plan
    burst: int  # records of the digests section's burst to one chat robot


FULL = Mode(
    name="full",
    jobs=10_000,
    runs=3,
    http_posts=10_000,
    rate=200.0,
    duration_s=30.0,
    history=1_000_000,
    claim_reps=50,
    snapshot=snapshot.Plan(
        rate=300.0, window_s=60.0, before_s=60.0, hold_s=600.0, after_s=180.0, warmup_max_s=300.0
    ),
    burst=300,
)
QUICK = Mode(
    name="quick",
    jobs=1_000,
    runs=1,
    http_posts=1_000,
    rate=200.0,
    duration_s=3.0,
    history=20_000,
    claim_reps=10,
    snapshot=snapshot.Plan(rate=300.0, window_s=10.0, before_s=10.0, hold_s=30.0, after_s=20.0),
    burst=40,
)

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass
class Row:
    """One figure: its runs' values, and the target its median is held to (if any)."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    target: str = ""
    # (operator, bound) the median must satisfy; the target text says it for people.
    check: tuple[str, float] | None = None

    def met(self) -> str:
        if self.check is None or not self.values:
            return ""
        med = statistics.median(self.values)
        if med != med:  # NaN: not measurable here
            return "n/a"
        op, bound = self.check
        return "yes" if _OPS[op](med, bound) else "NO"

    def cells(self) -> list[str]:
        if not self.values:
            return [self.name, "-", "-", "-", self.unit, "0", self.target, ""]
        med = statistics.median(self.values)
        return [
            self.name,
            _fmt(med),
            _fmt(min(self.values)),
            _fmt(max(self.values)),
            self.unit,
            str(len(self.values)),
            self.target,
            self.met(),
        ]


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _table(header: list[str], cells: list[list[str]], left: set[int]) -> str:
    rows = [header, *cells]
    widths = [max(len(c[i]) for c in rows) for i in range(len(header))]
    lines = []
    for n, cell in enumerate(rows):
        lines.append(
            "| "
            + " | ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cell, widths, strict=True))
            )
            + " |"
        )
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def figures_table(rows: list[Row]) -> str:
    header = ["figure", "median", "min", "max", "unit", "runs", "target", "met"]
    return _table(header, [r.cells() for r in rows], {0, 4, 6, 7})


@dataclass
class Contender:
    """One system draining the same N jobs: the daemon, the yardstick, a peer."""

    name: str
    runs: list[scenarios.Throughput] = field(default_factory=list)

    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    def cpu_us(self) -> float:
        return statistics.median(r.cpu_us for r in self.runs)


def peers_table(contenders: list[Contender], yardstick: Contender | None) -> str:
    header = ["system (same N jobs, same sink, 50 at a time)", "jobs/s", "min", "max"]
    header += ["CPU us/job", "x yardstick", "loop", "runs"]
    base = yardstick.rate() if yardstick is not None and yardstick.runs else float("nan")
    cells = []
    for c in contenders:
        if not c.runs:
            continue
        rates = [r.rate for r in c.runs]
        cells.append(
            [
                c.name,
                _fmt(c.rate()),
                _fmt(min(rates)),
                _fmt(max(rates)),
                _fmt(c.cpu_us()),
                _fmt(c.rate() / base),
                "/".join(sorted({r.loop for r in c.runs})),
                str(len(c.runs)),
            ]
        )
    return _table(header, cells, {0, 6})


def footprint_table(contenders: list[Contender]) -> str:
    header = ["system (same N jobs, enqueue included)", "jobs/s", "WAL B/job", "min", "max"]
    header += ["PG statement us/job", "min", "max", "runs"]
    cells = []
    for c in contenders:
        if not c.runs:
            continue
        wal = [r.wal_b for r in c.runs]
        spent = [r.statement_us for r in c.runs]
        cells.append(
            [c.name, _fmt(c.rate())]
            + [_fmt(f(wal)) for f in (statistics.median, min, max)]
            + [_fmt(f(spent)) for f in (statistics.median, min, max)]
            + [str(len(c.runs))]
        )
    return _table(header, cells, {0})


def wal_table(run: scenarios.Throughput, n: int, top: int = 15) -> str:
    """Where one drain's WAL went, per delivered record: the ``top`` largest relation and record
    type pairs, then the rest together."""
    header = ["WAL of one daemon drain: relation", "record", "records/job", "B/job", "share"]
    total = sum(s.bytes for s in run.wal_shares) or 1
    shown = run.wal_shares[:top]
    rest = run.wal_shares[top:]
    cells = [
        [s.relation, s.record, f"{s.count / n:.2f}", _fmt(s.bytes / n), f"{s.bytes / total:.0%}"]
        for s in shown
    ]
    if rest:
        bytes_ = sum(s.bytes for s in rest)
        cells.append(
            [f"(the other {len(rest)})", "", f"{sum(s.count for s in rest) / n:.2f}",
             _fmt(bytes_ / n), f"{bytes_ / total:.0%}"]
        )  # fmt: skip
    cells.append(["total", "", "", _fmt(total / n), "100%"])
    return _table(header, cells, {0, 1})


def statement_table(run: scenarios.Throughput, n: int, top: int = 10, width: int = 70) -> str:
    """Where one drain's statement time went, per delivered record: the ``top`` statements
    (their text cut to ``width``), then the rest together."""
    header = ["statement time of one daemon drain: statement", "calls/job", "us/job", "share"]
    total = sum(s.exec_ms for s in run.statement_shares) or 1.0
    shown = run.statement_shares[:top]
    rest = run.statement_shares[top:]

    def cut(text: str) -> str:
        return text if len(text) <= width else text[: width - 3] + "..."

    cells = [
        [cut(s.query), f"{s.calls / n:.3f}", _fmt(s.exec_ms * 1000 / n), f"{s.exec_ms / total:.0%}"]
        for s in shown
    ]
    if rest:
        spent = sum(s.exec_ms for s in rest)
        cells.append(
            [f"(the other {len(rest)})", f"{sum(s.calls for s in rest) / n:.3f}",
             _fmt(spent * 1000 / n), f"{spent / total:.0%}"]
        )  # fmt: skip
    cells.append(["total", "", _fmt(total * 1000 / n), "100%"])
    return _table(header, cells, {0})


def snapshot_table(plan: snapshot.Plan, windows: list[snapshot.Window]) -> str:
    header = [f"window (s), {plan.rate:.0f} events/s", "snapshot", "events", "p50 ms", "p99 ms"]
    header += [f"{loop} claim ms" for loop in snapshot.CLAIM_LOOPS]
    header += ["dead tuples: records", "outbox"]
    cells = [
        [
            f"{w.start_s:.0f}-{w.start_s + w.length_s:.0f}",
            w.phase,
            f"{len(w.latencies_s):,}",
            _fmt(_quantile(w.latencies_s, 50) * 1000),
            _fmt(_quantile(w.latencies_s, 99) * 1000),
            *(_fmt(w.claim_ms[loop]) for loop in snapshot.CLAIM_LOOPS),
            f"{w.dead.get('notification_records', 0):,}",
            f"{w.dead.get('outbox', 0):,}",
        ]
        for w in windows
    ]
    return _table(header, cells, {0, 1})


# Commit-to-delivery p99 the held-snapshot run is held to, in every window.
SNAPSHOT_P99_MS = 100.0


def _recovery_s(plan: snapshot.Plan, windows: list[snapshot.Window]) -> float:
    """Seconds from the release to the end of the last window after it whose p99 is over
    target (0: none was); infinite when the run's last window still was."""
    after = [w for w in windows if w.phase == "after"]
    slow = [w for w in after if _quantile(w.latencies_s, 99) * 1000 > SNAPSHOT_P99_MS]
    if not slow:
        return 0.0
    if slow[-1] is after[-1]:
        return float("inf")
    return slow[-1].start_s + plan.window_s - (plan.before_s + plan.hold_s)


def _versions(dbs: Databases) -> str:
    def v(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return (
        f"Python {platform.python_version()}, psycopg {v('psycopg')}, httpx {v('httpx')}, "
        f"aiohttp {v('aiohttp')}, httpx-aiohttp {v('httpx-aiohttp')}, uvloop {v('uvloop')}, "
        f"{peers.versions()}, PostgreSQL {dbs.server_version()}, "
        f"{platform.machine()} x{_cpus()} CPUs"
    )


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    with throwaway_server(fsync=True, settings=footprint.SERVER_SETTINGS) as found:
        yield found


def _repeat(label: str, runs: int, fn: Callable[[], float]) -> list[float]:
    out = []
    for i in range(runs):
        value = fn()
        _log(f"{label} run {i + 1}/{runs}: {value:,.1f}")
        out.append(value)
    return out


def _drain(label: str, contender: Contender, fn: Callable[[], scenarios.Throughput]) -> None:
    result = fn()
    contender.runs.append(result)
    _log(
        f"{label} run {len(contender.runs)}: {result.rate:,.1f}/s, "
        f"{result.cpu_us:,.0f} us CPU/job, {result.loop}, peak RSS {result.rss_mb:.0f} MiB"
    )


def _quantile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99) of ``values``, inclusive method; NaN for fewer than 2."""
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class Bench:
    """Runs the sections in order, collecting figure rows and the side-by-side contenders."""

    def __init__(self, dbs: Databases, srv: RemoteFeishuServer, mode: Mode) -> None:
        self.dbs, self.srv, self.mode = dbs, srv, mode
        self.rows: list[Row] = []
        self.contenders: list[Contender] = []
        self.yardstick: Contender | None = None
        self.footprints: list[Contender] = []
        self.tables: list[str] = []  # sections' own tables, printed after the others
        self.notes: list[str] = []

    def throughput(self) -> None:
        dbs, srv, n, runs = self.dbs, self.srv, self.mode.jobs, self.mode.runs
        daemon = Contender("daemon: CLI, default settings")
        bare = Contender("yardstick: bare loop, psycopg + httpx over aiohttp")
        for _ in range(runs):  # interleaved, so drift hits both alike
            _drain("daemon", daemon, lambda: scenarios.daemon_throughput(dbs, srv, n, "cli"))
            _drain("yardstick", bare, lambda: scenarios.baseline_throughput(dbs, srv, n))
        self.contenders += [daemon, bare]
        self.yardstick = bare
        loop = "/".join(sorted({r.loop for r in bare.runs}))
        ratio = daemon.rate() / bare.rate()
        beyond = daemon.cpu_us() - bare.cpu_us()
        self.rows += [
            Row(
                f"end-to-end: daemon (CLI), {n:,} records",
                "records/s",
                [r.rate for r in daemon.runs],
            ),
            Row(
                f"yardstick: bare claim 100 / POST / update, httpx over aiohttp, {loop}",
                "jobs/s",
                [r.rate for r in bare.runs],
            ),
            Row(
                "ratio daemon / yardstick (medians)",
                "x",
                [ratio],
                target=">= 0.9",
                check=(">=", 0.9),
            ),
            Row(
                "daemon CPU per delivered record",
                "us",
                [r.cpu_us for r in daemon.runs],
                target="<= 400",
                check=("<=", 400.0),
            ),
            Row("yardstick CPU per job", "us", [r.cpu_us for r in bare.runs]),
            Row(
                "daemon CPU beyond the yardstick's (medians)",
                "us",
                [beyond],
                target="<= 50",
                check=("<=", 50.0),
            ),
            Row(
                "daemon peak RSS (CLI, end-to-end run)",
                "MiB",
                [r.rss_mb for r in daemon.runs],
                target="< 150",
                check=("<", 150.0),
            ),
        ]

    def tracing(self) -> None:
        """The CLI daemon with tracing off and on (every span sampled, exported over OTLP/HTTP
        to a local sink), runs interleaved."""
        dbs, srv, n, runs = self.dbs, self.srv, self.mode.jobs, self.mode.runs
        off = Contender("daemon: CLI, tracing off (the default)")
        on = Contender("daemon: CLI, tracing on, 100% sampled, OTLP/HTTP")
        tenth = Contender("daemon: CLI, tracing on, 10% sampled, OTLP/HTTP")
        with otlp_sink() as sink:
            env = _traced_env(sink.url)
            sampled = {
                **env,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
            }
            traced = {"tracing": "true"}
            for _ in range(runs):
                _drain("tracing off", off, lambda: scenarios.daemon_throughput(dbs, srv, n, "cli"))
                _drain(
                    "tracing on",
                    on,
                    lambda: scenarios.daemon_throughput(
                        dbs, srv, n, "cli", settings=traced, env=env
                    ),
                )
                _drain(
                    "tracing on, 10%",
                    tenth,
                    lambda: scenarios.daemon_throughput(
                        dbs, srv, n, "cli", settings=traced, env=sampled
                    ),
                )
            exported = sink.requests
        if not exported:
            raise RuntimeError("tracing on, yet no span reached the OTLP sink")
        from bench import otel_floor  # the otel extra, which only this section needs

        floor = otel_floor.measure()
        _log(f"tracing: the SDK alone, {floor}")
        off_cpu = statistics.median(r.cpu_us for r in off.runs)
        self.rows += [
            Row(f"daemon, tracing off, {n:,} records", "records/s", [r.rate for r in off.runs]),
            Row(
                f"daemon, tracing on (100% sampled, OTLP/HTTP), {n:,} records",
                "records/s",
                [r.rate for r in on.runs],
            ),
            Row(
                "ratio tracing on / off (medians)",
                "x",
                [on.rate() / off.rate()],
                target=">= 0.8",
                check=(">=", 0.8),
            ),
            Row(
                "ratio tracing on, 10% sampled / off (medians)",
                "x",
                [tenth.rate() / off.rate()],
            ),
            Row("daemon CPU per record, tracing off", "us", [r.cpu_us for r in off.runs]),
            Row("daemon CPU per record, tracing on", "us", [r.cpu_us for r in on.runs]),
            Row("daemon CPU per record, tracing on, 10%", "us", [r.cpu_us for r in tenth.runs]),
            Row(
                "OpenTelemetry SDK alone, per record: 2 spans created and ended",
                "us",
                [floor.create_us],
            ),
            Row(
                "OpenTelemetry SDK alone, per record: 2 spans encoded for OTLP",
                "us",
                [floor.encode_us],
            ),
            Row(
                "highest ratio the SDK allows: CPU off / (CPU off + SDK alone)",
                "x",
                [off_cpu / (off_cpu + floor.total_us)],
            ),
        ]
        self.notes.append(f"tracing: {exported} OTLP export requests reached the sink")

    def peers(self) -> None:
        dbs, srv, n, runs = self.dbs, self.srv, self.mode.jobs, self.mode.runs
        absent = peers.missing()
        for system, packages in absent.items():
            note = (
                f"{system} skipped: {', '.join(packages)} not installed (pip install -e '.[bench]')"
            )
            self.notes.append(note)
            _log(note)
        for system in peers.SYSTEMS:
            if system in absent:
                continue
            peer = Contender(f"{system} + httpx over aiohttp")
            for _ in range(runs):
                _drain(system, peer, lambda s=system: scenarios.peer_throughput(dbs, srv, n, s))  # type: ignore[misc]
            self.contenders.append(peer)
        for transport, loop, send, label in (
            ("aiohttp", "auto", "transport", BARE_TRANSPORT),
            ("aiohttp", "asyncio", "client", "bare loop, httpx over aiohttp, on asyncio"),
            ("default", "auto", "client", "bare loop, httpx's own pool"),
            ("none", "auto", "client", "bare loop without HTTP (database only)"),
        ):
            bare = Contender(label)
            for _ in range(runs):
                _drain(
                    label,
                    bare,
                    lambda t=transport, lp=loop, sd=send: scenarios.baseline_throughput(  # type: ignore[misc]
                        dbs, srv, n, t, lp, send=sd
                    ),
                )
            self.contenders.append(bare)

    def database(self) -> None:
        dbs, srv, n = self.dbs, self.srv, self.mode.jobs
        row = Row(
            "database side alone: daemon + instant provider",
            "records/s",
            target=">= 10,000",
            check=(">=", 10_000.0),
        )
        cpu = Row("database side alone: daemon CPU per record", "us")
        for i in range(self.mode.runs):
            result = scenarios.daemon_throughput(dbs, srv, n, "instant")
            row.values.append(result.rate)
            cpu.values.append(result.cpu_us)
            _log(f"instant run {i + 1}/{self.mode.runs}: {result.rate:,.1f}/s, "
                 f"{result.cpu_us:,.0f} us CPU/record")  # fmt: skip
        self.rows += [row, cpu]

    def latency(self) -> None:
        mode = self.mode
        label = f"at {mode.rate:.0f}/s for {mode.duration_s:.0f} s"
        p50 = Row(f"latency p50 {label}", "ms", target="<= 10", check=("<=", 10.0))
        p95 = Row(f"latency p95 {label}", "ms")
        p99 = Row(f"latency p99 {label}", "ms", target="<= 50", check=("<=", 50.0))
        offered = Row("latency run: offered rate achieved", "events/s")
        for i in range(mode.runs):
            lat, achieved = scenarios.latency(self.dbs, self.srv, mode.rate, mode.duration_s)
            for row, q in ((p50, 50), (p95, 95), (p99, 99)):
                row.values.append(_quantile(lat, q) * 1000)
            offered.values.append(achieved)
            _log(f"latency run {i + 1}/{mode.runs}: p50 {p50.values[-1]:.1f} ms, "
                 f"p99 {p99.values[-1]:.1f} ms")  # fmt: skip
        self.rows += [p50, p95, p99, offered]

    def purge(self) -> None:
        mode = self.mode
        hist = f"{mode.history:,}"
        records = Row(
            f"purge {hist} finished records with their attempts, under load",
            "records/s",
            target=">= 20,000",
            check=(">=", 20_000.0),
        )
        outbox = Row(f"purge {hist} finished outbox rows, under load", "rows/s")
        p50 = Row(f"latency p50 during the purge, {mode.rate:.0f}/s offered", "ms")
        p99 = Row(
            f"latency p99 during the purge, {mode.rate:.0f}/s offered",
            "ms",
            target="<= 50",
            check=("<=", 50.0),
        )
        events = Row("events delivered during the purge", "events")
        for i in range(mode.runs):
            result = scenarios.purge_under_load(self.dbs, self.srv, mode.history, mode.rate)
            records.values.append(result.records_per_s)
            outbox.values.append(result.outbox_per_s)
            p50.values.append(_quantile(result.latencies, 50) * 1000)
            p99.values.append(_quantile(result.latencies, 99) * 1000)
            events.values.append(len(result.latencies))
            _log(
                f"purge run {i + 1}/{mode.runs}: {result.records_per_s:,.0f} records/s, "
                f"{result.outbox_per_s:,.0f} outbox rows/s, {len(result.latencies)} events during,"
                f" p99 {p99.values[-1]:.1f} ms, offered {result.achieved:.0f}/s"
            )
        self.rows += [records, outbox, p50, p99, events]

    def scale(self) -> None:
        mode = self.mode
        empty = scenarios.claim_latency(self.dbs, 0, mode.claim_reps)
        _log(f"claim latency, empty: {empty}")
        full = scenarios.claim_latency(self.dbs, mode.history, mode.claim_reps)
        _log(f"claim latency, {mode.history:,} history: {full}")
        hist = f"{mode.history:,}"
        self.rows += [
            Row("claim_records(100), empty database", "ms", [empty[0]]),
            Row(
                f"claim_records(100), {hist} finished rows",
                "ms",
                [full[0]],
                target="<= 2x empty",
                check=("<=", 2 * empty[0]),
            ),
            Row("claim_outbox(100), empty database", "ms", [empty[1]]),
            Row(
                f"claim_outbox(100), {hist} finished rows",
                "ms",
                [full[1]],
                target="<= 2x empty",
                check=("<=", 2 * empty[1]),
            ),
        ]

    def footprint(self) -> None:
        dbs, srv, n = self.dbs, self.srv, self.mode.jobs
        meter = footprint.Meter.probe(dbs.server_dsn)
        if not meter.statements:
            self.notes.append(f"PostgreSQL statement time not measured: {meter.why}")
        if not meter.checkpoint:
            self.notes.append("footprint runs without a CHECKPOINT before each (not permitted)")
        drains: list[tuple[str, Callable[[], scenarios.Throughput]]] = [
            (
                "daemon: CLI, default settings",
                lambda: scenarios.daemon_throughput(dbs, srv, n, "cli", meter=meter),
            ),
            (
                "daemon: CLI, durable_claims = true",
                lambda: scenarios.daemon_throughput(
                    dbs, srv, n, "cli", meter=meter, settings={"durable_claims": "true"}
                ),
            ),
            (
                "yardstick: bare loop, psycopg + httpx over aiohttp",
                lambda: scenarios.baseline_throughput(dbs, srv, n, meter=meter),
            ),
        ]
        absent = peers.missing()
        drains += [
            (
                f"{system} + httpx over aiohttp",
                lambda s=system: scenarios.peer_throughput(dbs, srv, n, s, meter),  # type: ignore[misc]
            )
            for system in peers.SYSTEMS
            if system not in absent
        ]
        self.footprints = [Contender(name) for name, _ in drains]
        for _ in range(self.mode.runs):  # interleaved, so drift hits all alike
            for contender, (_, drain) in zip(self.footprints, drains, strict=True):
                result = drain()
                contender.runs.append(result)
                _log(
                    f"footprint {contender.name} run {len(contender.runs)}: {result.rate:,.1f}/s,"
                    f" {result.wal_b:,.0f} B WAL/job, {result.statement_us:,.1f} us statements/job"
                )
        daemon = self.footprints[0].runs
        broken_down = [r for r in daemon if r.wal_shares]
        if broken_down:  # the median run's
            median = sorted(broken_down, key=lambda r: r.wal_b)[len(broken_down) // 2]
            self.tables.append(wal_table(median, n))
        else:
            self.notes.append("WAL not broken down: pg_walinspect is not available here")
        timed = [r for r in daemon if r.statement_shares]
        if timed:  # the median run's
            median = sorted(timed, key=lambda r: r.statement_us)[len(timed) // 2]
            self.tables.append(statement_table(median, n))
        self.rows += [
            Row(
                "WAL per delivered record, daemon (CLI, enqueue included)",
                "B",
                [r.wal_b for r in daemon],
                target="<= 2,500",
                check=("<=", 2_500.0),
            ),
            Row(
                "PostgreSQL statement time per delivered record, daemon (CLI)",
                "us",
                [r.statement_us for r in daemon],
                target="<= 110",
                check=("<=", 110.0),
            ),
        ]

    def snapshot(self) -> None:
        plan = self.mode.snapshot
        _log(
            f"snapshot: {plan.rate:.0f} events/s for "
            f"{plan.before_s + plan.hold_s + plan.after_s:.0f} s, snapshot held from "
            f"{plan.before_s:.0f} s to {plan.before_s + plan.hold_s:.0f} s"
            + (f", after a warm-up of up to {plan.warmup_max_s:.0f} s" if plan.warmup_max_s else "")
        )
        windows, achieved = snapshot.held_snapshot(self.dbs, self.srv, plan)
        self.tables.append(snapshot_table(plan, windows))
        held = f"REPEATABLE READ held {plan.hold_s:.0f} s at {plan.rate:.0f}/s"
        before = [w for w in windows if w.phase == "before"]
        until_release = [w for w in windows if w.phase in ("before", "held")]
        rows = [
            Row(
                f"held snapshot ({held}): worst p99 of a {plan.window_s:.0f} s window",
                "ms",
                [max(_quantile(w.latencies_s, 99) * 1000 for w in until_release)],
                target=f"<= {SNAPSHOT_P99_MS:.0f}, every window",
                check=("<=", SNAPSHOT_P99_MS),
            )
        ]
        last_held = [w for w in windows if w.phase == "held"][-1]
        for loop in snapshot.CLAIM_LOOPS:
            flat = last_held.claim_ms[loop] / statistics.median(w.claim_ms[loop] for w in before)
            rows.append(
                Row(
                    f"held snapshot: {loop} claim, last held window / before",
                    "x",
                    [flat],
                    target="flat: <= 2x",
                    check=("<=", 2.0),
                )
            )
        rows.append(
            Row(
                f"held snapshot: after release, until p99 <= {SNAPSHOT_P99_MS:.0f} ms",
                "s",
                [_recovery_s(plan, windows)],
                target="<= 60",
                check=("<=", 60.0),
            )
        )
        rows.append(Row("held snapshot run: offered rate achieved", "events/s", [achieved]))
        for w in windows:
            if w.phase == "warm-up":  # the start on fresh tables (bench/snapshot.py), not judged
                rows.append(
                    Row(
                        f"held snapshot run: warm-up ({w.length_s:.0f} s, fresh tables until "
                        "first analyzed and vacuumed), p99",
                        "ms",
                        [_quantile(w.latencies_s, 99) * 1000],
                    )
                )
        self.rows += rows

    def ordering(self) -> None:
        """The CLI daemon with an ordering key on every record beside the same run without,
        interleaved run by run."""
        dbs, srv, n, runs = self.dbs, self.srv, self.mode.jobs, self.mode.runs
        keys = max(n // RECORDS_PER_KEY, 1)
        plain = Row("daemon (CLI), no ordering keys", "records/s")
        keyed = Row(f"daemon (CLI), ordering keys ({RECORDS_PER_KEY} records a key)", "records/s")
        for i in range(runs):
            for row, k in ((plain, 0), (keyed, keys)):
                rate = scenarios.daemon_throughput(dbs, srv, n, "cli", ordering_keys=k).rate
                row.values.append(rate)
                _log(f"ordering run {i + 1}/{runs}, {k} keys: {rate:,.1f}/s")
        ratio = Row(
            "ratio with ordering keys / without",
            "x",
            [a / b for a, b in zip(keyed.values, plain.values, strict=True)],
            target=">= 0.7",
            check=(">=", 0.7),
        )
        self.rows += [plain, keyed, ratio]

    def digests(self) -> None:
        """A burst for one chat robot, with digests on and off, one run each (the figures are
        the budgets', not the machine's): time to the last delivery, calls, records per call,
        and the busiest second and minute as the platform saw them."""
        n = self.mode.burst
        # the bounds for a burst of 300, with digests on
        within_s = {"dingtalk_bot": 120.0, "feishu_bot": 30.0, "slack_webhook": 30.0}
        table: list[list[str]] = []
        for provider, (_, _, budget) in digests.PLATFORMS.items():
            for on in (True, False):
                result = digests.burst(self.dbs, self.srv, provider, n, digests=on)
                state = "on" if on else "off"
                _log(
                    f"digests {state}, {provider}: last delivery {result.last_delivery_s:.1f} s,"
                    f" {result.calls} calls, {result.records_per_call:.1f} records a call"
                )
                table.append([
                    provider, budget, state, _fmt(result.last_delivery_s), str(result.calls),
                    _fmt(result.records_per_call), str(result.peak_per_s),
                    str(result.peak_per_min),
                ])  # fmt: skip
                if on:
                    self.rows.append(
                        Row(
                            f"burst of {n} to one {provider} ({budget}), digests on: "
                            "last delivery after the commit",
                            "s",
                            [result.last_delivery_s],
                            target=f"<= {within_s[provider]:.0f}",
                            check=("<=", within_s[provider]),
                        )
                    )
        header = [f"burst of {n}, one target", "budget", "digests", "last delivery s", "calls"]
        header += ["records/call", "peak calls/s", "peak calls/min"]
        self.tables.append(_table(header, table, {0, 1, 2}))

    def transports(self) -> None:
        dbs, srv, n, runs = self.dbs, self.srv, self.mode.jobs, self.mode.runs
        for transport in ("aiohttp", "minimal", "default"):
            row = Row(f"daemon (bench.child), provider over httpx + {transport}", "records/s")
            row.values = _repeat(
                f"daemon/{transport}",
                runs,
                lambda t=transport: scenarios.daemon_throughput(dbs, srv, n, t).rate,  # type: ignore[misc]
            )
            self.rows.append(row)

    def http(self) -> None:
        posts, runs = self.mode.http_posts, self.mode.runs
        for transport, build in (
            ("default", "json"),
            ("default", "prebuilt"),
            ("aiohttp", "json"),
            ("aiohttp", "prebuilt"),
            ("minimal", "prebuilt"),
        ):
            row = Row(f"http alone: httpx {build}, {transport} transport, 50 concurrent", "POSTs/s")
            row.values = _repeat(
                f"http/{transport}/{build}",
                runs,
                lambda t=transport, b=build: scenarios.http_alone(self.srv, posts, t, b),  # type: ignore[misc]
            )
            self.rows.append(row)

    def profile(self, out_dir: Path, *, traced: bool) -> None:
        """One profiled throughput run per daemon variant, and the yardstick's; ``traced``: one
        more of the CLI daemon with tracing on (every span sampled, exported to a sink)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        for variant in ("cli", "instant"):
            out = out_dir / f"daemon-{variant}.txt"
            result = scenarios.daemon_throughput(
                self.dbs, self.srv, self.mode.jobs, variant, profile=out
            )
            _log(f"profiled {variant}: {result.rate:,.1f}/s -> {out}")
        if traced:
            out = out_dir / "daemon-cli-traced.txt"
            with otlp_sink() as sink:
                result = scenarios.daemon_throughput(
                    self.dbs, self.srv, self.mode.jobs, "cli", profile=out,
                    settings={"tracing": "true"}, env=_traced_env(sink.url),
                )  # fmt: skip
            _log(f"profiled cli, tracing on: {result.rate:,.1f}/s -> {out}")
        out = out_dir / "yardstick.txt"
        result = scenarios.baseline_throughput(self.dbs, self.srv, self.mode.jobs, profile=out)
        _log(f"profiled yardstick: {result.rate:,.1f}/s -> {out}")


def _traced_env(sink_url: str) -> dict[str, str]:
    """The daemon's environment for tracing on, every span sampled, exported to the sink."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url,
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_SERVICE_NAME": "outbox-notifier-bench",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every section, small (smoke run)")
    parser.add_argument("--dsn", help="an existing PostgreSQL server (databases are created)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, quick 1)")
    parser.add_argument("--jobs", type=int, help="jobs per throughput run (default 10000)")
    parser.add_argument("--history", type=int, help="finished rows to purge and to claim beside")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="write a sampled profile of one throughput run per daemon variant (and one with "
        "tracing on, if the tracing section runs)",
    )
    parser.add_argument(
        "--hold-s",
        type=float,
        help="seconds the snapshot section holds its snapshot (default 600, quick 30)",
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS))
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    for name in ("runs", "jobs", "history"):
        if getattr(args, name):
            mode = replace(mode, **{name: getattr(args, name)})
    if args.hold_s:  # whole windows, so that every window has one phase
        windows = max(round(args.hold_s / mode.snapshot.window_s), 1)
        mode = replace(
            mode, snapshot=replace(mode.snapshot, hold_s=windows * mode.snapshot.window_s)
        )
    started = time.monotonic()
    with _server(args.dsn) as server_dsn, feishu_server() as srv:
        dbs = Databases(server_dsn)
        try:
            versions = _versions(dbs)
            _log(versions)
            bench = Bench(dbs, srv, mode)
            for section in SECTIONS:  # always in this order, whatever order --only names them
                if section in args.only:
                    _log(f"section {section}")
                    getattr(bench, section)()
            if args.profile is not None:
                bench.profile(args.profile, traced="tracing" in args.only)
        finally:
            dbs.close()
    print(f"\n{versions}; mode {mode.name}; {time.monotonic() - started:.0f} s\n")
    print(figures_table(bench.rows))
    if bench.contenders:
        print()
        print(peers_table(bench.contenders, bench.yardstick))
    if bench.footprints:
        print()
        print(footprint_table(bench.footprints))
    for table in bench.tables:
        print()
        print(table)
    for note in bench.notes:
        print(f"\nnote: {note}")
    return 0
