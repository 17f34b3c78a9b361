"""Scenario 2: the database restarts (``pg_ctl restart -m fast``) under a running workload.

The shared test server may not be ours to restart, so this scenario makes a private cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.delivery import Deliverer
from outbox_notifier.metrics import Metrics
from outbox_notifier.names import Outcome
from outbox_notifier.providers.model import Delivery, SendResult
from outbox_notifier.store import AppliedResults, AttemptResult, ClaimPolicy, RecordStore
from outbox_notifier.testing.feishu_server import FeishuServer
from outbox_notifier.testing.postgres import LocalCluster
from tests.faults import harness
from tests.support import loop_context, relay_for

pytestmark = pytest.mark.faults

EVENTS = 1500
USERS = 10
RESTARTS = 2
# The workload is committed over PRODUCE_S; a restart comes every RESTART_EVERY_S of it, so
# both land while events are being committed (each outage lasts a fraction of a second).
PRODUCE_S = 4.0
RESTART_EVERY_S = 1.3


@pytest.mark.timeout(150)
def test_database_restarts_lose_nothing_and_listen_comes_back(
    private_cluster: LocalCluster,
    private_db: str,
    server: FeishuServer,
    record_property: Callable[[str, object], None],
) -> None:
    dsn = private_db
    harness.add_channels(dsn, {u: server.flow_url(f"user-{u}") for u in range(1, USERS + 1)})
    producer = harness.Producer(dsn, EVENTS, users=range(1, USERS + 1), duration_s=PRODUCE_S)
    started = time.monotonic()
    outages: list[float] = []
    # A long poll interval: after the restarts only a working LISTEN makes delivery prompt.
    with (
        harness.Fleet(
            dsn, 3,
            "poll_interval_s=5", "lease_s=10", *harness.QUICK_RETRIES, "max_attempts=10",
        ) as fleet,
        harness.LeaseWatch(dsn) as watch,
    ):  # fmt: skip
        fleet.wait_ready()
        producer.start()
        for _ in range(RESTARTS):
            time.sleep(RESTART_EVERY_S)
            down = time.monotonic()
            private_cluster.restart("fast")
            outages.append(time.monotonic() - down)
        committed_by_last_restart = producer.committed_rows
        producer.join()
        fleet.wait_ready(timeout_s=30)  # readiness includes "the LISTEN connection is up"
        settle_s = harness.wait_settled(dsn, timeout_s=60)
        reconnects = [r.metric("outbox_notifier_listener_reconnects_total") for r in fleet.replicas]
        db_errors = sum(r.metric("outbox_notifier_database_errors_total") for r in fleet.replicas)
        # One more event after the restarts: NOTIFY (not the 5 s poll) must bring it in at once.
        with psycopg.connect(dsn, autocommit=True) as conn:
            harness.enqueue_event(conn, "after-restart", 1, 999_999)
        notify_latency_s = harness.wait_until(
            lambda: harness.record_status(dsn, "after-restart") == "sent",
            4.0,
            "a prompt delivery via NOTIFY",
        )
        codes = fleet.stop()
    elapsed = time.monotonic() - started
    assert codes == [0, 0, 0], fleet.logs()[-5000:]
    figures = harness.check_invariants(dsn, server.requests, lease_watch=watch)
    figures.extra.update(
        events=producer.committed_rows,
        db_restarts=RESTARTS,
        outage_s="/".join(f"{o:.1f}" for o in outages),
        committed_by_last_restart=committed_by_last_restart,
        producer_retries=producer.commit_errors,
        daemon_db_errors=int(db_errors),
        listener_reconnects="/".join(str(int(r)) for r in reconnects),
        notify_latency_s=round(notify_latency_s, 2),
        kills=0,
        settle_s=round(settle_s, 1),
        run_s=round(elapsed, 1),
    )
    harness.report("database_restart", figures, record_property)
    # the restarts came while the workload was still being committed
    assert committed_by_last_restart < EVENTS, committed_by_last_restart
    assert figures.records == len(producer.acknowledged) + 1
    assert figures.rejected >= producer.bad_acknowledged
    assert figures.by_status == {"sent": figures.records}
    assert all(r >= RESTARTS for r in reconnects), reconnects
    assert figures.duplicates == 0
    assert figures.lease_rescues == 0  # outages far shorter than the lease
    assert "Traceback" not in fleet.logs(), fleet.logs()[-5000:]


class _ApplyFailsOnce(RecordStore):
    """A store whose first ``apply_results`` loses its connection before the statement runs:
    what a database restart between a batch's calls and its apply does. The results, their
    disables and the target bookkeeping are one statement, so the retry stores them once."""

    failures = 1

    async def apply_results(
        self, results: Sequence[AttemptResult], policy: ClaimPolicy
    ) -> AppliedResults:
        if self.failures:
            self.failures -= 1
            raise psycopg.OperationalError("terminating connection due to administrator command")
        return await super().apply_results(results, policy)


class _AlwaysOk:
    channel = "feishu"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, delivery: Delivery) -> SendResult:
        self.calls += 1
        return SendResult(outcome=Outcome.SUCCESS, http_status=200)


async def test_an_apply_that_loses_its_connection_is_retried_and_stored_once(
    db: str, record_property: Callable[[str, object], None]
) -> None:
    harness.add_channels(db, {1: "http://127.0.0.1:9/flow/api/trigger-webhook/x"})
    with psycopg.connect(db, autocommit=True) as conn:
        for i in range(3):
            harness.enqueue_event(conn, f"bk-{i}", 1, i)
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        db, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await pool.open()
    try:
        store = _ApplyFailsOnce(pool)
        await relay_for(store, relay_batch_size=10).relay_once()
        provider = _AlwaysOk()
        metrics = Metrics(CollectorRegistry())
        claims = ClaimPolicy(lease_s=30)
        deliverer = Deliverer(
            store, {"feishu_flow": provider}, RetryPolicy(), claims,
            ResultCompleter(store, claims, retry_s=0.05), batch_size=10, concurrency=10,
        )  # fmt: skip
        ctx = loop_context(metrics)
        task = asyncio.create_task(deliverer.run(ctx, asyncio.Event(), 0.1))

        async def all_sent() -> bool:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM outbox_notifier.notification_records"
                    " WHERE status = 'sent'"
                )
                row = await cur.fetchone()
            return row is not None and row[0] == 3

        deadline = time.monotonic() + 10
        while not await all_sent():
            assert time.monotonic() < deadline, "records were not sent"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the retried batch land
        ctx.stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        await pool.close()
    figures = harness.check_invariants(db, None)
    figures.extra.update(provider_calls=provider.calls, fenced=fenced(metrics))
    harness.report("apply_retried_after_lost_connection", figures, record_property)
    assert provider.calls == 3
    assert figures.late_results == 0, "applied results were written again as late results"
    assert fenced(metrics) == 0
    assert store.failures == 0  # the failure did happen


def fenced(metrics: Metrics) -> float | None:
    """Results discarded because their lease was taken over, as the daemon counts them."""
    return metrics.registry.get_sample_value("outbox_notifier_late_results_total")
