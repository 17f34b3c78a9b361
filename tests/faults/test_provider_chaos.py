"""Scenario 3: the provider fails at random (5xx, black-holed calls, dropped connections, 429
with Retry-After) and some targets are slow; every record settles per the retry policy."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.faults import harness

pytestmark = pytest.mark.faults

# Enough records for every fault kind to occur a score of times or more (the rarest are 5% of
# calls each), not more: the settling time is set by the slowest records' retries.
EVENTS = 400
USERS = 10
SLOW_USERS = (9, 10)
MAX_ATTEMPTS = 8
RETRYABLE = {"provider_timeout", "provider_rate_limited", "provider_5xx", "network_error"}


def _attempts(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT a.record_id, a.attempt, a.outcome, a.error_code, a.started_at,"
            " a.duration_ms, r.status, r.attempt_count, r.max_attempts, r.last_error_code"
            " FROM outbox_notifier.delivery_attempts a"
            " JOIN outbox_notifier.notification_records r ON r.id = a.record_id"
            " WHERE a.applied ORDER BY a.record_id, a.attempt"
        ).fetchall()


@pytest.mark.timeout(150)
def test_provider_chaos_settles_every_record_per_the_retry_policy(
    db: str, server: FeishuServer, record_property: Callable[[str, object], None]
) -> None:
    urls = {u: server.flow_url(f"{'slow' if u in SLOW_USERS else 'user'}-{u}")
            for u in range(1, USERS + 1)}  # fmt: skip
    harness.add_channels(db, urls)
    # A "timeout" is a call the provider never answers (timeout_s far beyond the test), so it
    # is never counted as a delivery the daemon could not know about.
    server.chaos(7, p_500=0.2, p_timeout=0.05, p_drop=0.05, p_429=0.05, retry_after_s=1,
                 timeout_s=3600)  # fmt: skip
    # Slow targets: answers close to the 2 s timeout, some of them failing, a trickled one.
    slow = [Reply(delay_s=1.5), Reply(delay_s=1.0, status=500), Reply(trickle_s=0.6),
            Reply(delay_s=0.8), Reply(status=503, delay_s=1.2)]  # fmt: skip
    server.script("slow", slow * 10, then=Reply(delay_s=0.5))
    producer = harness.Producer(db, EVENTS, users=range(1, USERS + 1), duration_s=2.0)
    started = time.monotonic()
    # A 429 slows its target to throttle_max_per_s (5/s) for throttle_slowdown_s after the
    # Retry-After: at the default 60 s every target would soon be paced at 5/s and the run take
    # as long as that pace needs; 2 s keeps the slowdown in play without setting the pace.
    with (
        harness.Fleet(
            db, 2,
            "lease_s=4", *harness.QUICK_RETRIES, f"max_attempts={MAX_ATTEMPTS}",
            "breaker_cooloff_s=1", "throttle_slowdown_s=2",
        ) as fleet,
        harness.LeaseWatch(db) as watch,
    ):  # fmt: skip
        fleet.wait_ready()
        producer.start()
        producer.join()
        settle_s = harness.wait_settled(db, timeout_s=100)
        codes = fleet.stop()
    elapsed = time.monotonic() - started
    assert codes == [0, 0], fleet.logs()[-5000:]
    figures = harness.check_invariants(db, server.requests, lease_watch=watch)

    # Per policy: dead only after max_attempts temporary failures; sent ends with a success
    # after temporary failures only; a 429's Retry-After (1 s) is waited out.
    rows = _attempts(db)
    by_record: dict[int, list[tuple[Any, ...]]] = collections.defaultdict(list)
    for row in rows:
        by_record[row[0]].append(row)
    codes_seen: collections.Counter[str] = collections.Counter()
    gap_after: dict[str, float] = {}
    problems = []
    for rid, attempts in by_record.items():
        status, attempt_count, max_attempts, last_code = attempts[0][6:10]
        outcomes = [a[2] for a in attempts]
        for a in attempts:
            if a[3]:
                codes_seen[a[3]] += 1
        if status == "dead" and (attempt_count != max_attempts or last_code not in RETRYABLE):
            problems.append(f"record {rid} dead after {attempt_count} attempts ({last_code})")
        if status == "sent" and (
            outcomes[-1] != "success" or set(outcomes[:-1]) - {"temporary_fail"}
        ):
            problems.append(f"record {rid} sent with attempts {outcomes}")
        for prev, nxt in itertools.pairwise(attempts):
            gap = (nxt[4] - prev[4]).total_seconds() - prev[5] / 1000.0
            code = prev[3] or "?"
            gap_after[code] = min(gap_after.get(code, gap), gap)
    assert not problems, problems[:20]
    assert gap_after.get("provider_rate_limited", 1.0) >= 0.9, gap_after
    figures.extra.update(
        events=producer.committed_rows,
        kills=0,
        errors=dict(codes_seen.most_common()),
        min_gap_after_s={k: round(v, 2) for k, v in sorted(gap_after.items())},
        settle_s=round(settle_s, 1),
        run_s=round(elapsed, 1),
    )
    harness.report("provider_chaos", figures, record_property)
    assert set(figures.by_status) <= {"sent", "dead"}
    assert figures.by_status.get("sent", 0) >= figures.records * 0.95
    assert figures.duplicates == 0
    assert figures.lease_rescues == 0
    assert {"provider_5xx", "provider_timeout", "network_error", "provider_rate_limited"} <= set(
        codes_seen
    )
