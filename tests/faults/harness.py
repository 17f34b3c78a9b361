"""Fault-injection harness: real daemon processes, a producer, a lease watch, one invariant check.

A scenario starts a `Fleet` of ``python -m outbox_notifier run`` subprocesses against one
database and the local Feishu-like server, runs a `Producer` that commits outbox events while
faults are injected (kills, a database restart, provider chaos, a pooler in between), waits
for the pipeline to settle and ends with `check_invariants`, written once for every scenario
(the watches, `LeaseWatch` and `TargetWatch`, sample the database from a thread meanwhile):

* every outbox row is ``relayed`` or ``rejected`` (with a reason), and every relayed row maps
  to exactly one notification record by its (normalised) dedupe key; no record lacks a row;
* every record is terminal (``sent``/``dead``/``skipped``) with a reason when not sent,
  ``attempt_count <= max_attempts``, and its applied ``delivery_attempts`` rows number exactly
  ``attempt_count``;
* per record the server saw at most one successful delivery (2xx, Feishu ``code`` 0), plus at
  most one more per time a worker holding its lease died mid-call (each such death is logged as
  a ``sending_lease_expired`` attempt); a ``sent`` record was received at least once;
* a result is logged as late (``applied = false``) only for a record whose lease was taken
  over (a ``sending_lease_expired`` attempt), never for a result that was in fact applied;
* no record stayed ``sending`` past its lease for longer than the rescue needs (`LeaseWatch`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import msgspec
import psycopg

from outbox_notifier import events
from outbox_notifier.testing.feishu_server import FLOW_PREFIX, FeishuServer, Recorded

TERMINAL = ("sent", "dead", "skipped")

# Settings every replica gets: the local server's URLs allowed, quick polls and rescues.
BASE_SETTINGS: tuple[str, ...] = (
    "flow_allowed_schemes=http",
    "flow_allowed_hosts=127.0.0.1",
    "egress_allow_cidrs=127.0.0.0/8",
    "poll_interval_s=0.5",
    "retry_interval_s=0.2",
    "pool_min_size=1",
    "pool_max_size=4",
    "shutdown_deadline_s=5",
    "log_level=WARNING",
)


# Calls bounded at 2 s and retried within a second, so failed records come back within a run.
QUICK_RETRIES: tuple[str, ...] = ("http_timeout_s=2", "retry_base_s=0.2", "retry_max_s=1")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """``GET`` a daemon's HTTP port on loopback: the status and the body, errors included."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Polls ``check`` until true; returns the seconds it took. Raises AssertionError."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


# -- daemons --------------------------------------------------------------------------------


@dataclass
class Replica:
    """One daemon process; its output goes to a file (a pipe nobody reads would block it)."""

    index: int
    dsn: str
    settings: tuple[str, ...]
    logdir: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    http_port: int = 0
    generation: int = 0

    @property
    def log_path(self) -> Path:
        return self.logdir / f"replica-{self.index}-{self.generation}.log"

    def start(self) -> None:
        self.generation += 1
        self.http_port = free_port()
        cmd = [sys.executable, "-m", "outbox_notifier", "run", "--dsn", self.dsn]
        for item in (*BASE_SETTINGS, *self.settings, f"http_listen=127.0.0.1:{self.http_port}"):
            cmd += ["--set", item]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None when it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
        return http_get(self.http_port, path, timeout_s)

    def metric(self, name: str) -> float:
        """Sum of a metric's samples from /metrics (0 when absent)."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def peak_rss_bytes(self) -> int:
        """The process's peak resident memory (VmHWM), from /proc."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def logs(self) -> str:
        texts = []
        for gen in range(1, self.generation + 1):
            path = self.logdir / f"replica-{self.index}-{gen}.log"
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)


