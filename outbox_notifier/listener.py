"""The listener loop: one dedicated connection LISTENing to outbox inserts, reconnecting with
backoff. A notification only wakes the relay early; the relay polls as well."""

from __future__ import annotations

import asyncio
import logging

from outbox_notifier import connections
from outbox_notifier.loops import LoopContext
from outbox_notifier.settings import Settings
from outbox_notifier.store import OperationalError

logger = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 5.0


class Listener:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.up = False  # the LISTEN connection is open (/readyz, the listener_up gauge)

    async def run(self, ctx: LoopContext, outbox_wake: asyncio.Event) -> None:
        """Listens until stopped; sets ``outbox_wake`` on each notification."""
        poll_interval_s = self.settings.poll_interval_s
        delay = RECONNECT_FIRST_S
        while ctx.turn("listener"):
            try:
                async with connections.outbox_listener(self.settings) as listener:
                    if not self.up:
                        logger.info("listening for outbox notifications")
                    self.up = True
                    delay = RECONNECT_FIRST_S
                    # Rows inserted while we were not listening: look now, don't wait a poll.
                    outbox_wake.set()
                    while ctx.turn("listener"):
                        async for _ in listener.notified(poll_interval_s):
                            outbox_wake.set()
            except OperationalError as exc:
                ctx.metrics.database_error("listener")
                if self.up:
                    logger.warning("listener lost its connection, reconnecting: %s",
                                   str(exc).strip())  # fmt: skip
                    ctx.metrics.listener_reconnected()
                self.up = False
                await ctx.sleep("listener", delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
