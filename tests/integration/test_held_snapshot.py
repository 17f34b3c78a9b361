"""A long-open snapshot on the primary must not make the claims, or applying results, walk what
it keeps alive.

Under a REPEATABLE READ transaction held open, every record claimed since it began leaves an
index entry in ``records_pending_due_idx`` that neither vacuum nor the scans' own clean-up
(``_bt_killitems``) may remove, each pointing at row versions it keeps. A claim that walks the
index from its low end reads all of them on every call; the claim's cursor (``after_id``) starts
past them. The figures are counts of buffers read (``pg_stat_get_xact_blocks_fetched`` of the
table and its indexes) and of index scans, not timings.
"""

from __future__ import annotations

from typing import Any

import psycopg

from outbox_notifier.sqlfiles import query
from outbox_notifier.store import ClaimedRecord, ClaimPolicy, apply_params, claim_params
from tests.support import held_snapshot, result_for, scalar

_POLICY = ClaimPolicy(lease_s=30.0)
# the daemon's own parameters of a claim with nothing paced
_CLAIM: dict[str, Any] = claim_params(_POLICY)
# buffers of the records table and its indexes read in this transaction (hits included): a
# count that does not depend on the plan's shape
_READ = (
    "SELECT sum(pg_stat_get_xact_blocks_fetched(c.oid))::bigint FROM pg_class c"
    " WHERE c.oid = 'outbox_notifier.notification_records'::regclass OR c.oid IN ("
    "   SELECT indexrelid FROM pg_index"
    "   WHERE indrelid = 'outbox_notifier.notification_records'::regclass)"
)


def _add_pending(conn: psycopg.Connection[Any], prefix: str, n: int) -> None:
    conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url)"
        " SELECT 'feishu', 1, 'p', %s || g, '/x' FROM generate_series(1, %s) g",
        (prefix, n),
    )


def _claim_records(
    conn: psycopg.Connection[Any], limit: int, after_id: int
) -> tuple[list[ClaimedRecord], int]:
    """The records one claim takes, and how many buffers of the records table and its indexes
    it read."""
    with conn.transaction():
        before = int(scalar(conn, _READ))
        rows = conn.execute(
            query("claim_records"), _CLAIM | {"limit": limit, "after_id": after_id}
        ).fetchall()
        buffers = int(scalar(conn, _READ)) - before
    return [ClaimedRecord(*row) for row in rows], buffers


def _claim(conn: psycopg.Connection[Any], limit: int, after_id: int) -> tuple[list[int], int]:
    """The ids one claim takes, and how many buffers it read."""
    claimed, buffers = _claim_records(conn, limit, after_id)
    return [r.id for r in claimed], buffers


def _apply_sent(conn: psycopg.Connection[Any], claimed: list[ClaimedRecord]) -> int:
    """Applies a 'sent' result to each claimed record with the daemon's statement; returns how
    many index scans of records_sending_lease_idx that began."""
    results = [result_for(r, "sent") for r in claimed]
    scans = (
        "SELECT pg_stat_get_xact_numscans('outbox_notifier.records_sending_lease_idx'::regclass)"
    )
    with conn.transaction():
        before = int(scalar(conn, scans))
        applied = conn.execute(query("apply_results"), apply_params(results, _POLICY)).fetchall()
        sending_scans = int(scalar(conn, scans)) - before
    assert sorted((row[0], row[2]) for row in applied) == [(r.id, "sent") for r in claimed]
    return sending_scans


def _deliver(conn: psycopg.Connection[Any], ids: list[int]) -> None:
    conn.execute(
        "UPDATE outbox_notifier.notification_records SET status = 'sent', sent_at = now(),"
        " lease_expires_at = NULL, lease_token = NULL WHERE id = ANY (%s)",
        (ids,),
    )


def test_the_claims_reads_stay_flat_while_a_snapshot_keeps_dead_entries(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    with held_snapshot(db):
        cursor, reads, sweeps = 0, {}, {}
        for round_, n in enumerate((200, 2_000)):
            # n records claimed and delivered in batches of 100 while the snapshot holds
            _add_pending(conn, f"d{round_}-", n)
            while True:
                ids, _ = _claim(conn, 100, cursor)
                if not ids:
                    break
                cursor = max(cursor, *ids)
                _deliver(conn, ids)
            conn.execute("VACUUM outbox_notifier.notification_records")  # removes nothing
            _add_pending(conn, f"n{round_}-", 10)
            conn.execute("ANALYZE outbox_notifier.notification_records")
            with conn.transaction(force_rollback=True):
                fresh, reads[n] = _claim(conn, 10, cursor)
            assert len(fresh) == 10
            # the sweep from the start reads every entry the snapshot keeps: the dead entries
            # are there, and the cursor is what keeps the claim off them
            with conn.transaction(force_rollback=True):
                swept, sweep_reads = _claim(conn, 10, 0)
            assert sorted(swept) == sorted(fresh)
            sweeps[n] = sweep_reads
    # From 200 to 2,000 records delivered under the snapshot, a claim of ten from the start
    # read 171 more buffers, one from the cursor 48 more (measured; the rest is outside the scan
    # of first attempts): the cursor takes out most of the growth, not all of it.
    assert sweeps[2_000] - sweeps[200] >= 100, (sweeps, reads)
    assert reads[2_000] - reads[200] <= (sweeps[2_000] - sweeps[200]) // 2, (sweeps, reads)


def test_applying_results_reads_each_record_by_id_while_a_snapshot_keeps_dead_entries(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    # The apply's UPDATE asks for records with status = 'sending', the predicate of
    # records_sending_lease_idx; with statistics that count few records sending, the planner
    # read the records through that index, and so visited an entry of every record sent since
    # the snapshot began (0018). Those entries share a few pages, so buffer counts hardly show
    # it (measured: as many buffers either way); the scan of the index is what to look for.
    with held_snapshot(db):
        _add_pending(conn, "a-", 1_000)
        conn.execute("ANALYZE outbox_notifier.notification_records")  # none sending
        cursor, batches = 0, 0
        while True:
            claimed, _ = _claim_records(conn, 100, cursor)
            if not claimed:
                break
            cursor, batches = max(cursor, *(r.id for r in claimed)), batches + 1
            assert _apply_sent(conn, claimed) == 0, f"batch {batches}"
    assert batches == 10


def test_the_sweep_takes_a_record_left_below_the_cursor(conn: psycopg.Connection[Any]) -> None:
    _add_pending(conn, "low-", 3)
    low = [int(r[0]) for r in conn.execute(
        "SELECT id FROM outbox_notifier.notification_records ORDER BY id"
    ).fetchall()]  # fmt: skip
    # another loop holds the first record's key while the claim passes it
    with psycopg.connect(conn.info.dsn, autocommit=True) as other, other.transaction():
        other.execute(
            "SELECT pg_advisory_xact_lock(outbox_notifier.record_lock_key('feishu', 'low-1'))"
        )
        ids, _ = _claim(conn, 10, 0)
    assert ids == low[1:]
    assert _claim(conn, 10, max(ids))[0] == []  # below the cursor: not seen
    assert _claim(conn, 10, 0)[0] == low[:1]  # the sweep takes it