class Fleet:
    """Several replicas against one database; kills and restarts are counted. Their
    environment is ``env``, by default this one without stray settings
    (``env_without_settings``)."""

    def __init__(
        self,
        dsn: str,
        n: int,
        *settings: str,
        env: dict[str, str] | None = None,
    ) -> None:
        env = env_without_settings() if env is None else env
        self.logdir = Path(tempfile.mkdtemp(prefix="outbox-notifier-faults-"))
        self.replicas = [Replica(i, dsn, tuple(settings), self.logdir, env) for i in range(n)]
        self.kills = 0
        self.restarts = 0
        self.exit_codes: list[int | None] = []

    def __enter__(self) -> Fleet:
        for replica in self.replicas:
            replica.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def ready() -> bool:
            for replica in self.replicas:
                if not replica.alive():
                    raise AssertionError(f"replica exited early:\n{replica.logs()[-3000:]}")
                try:
                    if replica.get("/readyz", timeout_s=1.0)[0] != 200:
                        return False
                except OSError:
                    return False
            return True

        wait_until(ready, timeout_s, "replicas ready")

    def kill_and_restart(self, rng: random.Random) -> Replica:
        replica = rng.choice(self.replicas)
        replica.kill()
        self.kills += 1
        replica.start()
        self.restarts += 1
        return replica

    def stop(self) -> list[int | None]:
        if not self.exit_codes:
            self.exit_codes = [r.stop() for r in self.replicas]
        return self.exit_codes

    def logs(self) -> str:
        return "\n".join(r.logs() for r in self.replicas)

    def log_count(self, needle: str) -> int:
        return self.logs().count(needle)


