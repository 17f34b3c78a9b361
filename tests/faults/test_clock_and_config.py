"""Scenario 6: a skewed host clock does not move retries, nor a provider's Retry-After date;
bad settings fail fast with exit 2.

Retry times are computed by Postgres (``now() + delay`` in the apply statement), so the
backoff holds on the database clock whatever the daemon's host clock says. Shown in-process:
the delivery module's ``datetime`` is replaced by one that runs a day fast or slow.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier import delivery as delivery_module
from outbox_notifier import store as store_module
from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.daemon import claim_policy, http_transport
from outbox_notifier.delivery import Deliverer
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers import FeishuFlowProvider
from outbox_notifier.providers.model import Delivery, SendResult
from outbox_notifier.store import ClaimPolicy, RecordStore
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.faults import harness
from tests.support import delivering, eventually, loop_context, relay_for, settings_for

pytestmark = pytest.mark.faults


class _Failing:
    """A provider that always fails temporarily; the n-th call may carry a Retry-After."""

    channel = "feishu"

    def __init__(self, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        self.calls = 0

    async def send(self, delivery: Delivery) -> SendResult:
        self.calls += 1
        return SendResult(
            outcome=Outcome.TEMPORARY_FAIL,
            error_code=ErrorCode.PROVIDER_5XX,
            error_message="HTTP 503",
            http_status=503,
            retry_after_s=self.retry_after_s,
        )


def _skewed(skew: timedelta) -> type[datetime]:
    class Skewed(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + skew

    return Skewed


@pytest.fixture
async def pool(db: str) -> Any:
    p: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        db, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await p.open()
    yield p
    await p.close()


@pytest.mark.parametrize("skew_h", [-24, 0, 24])
async def test_retry_times_follow_the_database_clock_whatever_the_host_clock(
    db: str,
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
    skew_h: int,
) -> None:
    # The whole daemon's host clock is off by skew_h: the modules that read it are patched.
    monkeypatch.setattr(delivery_module, "datetime", _skewed(timedelta(hours=skew_h)))
    monkeypatch.setattr(store_module, "datetime", _skewed(timedelta(hours=skew_h)))
    harness.add_channels(db, {1: "http://127.0.0.1:9/flow/api/trigger-webhook/x"})
    store = RecordStore(pool)
    relay = relay_for(store, relay_batch_size=10)

    async def produce(key: str) -> None:
        with psycopg.connect(db, autocommit=True) as conn:
            harness.enqueue_event(conn, key, 1, 1)
        await relay.relay_once()

    await produce("clock-a")
    policy = RetryPolicy(max_attempts=5, base_s=60, max_s=600)
    claim = ClaimPolicy(lease_s=30)

    async def deliver_one(provider: _Failing, seed: int) -> None:
        """One pass of the delivery loop: one record claimed, called, its result applied."""
        deliverer = Deliverer(store, {"feishu_flow": provider}, policy, claim,
                              ResultCompleter(store, claim), batch_size=1, concurrency=1,
                              rng=random.Random(seed))  # fmt: skip
        ctx = loop_context()
        async with delivering(deliverer, ctx):  # stopping drains: the result is applied
            await eventually(lambda: provider.calls == 1)

    rows: list[tuple[Any, ...]] = []
    with psycopg.connect(db, autocommit=True) as conn:
        gaps = []
        for attempt, backoff_s in ((1, 60.0), (2, 120.0), (3, 240.0)):
            await deliver_one(_Failing(), seed=attempt)
            # The jitter of a loop seeded alike: exactly the delay the loop decided.
            expected = backoff_s * random.Random(attempt).uniform(0.8, 1.2)
            row = conn.execute(
                "SELECT extract(epoch FROM next_retry_at - updated_at),"
                " extract(epoch FROM next_retry_at - now()), attempt_count"
                " FROM outbox_notifier.notification_records WHERE dedupe_key = 'clock-a'"
            ).fetchone()
            assert row is not None
            gap, ahead, attempts = float(row[0]), float(row[1]), row[2]
            assert attempts == attempt
            assert gap == pytest.approx(expected, abs=1e-3)  # exactly the backoff, DB clock
            assert 0.8 * backoff_s <= gap <= 1.2 * backoff_s
            assert expected - 5 < ahead <= expected  # in the DB's future, not the host's
            gaps.append(gap)
            # make it due again on the database clock
            conn.execute(
                "UPDATE outbox_notifier.notification_records SET next_retry_at = now()"
                " WHERE dedupe_key = 'clock-a'"
            )
        conn.execute(  # clock-a out of the way; clock-b gets a Retry-After
            "UPDATE outbox_notifier.notification_records SET next_retry_at = now() + interval"
            " '1 day' WHERE dedupe_key = 'clock-a'"
        )
        await produce("clock-b")
        await deliver_one(_Failing(retry_after_s=7), seed=4)
        retry_after_gap = conn.execute(
            "SELECT extract(epoch FROM next_retry_at - updated_at)"
            " FROM outbox_notifier.notification_records WHERE dedupe_key = 'clock-b'"
        ).fetchone()
        rows = conn.execute(
            "SELECT extract(epoch FROM started_at - now()) FROM outbox_notifier.delivery_attempts"
        ).fetchall()
    assert retry_after_gap is not None and float(retry_after_gap[0]) == pytest.approx(7, abs=1e-3)
    started_offset_h = max(abs(float(r[0])) for r in rows) / 3600
    # The attempt log is written on the database clock too.
    assert started_offset_h < 0.01
    line = (
        f"[faults:clock skew={skew_h:+d}h] backoff_gaps_s={[round(g, 3) for g in gaps]}"
        f" retry_after_gap_s={float(retry_after_gap[0]):.3f}"
        f" attempt_started_at_offset_h={started_offset_h:.1f}"
    )
    print("\n" + line)
    record_property("faults_figures", line)


BAD_SETTINGS = [
    ({"OUTBOX_NOTIFIER_LEASE_S": "abc"}, "lease_s"),
    ({"OUTBOX_NOTIFIER_POLL_INTERVAL_S": "-1"}, "poll_interval_s"),
    ({"OUTBOX_NOTIFIER_MAX_ATTEMPTS": "0"}, "max_attempts"),
    ({"OUTBOX_NOTIFIER_LEASE_S": "2", "OUTBOX_NOTIFIER_HTTP_TIMEOUT_S": "5"}, "lease_s"),
    ({"OUTBOX_NOTIFIER_LOG_FORMAT": "xml"}, "log_format"),
    ({"OUTBOX_NOTIFIER_RETRY_BASE_S": "nan"}, "retry_base_s"),
    ({"OUTBOX_NOTIFIER_POOL_MIN_SIZE": "5", "OUTBOX_NOTIFIER_POOL_MAX_SIZE": "1"}, "pool_max_size"),
    ({"OUTBOX_NOTIFIER_DELIVERY_CONCURRENCY": "1.5"}, "delivery_concurrency"),
]


@pytest.fixture
def bad_runs(db: str) -> Iterator[list[tuple[str, subprocess.Popen[str], float]]]:
    """Every bad configuration started at once (they must all exit quickly)."""
    procs = []
    for env_extra, setting in BAD_SETTINGS:
        env = {**harness.env_without_settings(), **env_extra}
        cmd = [sys.executable, "-m", "outbox_notifier", "run", "--dsn", db]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)  # fmt: skip
        procs.append((setting, proc, time.monotonic()))
    yield procs
    for _, proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_invalid_settings_fail_fast_with_exit_2_and_one_line(
    bad_runs: list[tuple[str, subprocess.Popen[str], float]],
    record_property: Callable[[str, object], None],
) -> None:
    slowest = 0.0
    for setting, proc, started in bad_runs:
        out, _ = proc.communicate(timeout=30)
        slowest = max(slowest, time.monotonic() - started)
        lines = [line for line in out.splitlines() if line.strip()]
        assert proc.returncode == 2, (setting, proc.returncode, out)
        assert len(lines) == 1, (setting, out)
        assert setting in lines[0], (setting, out)
        assert "Traceback" not in out
    line = f"[faults:bad_settings] cases={len(bad_runs)} exit=2 slowest_exit_s={slowest:.2f}"
    print("\n" + line)
    record_property("faults_figures", line)


@pytest.mark.parametrize("with_date", [True, False])
@pytest.mark.parametrize("skew_h", [-1, 1])
async def test_retry_after_date_waits_as_asked_whatever_the_host_clock(
    db: str,
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
    skew_h: int,
    with_date: bool,
) -> None:
    # A provider asks for 30 s as an HTTP date, on its own correct clock; this replica's host
    # clock is an hour off. Read against the reply's Date, or on the database clock when the
    # reply has none, the wait is 30 s either way (the host clock used to make it 3600 s, the
    # cap, or 0).
    monkeypatch.setattr(delivery_module, "datetime", _skewed(timedelta(hours=skew_h)))
    monkeypatch.setattr(store_module, "datetime", _skewed(timedelta(hours=skew_h)))
    # rounded up to a whole second, as the header carries it: the wait then starts at 30 s
    now = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    headers = {"Retry-After": format_datetime(now + timedelta(seconds=30), usegmt=True)}
    if with_date:
        headers["Date"] = format_datetime(now, usegmt=True)
    settings = settings_for(db)
    async with FeishuServer() as server:
        server.script("/flow/api/trigger-webhook/", [Reply(status=429, headers=headers)])
        harness.add_channels(db, {1: server.flow_url("skewed")})
        relay = relay_for(RecordStore(pool), relay_batch_size=10)
        with psycopg.connect(db, autocommit=True) as conn:
            harness.enqueue_event(conn, "skew", 1, 1)
            await relay.relay_once()
            transport = http_transport(settings)
            try:
                # the provider's own clock (signing times, sent_at) is the skewed host's too
                provider = FeishuFlowProvider(
                    transport, allowed_schemes=("http",), allowed_hosts=("127.0.0.1",),
                    clock=lambda: datetime.now(UTC) + timedelta(hours=skew_h),
                )  # fmt: skip
                store = RecordStore(pool)
                claims = claim_policy(settings)
                deliverer = Deliverer(
                    store, {"feishu_flow": provider}, RetryPolicy(), claims,
                    ResultCompleter(store, claims), batch_size=1, concurrency=1,
                )  # fmt: skip
                async with delivering(deliverer, loop_context()):  # stopping applies the result
                    await eventually(lambda: server.count() == 1)
            finally:
                await transport.aclose()
            row = conn.execute(
                "SELECT status, last_error_code, extract(epoch FROM next_retry_at - updated_at)"
                " FROM outbox_notifier.notification_records WHERE dedupe_key = 'skew'"
            ).fetchone()
    assert row is not None
    status, code, wait_s = row[0], row[1], float(row[2])
    assert (status, code) == ("failed", "provider_rate_limited")
    # 30 s, less (without a Date) the time from here to the call (under a second), plus what
    # the rounding above added (under a second)
    assert 29.0 <= wait_s <= 31.0, wait_s
    line = (
        f"[faults:retry_after_date skew={skew_h:+d}h date_header={with_date}] wait_s={wait_s:.3f}"
    )
    print("\n" + line)
    record_property("faults_figures", line)
