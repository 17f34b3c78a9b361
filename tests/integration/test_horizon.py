"""A snapshot held open on another connection, seen by the daemon: the horizon gauges, the
holder on /readyz (still 200), the dead tuples it leaves behind, and a role that cannot see
other roles' sessions reporting "unknown" rather than a false 0.

Roles belong to the cluster: each login role made here has a unique name and is dropped.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from outbox_notifier.daemon import Daemon
from outbox_notifier.horizon import HorizonWatch
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.metrics import Metrics
from tests.support import (
    enqueue,
    eventually,
    held_snapshot,
    login_role,
    payload,
    running,
    settings_for,
)

pytestmark = pytest.mark.timeout(60)


async def check(store: MaintenanceStore, watch: HorizonWatch, metrics: Metrics) -> None:
    await watch.check(store, metrics, timeout_s=10.0)


def gauge(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value("outbox_notifier_" + name, labels)
    assert found is not None
    return found


async def test_a_held_snapshot_is_measured_named_and_released(
    db: str, aconn: psycopg.AsyncConnection[Any]
) -> None:
    store, metrics = MaintenanceStore(aconn), Metrics(CollectorRegistry())
    watch = HorizonWatch(warn_s=0.2)
    await check(store, watch, metrics)
    assert gauge(metrics, "xmin_horizon_age_seconds") < 0.2  # only short transactions
    assert watch.readiness_detail() == {}

    with held_snapshot(db) as pid:
        await asyncio.sleep(0.3)
        await check(store, watch, metrics)
        first = gauge(metrics, "xmin_horizon_age_seconds")
        assert first >= 0.3
        assert gauge(metrics, "xmin_horizon_age_xids") >= 0
        detail = watch.readiness_detail()["horizon"]
        assert detail["held_s"] == round(first)
        assert detail["by"].startswith(f"pid {pid} (user ")
        assert "state idle in transaction, application_name analytics" in detail["by"]
        assert "SELECT" not in detail["by"]  # never the query's text

        await asyncio.sleep(0.3)
        await check(store, watch, metrics)
        assert gauge(metrics, "xmin_horizon_age_seconds") >= first + 0.3  # still growing

    await check(store, watch, metrics)
    assert gauge(metrics, "xmin_horizon_age_seconds") < 0.2
    assert watch.readiness_detail() == {}


async def test_dead_tuples_follow_deletes_while_the_horizon_is_held(
    db: str, conn: psycopg.Connection[Any], aconn: psycopg.AsyncConnection[Any]
) -> None:
    store, metrics = MaintenanceStore(aconn), Metrics(CollectorRegistry())
    watch = HorizonWatch(warn_s=60.0)
    with held_snapshot(db):  # vacuum may not take them away meanwhile
        conn.execute(
            "INSERT INTO outbox_notifier.outbox (event_type, event_version, payload, status)"
            " SELECT 'x', '1', '{}', 'relayed' FROM generate_series(1, 500)"
        )
        conn.execute("DELETE FROM outbox_notifier.outbox")

        async def counted() -> bool:
            # A session publishes its statistics at the end of a transaction at least a second
            # after its last report, else only once idle for 10 s: so the deleting session runs
            # one more, or this would wait those 10 s.
            conn.execute("SELECT 1")
            await check(store, watch, metrics)
            return gauge(metrics, "dead_tuples", table="outbox") >= 500

        # The statistics system publishes counts within about a second.
        await eventually(counted, timeout_s=10, what="500 dead outbox tuples")
    for table in ("notification_records", "delivery_attempts", "targets"):
        assert gauge(metrics, "dead_tuples", table=table) >= 0


async def test_a_role_that_cannot_see_other_sessions_says_unknown(db: str) -> None:
    metrics = Metrics(CollectorRegistry())
    watch = HorizonWatch(warn_s=0.1)
    with login_role(db, "outbox_notifier_daemon") as blind_dsn, held_snapshot(db):
        async with await psycopg.AsyncConnection.connect(blind_dsn, autocommit=True) as blind:
            await asyncio.sleep(0.2)
            await check(MaintenanceStore(blind), watch, metrics)
            assert math.isnan(gauge(metrics, "xmin_horizon_age_seconds"))  # not a false 0
            assert math.isnan(gauge(metrics, "xmin_horizon_age_xids"))
            assert "GRANT pg_read_all_stats" in watch.readiness_detail()["horizon"]
            assert gauge(metrics, "dead_tuples", table="outbox") >= 0  # visible to any role

    # The documented grant is enough.
    with (
        login_role(db, "outbox_notifier_daemon", "pg_read_all_stats") as dsn,
        held_snapshot(db) as pid,
    ):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as seeing:
            await asyncio.sleep(0.2)
            await check(MaintenanceStore(seeing), watch, metrics)
            assert gauge(metrics, "xmin_horizon_age_seconds") >= 0.2
            assert watch.readiness_detail()["horizon"]["by"].startswith(f"pid {pid} ")


async def test_readyz_names_the_holder_and_stays_ready(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    enqueue(conn, payload("a"))  # some work, so the daemon's own transactions come and go
    daemon = Daemon(
        settings_for(db, maintenance_interval_s=0.2, horizon_warn_s=0.5),
        registry=CollectorRegistry(),
    )
    async with running(daemon), httpx.AsyncClient(trust_env=False) as client:

        async def get(path: str) -> httpx.Response:
            return await client.get(f"http://127.0.0.1:{daemon.http_port}{path}")

        async def ready() -> bool:
            return daemon.http_port is not None and (await get("/readyz")).status_code == 200

        await eventually(ready, timeout_s=15, what="ready")
        with held_snapshot(db) as pid:
            answers: list[httpx.Response] = []

            async def named() -> bool:
                answers.append(await get("/readyz"))
                return "horizon" in answers[-1].json()

            await eventually(named, timeout_s=10, what="/readyz naming the holder")
            assert answers[-1].status_code == 200  # never a readiness failure
            body = answers[-1].json()
            assert body["status"] == "ok"
            assert body["horizon"]["by"].startswith(f"pid {pid} ")
            assert body["horizon"]["held_s"] >= 0
            metrics_text = (await get("/metrics")).text
            (line,) = [
                x
                for x in metrics_text.splitlines()
                if x.startswith("outbox_notifier_xmin_horizon_age_seconds ")
            ]
            assert float(line.split()[1]) >= 0.5

        async def released() -> bool:
            body = (await get("/readyz")).json()
            return body["status"] == "ok" and "horizon" not in body

        await eventually(released, timeout_s=10, what="/readyz without the horizon")