@contextlib.contextmanager
def killing(fleet: Fleet, every_s: float, seed: int) -> Iterator[list[float]]:
    """SIGKILLs a random replica every ``every_s`` seconds and starts it again, until the block
    ends; yields the list of kill times (monotonic)."""
    rng = random.Random(seed)
    stop = threading.Event()
    times: list[float] = []

    def run() -> None:
        while not stop.wait(every_s * rng.uniform(0.6, 1.4)):
            fleet.kill_and_restart(rng)
            times.append(time.monotonic())

    thread = threading.Thread(target=run, name="killer", daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join(30)


# -- workload -------------------------------------------------------------------------------


def event_payload(key: str, user_id: int, n: int) -> dict[str, Any]:
    return {
        "notification_id": n,
        "user_id": user_id,
        "trigger_id": f"trg-{n}",
        "preview_id": f"asp-{n}",
        "trigger_type": "schedule_conflict",
        "target_type": "schedule",
        "target_id": n,
        "dedupe_key": key,
        "target_url": f"/assistant/preview/asp-{n}",
        "summary_text": f"Event {n}: your Tuesday has two overlapping meetings.",
        "fallback_text": "",
        "trace_id": f"trace-{key}",
        "requested_at": "2026-11-29T08:00:00Z",
    }


def enqueue_event(conn: psycopg.Connection[Any], key: str, user_id: int = 1, n: int = 0) -> None:
    """Commit (or, in a transaction, add) one valid outbox event (``event_payload``)."""
    conn.execute(
        "SELECT outbox_notifier.enqueue(%s, %s::jsonb)",
        (events.EVENT_TYPE, msgspec.json.encode(event_payload(key, user_id, n)).decode()),
    )


def record_status(dsn: str, key: str) -> str | None:
    """The status of the record with dedupe key ``key`` (None before it exists)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
        row = conn.execute(
            "SELECT status FROM outbox_notifier.notification_records WHERE dedupe_key = %s",
            (key,),
        ).fetchone()
    return None if row is None else str(row[0])


def add_channels(dsn: str, urls: dict[int, str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for user_id, url in urls.items():
            conn.execute(
                "INSERT INTO outbox_notifier.notification_channels (user_id, channel, webhook_url)"
                " VALUES (%s, 'feishu', %s)",
                (user_id, url),
            )


@dataclass
class Producer:
    """Commits ``events`` outbox events (in transactions of ``batch``) spread over
    ``duration_s``; every ``redeliver_every``-th event repeats an earlier key (a producer
    retry), every ``bad_every``-th is malformed. Commits that fail are retried with the same
    keys, so an unknown commit outcome is resolved by deduplication, never by loss."""

    dsn: str
    events: int
    users: Sequence[int]
    duration_s: float
    batch: int = 20
    redeliver_every: int = 10
    bad_every: int = 100
    key_prefix: str = "k"
    acknowledged: set[str] = field(default_factory=set)
    bad_acknowledged: int = 0
    committed_rows: int = 0
    commit_errors: int = 0
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    def rows(self) -> list[tuple[str, str, str | None]]:
        """(event_type, payload json, dedupe key or None for a bad row), in commit order."""
        out: list[tuple[str, str, str | None]] = []
        for n in range(self.events):
            if self.bad_every and n % self.bad_every == self.bad_every - 1:
                bad = {"user_id": -n, "dedupe_key": "", "target_url": "https://evil.example/x"}
                out.append((events.EVENT_TYPE, msgspec.json.encode(bad).decode(), None))
                continue
            if self.redeliver_every and n % self.redeliver_every == self.redeliver_every - 1:
                n_key = n // 2  # an earlier event, sent again
            else:
                n_key = n
            key = f"{self.key_prefix}-{n_key}"
            body = event_payload(key, self.users[n_key % len(self.users)], n_key)
            out.append((events.EVENT_TYPE, msgspec.json.encode(body).decode(), key))
        return out

    def start(self) -> Producer:
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float = 120.0) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "producer did not finish"
        if self.error is not None:
            raise AssertionError(f"producer failed: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            rows = self.rows()
            chunks = [rows[i : i + self.batch] for i in range(0, len(rows), self.batch)]
            pause = self.duration_s / max(1, len(chunks))
            conn: psycopg.Connection[Any] | None = None
            for chunk in chunks:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if conn is None or conn.closed:
                            conn = psycopg.connect(self.dsn, connect_timeout=3)
                        with conn.transaction():
                            for event_type, body, _ in chunk:
                                conn.execute(
                                    "SELECT outbox_notifier.enqueue(%s, %s::jsonb)",
                                    (event_type, body),
                                )
                        break
                    except psycopg.OperationalError:
                        self.commit_errors += 1
                        if conn is not None:
                            conn.close()
                        conn = None
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.3)
                self.committed_rows += len(chunk)
                for _, _, key in chunk:
                    if key is None:
                        self.bad_acknowledged += 1
                    else:
                        self.acknowledged.add(key)
                time.sleep(pause)
            if conn is not None:
                conn.close()
        except BaseException as exc:
            self.error = exc


class PollingWatch:
    """A thread that samples the database every ``every_s`` while the scenario runs, on a
    connection of its own; a database error (the database may be restarting) skips a sample
    and reconnects. A subclass writes ``sample``."""

    name = "watch"

    def __init__(self, dsn: str, every_s: float) -> None:
        self.dsn = dsn
        self.every_s = every_s
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def sample(self, conn: psycopg.Connection[Any]) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.wait(self.every_s):
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                self.sample(conn)
                self.samples += 1
            except psycopg.OperationalError:
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


class LeaseWatch(PollingWatch):
    """How long any record has stayed ``sending`` past its lease, at the most."""

    name = "lease-watch"

    def __init__(self, dsn: str, every_s: float = 0.25) -> None:
        super().__init__(dsn, every_s)
        self.max_overdue_s = 0.0

    def sample(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            "SELECT coalesce(max(extract(epoch FROM now() - lease_expires_at)), 0)"
            " FROM outbox_notifier.notification_records WHERE status = 'sending'"
        ).fetchone()
        assert row is not None
        self.max_overdue_s = max(self.max_overdue_s, float(row[0]))


class TargetWatch(PollingWatch):
    """Whether the targets were ever paused or throttled (``target_health``), and when one
    first was paused, with the calls ``server`` had received by then."""

    name = "target-watch"

    def __init__(self, dsn: str, server: FeishuServer, every_s: float = 0.05) -> None:
        super().__init__(dsn, every_s)
        self.server = server
        self.paused_seen = 0  # polls that saw a pause
        self.throttled_seen = 0
        self.first_pause: tuple[float, int] | None = None  # (monotonic time, calls received)

    def sample(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            "SELECT coalesce(bool_or(paused), false), coalesce(bool_or(throttled), false)"
            " FROM outbox_notifier.target_health"
        ).fetchone()
        assert row is not None
        if row[0]:
            self.paused_seen += 1
            if self.first_pause is None:
                self.first_pause = (time.monotonic(), len(self.server.requests))
        if row[1]:
            self.throttled_seen += 1


def settled(dsn: str) -> bool:
    """No pending outbox row and no record that is not terminal."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM outbox_notifier.outbox WHERE status = 'pending'),"
            " (SELECT count(*) FROM outbox_notifier.notification_records"
            "  WHERE status NOT IN ('sent', 'dead', 'skipped'))"
        ).fetchone()
    assert row is not None
    return bool(row[0] == 0 and row[1] == 0)


def wait_settled(dsn: str, timeout_s: float) -> float:
    def check() -> bool:
        try:
            return settled(dsn)
        except psycopg.OperationalError:
            return False

    return wait_until(check, timeout_s, "every outbox row and record to settle")


