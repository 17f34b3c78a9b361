-- kind: additive
-- 0010: the relay's claim bounded by bytes as well as rows.
--
-- claim_outbox_v1 takes up to p_limit rows whatever their size, and a jsonb payload may be
-- hundreds of megabytes: 30 rows of 8 MB in one batch took the daemon from 57 to 553 MiB of
-- resident memory. claim_outbox_v2 stops a batch before the running total of its payloads
-- would pass p_max_batch_bytes (always taking one row, so a big but allowed payload still
-- moves), and returns a payload over p_max_payload_bytes without its text (NULL, with its size),
-- so that it never leaves the database: the relay rejects the row with its size as the reason.
-- Such a row costs the batch nothing, since nothing of it is sent.
--
-- A size is octet_length(payload::text): the JSON text the daemon would receive and hold, and
-- the size a user reads as max_payload_bytes. pg_column_size(payload) would be free (the stored
-- size, read without detoasting) but measures the compressed binary form: a repetitive 8 MB
-- payload is stored in about 100 KB, so it bounds neither the daemon's memory nor anything a
-- user can predict. The price is rendering each row examined as text once to measure it: a few
-- microseconds for the usual payload of a few hundred bytes; an oversized payload is rendered
-- once, when it is rejected; an allowed one twice (measured, then returned), so at most
-- p_max_batch_bytes more per claim.
--
-- Order and locks as in v1 (0006): the scan walks outbox_pending_idx in id order with bitmap
-- scans off, and rows another relay holds are skipped. Only the rows returned are locked: the
-- scan reads without locks, fetching one row at a time, and each row is locked (SKIP LOCKED,
-- status re-checked) only once it is known to fit. A window over a locked scan would lock the
-- row that passes the budget, and every row the scan read ahead, without returning them, and
-- other relays would skip them until this transaction ends.
--
-- Additive: claim_outbox_v1 stays for daemons that call it. Like v1 it keeps PostgreSQL's
-- default EXECUTE for PUBLIC and runs with the caller's rights (0004): the daemon's grants on
-- the outbox decide what it may read and lock.
CREATE FUNCTION outbox_notifier.claim_outbox_v2(
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
        SELECT o.id, octet_length(o.payload::text)::bigint AS bytes
        FROM outbox_notifier.outbox o
        WHERE o.status = 'pending'
        ORDER BY o.id;
    v_id bigint;
    v_bytes bigint;
    v_ids bigint[] := '{}';
    v_sizes bigint[] := '{}';
    v_batch_bytes bigint := 0;
BEGIN
    IF p_limit < 1 THEN
        RETURN;
    END IF;
    OPEN v_scan;
    LOOP
        FETCH v_scan INTO v_id, v_bytes;
        EXIT WHEN NOT FOUND;
        IF v_bytes <= p_max_payload_bytes THEN
            EXIT WHEN cardinality(v_ids) > 0 AND v_batch_bytes + v_bytes > p_max_batch_bytes;
        END IF;
        PERFORM FROM outbox_notifier.outbox o
        WHERE o.id = v_id AND o.status = 'pending'
        FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            v_ids := v_ids || v_id;
            v_sizes := v_sizes || v_bytes;
            IF v_bytes <= p_max_payload_bytes THEN
                v_batch_bytes := v_batch_bytes + v_bytes;
            END IF;
            EXIT WHEN cardinality(v_ids) >= p_limit;
        END IF;
    END LOOP;
    CLOSE v_scan;

    RETURN QUERY
    SELECT o.id, o.event_type, o.event_version,
           CASE WHEN s.bytes <= p_max_payload_bytes THEN o.payload::text END,
           s.bytes, o.created_at
    FROM unnest(v_ids, v_sizes) AS s(id, bytes)
    JOIN outbox_notifier.outbox o ON o.id = s.id
    ORDER BY o.id;
END;
$$;
