"""The relay claims past its cursor (0017): off the entries a held snapshot keeps, and without
passing a row whose transaction commits after a higher id's."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.relay import Relay
from outbox_notifier.relay_cursor import RelayCursor
from outbox_notifier.store import RecordStore
from tests.support import ManualClock, enqueue, held_snapshot, payload, relay_for, scalar


def _relay(store: RecordStore, clock: ManualClock) -> Relay:
    relay = relay_for(store, relay_batch_size=100)
    # no sweep by the clock in these tests: whatever the relay takes below its cursor, a sweep
    # on its schedule did not take
    relay.cursor = RelayCursor(max_wait_s=5.0, sweep_s=3600.0, clock=clock)
    return relay


def _status(conn: psycopg.Connection[Any], outbox_id: int) -> str:
    return str(
        scalar(conn, "SELECT status FROM outbox_notifier.outbox WHERE id = %s", (outbox_id,))
    )


async def _caught_up(relay: Relay, conn: psycopg.Connection[Any], clock: ManualClock) -> None:
    """Relays a row at a time until the cursor passes every row enqueued before. Another
    transaction anywhere in the cluster (the tests' own CREATE DATABASE) holds it back until
    it ends, as it must: a transaction the claim cannot see through could be a producer's."""
    target = enqueue(conn, payload(f"k-catch-up-{clock.now}"))
    deadline = time.monotonic() + 10
    while relay.cursor.after_id < target:
        assert time.monotonic() < deadline, f"the cursor stayed at {relay.cursor.after_id}"
        await asyncio.sleep(0.05)
        clock.now += 0.01
        enqueue(conn, payload(f"k-catch-up-{clock.now}"))
        await relay.relay_once()


async def _relay_more_below(
    relay: Relay, conn: psycopg.Connection[Any], clock: ManualClock, late: int
) -> list[int]:
    """Three passes, each after a new row is committed, while the row ``late`` is not: each
    claim must start below it. Returns how many rows each pass created."""
    created = []
    for n in range(3):
        clock.now += 0.1
        enqueue(conn, payload(f"k-more-{n}"))
        after_id, made = await _relay_now(relay)
        assert after_id < late, "the cursor passed a row still uncommitted"
        created.append(made)
    return created


async def _relay_now(relay: Relay) -> tuple[int, int]:
    """One relay pass: the cursor as the pass began (its claim starts past it, or from 0 when
    it sweeps), and how many rows the pass created."""
    after_id = relay.cursor.after_id
    report = await relay.relay_once()
    return after_id, report.created


async def test_a_row_committed_after_a_higher_id_is_relayed_without_waiting_for_a_sweep(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    clock = ManualClock()
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        relay = _relay(RecordStore(pool), clock)
        enqueue(conn, payload("k-0"))
        assert (await relay.relay_once()).created == 1  # the first claim sweeps from 0
        with psycopg.connect(db) as producer:
            # a producer takes an id, and commits after later rows have been relayed
            late = enqueue(producer, payload("k-late"))
            relayed = [enqueue(conn, payload(f"k-{n}")) for n in (1, 2)]
            assert min(relayed) > late
            assert all(made >= 1 for made in await _relay_more_below(relay, conn, clock, late))
            producer.commit()
        assert _status(conn, late) == "pending"
        clock.now += 0.1
        after_id, created = await _relay_now(relay)
        assert (after_id < late, created) == (True, 1)
        assert _status(conn, late) == "relayed"
        # with the producer gone the cursor moves past every row relayed so far
        await _caught_up(relay, conn, clock)
        assert relay.cursor.after_id > max(relayed)
        assert scalar(conn, "SELECT count(*) FROM outbox_notifier.outbox"
                      " WHERE status = 'pending'") == 0  # fmt: skip


async def test_the_cursor_waits_for_a_writer_whose_id_no_snapshot_counts_as_running_yet(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    """A snapshot's xmax is the newest completed transaction id plus one, so a running
    transaction with a higher id is in no snapshot's list: the cursor must wait on an id taken
    after the scan began (the claim's own), not on that xmax."""
    clock = ManualClock()
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        relay = _relay(RecordStore(pool), clock)
        with (
            psycopg.connect(db) as higher,
            psycopg.connect(db) as lower,
            psycopg.connect(db) as writer,
        ):
            higher.execute("SELECT pg_current_xact_id()")  # ids in this order: higher's,
            lower.execute("SELECT pg_current_xact_id()")  # lower's, then the writer's
            late = enqueue(writer, payload("k-late"))
            above = enqueue(higher, payload("k-above"))
            higher.commit()  # the newest completed id is now below lower's and the writer's
            assert above > late
            assert (await relay.relay_once()).created == 1
            lower.commit()
            assert await _relay_more_below(relay, conn, clock, late) == [1, 1, 1]
            assert relay.cursor.after_id < late
            writer.commit()
        clock.now += 0.1
        after_id, created = await _relay_now(relay)
        assert (after_id < late, created) == (True, 1)
        assert _status(conn, late) == "relayed"


async def test_a_long_transaction_passed_over_is_swept_for_when_it_ends(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    clock = ManualClock()
    started = clock.now
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        relay = _relay(RecordStore(pool), clock)
        with psycopg.connect(db) as producer:
            late = enqueue(producer, payload("k-late"))
            first = enqueue(conn, payload("k-1"))
            await relay.relay_once()
            clock.now += 6  # longer than max_wait_s
            enqueue(conn, payload("k-2"))
            await relay.relay_once()
            assert relay.cursor.after_id >= first > late  # passed over the open transaction
            producer.commit()
        enqueue(conn, payload("k-3"))
        after_id, _ = await _relay_now(relay)
        assert after_id > late  # past it: this claim did not see it
        assert _status(conn, late) == "pending"
        # the first claim that sees the passed-over transaction has ended (another one in the
        # cluster may still run, see _caught_up) makes the next one sweep, long before sweep_s
        await _caught_up(relay, conn, clock)
        await relay.relay_once()
        assert _status(conn, late) == "relayed"
        assert clock.now - started < relay.cursor.sweep_s


def _relay_claim_reads(conn: psycopg.Connection[Any], after_id: int) -> tuple[int, int]:
    """Rows one relay claim of 10 takes past ``after_id``, and the buffers of the outbox and
    its indexes it read (rolled back)."""
    read = (
        "SELECT sum(pg_stat_get_xact_blocks_fetched(c.oid))::bigint FROM pg_class c"
        " WHERE c.oid = 'outbox_notifier.outbox'::regclass OR c.oid IN ("
        "   SELECT indexrelid FROM pg_index WHERE indrelid = 'outbox_notifier.outbox'::regclass)"
    )
    with conn.transaction(force_rollback=True):
        before = int(scalar(conn, read))
        taken = conn.execute(
            "SELECT count(*) FROM outbox_notifier.claim_outbox_v2(10, 1 << 20, 1 << 20, %s)",
            (after_id,),
        ).fetchone()
        assert taken is not None
        return int(taken[0]), int(scalar(conn, read)) - before


async def test_the_relay_claims_reads_stay_flat_while_a_snapshot_keeps_dead_entries(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    clock = ManualClock()
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        relay = _relay(RecordStore(pool), clock)
        with held_snapshot(db):
            cursor_reads, sweep_reads = {}, {}
            for round_, n in enumerate((200, 3_000)):
                conn.execute(
                    "SELECT outbox_notifier.enqueue(%s, jsonb_set(%s::jsonb, '{dedupe_key}',"
                    " to_jsonb(%s || g))) FROM generate_series(1, %s) g",
                    (EVENT_TYPE, msgspec.json.encode(payload("")).decode(), f"r{round_}-", n),
                )
                await _caught_up(relay, conn, clock)
                conn.execute("VACUUM outbox_notifier.outbox")  # removes nothing
                for k in range(10):
                    enqueue(conn, payload(f"fresh-{round_}-{k}"))
                taken, cursor_reads[n] = _relay_claim_reads(conn, relay.cursor.after_id)
                assert taken == 10
                taken, sweep_reads[n] = _relay_claim_reads(conn, 0)
                assert taken == 10
                clock.now += 0.1
                await relay.relay_once()
    # From 200 to 3,000 rows relayed under the snapshot, a claim from the start read about 400
    # more buffers (the entries of all of them, and the row versions they point at), one from
    # the cursor 6 more (measured): the growth is the sweep's, not the claims'
    growth = sweep_reads[3_000] - sweep_reads[200]
    assert growth >= 200, (sweep_reads, cursor_reads)
    assert cursor_reads[3_000] - cursor_reads[200] <= growth // 10, (sweep_reads, cursor_reads)