# -- the invariant check ----------------------------------------------------------------------


@dataclass
class Figures:
    """What a scenario reports."""

    outbox_rows: int = 0
    relayed: int = 0
    rejected: int = 0
    records: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    lease_rescues: int = 0  # attempts logged as sending_lease_expired
    late_results: int = 0  # attempts logged with applied = false
    server_requests: int = 0
    server_successes: int = 0
    duplicates: int = 0  # successful deliveries beyond the first, per record
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self, name: str) -> str:
        status = " ".join(f"{k}={v}" for k, v in sorted(self.by_status.items()))
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (
            f"[faults:{name}] outbox={self.outbox_rows} relayed={self.relayed}"
            f" rejected={self.rejected} records={self.records} ({status})"
            f" attempts={self.attempts} lease_rescues={self.lease_rescues}"
            f" late_results={self.late_results} server_requests={self.server_requests}"
            f" server_successes={self.server_successes} duplicates={self.duplicates} {extra}"
        ).rstrip()


def _successful(req: Recorded) -> int | None:
    """The record id of a successful Flow delivery (2xx answered, Feishu code 0), else None."""
    if not req.path.startswith(FLOW_PREFIX) or not 200 <= req.status_sent < 300:
        return None
    body = req.json
    if not isinstance(body, dict) or not isinstance(body.get("notification_id"), int):
        return None
    return int(body["notification_id"])


