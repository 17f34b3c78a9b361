"""The horizon as the metrics, the log and /readyz tell it (outbox_notifier.horizon); the
database side is in tests/integration/test_horizon.py."""

from __future__ import annotations

import logging
import math

import pytest
from prometheus_client import CollectorRegistry

from outbox_notifier.horizon import GRANT_HINT, Horizon, HorizonWatch
from outbox_notifier.metrics import TUPLE_TABLES, Metrics

P = "outbox_notifier_"
HOLDER = "pid 4711 (user analytics, state idle in transaction, application_name psql, ...)"


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(P + name, labels)


def held(age_s: float, *, sees_all: bool = True) -> Horizon:
    return Horizon(sees_all=sees_all, age_s=age_s, age_xids=1234, holder=HOLDER)


def test_gauges_are_unknown_until_read_then_follow_the_reading() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # Before the first snapshot: NaN, never a reassuring 0.
    age = value(registry, "xmin_horizon_age_seconds")
    assert age is not None and math.isnan(age)
    for table in TUPLE_TABLES:
        dead = value(registry, "dead_tuples", table=table)
        assert dead is not None and math.isnan(dead)

    metrics.apply_horizon(held(312.5))
    metrics.apply_table_tuples([("outbox", 10, 7), ("notification_records", 20, 179_000)])
    assert value(registry, "xmin_horizon_age_seconds") == 312.5
    assert value(registry, "xmin_horizon_age_xids") == 1234
    assert value(registry, "dead_tuples", table="notification_records") == 179_000
    assert value(registry, "live_tuples", table="outbox") == 10
    missing = value(registry, "dead_tuples", table="targets")  # not in the rows: unknown
    assert missing is not None and math.isnan(missing)

    # A role that cannot see other roles' sessions cannot tell 0 from a hold: unknown.
    metrics.apply_horizon(held(0.0, sees_all=False))
    age = value(registry, "xmin_horizon_age_seconds")
    assert age is not None and math.isnan(age)
    # A failed read leaves nothing stale behind.
    metrics.apply_table_tuples(None)
    dead = value(registry, "dead_tuples", table="notification_records")
    assert dead is not None and math.isnan(dead)


def test_readiness_detail_names_the_holder_only_past_the_threshold() -> None:
    watch = HorizonWatch(warn_s=60.0)
    assert watch.readiness_detail() == {}  # nothing read yet
    watch.observe(held(59.0))
    assert watch.readiness_detail() == {}
    watch.observe(held(312.4))
    assert watch.readiness_detail() == {"horizon": {"held_s": 312, "held_xids": 1234, "by": HOLDER}}
    watch.observe(Horizon(sees_all=False, age_s=0.0, age_xids=0, holder=None))
    assert watch.readiness_detail() == {
        "horizon": f"unknown: other roles' sessions are not visible: {GRANT_HINT}"
    }
    watch.observe(None)  # the read failed: nothing to say
    assert watch.readiness_detail() == {}


def test_one_log_line_when_held_and_one_when_free(caplog: pytest.LogCaptureFixture) -> None:
    watch = HorizonWatch(warn_s=60.0)
    with caplog.at_level(logging.INFO, logger="outbox_notifier.horizon"):
        for age_s in (10.0, 61.0, 120.0, 180.0, 0.5, 0.4):
            watch.observe(held(age_s))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("database horizon held for 61s (1234 transactions) by pid 4711")
    assert messages[1].startswith("database horizon no longer held")
    assert all("SELECT" not in m for m in messages)


def test_a_blind_role_is_told_once(caplog: pytest.LogCaptureFixture) -> None:
    watch = HorizonWatch(warn_s=60.0)
    with caplog.at_level(logging.INFO, logger="outbox_notifier.horizon"):
        for _ in range(3):
            watch.observe(held(0.0, sees_all=False))
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot see other roles' sessions, so the database horizon is unknown: {GRANT_HINT}"
    ]
