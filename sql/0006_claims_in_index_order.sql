-- kind: additive
-- 0006: claims that stay O(batch) during a burst or a backlog.
--
-- The planner's row estimates lag behind a burst (statistics come with autovacuum's ANALYZE):
-- with 10,000 pending rows it still expects about a hundred, and for "the oldest N pending"
-- chose a bitmap scan of every pending row and a sort, on every claim. So each claim cost
-- O(backlog) and draining a backlog O(backlog^2): with 10,000 outbox rows queued at once, a
-- relay claim of 500 took 10-30 ms and a delivery claim of 40 about 4 ms, mostly reading rows
-- it did not take (EXPLAIN (ANALYZE, BUFFERS) in bench/README.md). Both claims read their
-- partial index in order and stop at the limit, and turn bitmap scans off for their own
-- statements (SET on the function), the one plan shape that reads the whole backlog here; a
-- sequential scan and sort would cost the planner more than the index on any sizeable table.
-- The relay's claim is claim_outbox_v1, created in 0010.
--
-- Additive: claim_due_v1 stays for daemons that call it.

-- Claims due records for delivery in one round trip: claim_due_v1 with its scan of due records
-- split by the index's order (see above), and without the pacing work when no target of the
-- batch is paced, failing or paused; otherwise unchanged.
CREATE FUNCTION outbox_notifier.claim_due_v2(
    p_limit integer,
    p_lease_s double precision,
    p_paced text[],
    p_per_s integer[],
    p_per_min integer[],
    p_margin_s double precision,
    p_breaker_failures integer,
    p_cooloff_s double precision
) RETURNS TABLE (
    id bigint, channel text, user_id bigint, trigger_id text, preview_id text,
    trigger_type text, target_type text, target_id bigint, dedupe_key text, target_url text,
    summary_text text, fallback_text text, fallback_used boolean, trace_id text,
    attempt_count integer, max_attempts integer, lease_token bigint,
    enabled boolean, webhook_url text, auth_kind text, auth_secret text, provider text,
    target_key text
)
LANGUAGE plpgsql VOLATILE
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_keys text[];
    v_providers text[];
    v_hosts text[];
    v_claim bigint[];
    v_now timestamptz;
    -- providers with a pacing limit
    v_paced text[] := ARRAY(
        SELECT pl.p FROM unnest(p_paced, p_per_s, p_per_min) AS pl(p, per_s, per_min)
        WHERE pl.per_s > 0 OR pl.per_min > 0);
