"""The first upgrade from 0.1.0, with a 0.1.0 daemon running through it.

README ("Upgrade"): "On the first upgrade from 0.1.0 the old pods stay up (they checked the
schema at start and keep delivering) but turn NotReady until they are replaced". Release
0.1.0's own tree comes from its commit in the repository's history (``tests/releases.toml``)
and runs on today's libraries, its package first on the path so that it shadows the installed
one. A 0.1.0 daemon calls 0003's unversioned ``claim_due`` and ``record_target_results`` and
the statements of its own ``sql/`` files against the tables this release's migrations
extended; nothing else in the suite runs those.

The scenario: a database migrated by 0.1.0's ``migrate``; a 0.1.0 daemon delivering on it;
this tree's ``migrate`` while that daemon runs and a 0.1.0 producer keeps calling
``enqueue(text, jsonb, text)``; the old daemon alone delivering what came during and after it
(a target failing twice on the way, so that its retry path and breaker bookkeeping run on the
new schema too, as do its metric snapshot and retention pass); then a daemon of this tree
beside it. Every event is delivered exactly once, no statement of the old daemon fails, its
``/readyz`` turns 503 while ``/healthz`` stays 200, and a 0.1.0 daemon started on the upgraded
schema refuses it with exit 1, as the README's table says. A second test prepares every
statement 0.1.0 ships on the upgraded schema, those the scenario does not reach included.
"""

from __future__ import annotations

import collections
import io
import json
import math
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from outbox_notifier import events, migrations
from outbox_notifier.testing.feishu_server import FLOW_PREFIX, FeishuServer, Reply
from tests import release_surface
from tests.faults import harness
from tests.support import scalar

OLD = next(r for r in release_surface.releases() if r.version == "0.1.0")
NEW_VERSION = migrations.latest_version()

# Settings 0.1.0 knows (it has no egress guard): the local server allowed, quick polls and
# retries, and the metric snapshot and the retention pass every second, so that every loop's
# statements run on the upgraded tables within the scenario. The retention ages stay 0.1.0's
# defaults: the pass deletes nothing the assertions read.
OLD_SETTINGS = (
    "flow_allowed_schemes=http",
    "flow_allowed_hosts=127.0.0.1",
    "poll_interval_s=0.5",
    "retry_interval_s=0.2",
    "retry_base_s=0.2",
    "retry_max_s=1",
    "pool_min_size=1",
    "pool_max_size=4",
    "shutdown_deadline_s=5",
    "maintenance_interval_s=1",
)
OLD_LEASE_TTL_S = 3.0  # 0.1.0 holds the maintenance lease for 3 maintenance intervals

BATCH = 50


# -- 0.1.0's tree and processes -------------------------------------------------------------


class Release:
    """0.1.0's tree, exported from the release commit on first use: in the test's body, so
    that a missing commit fails the test rather than erroring its setup."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self._tree: Path | None = None

    def tree(self) -> Path:
        if self._tree is None:
            self._tree = export_release(OLD.commit, self.dest)
        return self._tree


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return Release(tmp_path_factory.mktemp("release-0.1.0"))


def export_release(commit: str, dest: Path) -> Path:
    """The tree of ``commit`` from this checkout's history, written under ``dest``. Fails the
    test (never skips it) when the history lacks the commit, as in a shallow clone."""
    git = ["git", "-C", str(release_surface.ROOT)]
    try:
        found = subprocess.run(
            [*git, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
        ).returncode == 0  # fmt: skip
    except OSError:
        found = False
    if not found:
        pytest.fail(
            f"release {OLD.version} (commit {commit}) is not in this checkout's git history,"
            " which the upgrade test needs: fetch the full history (git fetch --unshallow)",
            pytrace=False,
        )
    archive = subprocess.run(
        [*git, "archive", "--format=tar", commit], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def old_env(tree: Path) -> dict[str, str]:
    """The environment of a 0.1.0 process: this one's, with the release's package first on
    the path. Its working directory is the tree as well, since ``python -m`` puts the working
    directory before everything (run from a checkout of this tree, it would shadow 0.1.0)."""
    return {**harness.env_without_settings(), "PYTHONPATH": str(tree)}


def old_python(tree: Path, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        env=old_env(tree), cwd=tree, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


def new_cli(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox_notifier", *args],
        env=harness.env_without_settings(), cwd=release_surface.ROOT,
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


def assert_runs_0_1_0(tree: Path) -> None:
    """The interpreter, started as the old processes are, imports 0.1.0 from ``tree``."""
    which = old_python(
        tree, "-c", "import outbox_notifier as p; print(p.__version__); print(p.__file__)"
    )
    assert which.returncode == 0, which.stderr
    version, where = which.stdout.split()
    assert version == OLD.version
    assert Path(where).is_relative_to(tree)


class OldDaemon:
    """A 0.1.0 daemon process; its output goes to a file."""

    def __init__(self, tree: Path, dsn: str, log_path: Path) -> None:
        self.port = harness.free_port()
        self.log_path = log_path
        cmd = [sys.executable, "-m", "outbox_notifier", "run", "--dsn", dsn]
        for item in (*OLD_SETTINGS, f"http_listen=127.0.0.1:{self.port}"):
            cmd += ["--set", item]
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=old_env(tree), cwd=tree
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        assert self.alive(), f"the 0.1.0 daemon exited:\n{self.logs()[-3000:]}"

    def get(self, path: str) -> tuple[int, str]:
        return harness.http_get(self.port, path, timeout_s=2.0)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on /metrics (NaN when it has none)."""
        samples = [
            float(line.rsplit(" ", 1)[1])
            for line in self.get("/metrics")[1].splitlines()
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
        ]
        return math.fsum(samples) if samples else math.nan

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        def ready() -> bool:
            self.check_alive()
            try:
                return self.get("/readyz")[0] == 200
            except OSError:
                return False

        harness.wait_until(ready, timeout_s, "the 0.1.0 daemon to be ready")

    def stop(self) -> int:
        if self.alive():
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- a 0.1.0 producer -------------------------------------------------------------------------


