"""Scenario: the database stalls (a lock, a network black hole, an outage at start).

Liveness must mean "this process is wedged", never "the database is slow": in each case the
daemon keeps answering /healthz 200 and feeding the systemd watchdog, says on /readyz what is
wrong, and recovers on its own once the database is back. Timeouts are kept small
(health_stale_s of a few seconds) so each scenario takes seconds, not minutes.

The black hole and the outage use a private cluster of their own (never the shared server):
the black hole drops its port's packets on loopback with iptables, always removed in a
``finally``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_notifier.daemon import STARTUP_RETRY_MAX_S
from outbox_notifier.http import HealthServer
from outbox_notifier.testing.feishu_server import FeishuServer
from outbox_notifier.testing.postgres import LocalCluster
from tests.faults import harness

pytestmark = pytest.mark.faults

SHARED_SERVER_PORT = 5432  # never ours to block, stop or lock


class Notifications:
    """A ``NOTIFY_SOCKET`` of our own: every datagram the daemon sends, with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def watchdog_times(self) -> list[float]:
        return [t for t, m in self.messages if "WATCHDOG=1" in m]

    def max_watchdog_gap_s(self, since: float, until: float) -> float:
        times = [since, *(t for t in self.watchdog_times() if since <= t <= until), until]
        return max(b - a for a, b in itertools.pairwise(times))


class Daemon:
    """One daemon process with its output in a file and a notify socket of its own."""

    def __init__(self, dsn: str, tmp: Path, *settings: str, nofile: int | None = None) -> None:
        self.http_port = harness.free_port()
        self.log = tmp / "daemon.log"
        self.notifications = Notifications(tmp / "notify.sock")
        cmd = [sys.executable, "-m", "outbox_notifier", "run", "--dsn", dsn]
        for item in (
            "flow_allowed_schemes=http",
            "flow_allowed_hosts=127.0.0.1",
            "egress_allow_cidrs=127.0.0.0/8",
            "poll_interval_s=0.5",
            "retry_interval_s=0.5",
            "pool_min_size=1",
            "pool_max_size=4",
            "shutdown_deadline_s=3",
            f"http_listen=127.0.0.1:{self.http_port}",
            *settings,
        ):
            cmd += ["--set", item]
        env = {
            **harness.env_without_settings(),
            "NOTIFY_SOCKET": str(self.notifications.path),
            "WATCHDOG_USEC": "2000000",  # WatchdogSec=2: a ping every second
        }

        def limit_files() -> None:
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=limit_files
            )

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
        return harness.http_get(self.http_port, path, timeout_s)

    def status(self, path: str) -> int | None:
        try:
            return self.get(path, timeout_s=1.0)[0]
        except OSError:
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.notifications.close()
        return self.proc.returncode


@contextlib.contextmanager
def daemon(dsn: str, tmp: Path, *settings: str, nofile: int | None = None) -> Iterator[Daemon]:
    d = Daemon(dsn, tmp, *settings, nofile=nofile)
    try:
        yield d
    finally:
        d.stop()


def wait_for(check: Any, timeout_s: float, what: str, d: Daemon | None = None) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            tail = d.output()[-3000:] if d is not None else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{tail}")
        time.sleep(0.1)
    return time.monotonic() - started


def all_sent(dsn: str, keys: list[str]) -> bool:
    try:
        return all(harness.record_status(dsn, k) == "sent" for k in keys)
    except psycopg.OperationalError:
        return False


STALL_SETTINGS = (
    "health_stale_s=4",
    "db_deadline_s=2",
    "lock_timeout_s=0.5",
    "statement_timeout_s=1.5",
    "tcp_user_timeout_s=2",
    "keepalives_idle_s=1",
    "keepalives_interval_s=1",
    "keepalives_count=2",
)