BEGIN
    WITH due AS (
        -- Undeferred first, then deferred ones now due: each branch walks
        -- records_pending_due_idx in its order and stops at p_limit (v1's OR of the two made a
        -- bitmap scan of every pending record, sorted, on each claim).
        (SELECT r.id FROM outbox_notifier.notification_records r
         WHERE r.status = 'pending' AND r.next_retry_at IS NULL
         ORDER BY r.next_retry_at NULLS FIRST, r.id LIMIT p_limit)
        UNION ALL
        (SELECT r.id FROM outbox_notifier.notification_records r
         WHERE r.status = 'pending' AND r.next_retry_at <= now()
         ORDER BY r.next_retry_at NULLS FIRST, r.id LIMIT p_limit)
        UNION ALL
        (SELECT r.id FROM outbox_notifier.notification_records r
         WHERE r.status = 'failed' AND r.next_retry_at <= now()
         ORDER BY r.next_retry_at LIMIT p_limit)
        LIMIT p_limit
    ), locked AS MATERIALIZED (
        -- re-checked under the row lock: another replica may have moved the row since the scan
        SELECT r.id, r.channel, r.dedupe_key, r.user_id
        FROM outbox_notifier.notification_records r
        WHERE r.id IN (SELECT due.id FROM due)
          AND (r.status IN ('pending', 'failed'))
          AND (r.next_retry_at IS NULL OR r.next_retry_at <= now())
        ORDER BY r.id
        FOR UPDATE OF r SKIP LOCKED
    ), candidates AS MATERIALIZED (
        SELECT l.id, ch.webhook_url, coalesce(ch.provider, 'feishu_flow') AS provider
        FROM locked l
        LEFT JOIN outbox_notifier.notification_channels ch
               ON ch.user_id = l.user_id AND ch.channel = l.channel AND ch.enabled
        WHERE pg_try_advisory_xact_lock(outbox_notifier.record_lock_key(l.channel, l.dedupe_key))
    )
    SELECT coalesce(array_agg(c.id ORDER BY c.id), '{}'),
           coalesce(array_agg(CASE WHEN c.webhook_url IS NOT NULL
                                   THEN outbox_notifier.target_key(c.webhook_url) END
                              ORDER BY c.id), '{}'),
           coalesce(array_agg(c.provider ORDER BY c.id), '{}'),
           coalesce(array_agg(substring(c.webhook_url FROM '^[a-z]+://([^/:?#]+)') ORDER BY c.id),
                    '{}')
    INTO v_ids, v_keys, v_providers, v_hosts
    FROM candidates c;

    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;

    INSERT INTO outbox_notifier.targets (target_key, provider, host)
    SELECT DISTINCT ON (k) k, p, coalesce(h, '')
    FROM unnest(v_keys, v_providers, v_hosts) AS u(k, p, h)
    WHERE k IS NOT NULL
    ORDER BY k
    ON CONFLICT (target_key) DO NOTHING;

    -- Lock (and so serialise across replicas) only the targets whose decision depends on
    -- shared state: paced ones, and failing or paused ones. A healthy unpaced target is only
    -- read: the worst a race there can do is let a call or two through just as it starts failing.
    PERFORM 1 FROM outbox_notifier.targets t
    WHERE t.target_key = ANY (v_keys)
      AND (t.consecutive_failures > 0 OR t.paused_until IS NOT NULL
           OR t.provider = ANY (v_paced))
    ORDER BY t.target_key
    FOR UPDATE;
    -- No target of the batch is paced, failing or paused (none was locked just above): every
    -- candidate may be called, and no target's log or deferral needs writing. The common case
    -- skips the budget, the log update and the deferral (about a fifth of a claim's time).
    IF NOT FOUND THEN
        v_claim := v_ids;
    ELSE
        v_now := clock_timestamp();

        WITH c AS (
            SELECT u.id, u.k, u.p, row_number() OVER (PARTITION BY u.k ORDER BY u.id) AS rn
            FROM unnest(v_ids, v_keys, v_providers) AS u(id, k, p)
        ), limits AS (
            SELECT pl.p, pl.per_s, pl.per_min
            FROM unnest(p_paced, p_per_s, p_per_min) AS pl(p, per_s, per_min)
        ), budget AS (
            SELECT t.target_key,
                   CASE
                       WHEN t.paused_until > v_now THEN 0
                       -- cool-off over: one probe decides whether the target resumes
                       WHEN t.consecutive_failures >= p_breaker_failures THEN 1
                       ELSE 2147483647
                   END AS breaker_allow,
                   CASE WHEN coalesce(lim.per_s, 0) > 0 THEN
                       lim.per_s - (SELECT count(*) FROM unnest(t.recent_sends) s
                                    WHERE s > v_now - make_interval(secs => 1 + p_margin_s))
                   ELSE 2147483647 END AS per_s_allow,
                   CASE WHEN coalesce(lim.per_min, 0) > 0 THEN
                       lim.per_min - (SELECT count(*) FROM unnest(t.recent_sends) s
                                      WHERE s > v_now - make_interval(secs => 60 + p_margin_s))
                   ELSE 2147483647 END AS per_min_allow
            FROM outbox_notifier.targets t
            LEFT JOIN limits lim ON lim.p = t.provider
            WHERE t.target_key = ANY (v_keys)
        )
        SELECT coalesce(array_agg(c.id), '{}') INTO v_claim
        FROM c LEFT JOIN budget b ON b.target_key = c.k
        WHERE c.k IS NULL OR c.rn <= least(b.breaker_allow, b.per_s_allow, b.per_min_allow);

        -- The calls about to be made go into each target's log (entries older than a minute drop
        -- out); a probe re-arms the pause so no other replica probes at the same time.
        UPDATE outbox_notifier.targets t
        SET recent_sends = (
                SELECT coalesce(array_agg(s ORDER BY s), '{}')
                FROM (
                    SELECT s FROM unnest(t.recent_sends) s
                    WHERE s > v_now - make_interval(secs => 60 + p_margin_s)
                    UNION ALL
                    SELECT v_now FROM generate_series(1, n.sent)
                ) kept
            ),
            paused_until = CASE WHEN t.consecutive_failures >= p_breaker_failures
                                THEN v_now + make_interval(secs => p_cooloff_s)
                                ELSE t.paused_until END,
            updated_at = now()
        FROM (
            SELECT u.k, count(*)::integer AS sent
            FROM unnest(v_ids, v_keys) AS u(id, k)
            WHERE u.k IS NOT NULL AND u.id = ANY (v_claim)
            GROUP BY u.k
        ) n
        WHERE t.target_key = n.k
          -- only paced targets keep a log, and only failing ones can need a probe re-armed
          AND (t.consecutive_failures >= p_breaker_failures
               OR t.provider = ANY (v_paced));

        -- Deferred records wait, without spending an attempt, until their target can take one
        -- more call: the end of a pause, or when the call that fills a window leaves it (the
        -- per_s-th / per_min-th newest entry of the log, which is sorted oldest first).
        UPDATE outbox_notifier.notification_records r
        SET next_retry_at = greatest(
                v_now + make_interval(secs => 0.05),
                CASE WHEN t.paused_until > v_now THEN t.paused_until END,
                CASE WHEN lim.per_s > 0 AND cardinality(t.recent_sends) >= lim.per_s
                     THEN t.recent_sends[cardinality(t.recent_sends) - lim.per_s + 1]
                          + make_interval(secs => 1 + p_margin_s) END,
                CASE WHEN lim.per_min > 0 AND cardinality(t.recent_sends) >= lim.per_min
                     THEN t.recent_sends[cardinality(t.recent_sends) - lim.per_min + 1]
                          + make_interval(secs => 60 + p_margin_s) END
            ),
            updated_at = now()
        FROM unnest(v_ids, v_keys) AS u(id, k)
        JOIN outbox_notifier.targets t ON t.target_key = u.k
        LEFT JOIN unnest(p_paced, p_per_s, p_per_min) AS lim(p, per_s, per_min) ON lim.p = t.provider
        WHERE r.id = u.id AND NOT (u.id = ANY (v_claim));
    END IF;

    RETURN QUERY
    WITH claimed AS (
        UPDATE outbox_notifier.notification_records r
        SET status = 'sending',
            attempt_count = r.attempt_count + 1,
            next_retry_at = NULL,
            last_error_code = NULL,
            last_error = NULL,
            lease_expires_at = now() + make_interval(secs => p_lease_s),
            lease_token = nextval('outbox_notifier.lease_token_seq'),
            updated_at = now()
        WHERE r.id = ANY (v_claim)
        RETURNING r.*
    )
    SELECT claimed.id, claimed.channel, claimed.user_id, claimed.trigger_id, claimed.preview_id,
           claimed.trigger_type, claimed.target_type, claimed.target_id, claimed.dedupe_key,
           claimed.target_url, claimed.summary_text, claimed.fallback_text,
           claimed.fallback_used, claimed.trace_id, claimed.attempt_count,
           claimed.max_attempts, claimed.lease_token, ch.enabled, ch.webhook_url, ch.auth_kind,
           ch.auth_secret, coalesce(ch.provider, 'feishu_flow'),
           outbox_notifier.target_key(ch.webhook_url)
    FROM claimed
    LEFT JOIN outbox_notifier.notification_channels ch
           ON ch.user_id = claimed.user_id AND ch.channel = claimed.channel
    ORDER BY claimed.id;
END;
$$;