def enqueue_0_1_0(conn: psycopg.Connection[Any], key: str, n: int) -> None:
    """What a 0.1.0 producer commits: an event of 0.1.0's fields through
    ``enqueue(text, jsonb, text)``; users 1 and 2 in turn."""
    body = harness.event_payload(key, 1 + n % 2, n)
    conn.execute(
        "SELECT outbox_notifier.enqueue(%s, %s::jsonb, %s)",
        (events.EVENT_TYPE, msgspec.json.encode(body).decode(), events.EVENT_VERSION),
    )


class OldProducer:
    """Commits one event every ``every_s`` (``enqueue_0_1_0``) on a thread of its own, until
    the block ends and at least ``at_least`` were committed."""

    def __init__(self, dsn: str, prefix: str, at_least: int, every_s: float = 0.02) -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.at_least = at_least
        self.every_s = every_s
        self.keys: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="old-producer", daemon=True)

    def __enter__(self) -> OldProducer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the producer did not finish"
        if self.error is not None:
            raise AssertionError(f"the 0.1.0 producer failed: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                n = 0
                while n < self.at_least or not self._stop.is_set():
                    key = f"{self.prefix}-{n}"
                    enqueue_0_1_0(conn, key, n)
                    self.keys.append(key)
                    n += 1
                    time.sleep(self.every_s)
        except BaseException as exc:
            self.error = exc


# -- checks ------------------------------------------------------------------------------------


def wait_sent(conn: psycopg.Connection[Any], keys: list[str], what: str, old: OldDaemon) -> None:
    def done() -> bool:
        old.check_alive()
        sent = scalar(
            conn,
            "SELECT count(*) FROM outbox_notifier.notification_records"
            " WHERE status = 'sent' AND dedupe_key = ANY (%s)",
            (keys,),
        )
        return int(sent) == len(keys)

    try:
        harness.wait_until(done, 20, what)
    except AssertionError as exc:
        shown = "\n".join(problem_lines(old.logs())[-20:])
        raise AssertionError(f"{exc}; problems in the 0.1.0 daemon's log:\n{shown}") from None


def problem_lines(log: str) -> list[str]:
    """A daemon's log lines at WARNING or above, tracebacks, and SQL errors."""
    problem = re.compile(
        r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|does not exist|Undefined\w+|ProgrammingError"
    )
    return [line for line in log.splitlines() if problem.search(line)]


@pytest.fixture
def server() -> Iterator[FeishuServer]:
    with FeishuServer.in_thread() as srv:
        yield srv


@pytest.fixture
def empty_conn(empty_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(empty_db, autocommit=True) as connection:
        yield connection


# -- the scenario -------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_0_1_0_daemon_keeps_delivering_through_the_upgrade_and_beside_this_release(
    release: Release,
    empty_db: str,
    empty_conn: psycopg.Connection[Any],
    server: FeishuServer,
    tmp_path: Path,
) -> None:
    dsn, conn = empty_db, empty_conn
    release_tree = release.tree()
    assert_runs_0_1_0(release_tree)
    assert tuple(harness.event_payload("k", 1, 0)) == OLD.event_fields

    # 0.1.0's migrate on a fresh database: schema version 3.
    migrated = old_python(release_tree, "-m", "outbox_notifier", "migrate", "--dsn", dsn)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert migrated.stdout.split() == [
        "applied", "0001_schema", "applied", "0002_operator", "applied", "0003_targets"
    ]  # fmt: skip
    harness.add_channels(dsn, {1: server.flow_url("steady"), 2: server.flow_url("flaky")})

    old = OldDaemon(release_tree, dsn, tmp_path / "daemon-0.1.0.log")
    new: harness.Replica | None = None
    try:
        old.wait_ready()
        # 1. Before the upgrade.
        first = [f"a-{n}" for n in range(BATCH)]
        for n, key in enumerate(first):
            enqueue_0_1_0(conn, key, n)
        wait_sent(conn, first, "the first batch sent by the 0.1.0 daemon", old)

        # 2. This tree's migrate while the old daemon runs and the producer keeps enqueuing;
        # then the old daemon alone delivers what came during and after it. Target "flaky"
        # fails twice on the way: retries and breaker bookkeeping on the new schema.
        server.script("flaky", [Reply(status=500), Reply(status=500)])
        with OldProducer(dsn, "b", at_least=BATCH) as during:
            harness.wait_until(lambda: len(during.keys) >= 5, 10, "the producer to start")
            before = len(during.keys)
            upgraded = new_cli("migrate", "--dsn", dsn)
            overlap = len(during.keys) - before
            upgraded_at = scalar(conn, "SELECT now()")
            upgraded_wall = time.time()
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        applied = [line.removeprefix("applied ") for line in upgraded.stdout.splitlines()]
        assert [int(name[:4]) for name in applied] == list(range(4, NEW_VERSION + 1))
        assert overlap > 0, "no event was enqueued while migrate ran"
        second = during.keys
        wait_sent(conn, second, "the second batch sent by the 0.1.0 daemon", old)

        # Its metric snapshot and its retention pass (after taking the maintenance lease)
        # ran on the upgraded schema too.
        def maintained() -> bool:
            old.check_alive()
            leased_at = scalar(
                conn,
                "SELECT max(expires_at) - make_interval(secs => %s)"
                " FROM outbox_notifier.maintenance_leases WHERE holder LIKE %s",
                (OLD_LEASE_TTL_S, f"%:{old.proc.pid}:%"),
            )
            snapshot_at = old.metric("outbox_notifier_snapshot_timestamp_seconds")
            return leased_at is not None and leased_at > upgraded_at and snapshot_at > upgraded_wall

        harness.wait_until(maintained, 10, "a maintenance pass of the 0.1.0 daemon after migrate")
        assert problem_lines(old.logs()) == []

        # NotReady, not dead: /readyz says why, and /healthz keeps a liveness probe from
        # restarting it (a restart refuses the schema: below).
        ready, body = old.get("/readyz")
        assert ready == 503, body
        assert msgspec.json.decode(body)["schema"] == f"at version {NEW_VERSION}, expected 3"
        assert old.get("/healthz")[0] == 200

        # 3. A daemon of this tree beside it.
        calls_before = old.metric("outbox_notifier_delivery_attempts_total")
        new = harness.Replica(0, dsn, (), tmp_path, harness.env_without_settings())
        new.start()
        harness.wait_until(lambda: _ready(new), 20, "this release's daemon to be ready")
        third = [f"c-{n}" for n in range(BATCH)]
        for n, key in enumerate(third):
            enqueue_0_1_0(conn, key, n)
        wait_sent(conn, third, "the third batch sent", old)
        assert new.alive(), new.logs()[-3000:]
        relayed_by_old = scalar(
            conn,
            "SELECT count(*) FROM outbox_notifier.notification_records"
            " WHERE dedupe_key = ANY (%s) AND outbox_created_at IS NULL",
            (third,),
        )
        called_by_old = old.metric("outbox_notifier_delivery_attempts_total") - calls_before
    finally:
        old_code = old.stop()
        new_code = new.stop() if new is not None else None
    assert old_code == 0, old.logs()[-3000:]
    assert new is not None
    assert new_code == 0, new.logs()[-3000:]

    # As the README's table says: a 0.1.0 daemon (re)started on the upgraded schema refuses it.
    restarted = old_python(
        release_tree, "-m", "outbox_notifier", "run", "--dsn", dsn,
        "--set", "http_listen=127.0.0.1:0",
    )  # fmt: skip
    assert restarted.returncode == 1, restarted.stdout + restarted.stderr
    assert f"schema is at version {NEW_VERSION}, this daemon needs 3" in restarted.stderr

    keys = [*first, *second, *third]
    outbox = dict(conn.execute(
        "SELECT status, count(*) FROM outbox_notifier.outbox GROUP BY status"
    ).fetchall())  # fmt: skip
    rows = conn.execute(
        "SELECT dedupe_key, id, status, attempt_count, outbox_created_at IS NULL"
        " FROM outbox_notifier.notification_records"
    ).fetchall()
    retried = scalar(
        conn,
        "SELECT count(DISTINCT record_id) FROM outbox_notifier.delivery_attempts"
        " WHERE outcome = 'temporary_fail'",
    )
    assert outbox == {"relayed": len(keys)}
    by_key = {key: (rid, status, tries, old_relay) for key, rid, status, tries, old_relay in rows}
    assert len(rows) == len(by_key) == len(set(keys)) == len(keys)
    assert set(by_key) == set(keys)
    assert collections.Counter(status for _, status, _, _ in by_key.values()) == {"sent": len(keys)}
    # The old daemon relayed the first two batches (0.1.0 does not know outbox_created_at),
    # and took the failing target's two records through one retry each.
    assert all(by_key[k][3] for k in (*first, *second))
    assert retried == 2
    assert sorted(tries for _, _, tries, _ in by_key.values())[-3:] == [1, 2, 2]

    # Each record reached the server once, answered with a success.
    successes = collections.Counter(
        r.json["notification_id"]  # type: ignore[index]
        for r in server.requests
        if r.path.startswith(FLOW_PREFIX) and 200 <= r.status_sent < 300
    )
    assert successes == {rid: 1 for rid, _, _, _ in by_key.values()}

    assert problem_lines(old.logs()) == []
    assert [line for line in problem_lines(new.logs()) if "WARNING" not in line] == []
    print(
        f"\n[upgrade {OLD.version} -> schema {NEW_VERSION}] events={len(keys)}"
        f" enqueued while migrate ran={overlap}"
        f" third batch relayed by {OLD.version}={relayed_by_old}/{BATCH},"
        f" delivered by it={called_by_old:g}/{BATCH}"
    )


def _ready(replica: harness.Replica) -> bool:
    assert replica.alive(), replica.logs()[-3000:]
    try:
        return replica.get("/readyz", timeout_s=1.0)[0] == 200
    except OSError:
        return False


# -- every statement 0.1.0 ships ------------------------------------------------------------


def test_every_statement_of_0_1_0_prepares_on_the_upgraded_schema(
    release: Release, db: str, conn: psycopg.Connection[Any]
) -> None:
    """Preparing a statement resolves every table, column, function and type it names: the
    failures a daemon would meet at run time ("column ... does not exist"), for the statements
    the scenario does not reach too (switching a channel off on a 410, the status and requeue
    commands, a lease renewal). ``db`` is migrated by this tree, whose 0001-0003 are 0.1.0's
    files (migrate refuses a changed one)."""
    release_tree = release.tree()
    loaded = old_python(
        release_tree, "-c",
        "import json; from outbox_notifier import sqlfiles; print(json.dumps(sqlfiles.queries()))",
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    statements: dict[str, str] = json.loads(loaded.stdout)
    assert {"claim_records", "record_target_results", "disable_channels", "requeue_dead"} <= set(
        statements
    )
    assert scalar(conn, "SELECT max(version) FROM outbox_notifier.schema_migrations") == (
        NEW_VERSION
    )
    for path in sorted((release_tree / "sql").glob("000[1-3]_*.sql")):
        assert path.read_text() == (release_surface.ROOT / "sql" / path.name).read_text()
    failures = {}
    for name, text in statements.items():
        numbers: dict[str, int] = {}

        def number(match: re.Match[str], numbers: dict[str, int] = numbers) -> str:
            return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

        prepared = re.sub(r"%\((\w+)\)s", number, text)
        try:
            conn.execute(f"PREPARE old_{name} AS {prepared}".encode())
        except psycopg.Error as exc:
            failures[name] = f"{type(exc).__name__}: {str(exc).strip()}"
    assert failures == {}
    assert len(statements) > 20
