"""Scenario 4: PgBouncer in transaction mode between the daemons' pool and Postgres.

The pool goes through PgBouncer (``--dsn``); LISTEN, which a transaction-mode pooler cannot
carry, goes straight to Postgres (``listen_dsn``). PgBouncer is a required tool of this suite:
without it the test fails, it does not skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.connections import connection_kwargs, session_timeouts, statement_timeouts
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.testing.feishu_server import FLOW_PREFIX, FeishuServer, Reply
from tests.faults import harness
from tests.support import settings_for
from tests.timeout_support import BLOCKED_MAINTENANCE, assert_fails_at_lock_timeout

pytestmark = pytest.mark.faults

EVENTS = 1000
USERS = 10


def _pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )
    if found is None:
        pytest.fail("pgbouncer is not installed (Debian/Ubuntu: apt-get install -y pgbouncer)")
    return found


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def pgbouncer(db: str) -> Iterator[str]:
    """A transaction-mode PgBouncer in front of the test database; yields its DSN."""
    binary = _pgbouncer_binary()
    upstream = psycopg.conninfo.conninfo_to_dict(db)
    user = str(upstream.get("user") or "postgres")
    root = Path(tempfile.mkdtemp(prefix="outbox-notifier-pgbouncer-"))
    port = harness.free_port()
    target = " ".join(f"{k}={upstream[k]}" for k in ("host", "port", "password") if upstream.get(k))
    (root / "userlist.txt").write_text(f'"{user}" ""\n')
    (root / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = {target}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {root / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        "max_client_conn = 500\n"
        "default_pool_size = 8\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {root / 'pgbouncer.log'}\n"
    )
    run_as = None
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        run_as = os.environ.get("OUTBOX_NOTIFIER_TEST_PG_USER", "postgres")
        entry = pwd.getpwnam(run_as)
        for path in (root, *root.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    proc = subprocess.Popen(
        [binary, str(root / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        user=run_as,
        cwd=root,
    )
    try:
        harness.wait_until(
            lambda: proc.poll() is not None or _accepts(port), 10, "pgbouncer to listen"
        )
        if proc.poll() is not None:
            log = (root / "pgbouncer.log").read_text(errors="replace")
            pytest.fail(f"pgbouncer exited with {proc.returncode}: {log[-2000:]}")
        yield psycopg.conninfo.make_conninfo(db, host="127.0.0.1", port=str(port), password="")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
def test_daemons_behind_pgbouncer_in_transaction_mode_complete_the_workload(
    db: str,
    pgbouncer: str,
    server: FeishuServer,
    record_property: Callable[[str, object], None],
) -> None:
    with psycopg.connect(pgbouncer, autocommit=True) as conn:  # the pooler really is in between
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.port != psycopg.conninfo.conninfo_to_dict(db).get("port")
    harness.add_channels(db, {u: server.flow_url(f"user-{u}") for u in range(1, USERS + 1)})
    # Some temporary failures, so the retry path runs through the pooler too.
    server.script(FLOW_PREFIX, [Reply(status=500)] * 50, then=None)
    producer = harness.Producer(db, EVENTS, users=range(1, USERS + 1), duration_s=2.5)
    started = time.monotonic()
    with (
        harness.Fleet(
            pgbouncer, 3,
            f"listen_dsn={db}", "prepared_statements=false", "lease_s=4",
            *harness.QUICK_RETRIES, "max_attempts=8", "breaker_cooloff_s=1",
        ) as fleet,
        harness.LeaseWatch(db) as watch,
    ):  # fmt: skip
        try:
            fleet.wait_ready()
            producer.start()
            producer.join()
            settle_s = harness.wait_settled(db, timeout_s=30)
        finally:
            codes = fleet.stop()
            logs = fleet.logs()
    elapsed = time.monotonic() - started
    assert codes == [0, 0, 0], logs[-5000:]
    figures = harness.check_invariants(db, server.requests, lease_watch=watch)
    figures.extra.update(
        events=producer.committed_rows,
        kills=0,
        settle_s=round(settle_s, 1),
        run_s=round(elapsed, 1),
    )
    harness.report("pgbouncer", figures, record_property)
    assert figures.lease_rescues == 0  # no worker died: every result must have landed
    assert figures.records == len(producer.acknowledged)
    assert figures.by_status == {"sent": figures.records}
    # psycopg prepares a statement after its 5th run by default; a transaction-mode pooler
    # hands the next transaction another server connection, where that name is missing or
    # names a different statement of another client.
    db_errors = [line for line in logs.splitlines() if "prepared statement" in line]
    assert not db_errors, "\n".join(db_errors[:10])
    assert "Traceback" not in logs, logs[-5000:]


@pytest.mark.timeout(60)
def test_lock_timeout_holds_behind_pgbouncer(db: str, pgbouncer: str) -> None:
    """lock_timeout is set per transaction, so the pooler (which drops startup options and
    hands each transaction any server connection) cannot lose it: a lock on the outbox costs
    the relay lock_timeout_s, and /readyz says so."""
    with (
        harness.Fleet(
            pgbouncer, 1,
            f"listen_dsn={db}", "prepared_statements=false", "lock_timeout_s=0.3",
            "health_stale_s=6", "db_deadline_s=4", "statement_timeout_s=2",
        ) as fleet,
        psycopg.connect(db) as blocker,
    ):  # fmt: skip
        fleet.wait_ready()
        [replica] = fleet.replicas
        blocker.execute("LOCK TABLE outbox_notifier.outbox IN ACCESS EXCLUSIVE MODE")

        def says_locked() -> bool:
            code, body = replica.get("/readyz", timeout_s=3.0)
            return code == 503 and "relay: LockNotAvailable" in body

        # Without the timeout the relay would wait on the lock and /readyz would stay 200
        # until db_deadline_s abandons the call, with a DeadlineExceeded, not a lock error.
        harness.wait_until(says_locked, 3.0, "/readyz to report the lock timeout")
        assert replica.get("/healthz")[0] == 200
        blocker.rollback()
        harness.wait_until(lambda: replica.get("/readyz")[0] == 200, 10, "ready again")
        assert fleet.stop() == [0]


@pytest.mark.timeout(60)
async def test_maintenance_statements_fail_at_lock_timeout_behind_pgbouncer(
    db: str, pgbouncer: str
) -> None:
    """Purges, the lease and the snapshot set their timeouts per transaction through the pooler
    too: each, blocked by a lock held on a direct connection, fails at lock_timeout."""
    settings = settings_for(pgbouncer, prepared_statements=False, lock_timeout_s=0.3)
    assert session_timeouts(settings) is None  # nothing to rely on but set_config
    async with AsyncConnectionPool(
        pgbouncer, kwargs=connection_kwargs(settings), min_size=1, max_size=2
    ) as pool:
        store = MaintenanceStore(pool, timeouts=statement_timeouts(settings))
        for statement in sorted(BLOCKED_MAINTENANCE):
            await assert_fails_at_lock_timeout(db, store, statement)
