"""Fixtures of the fault-injection scenarios: the local Feishu-like server, in a thread, so the
daemon subprocesses can reach it while the test drives faults; and a private cluster for the
scenarios that restart, stop or cut off the database (the shared test server is never ours
to do that to).

A scenario module starts with the same preamble: ``from tests.faults import harness`` (the
fleet, the producer, the watches, the invariant check) and ``pytestmark = pytest.mark.faults``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from outbox_notifier import migrations
from outbox_notifier.testing.feishu_server import FeishuServer
from outbox_notifier.testing.postgres import LocalCluster, create_database


@pytest.fixture
def server() -> Iterator[FeishuServer]:
    with FeishuServer.in_thread() as srv:
        yield srv


@pytest.fixture
def private_cluster() -> Iterator[LocalCluster]:
    """A Postgres cluster of this test's own, started; removed after it."""
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def private_db(private_cluster: LocalCluster) -> str:
    """DSN of a migrated database in the private cluster (gone with the cluster)."""
    dsn = create_database(private_cluster.dsn, prefix="on_faults")
    migrations.migrate(dsn)
    return dsn
