"""Database trouble as the loops see it, and the client-side deadline on their database work.

Liveness and database health are different facts. A loop that keeps retrying against a locked,
slow or absent database is alive (``/healthz`` stays 200, the watchdog keeps being fed); what
is wrong with the database is reported by `DatabaseHealth`, which ``/readyz`` and the
``outbox_notifier_database_failing`` gauge read.

Server-side timeouts (``lock_timeout``, ``statement_timeout``) end a statement that waits on the
server. They cannot end one whose packets never arrive (a partition, a dead NAT entry): libpq's
``tcp_user_timeout`` and keepalives bound that at the socket, and `bounded` bounds it in the
event loop. On the deadline the call is *abandoned*, not awaited: psycopg's own cancellation
(a cancel request, then closing the connection) may take up to 10 s in a black hole, and the
loop must not wait for it. The abandoned task finishes on its own and the pool discards the
broken connection it returns.

Usage::

    health = DatabaseHealth()
    try:
        rows = await bounded(store.claim_records(...), deadline_s=35.0)
    except psycopg.OperationalError as exc:  # DeadlineExceeded is one
        health.failed("delivery", exc)
    else:
        health.ok("delivery")
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import psycopg

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DeadlineExceeded(psycopg.OperationalError):
    """A database call did not finish within its client-side deadline; it was abandoned.

    An `OperationalError`, so every loop already treats it as "database unavailable".
    """


async def bounded(work: Coroutine[Any, Any, T], deadline_s: float | None) -> T:
    """Awaits ``work`` for at most ``deadline_s`` seconds (None: no deadline).

    Past the deadline the work is cancelled in the background and `DeadlineExceeded` raised at
    once. If the caller itself is cancelled, so is the work.
    """
    if deadline_s is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=deadline_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    task.add_done_callback(_consume)
    raise DeadlineExceeded(f"no answer from the database within {deadline_s:g}s")


def _consume(task: asyncio.Future[Any]) -> None:
    # Retrieve the outcome of an abandoned call, so asyncio does not report it as lost.
    if not task.cancelled() and task.exception() is not None:
        logger.debug("abandoned database call ended: %r", task.exception())


class DatabaseHealth:
    """The outcome of each loop's last database call; the failing ones say why.

    ``on_change(loop, failing)`` is called when a loop starts or stops failing (a gauge).
    """

    def __init__(self, on_change: Callable[[str, bool], None] | None = None) -> None:
        self._problems: dict[str, str] = {}
        self._on_change = on_change

    def ok(self, loop: str) -> None:
        if self._problems.pop(loop, None) is not None:
            logger.info("%s: database calls succeed again", loop)
            if self._on_change is not None:
                self._on_change(loop, False)

    def failed(self, loop: str, exc: BaseException) -> None:
        first = loop not in self._problems
        self._problems[loop] = describe(exc)
        if first and self._on_change is not None:
            self._on_change(loop, True)

    def problems(self) -> dict[str, str]:
        """Failing loops and why, e.g. ``{"relay": "LockNotAvailable: canceling ..."}``."""
        return dict(sorted(self._problems.items()))


def describe(exc: BaseException) -> str:
    """One line: the exception's class and the first line of its message."""
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of the exception's message (at most 300 characters: a log line stays
    one readable line), or its class when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
