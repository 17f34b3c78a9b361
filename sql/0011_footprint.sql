-- kind: additive
-- 0011: a smaller footprint in the application's database, and claims off the dead entries a
-- long-open snapshot keeps.
--
-- Measured with pg_waldump --stats=record (and a per-relation sum of the same records) over the
-- WAL of one 5,000-job drain of the CLI daemon (defaults, fsync on, pg_stat_statements loaded;
-- the bench's footprint drain), a loaded 2-core machine (statement times are indicative only):
--   before 0011: 5,250 B of WAL per delivered record. Per record: the record's heap updates
--   1,418 B (claim and apply, each a new tuple, mostly on another page), the outbox row's
--   relayed update 583 B (the whole row, payload included), inserts of outbox row 522 B,
--   record 380 B, attempt 158 B; 18 index insertions 1,290 B; heap LOCK records 3.8 on the
--   record and 2.0 on the outbox row (one per FOR UPDATE or foreign-key check, and one per
--   update that leaves its page); the targets' rows 315 B (0009's breaker bookkeeping wrote
--   every target of every result batch). Statement time 560-690 us per record, of which
--   apply_results 280-370 and the claim 130-140.
--   after 0011: 3,857 B per record (-27%); statement time 337 us (apply 133, claim 92).
--
-- * fillfactor 30 on notification_records and 50 on outbox. An update that stays on its page
--   is logged as the bytes that changed between the old tuple's unchanged prefix and suffix;
--   one that moves is logged whole, after a LOCK record. The outbox row's relayed update fell
--   from 583 to 89 B (its payload is in the prefix), the record's LOCKs from 3.8 to 2.2 per
--   record: 5,250 -> 4,191 B. (fillfactor 50 on both: 4,345 B.) Only pages written from now on
--   keep the room; a finished record's final version usually fills its share of the page
--   (the apply adds the request and the response), so the history grows by less than the
--   reserve.
-- * record_target_results_v1 (below; its breaker and throttle are 0009's) writes only the
--   targets whose state a batch can change: those that failed or were throttled in the batch,
--   or are not at rest (a failure still in the window, a breaker open, a pause, a throttle, a
--   slowdown). A healthy target's successes are not written: its window starts counting at
--   its first failure, so the failure ratio is taken over the calls since then (a target that
--   is down still trips after p_min_calls failures; 5% random failures still do not trip it).
--   No targets row is written while all is well, which also keeps the claims' and applies'
--   reads of those rows off HOT chains that a held snapshot would let grow by one version per
--   result batch. With it and the cursor below: 4,191 -> 3,857 B.
-- * The delivery claim, claim_due_v1 (created in 0015), starts its scan of first attempts past
--   p_after_id, the delivery loop's cursor (the highest id it has claimed), so the walk of
--   records_pending_due_idx does not revisit the entries of records claimed before it; a held
--   snapshot keeps those entries, and the versions they point at, from being removed or marked
--   dead, and every claim read them all. A sweep from 0 every second takes what the cursor
--   passed (a key held elsewhere at the claim, another replica's relay committing a lower id
--   after a higher one, a requeue). The test in test_held_snapshot.py counts buffers read.
--
-- Tried and not kept: a set-based relay claim (a locked scan of p_limit rows in index order,
-- then a running sum of octet_length(payload::text)): 3,000 pending rows of 386 B, median of
-- 30, claims of 100 / 500: by row count alone (in index order) 1.24 / 4.65 ms,
-- claim_outbox_v1 (0010) 2.46 / 10.58 ms, set-based 2.00 / 6.55 ms. It measures every locked
-- payload and renders the returned ones again, and it locks up to p_limit rows whatever the
-- budget, which claim_outbox_v1 was written not to do (another relay skips them).
--
-- Additive: a new function; storage parameters change no daemon's statement.

ALTER TABLE outbox_notifier.notification_records SET (fillfactor = 30);
ALTER TABLE outbox_notifier.outbox SET (fillfactor = 50);

-- Endpoint protection and throttling after a batch of results, one entry per call: its
-- target, when it started (database clock), its kind ('success', 'failure' (temporary, not a
-- 429), 'throttled' (a 429), 'answered' (any other reply)), its error code, and for a 429 until
-- when the target asked to be left alone. The breaker and the throttle are 0009's (see its
-- header). Only the targets whose state the batch can change are locked (in key order: no
-- deadlocks with claims) and written: the calls to targets that failed or were throttled in
-- this batch, or whose row is not at rest (a failure still in its window, a breaker open, a
-- pause, a throttle or a slowdown). A success, or any other reply, from a target at rest
-- changes nothing the update below would act on, so it is not written (see the header for what
-- that means to the window). Returns the keys of the targets this batch paused.
-- Created here rather than in 0009, whose columns it reads: its first step, the filter, is this
-- migration's change, measured above, and the whole function is then read in one place.
CREATE FUNCTION outbox_notifier.record_target_results_v1(
    p_keys text[],
    p_started timestamptz[],
    p_kinds text[],
    p_codes text[],
    p_throttled_until timestamptz[],
    p_window_s double precision,
    p_min_calls integer,
    p_min_failures integer,
    p_failure_ratio double precision,
    p_cooloff_s double precision,
    p_slowdown_s double precision
) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_keep text[];
    -- the calls to the targets kept, in their order
    v_keys text[];
    v_started timestamptz[];
    v_kinds text[];
    v_codes text[];
    v_until timestamptz[];
