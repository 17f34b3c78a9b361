"""What every scenario needs: the PostgreSQL server, per-run databases, the local Feishu server
and the processes under test.

Each run gets a fresh database cloned from a migrated template, so runs do not see each other's
rows. The Feishu look-alike runs in its own process; it is reset between runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import httpx
import msgspec
import psycopg

from bench.baseline import SCHEMA as BASELINE_SCHEMA
from outbox_notifier import migrations
from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.testing.feishu_server import RemoteFeishuServer
from outbox_notifier.testing.postgres import create_database, drop_database

USERS = 500  # channels: deliveries fan out over this many webhook URLs of one local server
SUMMARY = "Your 10:00 review moved to 11:00; standup now clashes with a 1:1."


def event_payload(
    run: str,
    i: int,
    trace_id: str = "",
    ordering_keys: int = 0,
    *,
    user_id: int | None = None,
    summary: str = SUMMARY,
) -> bytes:
    """A valid ``notification.feishu.requested`` v1 payload; dedupe keys unique per run. With
    ``ordering_keys``, event ``i`` carries the ordering key ``task-<i % ordering_keys>``: the
    records of a key are spread over the run, as the updates of one task are. Events go to
    the ``USERS`` users in turn, or all to ``user_id``."""
    ordering = {"ordering_key": f"task-{i % ordering_keys}"} if ordering_keys else {}
    return msgspec.json.encode(
        {
            **ordering,
            "notification_id": i,
            "user_id": i % USERS + 1 if user_id is None else user_id,
            "trigger_id": f"trigger-{i}",
            "preview_id": f"preview-{i}",
            "trigger_type": "schedule_adjustment",
            "target_type": "plan",
            "target_id": i,
            "dedupe_key": f"{run}-{i}",
            "target_url": f"/preview/{i}",
            "summary_text": summary,
            "fallback_text": "",
            "trace_id": trace_id or f"trace-{i}",
            "requested_at": "2026-01-01T09:00:00Z",
        }
    )


def flow_body(i: int) -> dict[str, object]:
    """The Flow webhook body's shape, for the baseline's jobs."""
    return {
        "event": "smartflow.schedule_adjustment_ready",
        "version": "1",
        "notification_id": i,
        "user_id": i % USERS + 1,
        "preview_id": f"preview-{i}",
        "trigger_id": f"trigger-{i}",
        "trigger_type": "schedule_adjustment",
        "target_type": "plan",
        "target_id": i,
        "message": {
            "title": "SmartFlow",
            "summary": SUMMARY + f"\n/preview/{i}",
            "action_text": "open",
            "action_url": f"/preview/{i}",
        },
        "trace_id": f"trace-{i}",
        "sent_at": "2026-01-01T09:00:00Z",
    }


class Databases:
    """Per-run databases on one server, cloned from a template with the schema applied."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        template_dsn = create_database(server_dsn, prefix="bench_template")
        migrations.migrate(template_dsn)
        with psycopg.connect(template_dsn, autocommit=True) as conn:
            conn.execute(BASELINE_SCHEMA)
        self.template = str(psycopg.conninfo.conninfo_to_dict(template_dsn)["dbname"])
        self._template_dsn = template_dsn
        self._made: list[str] = []

    def new(self) -> str:
        dsn = create_database(self.server_dsn, template=self.template, prefix="bench")
        self._made.append(dsn)
        return dsn

    def drop(self, dsn: str) -> None:
        drop_database(self.server_dsn, dsn)
        with contextlib.suppress(ValueError):
            self._made.remove(dsn)

    def close(self) -> None:
        for dsn in [*self._made, self._template_dsn]:
            with contextlib.suppress(psycopg.Error):
                drop_database(self.server_dsn, dsn)

    def server_version(self) -> str:
        with psycopg.connect(self.server_dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "?"


def add_channels(dsn: str, server: RemoteFeishuServer) -> None:
    rows = [(uid, server.flow_url(f"user-{uid}")) for uid in range(1, USERS + 1)]
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox_notifier.notification_channels (user_id, webhook_url)"
            " VALUES (%s, %s)",
            rows,
        )


def enqueue(dsn: str, run: str, n: int, ordering_keys: int = 0) -> float:
    """Writes ``n`` outbox rows through ``outbox_notifier.enqueue`` in one transaction (with
    ``ordering_keys`` keys, see `event_payload`); returns the wall-clock time of the commit."""
    payloads = [event_payload(run, i, ordering_keys=ordering_keys).decode() for i in range(n)]
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "SELECT outbox_notifier.enqueue(%s, p) FROM unnest(%s::jsonb[]) AS p",
            (EVENT_TYPE, payloads),
        )
        conn.commit()
        return time.time()


def job_list(server: RemoteFeishuServer, n: int) -> list[tuple[str, dict[str, object]]]:
    """(webhook URL, Flow body) of each of the bare loop's (and the peers') ``n`` jobs."""
    return [(server.flow_url(f"user-{i % USERS + 1}"), flow_body(i)) for i in range(n)]


