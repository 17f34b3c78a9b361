"""Ordering keys under faults: replicas SIGKILLed at random while a tenth of the calls fail.

Every record carries an ordering key; the receiver must see each key's records in outbox
order. A kill mid-call may repeat a record (at-least-once), but only before the next record of
its key: per key, the sequence of calls the server received (failed ones included) never goes
back. One key's head fails on purpose for a while, and the other keys must keep flowing
meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg
import pytest

from outbox_notifier import events
from outbox_notifier.testing.feishu_server import FLOW_PREFIX, FeishuServer, Recorded, Reply
from tests.faults.harness import (
    Fleet,
    LeaseWatch,
    add_channels,
    check_invariants,
    env_without_settings,
    event_payload,
    killing,
    report,
    wait_settled,
)

pytestmark = pytest.mark.faults

KEYS = 50
PER_KEY = 40  # the 50 x 40 = 2,000 records
USERS = 10
SLOW_USER = 100  # key 0's receiver: its first calls fail, so key 0's head keeps failing
SLOW_FAILURES = 6


def _produce(dsn: str, duration_s: float, errors: list[BaseException]) -> None:
    """Commits the records round by round (record n of every key, keys shuffled by round), in
    transactions of one round, spread over ``duration_s``."""
    try:
        with psycopg.connect(dsn) as conn:
            for n in range(PER_KEY):
                with conn.transaction():
                    for k in sorted(range(KEYS), key=lambda k: (k * 7 + n * 13) % KEYS):
                        user = SLOW_USER if k == 0 else 1 + k % USERS
                        body = event_payload(f"key{k}-{n}", user, k * 1000 + n)
                        body.update(ordering_key=f"task-{k}", trigger_id=f"{k}:{n}")
                        conn.execute(
                            "SELECT outbox_notifier.enqueue(%s, %s::jsonb)",
                            (events.EVENT_TYPE, msgspec.json.encode(body).decode()),
                        )
                time.sleep(duration_s / PER_KEY)
    except BaseException as exc:
        errors.append(exc)


def _calls_by_key(requests: list[Recorded]) -> dict[int, list[tuple[int, int]]]:
    """(n, status) of every Flow call by key, in the order the server received them."""
    calls: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for req in sorted(requests, key=lambda r: r.received_at):
        body: Any = req.json
        if not req.path.startswith(FLOW_PREFIX) or not isinstance(body, dict):
            continue
        k, n = map(int, str(body["trigger_id"]).split(":"))
        calls[k].append((n, req.status_sent))
    return calls


@pytest.mark.timeout(180)
def test_each_key_arrives_in_outbox_order_while_replicas_are_killed(
    db: str, server: FeishuServer, record_property: Callable[[str, object], None]
) -> None:
    urls = {u: server.flow_url(f"user-{u}") for u in range(1, USERS + 1)}
    add_channels(db, {**urls, SLOW_USER: server.flow_url(f"user-{SLOW_USER}")})
    # a tenth of all calls fail at random; slightly slow successes keep calls in flight, so
    # kills land mid-call; key 0's receiver fails its first calls outright
    server.chaos(seed=3, p_500=0.1, prefix=FLOW_PREFIX, ok_delay_s=0.05)
    server.script(f"{FLOW_PREFIX}user-{SLOW_USER}", [Reply(status=500)] * SLOW_FAILURES)
    errors: list[BaseException] = []
    producer = threading.Thread(target=_produce, args=(db, 4.0, errors), daemon=True)
    started = time.monotonic()
    with (
        Fleet(
            db, 3,
            "lease_s=3", "http_timeout_s=2", "retry_base_s=0.2", "retry_max_s=1",
            "max_attempts=25", "delivery_concurrency=20",
            env=env_without_settings(),
        ) as fleet,
        LeaseWatch(db) as watch,
    ):  # fmt: skip
        fleet.wait_ready()
        with killing(fleet, every_s=1.5, seed=5) as kill_times:
            producer.start()
            producer.join(60)
            time.sleep(3.0)  # keep killing while the tail is delivered
        assert not errors, errors
        fleet.wait_ready()
        settle_s = wait_settled(db, timeout_s=90)
        codes = fleet.stop()
    elapsed = time.monotonic() - started
    assert codes == [0, 0, 0], fleet.logs()[-5000:]
    figures = check_invariants(db, server.requests, kills=fleet.kills, lease_watch=watch)

    calls = _calls_by_key(server.requests)
    out_of_order = {k: [n for n, _ in seq] for k, seq in calls.items()
                    if [n for n, _ in seq] != sorted(n for n, _ in seq)}  # fmt: skip
    assert not out_of_order, f"keys out of outbox order: {out_of_order}"
    for k in range(KEYS):
        delivered = sorted({n for n, status in calls[k] if 200 <= status < 300})
        assert delivered == list(range(PER_KEY)), (k, delivered)
    repeats = sum(
        sum(1 for n, s in seq if 200 <= s < 300) - len({n for n, s in seq if 200 <= s < 300})
        for seq in calls.values()
    )
    # while key 0's head was failing, the other keys kept being delivered
    key0 = [r for r in server.requests if r.path.startswith(f"{FLOW_PREFIX}user-{SLOW_USER}")]
    first_fail, first_ok = (
        key0[0].received_at,
        next(r.received_at for r in key0 if 200 <= r.status_sent < 300),
    )
    others_meanwhile = sum(
        1 for r in server.requests
        if first_fail < r.received_at < first_ok and 200 <= r.status_sent < 300
        and not r.path.startswith(f"{FLOW_PREFIX}user-{SLOW_USER}")
    )  # fmt: skip
    figures.extra.update(
        kills=fleet.kills,
        repeats=repeats,
        key0_held_s=round(first_ok - first_fail, 1),
        others_delivered_meanwhile=others_meanwhile,
        settle_s=round(settle_s, 1),
        run_s=round(elapsed, 1),
    )
    report("ordering", figures, record_property)
    assert len(kill_times) >= 3
    assert figures.records == KEYS * PER_KEY
    assert figures.by_status == {"sent": KEYS * PER_KEY}
    assert others_meanwhile > 0
