"""``python -m bench``: every figure in one run, printed as one table.

Options: ``--quick`` (fewer jobs and runs, a smoke test), ``--dsn`` (an existing server instead of
a private fsync-on cluster), ``--runs``, ``--jobs``, ``--profile DIR`` (one extra profiled
throughput run per daemon variant, if py-spy is installed), ``--only`` (a subset of sections).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import scenarios
from bench.fixtures import Databases, feishu_server
from outbox_notifier.testing.postgres import throwaway_server

SECTIONS = ("throughput", "transports", "http", "database", "latency", "scale")


@dataclass(frozen=True)
class Mode:
    jobs: int
    runs: int
    http_posts: int
    rate: float
    duration_s: float
    history: int
    claim_reps: int


FULL = Mode(
    jobs=20_000,
    runs=3,
    http_posts=10_000,
    rate=200.0,
    duration_s=30.0,
    history=1_000_000,
    claim_reps=50,
)
QUICK = Mode(
    jobs=2_000, runs=2, http_posts=2_000, rate=200.0, duration_s=5.0, history=100_000, claim_reps=20
)


@dataclass
class Row:
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    target: str = ""
    higher_is_better: bool = True

    def cells(self) -> list[str]:
        if not self.values:
            return [self.name, "-", "-", "-", self.unit, "0", self.target]
        med = statistics.median(self.values)
        return [
            self.name,
            _fmt(med),
            _fmt(min(self.values)),
            _fmt(max(self.values)),
            self.unit,
            str(len(self.values)),
            self.target,
        ]


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _table(rows: list[Row]) -> str:
    header = ["figure", "median", "min", "max", "unit", "runs", "target"]
    cells = [header] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = []
    for n, cell in enumerate(cells):
        lines.append(
            "| "
            + " | ".join(
                c.ljust(w) if i in (0, 4, 6) else c.rjust(w)
                for i, (c, w) in enumerate(zip(cell, widths, strict=True))
            )
            + " |"
        )
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _versions(dbs: Databases) -> str:
    def v(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return (
        f"Python {platform.python_version()}, psycopg {v('psycopg')}, httpx {v('httpx')}, "
        f"httpcore {v('httpcore')}, aiohttp {v('aiohttp')}, httpx-aiohttp {v('httpx-aiohttp')}, "
        f"PostgreSQL {dbs.server_version()}, {platform.machine()} x{_cpus()} CPUs"
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
    with throwaway_server(fsync=True) as found:
        yield found


def _repeat(label: str, runs: int, fn: Callable[[], float]) -> list[float]:
    out = []
    for i in range(runs):
        value = fn()
        _log(f"{label} run {i + 1}/{runs}: {value:,.1f}")
        out.append(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and runs (smoke test)")
    parser.add_argument("--dsn", help="an existing PostgreSQL server (databases are created)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, quick 2)")
    parser.add_argument("--jobs", type=int, help="jobs per throughput run (default 20000)")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="write a sampled profile of one throughput run per daemon variant",
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.runs:
        mode = Mode(**{**mode.__dict__, "runs": args.runs})
    if args.jobs:
        mode = Mode(**{**mode.__dict__, "jobs": args.jobs})
    n, runs = mode.jobs, mode.runs
    rows: list[Row] = []
    started = time.monotonic()
    with _server(args.dsn) as server_dsn, feishu_server() as srv:
        dbs = Databases(server_dsn)
        try:
            versions = _versions(dbs)
            _log(versions)
            if "throughput" in args.only:
                daemon = Row(
                    f"end-to-end: daemon (CLI), {n:,} records", "records/s", target=">= 6x baseline"
                )
                base = Row(
                    f"baseline: psycopg claim 100 + httpx post + update, {n:,} jobs", "jobs/s"
                )
                rss = Row(
                    "daemon peak RSS (CLI, end-to-end run)",
                    "MiB",
                    target="< 150",
                    higher_is_better=False,
                )
                for i in range(runs):  # interleaved, so drift hits both alike
                    rate, peak = scenarios.daemon_throughput(dbs, srv, n, "cli")
                    _log(f"daemon run {i + 1}/{runs}: {rate:,.1f}/s, peak RSS {peak:.0f} MiB")
                    daemon.values.append(rate)
                    rss.values.append(peak)
                    base.values += _repeat(
                        "baseline", 1, lambda: scenarios.baseline_throughput(dbs, srv, n)
                    )
                ratio = Row("ratio daemon / baseline (medians)", "x", target=">= 6")
                ratio.values.append(
                    statistics.median(daemon.values) / statistics.median(base.values)
                )
                rows += [daemon, base, ratio, rss]
            if "transports" in args.only:
                for transport in ("aiohttp", "minimal"):
                    row = Row(f"daemon, provider over httpx + {transport} transport", "records/s")
                    row.values = _repeat(
                        f"daemon/{transport}",
                        runs,
                        lambda t=transport: scenarios.daemon_throughput(dbs, srv, n, t)[0],  # type: ignore[misc]
                    )
                    rows.append(row)
                row = Row("baseline over httpx + aiohttp transport", "jobs/s")
                row.values = _repeat(
                    "baseline/aiohttp",
                    runs,
                    lambda: scenarios.baseline_throughput(dbs, srv, n, "aiohttp"),
                )
                rows.append(row)
            if "http" in args.only:
                posts = mode.http_posts
                for transport, build in (
                    ("default", "json"),
                    ("default", "prebuilt"),
                    ("aiohttp", "prebuilt"),
                    ("minimal", "prebuilt"),
                ):
                    row = Row(
                        f"http alone: httpx {build}, {transport} transport, 50 concurrent",
                        "POSTs/s",
                    )
                    row.values = _repeat(
                        f"http/{transport}/{build}",
                        runs,
                        lambda t=transport, b=build: scenarios.http_alone(srv, posts, t, b),  # type: ignore[misc]
                    )
                    rows.append(row)
            if "database" in args.only:
                row = Row(
                    "database side alone: daemon + instant provider", "records/s", target=">= 5,000"
                )
                row.values = _repeat(
                    "instant", runs, lambda: scenarios.daemon_throughput(dbs, srv, n, "instant")[0]
                )
                rows.append(row)
            if "latency" in args.only:
                lat_rows = [
                    Row(
                        f"latency p{p} at {mode.rate:.0f}/s for {mode.duration_s:.0f} s",
                        "ms",
                        target=t,
                        higher_is_better=False,
                    )
                    for p, t in ((50, "<= 10"), (95, ""), (99, "<= 50"))
                ]
                offered = Row("latency run: offered rate achieved", "events/s")
                for i in range(runs):
                    lat, achieved = scenarios.latency(dbs, srv, mode.rate, mode.duration_s)
                    qs = statistics.quantiles(lat, n=100, method="inclusive")
                    for row, q in zip(lat_rows, (qs[49], qs[94], qs[98]), strict=True):
                        row.values.append(q * 1000)
                    offered.values.append(achieved)
                    _log(
                        f"latency run {i + 1}/{runs}: p50 {qs[49] * 1000:.1f} ms, "
                        f"p99 {qs[98] * 1000:.1f} ms"
                    )
                rows += [*lat_rows, offered]
            if "scale" in args.only:
                empty = scenarios.claim_latency(dbs, 0, mode.claim_reps)
                _log(f"claim latency, empty: {empty}")
                full = scenarios.claim_latency(dbs, mode.history, mode.claim_reps)
                _log(f"claim latency, {mode.history:,} history: {full}")
                hist = f"{mode.history:,}"
                rows += [
                    Row(
                        "claim_records(100), empty database",
                        "ms",
                        [empty[0]],
                        higher_is_better=False,
                    ),
                    Row(
                        f"claim_records(100), {hist} finished rows",
                        "ms",
                        [full[0]],
                        target="<= 2x empty",
                        higher_is_better=False,
                    ),
                    Row(
                        "claim_outbox(100), empty database",
                        "ms",
                        [empty[1]],
                        higher_is_better=False,
                    ),
                    Row(
                        f"claim_outbox(100), {hist} finished rows",
                        "ms",
                        [full[1]],
                        target="<= 2x empty",
                        higher_is_better=False,
                    ),
                ]
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                for variant in ("cli", "aiohttp", "instant"):
                    out = args.profile / f"daemon-{variant}.txt"
                    rate, _ = scenarios.daemon_throughput(dbs, srv, n, variant, profile=out)
                    _log(f"profiled {variant}: {rate:,.1f}/s -> {out}")
        finally:
            dbs.close()
    mode_name = "quick" if args.quick else "full"
    print(f"\n{versions}; mode {mode_name}; {time.monotonic() - started:.0f} s\n")
    print(_table(rows))
    return 0
