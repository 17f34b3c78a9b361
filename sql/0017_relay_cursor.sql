-- kind: additive
-- 0017: the relay's claim off the dead entries a long-open snapshot keeps.
--
-- claim_outbox_v1 (0010) walks outbox_pending_idx from its low end. Every row relayed since a
-- snapshot was taken (a REPEATABLE READ analytics query, a forgotten BEGIN, a logical slot
-- behind) leaves an entry there that neither vacuum nor the scans' own clean-up may remove,
-- and each claim read them all: measured with the bench's snapshot section (300 events/s, a
-- REPEATABLE READ snapshot held 10 minutes, one replica), the relay claim went from 19 to
-- 259 ms and commit-to-delivery p99 to 1.5 s, climbing with the snapshot's age. With this
-- claim (and the daemon's sweeps spaced out when they are slow) it stayed at 7-11 ms.
--
-- claim_outbox_v2 starts its scan past p_after_id, the relay's cursor, and reports two
-- transaction ids with which the relay moves that cursor safely (outbox_notifier/relay_cursor.py):
--   running_xmin: the oldest transaction still running when the claim began (the xmin of its
--     snapshot: no transaction with a lower id runs);
--   claim_xid: the claim's own transaction id, taken once its scan has begun, so higher than
--     the id of every transaction that had one then. (Not the scan snapshot's xmax: that is
--     the newest completed id plus one, and a transaction still running may hold a higher id.)
-- Producers commit ids out of order (a transaction takes its row's id, then commits after a
-- later one), so the cursor may not simply jump to the highest id claimed: a row below it that
-- was not yet committed would wait for the sweep. Every row below the batch's highest id that
-- the scan could not see belongs to a transaction that had its id before the scan began (an
-- enqueue takes its transaction's id as it writes the row, a moment after the row's id), so
-- below claim_xid. Once a later claim's running_xmin reaches claim_xid, all of those have
-- ended and every such row is visible: the cursor moves to the batch's highest id.
-- A transaction that stays open longer than the relay's bound (seconds) is passed anyway, and
-- what it commits below the cursor is taken by the sweep, a claim from 0 (p_after_id = 0).
-- Needs pg_current_snapshot() (PostgreSQL 13).
--
-- claim_outbox_v1 keeps its signature and behaviour: it is now claim_outbox_v2 from 0, so the
-- claim is written once. Additive: a new function, and an old one whose results do not change.

CREATE FUNCTION outbox_notifier.claim_outbox_v2(
    p_limit integer,
    p_max_batch_bytes bigint,
    p_max_payload_bytes bigint,
    p_after_id bigint
) RETURNS TABLE (
    id bigint, event_type text, event_version text, payload text, payload_bytes bigint,
    created_at timestamptz, running_xmin xid8, claim_xid xid8
)
LANGUAGE plpgsql VOLATILE
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
DECLARE
    -- an explicit cursor: each FETCH reads (and measures) one row, a FOR loop reads ten ahead
    v_scan CURSOR FOR
        SELECT o.id, o.payload::text AS body
        FROM outbox_notifier.outbox o
        WHERE o.status = 'pending' AND o.id > p_after_id
        ORDER BY o.id;
    v_id bigint;
    v_body text;
    v_bytes bigint;
    v_counted bigint;
    v_waiting boolean := false;  -- a row was read that did not fit (yet)
    v_taken integer;
    v_ids bigint[] := '{}';  -- the batch: locked
    v_sizes bigint[] := '{}';
    v_bodies text[] := '{}';
    v_batch_bytes bigint := 0;
    v_want_ids bigint[];  -- the rows to lock next
    v_want_sizes bigint[];
    v_want_bodies text[];
    v_want_bytes bigint;
    v_got_ids bigint[];
    v_running_xmin xid8 := pg_snapshot_xmin(pg_current_snapshot());
    v_claim_xid xid8;
BEGIN
    OPEN v_scan;
    -- Rounds: read the rows that fit beside the batch, then lock them in one statement. A row
    -- another relay holds (or has relayed meanwhile) is skipped, which leaves room for the
    -- next round; with no row skipped, the batch is complete.
    LOOP
        v_want_ids := '{}';
        v_want_sizes := '{}';
        v_want_bodies := '{}';
        v_want_bytes := 0;
        LOOP
            v_taken := cardinality(v_ids) + cardinality(v_want_ids);
            EXIT WHEN v_taken >= p_limit;
            IF NOT v_waiting THEN
                FETCH v_scan INTO v_id, v_body;
                EXIT WHEN NOT FOUND;
                v_bytes := octet_length(v_body);
                v_waiting := true;
            END IF;
            -- an oversized payload is not sent: it costs the batch nothing
            v_counted := CASE WHEN v_bytes <= p_max_payload_bytes THEN v_bytes ELSE 0 END;
            EXIT WHEN v_taken > 0
                AND v_batch_bytes + v_want_bytes + v_counted > p_max_batch_bytes;
            v_want_ids := v_want_ids || v_id;
            v_want_sizes := v_want_sizes || v_bytes;
            v_want_bodies := v_want_bodies || CASE WHEN v_counted > 0 THEN v_body END;
            v_want_bytes := v_want_bytes + v_counted;
            v_waiting := false;
        END LOOP;
        EXIT WHEN cardinality(v_want_ids) = 0;

        WITH locked AS (
            SELECT o.id
            FROM outbox_notifier.outbox o
            WHERE o.id = ANY (v_want_ids) AND o.status = 'pending'
            ORDER BY o.id
            FOR UPDATE SKIP LOCKED
        )
        SELECT coalesce(array_agg(locked.id), '{}') INTO v_got_ids FROM locked;

        SELECT v_ids || coalesce(array_agg(w.id ORDER BY w.id), '{}'),
               v_sizes || coalesce(array_agg(w.bytes ORDER BY w.id), '{}'),
               v_bodies || coalesce(array_agg(w.body ORDER BY w.id), '{}'),
               v_batch_bytes + coalesce(sum(octet_length(w.body)), 0)
        INTO v_ids, v_sizes, v_bodies, v_batch_bytes
        FROM unnest(v_want_ids, v_want_sizes, v_want_bodies) AS w(id, bytes, body)
        WHERE w.id = ANY (v_got_ids);

        EXIT WHEN cardinality(v_got_ids) = cardinality(v_want_ids);
    END LOOP;
    CLOSE v_scan;
    -- after the scan's snapshot (OPEN took it); a claim that locked rows has an id already,
    -- taken with its first lock, and an empty one takes none (no commit record to write)
    IF cardinality(v_ids) > 0 THEN
        v_claim_xid := pg_current_xact_id();
    END IF;

    RETURN QUERY
    SELECT o.id, o.event_type, o.event_version, s.body, s.bytes, o.created_at,
           v_running_xmin, v_claim_xid
    FROM unnest(v_ids, v_sizes, v_bodies) AS s(id, bytes, body)
    JOIN outbox_notifier.outbox o ON o.id = s.id
    ORDER BY o.id;
END;
$$;

CREATE OR REPLACE FUNCTION outbox_notifier.claim_outbox_v1(
    p_limit integer,
    p_max_batch_bytes bigint,
    p_max_payload_bytes bigint
) RETURNS TABLE (
    id bigint, event_type text, event_version text, payload text, payload_bytes bigint,
    created_at timestamptz
)
LANGUAGE sql VOLATILE AS $$
    SELECT c.id, c.event_type, c.event_version, c.payload, c.payload_bytes, c.created_at
    FROM outbox_notifier.claim_outbox_v2(p_limit, p_max_batch_bytes, p_max_payload_bytes, 0) AS c;
$$;
