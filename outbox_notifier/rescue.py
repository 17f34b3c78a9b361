"""The rescue loop: records left in 'sending' past their lease (their worker died) go back to
'failed' with backoff (jittered as the policy says, per record, in SQL), or 'dead' once their
attempts are spent (`rescue_expired_leases`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.dbhealth import bounded, describe
from outbox_notifier.loops import LoopContext
from outbox_notifier.store import OperationalError, RecordStore, RescuedRecord
from outbox_notifier.sweeps import paced_schedule

logger = logging.getLogger(__name__)


async def rescue_expired_leases(
    store: RecordStore, policy: RetryPolicy, *, limit: int = 500
) -> list[RescuedRecord]:
    """Takes back records stuck in 'sending' past their lease (their worker died)."""
    rescued = await store.rescue_expired_leases(
        limit, policy.delays_s(policy.max_attempts), policy.jitter
    )
    for row in rescued:
        logger.warning(
            "lease expired while sending; record is now %s", row.status,
            extra={"record_id": row.id},
        )  # fmt: skip
    return rescued


class Rescuer:
    def __init__(
        self,
        store: RecordStore,
        policy: RetryPolicy,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.policy = policy
        self.interval_s = interval_s
        # Once two rescues in a row are slow (a held snapshot), they are spaced out to 1% of
        # the time, a minute apart at most: a lease that expires meanwhile waits that much more.
        self.schedule = paced_schedule(interval_s, clock)

    async def run(self, ctx: LoopContext, rescued_wake: asyncio.Event) -> None:
        """Rescues every ``interval_s`` (less often while rescues are slow) until stopped; sets
        ``rescued_wake`` when it took any."""
        while ctx.turn("rescue"):
            if self.schedule.begin():
                try:
                    rescued = await self._rescue(ctx)
                finally:
                    self.schedule.end()
                if rescued:
                    rescued_wake.set()
            await ctx.sleep("rescue", self.interval_s)

    async def _rescue(self, ctx: LoopContext) -> list[RescuedRecord]:
        rescued: list[RescuedRecord] = []
        try:
            with ctx.metrics.claim_timer("rescue"):
                rescued = await bounded(
                    rescue_expired_leases(self.store, self.policy), ctx.db_deadline_s
                )
        except OperationalError as exc:
            logger.warning("lease rescue failed, database unavailable: %s", describe(exc))
            ctx.database_failed("rescue", exc)
        else:
            ctx.db_health.ok("rescue")
        ctx.metrics.observe_rescued(rescued)
        return rescued