def check_invariants(
    dsn: str,
    requests: Sequence[Recorded] | None,
    *,
    kills: int = 0,
    failed_replies: Callable[[Recorded], bool] | None = None,
    lease_watch: LeaseWatch | None = None,
    max_overdue_s: float = 5.0,
) -> Figures:
    """The one invariant check every scenario ends with; returns the figures.

    ``kills`` is how many workers were killed during the run: each may have died between a
    provider's answer and the database write, and only that allows a second delivery of a
    record. ``requests`` are what the local server received (None: no server took part, skip those
    checks). ``failed_replies`` marks 2xx replies that were not a success for the provider (a
    scripted Feishu error body, say); by default every 2xx reply of the local server carries code 0.
    """
    figures = Figures()
    problems: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Payloads of relayed rows only: those are decoded below; a rejected row's may be
        # megabytes that nothing here reads.
        outbox = conn.execute(
            "SELECT id, event_type, event_version,"
            " CASE WHEN status = 'relayed' THEN payload::text END, status, error"
            " FROM outbox_notifier.outbox ORDER BY id"
        ).fetchall()
        records = conn.execute(
            "SELECT r.id, r.dedupe_key, r.status, r.attempt_count, r.max_attempts,"
            " r.last_error_code, r.last_error, r.sent_at, r.outbox_id,"
            " (SELECT count(*) FROM outbox_notifier.delivery_attempts a"
            "  WHERE a.record_id = r.id AND a.applied),"
            " (SELECT count(*) FROM outbox_notifier.delivery_attempts a"
            "  WHERE a.record_id = r.id AND a.error_code = 'sending_lease_expired'),"
            " (SELECT count(*) FROM outbox_notifier.delivery_attempts a"
            "  WHERE a.record_id = r.id AND NOT a.applied)"
            " FROM outbox_notifier.notification_records r WHERE r.channel = 'feishu'"
        ).fetchall()
        attempt_totals = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT applied),"
            " count(*) FILTER (WHERE error_code = 'sending_lease_expired')"
            " FROM outbox_notifier.delivery_attempts"
        ).fetchone()
    assert attempt_totals is not None
    figures.attempts, figures.late_results, figures.lease_rescues = map(int, attempt_totals)

    # Outbox rows: relayed or rejected with a reason; relayed rows map to one record each.
    by_key = {row[1]: row for row in records}
    relayed_ids: set[int] = set()
    keys_of_relayed: set[str] = set()
    figures.outbox_rows = len(outbox)
    for oid, event_type, version, payload, status, error in outbox:
        if status == "rejected":
            figures.rejected += 1
            if not error:
                problems.append(f"outbox {oid} rejected without a reason")
            continue
        if status != "relayed":
            problems.append(f"outbox {oid} is {status!r}")
            continue
        figures.relayed += 1
        relayed_ids.add(oid)
        try:
            event = events.decode_event(event_type, version, payload.encode())
        except events.EventRejected as exc:
            problems.append(f"outbox {oid} relayed but its payload is rejected: {exc.reason}")
            continue
        keys_of_relayed.add(event.dedupe_key)
        if event.dedupe_key not in by_key:
            problems.append(f"outbox {oid} relayed but has no record for its dedupe key")
    for rid, key, *_rest in records:
        if key not in keys_of_relayed:
            problems.append(f"record {rid} has no relayed outbox row")
        outbox_id = _rest[6]
        if outbox_id is not None and outbox_id not in relayed_ids:
            problems.append(f"record {rid} points at outbox {outbox_id}, which is not relayed")

    # Records: terminal with a reason, attempts within budget and in agreement with the log.
    figures.records = len(records)
    status_counts: collections.Counter[str] = collections.Counter()
    lease_rescues_by_id: dict[int, int] = {}
    status_by_id: dict[int, str] = {}
    for row in records:
        (rid, _key, status, attempts, max_attempts, code, error, sent_at, _oid, logged,
         rescues, late) = row  # fmt: skip
        status_counts[status] += 1
        status_by_id[rid] = status
        lease_rescues_by_id[rid] = int(rescues)
        if status not in TERMINAL:
            problems.append(f"record {rid} ended {status!r}")
        if attempts > max_attempts:
            problems.append(f"record {rid}: attempt_count {attempts} > max_attempts {max_attempts}")
        if logged != attempts:
            problems.append(
                f"record {rid}: {logged} applied attempts logged, attempt_count {attempts}"
            )
        if late > rescues:
            # A result is late only when a rescue took its lease over (nothing else does here).
            problems.append(f"record {rid}: {late} results logged as late, {rescues} rescues")
        if status == "sent" and sent_at is None:
            problems.append(f"record {rid} sent without sent_at")
        if status in ("dead", "skipped") and (not code or not error):
            problems.append(f"record {rid} {status} without a reason")
    figures.by_status = dict(status_counts)

    # The provider's side: at most one success per record, plus one per worker death mid-call.
    if requests is None:
        requests = []
        status_by_id = {}
    successes: collections.Counter[int] = collections.Counter()
    figures.server_requests = sum(1 for r in requests if r.path.startswith(FLOW_PREFIX))
    for req in requests:
        rid = _successful(req)
        if rid is None or (failed_replies is not None and failed_replies(req)):
            continue
        successes[rid] += 1
    figures.server_successes = sum(successes.values())
    figures.duplicates = sum(n - 1 for n in successes.values() if n > 1)
    for rid, n in successes.items():
        # one extra per death of a worker holding the record's lease: a rescue, after a kill
        interrupted = min(lease_rescues_by_id.get(rid, 0), kills)
        if n > 1 + interrupted:
            problems.append(
                f"record {rid} delivered {n} times, allowed {1 + interrupted}"
                f" ({lease_rescues_by_id.get(rid, 0)} lease rescues, {kills} workers killed)"
            )
    for rid, status in status_by_id.items():
        if status == "sent" and successes[rid] == 0:
            problems.append(f"record {rid} is sent but the server never answered it with 2xx")
    if figures.duplicates > (figures.lease_rescues if kills else 0):
        problems.append(
            f"{figures.duplicates} duplicate deliveries with {kills} workers killed and"
            f" {figures.lease_rescues} lease rescues"
        )

    if lease_watch is not None:
        figures.extra["max_lease_overdue_s"] = round(lease_watch.max_overdue_s, 2)
        figures.extra["lease_samples"] = lease_watch.samples
        if lease_watch.max_overdue_s > max_overdue_s:
            problems.append(
                f"a record stayed 'sending' {lease_watch.max_overdue_s:.1f}s past its lease"
            )

    if problems:
        shown = "\n".join(problems[:30])
        raise AssertionError(
            f"{len(problems)} invariant violations ({figures.line('failed')}):\n{shown}"
        )
    return figures


def report(name: str, figures: Figures, record_property: Callable[[str, object], None]) -> None:
    line = figures.line(name)
    print("\n" + line)
    record_property("faults_figures", line)


def env_without_settings() -> dict[str, str]:
    """The environment for daemon subprocesses, without stray OUTBOX_NOTIFIER_* settings."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OUTBOX_NOTIFIER_") or k == "OUTBOX_NOTIFIER_TEST_DSN"
    }