# The lock scenario's bounds: the same shape, halved (it only needs the lock to outlast them).
LOCK_STALE_S = 2.0
LOCK_SETTINGS = (
    f"health_stale_s={LOCK_STALE_S:g}",
    "db_deadline_s=1",
    "lock_timeout_s=0.5",
    "statement_timeout_s=0.8",
)


@pytest.mark.timeout(120)
def test_outbox_lock_past_health_stale_keeps_liveness_and_delivers(
    db: str, server: FeishuServer, tmp_path: Path
) -> None:
    harness.add_channels(db, {1: server.flow_url("ok")})
    with daemon(db, tmp_path, *LOCK_SETTINGS) as d:
        wait_for(lambda: d.status("/readyz") == 200, 30, "ready", d)
        with (
            psycopg.connect(db) as blocker,
            psycopg.connect(db, autocommit=True) as conn,
        ):
            blocker.execute("LOCK TABLE outbox_notifier.outbox IN ACCESS EXCLUSIVE MODE")
            backlog = [f"backlog-{n}" for n in range(20)]
            for key in backlog:  # visible once the lock goes
                harness.enqueue_event(blocker, key)
            conn.execute(
                "INSERT INTO outbox_notifier.notification_records"
                " (channel, user_id, preview_id, dedupe_key, target_url, trace_id)"
                " VALUES ('feishu', 1, 'p', 'relayed-before', '/x', 't')"
            )
            locked_at = time.monotonic()
            hold_s = 2.5 * LOCK_STALE_S  # > 2 x health_stale_s
            ready_answers = []
            while time.monotonic() - locked_at < hold_s:
                code, body = d.get("/healthz", timeout_s=2.0)
                assert code == 200, body
                ready_answers.append(d.get("/readyz", timeout_s=3.0))
                time.sleep(0.25)
            unlocked_at = time.monotonic()
            assert harness.record_status(db, "relayed-before") == "sent"
            assert any(c == 503 and "LockNotAvailable" in b for c, b in ready_answers)
            blocker.commit()
        drain_s = wait_for(lambda: all_sent(db, backlog), 15, "backlog drained", d)
        gap = d.notifications.max_watchdog_gap_s(locked_at, unlocked_at)
        assert gap < 2.0, f"watchdog ping gap {gap:.1f}s over WatchdogSec=2"
        print(f"\nlock held {hold_s:g}s: max watchdog gap {gap:.2f}s, drained in {drain_s:.1f}s")
        assert d.stop() == 0


# -- a network black hole -------------------------------------------------------------------


def _iptables() -> str | None:
    return shutil.which("iptables") or next(
        (p for p in ("/usr/sbin/iptables", "/sbin/iptables") if os.path.exists(p)), None
    )


def _rules(port: int) -> list[list[str]]:
    # Loopback only, and only the private cluster's port, in both directions.
    return [
        ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
        ["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"],
    ]


