"""What every long-running loop shares, so each stage can own its loop in one shape.

A stage (``Relay``, ``Deliverer``, ``Rescuer``, ``Maintenance``, ``Listener``) has a
``run(...)`` coroutine that loops until the stop event is set (the ``ResultCompleter``, which
the ``Deliverer`` runs beside itself, until it is told to finish: it lands the last results).
Through a `LoopContext` it beats its heartbeat (``/healthz`` and the systemd watchdog), says
when it waits on purpose (a wait is not a wedge), reports its database calls to `DatabaseHealth`
(``/readyz``) and counts database errors. The daemon builds one context and only starts, guards
and drains the loops.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from outbox_notifier.dbhealth import DatabaseHealth
    from outbox_notifier.http import HeartbeatMonitor
    from outbox_notifier.metrics import Metrics


# eq=False: a context is one object shared by the loops, compared (and hashed) by identity.
@dataclasses.dataclass(eq=False)
class LoopContext:
    stop: asyncio.Event
    monitor: HeartbeatMonitor
    db_health: DatabaseHealth
    metrics: Metrics
    _: dataclasses.KW_ONLY
    db_deadline_s: float

    def turn(self, name: str) -> bool:
        """Beats ``name``'s heartbeat; whether the loop should go on (not stopping)."""
        if self.stop.is_set():
            return False
        self.monitor.beat(name)
        return True

    def database_failed(self, name: str, exc: BaseException) -> None:
        self.metrics.database_error(name)
        self.db_health.failed(name, exc)

    async def sleep(self, name: str, seconds: float) -> None:
        """Waits ``seconds`` or until stopped; ``name`` counts as alive meanwhile."""
        self.monitor.sleeping(name, seconds)
        await wait_any(self.stop, timeout_s=seconds)

    async def wait(self, name: str, wake: asyncio.Event, seconds: float) -> None:
        """`sleep`, cut short when ``wake`` is set."""
        self.monitor.sleeping(name, seconds)
        await wait_any(self.stop, wake, timeout_s=seconds)


async def wait_any(*events: asyncio.Event, timeout_s: float) -> None:
    """Returns when any event is set or the timeout passes."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
