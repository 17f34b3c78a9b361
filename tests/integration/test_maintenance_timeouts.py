"""The maintenance loop's statements (purges, the leader lease, the metrics snapshot) are
bounded as the pipeline's are (test_statement_timeouts.py): through the session's startup
options on a direct connection, per transaction where a pooler dropped them, and on a
connection of their own, which carries no options at all. Behind PgBouncer:
tests/faults/test_pgbouncer.py."""

from __future__ import annotations

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.connections import connection_kwargs, session_timeouts, statement_timeouts
from outbox_notifier.maintenance_store import MaintenanceStore
from tests.support import settings_for
from tests.timeout_support import BLOCKED_MAINTENANCE, assert_fails_at_lock_timeout


@pytest.mark.parametrize("statement", sorted(BLOCKED_MAINTENANCE))
@pytest.mark.parametrize("mode", ["direct", "options-dropped", "one-connection"])
async def test_a_maintenance_statement_fails_at_lock_timeout(
    db: str, mode: str, statement: str
) -> None:
    settings = settings_for(db, lock_timeout_s=0.3)
    session = session_timeouts(settings)
    assert session is not None
    kwargs = connection_kwargs(settings)
    if mode == "one-connection":
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as aconn:
            store = MaintenanceStore(aconn, timeouts=statement_timeouts(settings))
            await assert_fails_at_lock_timeout(db, store, statement)
        return
    if mode == "options-dropped":
        del kwargs["options"]
    async with AsyncConnectionPool(
        db, kwargs=kwargs, configure=session.configure, min_size=1, max_size=1
    ) as pool:
        async with pool.connection() as pooled:
            assert session.holds(pooled) is (mode == "direct")
        store = MaintenanceStore(pool, timeouts=statement_timeouts(settings), session=session)
        await assert_fails_at_lock_timeout(db, store, statement)