@contextlib.contextmanager
def black_hole(port: int) -> Iterator[None]:
    assert port != SHARED_SERVER_PORT
    binary = _iptables()
    assert binary is not None
    added: list[list[str]] = []
    try:
        for rule in _rules(port):
            subprocess.run([binary, "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run([binary, "-D", *rule], check=False, capture_output=True)


@pytest.fixture
def iptables_allowed() -> None:
    binary = _iptables()
    if binary is None:
        pytest.skip("iptables is not installed (apt-get install -y iptables)")
    probe = subprocess.run([binary, "-L", "INPUT", "-n"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"iptables is not permitted here: {probe.stderr.strip()[:200]}")


# psycopg_pool's warning when it stops retrying a lost connection (after reconnect_timeout).
_GAVE_UP = re.compile(r"reconnection attempt in pool '[^']*' failed after")


@pytest.mark.timeout(150)
@pytest.mark.usefixtures("iptables_allowed")
def test_black_hole_keeps_liveness_and_recovers_within_10s(
    private_cluster: LocalCluster, private_db: str, server: FeishuServer, tmp_path: Path
) -> None:
    dsn = private_db
    harness.add_channels(dsn, {1: server.flow_url("ok")})
    with daemon(dsn, tmp_path, *STALL_SETTINGS) as d:
        wait_for(lambda: d.status("/readyz") == 200, 30, "ready", d)
        with psycopg.connect(dsn, autocommit=True) as conn:
            harness.enqueue_event(conn, "before")
        wait_for(lambda: all_sent(dsn, ["before"]), 15, "first delivery", d)
        # Three times health_stale_s, and past the pool's reconnect_timeout (5 s here) by
        # seconds. The pool's own backoff (1, 2, 4, 8, 16 s ... between 2-s connect timeouts)
        # would only make a 10 s recovery miss after a hole of half a minute; rather than wait
        # that out, the log below must show the pool giving a reconnection up during the
        # hole, which is what keeps the backoff from growing (see connections.new_pool).
        hole_s = 12.0
        assert _GAVE_UP.search(d.output()) is None, d.output()[-3000:]
        with black_hole(private_cluster.port):
            started = time.monotonic()
            saw_unready = False
            while time.monotonic() - started < hole_s:
                code, body = d.get("/healthz", timeout_s=2.0)
                assert code == 200, body
                code, body = d.get("/readyz", timeout_s=3.0)
                saw_unready = saw_unready or code == 503
                time.sleep(0.25)
            hole_end = time.monotonic()
        gap = d.notifications.max_watchdog_gap_s(started, hole_end)
        assert saw_unready, "/readyz never reported the unreachable database"
        restored = time.monotonic()
        keys = [f"after-{n}" for n in range(10)]
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            for key in keys:
                harness.enqueue_event(conn, key)
        recovery_s = wait_for(lambda: all_sent(dsn, keys), 10, "work after the hole", d)
        recovery_s = time.monotonic() - restored
        assert gap < 2.0, f"watchdog ping gap {gap:.1f}s over WatchdogSec=2"
        gave_up = len(_GAVE_UP.findall(d.output()))
        assert gave_up >= 1, f"the pool never gave a reconnection up\n{d.output()[-3000:]}"
        print(
            f"\nblack hole {hole_s:g}s: recovered in {recovery_s:.1f}s, watchdog gap {gap:.2f}s,"
            f" pool gave up {gave_up} reconnections"
        )
        assert d.stop() == 0


# -- an outage at start ---------------------------------------------------------------------

# Small bounds, so a short outage outlasts them: the start-up tries back off 0.5, 1, 2, 4 s ...
# (doubling up to a cap), and the database stays down until the daemon has failed
# OUTAGE_TRIES of them. Its wait for the next try is then 4 s, twice health_stale_s, and the
# outage as the daemon sees it (first try to the one that connects) about 7.5 s, several
# times health_stale_s and db_deadline_s.
OUTAGE_STALE_S = 2.0
OUTAGE_SETTINGS = (f"health_stale_s={OUTAGE_STALE_S:g}", "db_deadline_s=1")
OUTAGE_TRIES = 4
_NEXT_IN = re.compile(r"waiting for database \(try \d+, next in ([0-9.]+)s\)")


@pytest.mark.timeout(120)
def test_daemon_started_before_the_database_waits_then_delivers(
    private_cluster: LocalCluster, private_db: str, server: FeishuServer, tmp_path: Path
) -> None:
    dsn = private_db
    harness.add_channels(dsn, {1: server.flow_url("ok")})
    private_cluster.stop()
    with daemon(dsn, tmp_path, *OUTAGE_SETTINGS) as d:
        wait_for(lambda: d.status("/healthz") == 200, 30, "/healthz up", d)
        started = time.monotonic()

        def live_and_waiting() -> bool:
            code, body = d.get("/healthz", timeout_s=2.0)
            assert code == 200, body
            code, body = d.get("/readyz", timeout_s=3.0)
            assert code == 503 and "database" in body, body
            assert d.proc.poll() is None, d.output()[-3000:]
            return len(_NEXT_IN.findall(d.output())) >= OUTAGE_TRIES

        wait_for(live_and_waiting, 30, f"{OUTAGE_TRIES} start-up tries", d)
        ready_body = d.get("/readyz", timeout_s=3.0)[1]
        assert "startup: OperationalError" in ready_body, ready_body
        private_cluster.start()
        down_s = time.monotonic() - started

        def ready() -> bool:  # /healthz stays 200 through the last wait as well
            code, body = d.get("/healthz", timeout_s=2.0)
            assert code == 200, body
            return d.status("/readyz") == 200

        ready_s = wait_for(ready, 30, "ready after start", d)
        with psycopg.connect(dsn, autocommit=True) as conn:
            harness.enqueue_event(conn, "late")
        wait_for(lambda: all_sent(dsn, ["late"]), 15, "delivery", d)
        statuses = [m for _, m in d.notifications.messages if "STATUS=waiting for database" in m]
        assert statuses, d.notifications.messages[:5]
        # Each try extends systemd's start timeout; READY=1 only comes after the wait.
        assert all("EXTEND_TIMEOUT_USEC=" in m for m in statuses), statuses[:3]
        assert any("READY=1" in m for _, m in d.notifications.messages)
        # One log line per failed try, its wait doubling from 0.5 s (to a cap): a backoff, not a
        # spin; the last wait is at least twice health_stale_s.
        waits = [float(w) for w in _NEXT_IN.findall(d.output())]
        assert len(waits) >= OUTAGE_TRIES, waits
        assert waits == [min(0.5 * 2**i, STARTUP_RETRY_MAX_S) for i in range(len(waits))], waits
        assert waits[-1] >= 2 * OUTAGE_STALE_S, waits
        print(
            f"\ndatabase down {down_s:.1f}s at start ({len(waits)} tries, waits {waits}):"
            f" ready {ready_s:.1f}s after it came up"
        )
        assert d.stop() == 0


# -- a flood of idle connections to the health port -----------------------------------------

# How long the health server keeps a connection that sends nothing (request_timeout_s).
IDLE_TIMEOUT_S: float = inspect.signature(HealthServer).parameters["request_timeout_s"].default


@pytest.mark.timeout(90)
def test_400_idle_connections_leave_healthz_answering_and_the_log_quiet(
    db: str, tmp_path: Path
) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    with daemon(db, tmp_path, nofile=256) as d:
        wait_for(lambda: d.status("/readyz") == 200, 30, "ready", d)
        before = len(d.output().splitlines())
        idle: list[socket.socket] = []

        def connect(_: int) -> None:
            idle.append(socket.create_connection(("127.0.0.1", d.http_port), timeout=5))

        try:
            # Eight at a time: one by one, each time the accept queue is full a connection waits
            # out a SYN retransmit (1 s) alone, and the flood takes 4 s to build.
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(connect, range(400)))
            assert len(idle) == 400
            started = time.monotonic()
            slowest = 0.0
            # Past the server's idle timeout, so the flood's survivors are closed meanwhile too.
            while time.monotonic() - started < IDLE_TIMEOUT_S + 1.5:
                t0 = time.monotonic()
                code, _ = d.get("/healthz", timeout_s=1.0)
                slowest = max(slowest, time.monotonic() - t0)
                assert code == 200
                time.sleep(0.2)
        finally:
            for sock in idle:
                sock.close()
        assert slowest < 1.0
        new_lines = d.output().splitlines()[before:]
        assert not any("Traceback" in line for line in new_lines), new_lines[:20]
        assert len([line for line in new_lines if "ERROR" in line]) <= 1, new_lines[:20]
        print(f"\n400 idle connections: slowest /healthz {slowest * 1000:.0f} ms")
        assert d.stop() == 0