BEGIN
    -- read without a lock: a target another replica's batch is tripping at this moment may miss
    -- this batch's successes, which can only make its window's failure ratio higher
    SELECT coalesce(array_agg(DISTINCT u.k), '{}') INTO v_keep
    FROM unnest(p_keys, p_kinds) AS u(k, kind)
    WHERE u.k IS NOT NULL
      AND (u.kind IN ('failure', 'throttled')
           OR EXISTS (
               SELECT FROM outbox_notifier.targets t
               WHERE t.target_key = u.k
                 AND (t.consecutive_failures > 0 OR t.paused_until IS NOT NULL OR t.breaker_open
                      OR t.throttled_until IS NOT NULL OR t.slowed_until IS NOT NULL
                      OR EXISTS (SELECT FROM unnest(t.window_seconds, t.window_failures) AS w(s, f)
                                 WHERE w.f > 0
                                   AND w.s > now() - make_interval(secs => p_window_s)))));
    IF cardinality(v_keep) = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(u.k ORDER BY u.n), array_agg(u.started ORDER BY u.n),
           array_agg(u.kind ORDER BY u.n), array_agg(u.code ORDER BY u.n),
           array_agg(u.until ORDER BY u.n)
    INTO v_keys, v_started, v_kinds, v_codes, v_until
    FROM unnest(p_keys, p_started, p_kinds, p_codes, p_throttled_until)
         WITH ORDINALITY AS u(k, started, kind, code, until, n)
    WHERE u.k = ANY (v_keep);

    PERFORM 1 FROM outbox_notifier.targets t
    WHERE t.target_key = ANY (v_keys)
    ORDER BY t.target_key
    FOR UPDATE OF t;

    RETURN QUERY
    WITH calls AS (
        SELECT u.k, u.started, u.kind, u.code, u.until
        FROM unnest(v_keys, v_started, v_kinds, v_codes, v_until)
             AS u(k, started, kind, code, until)
        WHERE u.k IS NOT NULL
    ), batch AS (
        SELECT c.k,
               max(c.started) FILTER (WHERE c.kind = 'success') AS last_ok,
               max(c.started) FILTER (WHERE c.kind = 'failure') AS last_failed,
               max(c.started) FILTER (WHERE c.kind = 'throttled') AS last_throttled,
               max(c.started) FILTER (WHERE c.kind <> 'throttled') AS last_answered,
               max(c.until) FILTER (WHERE c.kind = 'throttled') AS throttle_until,
               (array_agg(c.code ORDER BY c.started DESC)
                   FILTER (WHERE c.kind = 'failure'))[1] AS code
        FROM calls c
        GROUP BY c.k
    ), buckets AS (
        -- the window: the target's seconds still inside it plus this batch's, summed per second
        SELECT b.k, b.s, sum(b.n)::integer AS n, sum(b.f)::integer AS f
        FROM (
            SELECT t.target_key AS k, w.s, w.n, w.f
            FROM outbox_notifier.targets t,
                 unnest(t.window_seconds, t.window_calls, t.window_failures) AS w(s, n, f)
            WHERE t.target_key = ANY (v_keys)
            UNION ALL
            SELECT c.k, date_trunc('second', c.started),
                   count(*) FILTER (WHERE c.kind IN ('success', 'failure')),
                   count(*) FILTER (WHERE c.kind = 'failure')
            FROM calls c
            GROUP BY c.k, date_trunc('second', c.started)
        ) b
        WHERE b.s > now() - make_interval(secs => p_window_s)
        GROUP BY b.k, b.s
        HAVING sum(b.n) > 0
    ), windows AS (
        SELECT w.k, array_agg(w.s ORDER BY w.s) AS seconds, array_agg(w.n ORDER BY w.s) AS ns,
               array_agg(w.f ORDER BY w.s) AS fs, sum(w.n) AS calls, sum(w.f) AS failures
        FROM buckets w
        GROUP BY w.k
    ), decided AS (
        SELECT t.target_key, b.*, w.seconds, w.ns, w.fs,
               -- a call started after the breaker opened (the probe) decides whether it closes;
               -- any success also ends a pause of 0.1.0's breaker (0003's record_target_results
               -- sets consecutive_failures and paused_until)
               coalesce(CASE WHEN t.breaker_open THEN b.last_ok >= t.breaker_opened_at
                             ELSE b.last_ok IS NOT NULL
                                  AND (t.paused_until IS NOT NULL OR t.consecutive_failures > 0)
                        END, false) AS closes,
               coalesce(t.breaker_open AND b.last_failed >= t.breaker_opened_at
                        AND NOT coalesce(b.last_ok >= t.breaker_opened_at, false),
                        false) AS repauses,
               coalesce(NOT t.breaker_open AND b.last_failed IS NOT NULL
                        AND w.calls >= p_min_calls AND w.failures >= p_min_failures
                        AND w.failures >= p_failure_ratio * w.calls, false) AS trips
        FROM outbox_notifier.targets t
        JOIN batch b ON b.k = t.target_key
        LEFT JOIN windows w ON w.k = t.target_key
    )
    UPDATE outbox_notifier.targets t
    SET -- an open breaker's window starts afresh once it closes
        window_seconds = CASE WHEN d.trips OR t.breaker_open THEN '{}'
                              ELSE coalesce(d.seconds, '{}') END,
        window_calls = CASE WHEN d.trips OR t.breaker_open THEN '{}' ELSE coalesce(d.ns, '{}') END,
        window_failures = CASE WHEN d.trips OR t.breaker_open THEN '{}'
                               ELSE coalesce(d.fs, '{}') END,
        breaker_open = CASE WHEN d.closes THEN false WHEN d.trips THEN true
                            ELSE t.breaker_open END,
        breaker_opened_at = CASE WHEN d.closes THEN NULL WHEN d.trips THEN now()
                                 ELSE t.breaker_opened_at END,
        consecutive_failures = CASE WHEN d.closes THEN 0 ELSE t.consecutive_failures END,
        paused_until = CASE WHEN d.closes THEN NULL
                            WHEN d.trips OR d.repauses
                                THEN now() + make_interval(secs => p_cooloff_s)
                            ELSE t.paused_until END,
        last_error_code = CASE WHEN d.closes THEN NULL
                               WHEN d.trips OR d.repauses OR t.breaker_open
                                   THEN coalesce(d.code, t.last_error_code)
                               ELSE t.last_error_code END,
        -- throttling: the newest 429 sets the wait; any other reply to a call started after it
        -- lifts the throttle (the budget stays halved until slowed_until)
        throttled_at = greatest(t.throttled_at, d.last_throttled),
        throttled_until = CASE
            WHEN d.throttle_until IS NOT NULL THEN greatest(d.throttle_until, t.throttled_until)
            WHEN d.last_answered > t.throttled_at THEN NULL
            ELSE t.throttled_until END,
        slowed_until = CASE
            WHEN d.last_throttled IS NOT NULL THEN now() + make_interval(secs => p_slowdown_s)
            WHEN t.slowed_until <= now() THEN NULL
            ELSE t.slowed_until END,
        updated_at = now()
    FROM decided d
    WHERE t.target_key = d.target_key
    RETURNING CASE WHEN d.trips OR d.repauses THEN t.target_key END;
END;
$$;
