"""Statement timeouts: set once per session on a direct connection, per transaction otherwise.

Both forms must bound a lock wait. The session form saves BEGIN, set_config and COMMIT around
every statement; the per-transaction form is what a pooler that drops startup options gets.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.connections import connection_kwargs, session_timeouts, statement_timeouts
from outbox_notifier.delivery import RetryPolicy, to_result
from outbox_notifier.providers.base import Outcome, SendResult
from outbox_notifier.relay import Relay
from outbox_notifier.store import ClaimPolicy, RecordStore
from tests.support import enqueue, payload, settings_for


@pytest.mark.parametrize("options_dropped", [False, True], ids=["direct", "options-dropped"])
async def test_a_lock_wait_is_bounded_with_or_without_startup_options(
    db: str, conn: psycopg.Connection[Any], options_dropped: bool
) -> None:
    settings = settings_for(db, lock_timeout_s=0.3)
    session = session_timeouts(settings)
    assert session is not None
    kwargs = connection_kwargs(settings)
    assert "lock_timeout=300" in kwargs["options"]
    if options_dropped:  # what PgBouncer's ignore_startup_parameters = options does
        del kwargs["options"]
    enqueue(conn, payload("k-timeout"))
    async with AsyncConnectionPool(
        db, kwargs=kwargs, configure=session.configure, min_size=1, max_size=1
    ) as pool:
        store = RecordStore(pool, timeouts=statement_timeouts(settings), session=session)
        await Relay(store, batch_size=10, max_attempts=5, summary_max_runes=180).relay_once()
        policy = ClaimPolicy(lease_s=30)
        [claimed] = await store.claim_records(10, policy)
        async with pool.connection() as pooled:
            assert session.holds(pooled) is not options_dropped
        ok = to_result(claimed, SendResult(outcome=Outcome.SUCCESS), RetryPolicy(),
                       datetime.now(UTC))  # fmt: skip
        with psycopg.connect(db) as holder:
            holder.execute(
                "SELECT 1 FROM outbox_notifier.notification_records WHERE id = %s FOR UPDATE",
                (claimed.id,),
            )
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                await store.apply_results([ok], policy)
            assert time.monotonic() - started < 3.0
        # The lock is gone: the same result applies, and the connection is still usable.
        batch = await store.apply_results([ok], policy)
        assert [a.status for a in batch.records] == ["sent"]


async def test_startup_options_keep_those_of_the_dsn(db: str) -> None:
    settings = settings_for(f"{db} options='-c application_name=mine'", lock_timeout_s=0.3)
    options = connection_kwargs(settings)["options"]
    assert options.startswith("-c application_name=mine ")
    assert "-c lock_timeout=300 -c statement_timeout=" in options


def test_no_startup_options_behind_a_transaction_pooler(db: str) -> None:
    settings = settings_for(db, prepared_statements=False)
    assert "options" not in connection_kwargs(settings)
    assert session_timeouts(settings) is None
