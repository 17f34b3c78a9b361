"""The client-side deadline and the per-loop record of database trouble."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from outbox_notifier.dbhealth import DatabaseHealth, DeadlineExceeded, bounded


async def test_bounded_returns_the_result_in_time() -> None:
    async def quick() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert await bounded(quick(), 1.0) == 7
    assert await bounded(quick(), None) == 7


async def test_bounded_abandons_work_that_ignores_cancellation_for_a_while() -> None:
    """Like psycopg cancelling a query in a black hole: the work takes seconds to end after
    its cancellation, and the caller must not wait for that."""
    finished = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # a slow cancellation
            finished.set()
            raise

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded, match=r"within 0\.1s"):
        await bounded(stubborn(), 0.1)
    assert loop.time() - started < 0.3
    assert not finished.is_set()
    await asyncio.wait_for(finished.wait(), 2.0)  # it still ends, in the background
    assert issubclass(DeadlineExceeded, psycopg.OperationalError)


def test_database_health_reports_failing_loops_and_their_recovery() -> None:
    changes: list[tuple[str, bool]] = []
    health = DatabaseHealth(on_change=lambda loop, failing: changes.append((loop, failing)))
    health.failed("relay", psycopg.errors.LockNotAvailable("canceling statement\ndetail"))
    health.failed("relay", psycopg.errors.LockNotAvailable("canceling statement"))
    health.ok("delivery")
    assert health.problems() == {"relay": "LockNotAvailable: canceling statement"}
    health.ok("relay")
    assert health.problems() == {}
    assert changes == [("relay", True), ("relay", False)]