def add_jobs(dsn: str, server: RemoteFeishuServer, n: int) -> float:
    """The baseline's jobs, committed at once; returns the wall-clock time of the commit."""
    rows = [msgspec.json.encode({"u": u, "p": p}) for u, p in job_list(server, n)]
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO bench.jobs (url, payload)"
            " SELECT d->>'u', d->'p' FROM unnest(%s::jsonb[]) AS d",
            ([r.decode() for r in rows],),
        )
        conn.commit()
        return time.time()


@dataclass
class Progress:
    done: int
    bad: int
    last_at: float | None  # epoch seconds of the last completion, on the database clock


_RECORDS_PROGRESS = """
SELECT count(*) FILTER (WHERE status = 'sent'),
       count(*) FILTER (WHERE status IN ('dead', 'skipped', 'failed')),
       extract(epoch FROM max(sent_at))::float8
FROM outbox_notifier.notification_records
"""
_JOBS_PROGRESS = """
SELECT count(*) FILTER (WHERE status = 'sent'),
       count(*) FILTER (WHERE status = 'sent' AND http_status <> 200),
       extract(epoch FROM max(sent_at))::float8
FROM bench.jobs
"""


def wait_done(
    dsn: str,
    n: int,
    *,
    jobs: bool = False,
    query: str | None = None,
    timeout_s: float = 600.0,
    poll_s: float = 0.5,
) -> Progress:
    """Polls until ``n`` records (or baseline jobs, or what ``query`` counts) are done; raises on
    failures or timeout. ``query`` returns (done, failed, epoch of the last success).

    The end of a run is the last success as the database recorded it, not when a poll saw it,
    so the poll can be slow: each one counts every row (about 5 ms at 10,000 records), and at
    10 polls a second that was CPU taken from the contender being measured."""
    statement = query or (_JOBS_PROGRESS if jobs else _RECORDS_PROGRESS)
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(statement).fetchone()
            assert row is not None
            progress = Progress(int(row[0]), int(row[1]), row[2])
            if progress.bad:
                raise RuntimeError(f"{progress.bad} deliveries failed; see the server's replies")
            if progress.done >= n:
                return progress
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {progress.done} of {n} sent after {timeout_s}s")
            time.sleep(poll_s)


@dataclass
class Process:
    """A child process whose output lines are collected by a thread."""

    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _seen: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        *,
        merge_stderr: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Starts ``python args``; ``env`` adds to (or overrides) this process's variables."""
        popen = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else None,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        proc = cls(popen)
        threading.Thread(target=proc._read, daemon=True).start()
        return proc

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    def wait_line(self, needle: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        with self._seen:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    tail = "\n".join(self.lines[-20:])
                    raise RuntimeError(f"process never printed {needle!r}; output:\n{tail}")
                self._seen.wait(min(left, 0.2))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds this process (all its threads) has used so far."""
        return cpu_seconds(self.pid)

    def loop_name(self) -> str:
        """``uvloop`` when the process has uvloop's extension mapped, else ``asyncio``."""
        return loop_name(self.pid)

    def peak_rss_mb(self) -> float:
        """Peak resident set size so far (VmHWM), in MiB; NaN where /proc is missing."""
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return float("nan")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


@contextlib.contextmanager
def feishu_server() -> Iterator[RemoteFeishuServer]:
    proc = Process.start(["-m", "outbox_notifier.testing.feishu_server", "--port", "0"])
    try:
        url = proc.wait_line("http://", timeout_s=20.0).strip()
        yield RemoteFeishuServer(url, timeout_s=60.0)
    finally:
        proc.stop()


def server_total(server: RemoteFeishuServer) -> int:
    """Requests the server has recorded, without downloading them."""
    response = httpx.get(f"{server.url}/_requests?since=1000000000", timeout=30.0)
    response.raise_for_status()
    return int(response.json()["total"])


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc (clock ticks, 10 ms at 100 Hz); NaN without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces and parentheses: split after its ")".
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def loop_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "uvloop" if "/uvloop/" in maps.read() else "asyncio"
    except OSError:
        return "unknown"


def egress_overrides() -> dict[str, str]:
    """Settings the daemon needs to post to the loopback look-alike: the URL policy, and the
    egress guard's allow list (it refuses loopback destinations unless allowed)."""
    return {
        "flow_allowed_schemes": "http",
        "flow_allowed_hosts": "127.0.0.1",
        "http_listen": "127.0.0.1:0",
        "egress_allow_cidrs": "127.0.0.0/8",
    }


def daemon_args(dsn: str, variant: str, extra: dict[str, str] | None = None) -> list[str]:
    """Command line of the daemon under test: the real CLI, or ``bench.child`` variants."""
    if variant == "cli":
        args = ["-m", "outbox_notifier", "run", "--dsn", dsn]
        for key, value in {**egress_overrides(), **(extra or {})}.items():
            args += ["--set", f"{key}={value}"]
        return args
    if variant == "instant":
        return ["-m", "bench.child", "--dsn", dsn, "--provider", "instant"]
    return ["-m", "bench.child", "--dsn", dsn, "--transport", variant]
