"""Fixtures of the fault-injection scenarios: the local Feishu-like server, in a thread, so the
daemon subprocesses can reach it while the test drives faults; and a private cluster for the
scenarios that restart, stop or cut off the database (the shared test server is never ours
to do that to).

The private cluster is made once, when a scenario first asks for it, and only these
scenarios use it, one after another: each gets a fresh migrated database in it (a clone of a
template, as the shared server's tests do) and the cluster running and reachable, whatever
the scenario before did to it (stopped, restarted, cut off); one that cannot be brought back
is replaced. An initdb per scenario cost about 2 s of its setup.

A scenario module starts with the same preamble: ``from tests.faults import harness`` (the
fleet, the producer, the watches, the invariant check) and ``pytestmark = pytest.mark.faults``.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from outbox_notifier import migrations
from outbox_notifier.testing.feishu_server import FeishuServer
from outbox_notifier.testing.postgres import (
    LocalCluster,
    NoPostgres,
    create_database,
    drop_database,
)


@pytest.fixture
def server() -> Iterator[FeishuServer]:
    with FeishuServer.in_thread() as srv:
        yield srv


class _FaultCluster:
    """The session's private cluster and its migrated template database, made on first use."""

    def __init__(self) -> None:
        self.cluster: LocalCluster | None = None
        self.template = ""

    def take(self) -> LocalCluster:
        """The cluster, running and answering; a new one when it cannot be brought back."""
        if self.cluster is not None and not _answers(self.cluster):
            try:
                self.cluster.start()
            except NoPostgres:
                self.close()
            if self.cluster is not None and not _answers(self.cluster):
                self.close()
        if self.cluster is None:
            cluster = LocalCluster()
            try:
                cluster.start()
                template = create_database(cluster.dsn, prefix="on_faults_template")
                migrations.migrate(template)
            except BaseException:
                cluster.remove()
                raise
            self.cluster = cluster
            self.template = _dbname(template)
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.remove()
        self.cluster, self.template = None, ""


def _answers(cluster: LocalCluster) -> bool:
    try:
        with psycopg.connect(cluster.dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def _dbname(dsn: str) -> str:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert isinstance(name, str)
    return name


@pytest.fixture(scope="session")
def _fault_cluster() -> Iterator[_FaultCluster]:
    made = _FaultCluster()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def private_cluster(_fault_cluster: _FaultCluster) -> LocalCluster:
    """A Postgres cluster of the fault scenarios' own (never the shared test server), running;
    this test may stop, restart or cut it off."""
    return _fault_cluster.take()


@pytest.fixture
def private_db(private_cluster: LocalCluster, _fault_cluster: _FaultCluster) -> Iterator[str]:
    """DSN of a fresh migrated database in the private cluster, for this test alone."""
    dsn = create_database(private_cluster.dsn, template=_fault_cluster.template, prefix="on_faults")
    yield dsn
    cluster = _fault_cluster.take()  # the test may have left it stopped or cut off
    drop_database(cluster.dsn, dsn)
