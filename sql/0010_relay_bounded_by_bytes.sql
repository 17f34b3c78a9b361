-- kind: additive
-- 0010: the relay's claim, claim_outbox_v1, bounded by bytes as well as rows.
--
-- A claim by row count alone (0.1.0's relay query: the oldest p_limit pending rows, locked as
-- they are read) takes them whatever their size, and a jsonb payload may be hundreds of
-- megabytes: 30 rows of 8 MB in one batch took the daemon from 57 to 553 MiB of resident
-- memory. claim_outbox_v1 stops a batch before the running total of its payloads would pass
-- p_max_batch_bytes (always taking one row, so a big but allowed payload still moves), and
-- returns a payload over p_max_payload_bytes without its text (NULL, with its size), so that
-- it never leaves the database: the relay rejects the row with its size as the reason. Such a
-- row costs the batch nothing, since nothing of it is sent.
--
-- A size is octet_length(payload::text): the JSON text the daemon would receive and hold, and
-- the size a user reads as max_payload_bytes. pg_column_size(payload) would be free (the stored
-- size, read without detoasting) but measures the compressed binary form: a repetitive 8 MB
-- payload is stored in about 100 KB, so it bounds neither the daemon's memory nor anything a
-- user can predict. The price is rendering each row read as text, which a claim by row count
-- does anyway for the rows it returns: the text is kept and returned, so an allowed row is
-- rendered once, an oversized one once, when it is rejected. Measured on 3,000 pending rows of
-- about 400 bytes (median of 30, a loaded 2-core machine): a claim of 500 takes 12 ms (by row
-- count alone, in index order: 5 ms), of 100 4 ms (1.2 ms): the cost of reading row by row
-- below.
--
-- Order and locks: the scan walks outbox_pending_idx in id order with bitmap scans off (0006
-- says why), and rows another relay holds are skipped. Only the rows returned are locked: the
-- scan reads without locks, one row at a time, and the rows that fit are locked together
-- (SKIP LOCKED, status re-checked). A window over a locked scan would lock the row that passes
-- the budget, and every row the scan read ahead, without returning them; other relays would
-- skip those until this transaction ends. (The payload is the one read before the lock: the
-- daemon never changes an outbox row's payload, and producers only insert.)
--
-- Additive: a new function. It keeps PostgreSQL's default EXECUTE for PUBLIC and runs with the
-- caller's rights (0004): the daemon's grants on the outbox decide what it may read and lock.
CREATE FUNCTION outbox_notifier.claim_outbox_v1(
    p_limit integer,
    p_max_batch_bytes bigint,
    p_max_payload_bytes bigint
) RETURNS TABLE (
    id bigint, event_type text, event_version text, payload text, payload_bytes bigint,
    created_at timestamptz
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
        WHERE o.status = 'pending'
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

    RETURN QUERY
    SELECT o.id, o.event_type, o.event_version, s.body, s.bytes, o.created_at
    FROM unnest(v_ids, v_sizes, v_bodies) AS s(id, bytes, body)
    JOIN outbox_notifier.outbox o ON o.id = s.id
    ORDER BY o.id;
END;
$$;
