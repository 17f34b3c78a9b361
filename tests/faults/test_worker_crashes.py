"""Scenario 1: replicas are SIGKILLed at random, mid-call, and started again."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from outbox_notifier.testing.feishu_server import FLOW_PREFIX, FeishuServer, Reply
from tests.faults import harness

pytestmark = pytest.mark.faults

EVENTS = 2000  # the issue asks for 2,000-5,000; 2,000 keeps the suite inside its time budget
USERS = 20


@pytest.mark.timeout(150)
def test_sigkilled_replicas_lose_nothing_and_duplicate_only_interrupted_calls(
    db: str, server: FeishuServer, record_property: Callable[[str, object], None]
) -> None:
    harness.add_channels(db, {u: server.flow_url(f"user-{u}") for u in range(1, USERS + 1)})
    # Slightly slow answers keep calls in flight, so kills land mid-call. At 0.1 s, the three
    # replicas' 60 slots take about 600 calls a second, so the events (500 a second) do not
    # queue up behind the kills; this seed's kills come 0.7, 1.5, 2.7, 3.8, 4.5, 5.8 s in.
    server.script(FLOW_PREFIX, [], then=Reply(delay_s=0.1))
    producer = harness.Producer(db, EVENTS, users=range(1, USERS + 1), duration_s=4.0)
    started = time.monotonic()
    with (
        harness.Fleet(
            db, 3,
            "lease_s=3", *harness.QUICK_RETRIES, "max_attempts=10",
            "delivery_concurrency=20",
        ) as fleet,
        harness.LeaseWatch(db) as watch,
    ):  # fmt: skip
        fleet.wait_ready()
        with harness.killing(fleet, every_s=1.0, seed=1) as kill_times:
            producer.start()
            producer.join()
            time.sleep(2.0)  # keep killing while the tail is delivered
        fleet.wait_ready()
        settle_s = harness.wait_settled(db, timeout_s=90)
        codes = fleet.stop()
    elapsed = time.monotonic() - started
    assert codes == [0, 0, 0], fleet.logs()[-5000:]
    figures = harness.check_invariants(db, server.requests, kills=fleet.kills, lease_watch=watch)
    figures.extra.update(
        events=producer.committed_rows,
        kills=fleet.kills,
        restarts=fleet.restarts,
        settle_s=round(settle_s, 1),
        run_s=round(elapsed, 1),
    )
    harness.report("worker_crashes", figures, record_property)
    assert len(kill_times) >= 5
    assert figures.records == len(producer.acknowledged)
    assert figures.rejected == producer.bad_acknowledged
    assert figures.by_status == {"sent": figures.records}
    assert figures.lease_rescues > 0  # the kills really landed mid-call
