-- kind: additive
-- 0009: the breaker opens on a failure rate keyed on the calls' start times; a 429 slows its
-- target instead of counting against it.
--
-- 0.1.0's breaker (0003's record_target_results) counts consecutive failures in the order
-- batches of results arrive. Under concurrency that is not the order of the calls: a fast 5xx
-- lands before the slower successes that started beside it, and failure-only batches of several
-- replicas add up to breaker_failures before any success resets them (5% random 5xx paused a
-- healthy target 41 times in 10,000 events, three replicas). A call's outcome is now counted in
-- the second its call started (on the database clock), in a window of the last p_window_s
-- seconds kept on the target row: whatever order the results arrive in, they land in the same
-- buckets. The target pauses when the window holds at least p_min_calls calls, at least
-- p_min_failures of them failed (the breaker_failures setting) and the failures reach
-- p_failure_ratio of the calls. A target that is down fails every call and pauses as soon as
-- p_min_calls calls have failed, within the first wave of calls to it (a wave is up to
-- delivery_concurrency calls per replica); 5% random failures would need p_min_calls calls to
-- fail before a single success lands, which is why successes are counted too.
--
-- A success is therefore written to its target's row (0.1.0's breaker writes only failures):
-- one row per target per batch of results, whose columns no index holds, so the update is HOT.
-- The bookkeeping is record_target_results_v1, created in 0011, which also leaves the row of a
-- target at rest unwritten (its window then starts at its first failure: see there). Claims do
-- not read the window: a claim of healthy targets is v3's cheap path unchanged.
--
-- A 429 (provider_rate_limited, which includes the bots' "frequency limited" replies) is not a
-- failure of the endpoint but its pacing: it is not counted in the window; it throttles the
-- target until its Retry-After (at least 1 s, at most retry_after_max_s), then one probe call
-- is let through at a time until a reply that is not a 429 lifts the throttle, and the target's
-- budget stays halved for p_slowdown_s (a target without a budget gets p_slow_per_s calls a
-- second). Records waiting for a throttled target are deferred without spending an attempt, as
-- for pacing; paused_until and paused_targets are left to the breaker alone.
--
-- Additive: claim_due_v3 stays for daemons that call it. 0.1.0's claim_due and
-- record_target_results read and write only the columns they knew, and a pause either
-- release's breaker sets is honoured by both releases' claims. The new columns have defaults,
-- so the ALTERs rewrite nothing.
ALTER TABLE outbox_notifier.targets
    ADD COLUMN window_seconds   timestamptz[] NOT NULL DEFAULT '{}',
    ADD COLUMN window_calls     integer[]     NOT NULL DEFAULT '{}',
    ADD COLUMN window_failures  integer[]     NOT NULL DEFAULT '{}',
    ADD COLUMN breaker_open     boolean       NOT NULL DEFAULT false,
    ADD COLUMN breaker_opened_at timestamptz,
    ADD COLUMN throttled_at     timestamptz,
    ADD COLUMN throttled_until  timestamptz,
    ADD COLUMN slowed_until     timestamptz;

-- Targets a v4 claim must lock and budget: v3's attention plus open breakers, throttled and
-- slowed targets. Empty while every target is healthy, as targets_attention_idx is.
CREATE INDEX targets_trouble_idx ON outbox_notifier.targets (target_key)
    WHERE consecutive_failures > 0 OR paused_until IS NOT NULL OR breaker_open
          OR throttled_until IS NOT NULL OR slowed_until IS NOT NULL;

-- Targets that are paused now, or have failed recently; now also with their window's calls and
-- failures, and whether they are throttled (by 429s) or slowed.
CREATE OR REPLACE VIEW outbox_notifier.target_health AS
SELECT target_key, provider, host, consecutive_failures, paused_until,
       paused_until > now() AS paused, last_error_code, updated_at,
       cardinality(recent_sends) AS recent_sends,
       (SELECT coalesce(sum(n), 0)::integer FROM unnest(window_calls) n) AS window_calls,
       (SELECT coalesce(sum(n), 0)::integer FROM unnest(window_failures) n) AS window_failures,
       breaker_open, throttled_until,
       coalesce(throttled_until > now() OR slowed_until > now(), false) AS throttled,
       slowed_until
FROM outbox_notifier.targets;

-- Claims due records for delivery in one round trip: claim_due_v3, where the breaker's pause
-- and probe follow breaker_open, and a throttled target takes no call until its Retry-After,
-- then one probe at a time, and a slowed one half its budget (p_slow_per_s a second when its
-- provider has none).
CREATE FUNCTION outbox_notifier.claim_due_v4(
    p_limit integer,
    p_lease_s double precision,
    p_paced text[],
    p_per_s integer[],
    p_per_min integer[],
    p_margin_s double precision,
    p_breaker_failures integer,
    p_cooloff_s double precision,
    p_slow_per_s integer
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
    v_token bigint;
    v_locked boolean := false;
    -- per locked target: effective limits, probes due, whether it keeps a log, its allowance
    v_b_keys text[];
    v_b_per_s integer[];
    v_b_per_min integer[];
    v_b_probe boolean[];
    v_b_throttle_probe boolean[];
    v_b_logged boolean[];
    v_b_allow integer[];
    -- providers with a pacing limit
    v_paced text[] := ARRAY(
        SELECT pl.p FROM unnest(p_paced, p_per_s, p_per_min) AS pl(p, per_s, per_min)
        WHERE pl.per_s > 0 OR pl.per_min > 0);
BEGIN
    WITH due AS (
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

    -- As v3, with targets_trouble_idx (which also holds open, throttled and slowed targets) in
    -- place of targets_attention_idx.
    IF v_providers && v_paced
       OR EXISTS (SELECT FROM outbox_notifier.targets t
                  WHERE t.target_key = ANY (v_keys)
                    AND (t.consecutive_failures > 0 OR t.paused_until IS NOT NULL
                         OR t.breaker_open OR t.throttled_until IS NOT NULL
                         OR t.slowed_until IS NOT NULL)) THEN
        PERFORM 1 FROM outbox_notifier.targets t
        WHERE t.target_key = ANY (v_keys)
          AND (t.consecutive_failures > 0 OR t.paused_until IS NOT NULL OR t.breaker_open
               OR t.throttled_until IS NOT NULL OR t.slowed_until IS NOT NULL
               OR t.provider = ANY (v_paced))
        ORDER BY t.target_key
        FOR UPDATE;
        v_locked := FOUND;
    END IF;
    IF NOT v_locked THEN
        v_claim := v_ids;
    ELSE
        v_now := clock_timestamp();

        -- Each target's effective limits (halved while slowed), whether a probe is due and
        -- its allowance, computed once: the claim, the log and the deferral below follow them.
        SELECT coalesce(array_agg(t.target_key), '{}'), coalesce(array_agg(lim.per_s), '{}'),
               coalesce(array_agg(lim.per_min), '{}'), coalesce(array_agg(lim.probe), '{}'),
               coalesce(array_agg(lim.throttle_probe), '{}'), coalesce(array_agg(lim.logged), '{}'),
               coalesce(array_agg(least(
                   CASE
                       WHEN t.paused_until > v_now OR t.throttled_until > v_now THEN 0
                       -- cool-off or Retry-After over: one probe decides whether it resumes
                       WHEN lim.probe OR lim.throttle_probe THEN 1
                       ELSE 2147483647
                   END,
                   CASE WHEN lim.per_s > 0 THEN
                       lim.per_s - (SELECT count(*) FROM unnest(t.recent_sends) s
                                    WHERE s > v_now - make_interval(secs => 1 + p_margin_s))
                   ELSE 2147483647 END,
                   CASE WHEN lim.per_min > 0 THEN
                       lim.per_min - (SELECT count(*) FROM unnest(t.recent_sends) s
                                      WHERE s > v_now - make_interval(secs => 60 + p_margin_s))
                   ELSE 2147483647 END)::integer), '{}')
        INTO v_b_keys, v_b_per_s, v_b_per_min, v_b_probe, v_b_throttle_probe, v_b_logged,
             v_b_allow
        FROM outbox_notifier.targets t
        LEFT JOIN unnest(p_paced, p_per_s, p_per_min) AS pl(p, per_s, per_min) ON pl.p = t.provider
        CROSS JOIN LATERAL (
            SELECT CASE WHEN t.slowed_until > v_now
                        THEN CASE WHEN coalesce(pl.per_s, 0) > 0 THEN greatest(pl.per_s / 2, 1)
                                  WHEN coalesce(pl.per_min, 0) > 0 THEN 0
                                  ELSE p_slow_per_s END
                        ELSE coalesce(pl.per_s, 0) END AS per_s,
                   CASE WHEN t.slowed_until > v_now AND coalesce(pl.per_min, 0) > 0
                        THEN greatest(pl.per_min / 2, 1)
                        ELSE coalesce(pl.per_min, 0) END AS per_min,
                   t.breaker_open OR t.consecutive_failures >= p_breaker_failures AS probe,
                   t.throttled_until IS NOT NULL AS throttle_probe,
                   t.provider = ANY (v_paced) OR coalesce(t.slowed_until > v_now, false) AS logged
        ) lim
        WHERE t.target_key = ANY (v_keys);

        WITH c AS (
            SELECT u.id, u.k, row_number() OVER (PARTITION BY u.k ORDER BY u.id) AS rn
            FROM unnest(v_ids, v_keys) AS u(id, k)
        )
        SELECT coalesce(array_agg(c.id), '{}') INTO v_claim
        FROM c LEFT JOIN unnest(v_b_keys, v_b_per_s, v_b_per_min, v_b_probe, v_b_throttle_probe,
                    v_b_logged, v_b_allow)
             AS b(target_key, per_s, per_min, probe, throttle_probe, logged, allow) ON b.target_key = c.k
        WHERE c.k IS NULL OR c.rn <= b.allow;

        -- The calls about to be made go into the log of each paced or slowed target (entries
        -- older than a minute drop out); a probe re-arms the pause so no other replica probes
        -- meanwhile, and a throttle probe holds the target a second (the probe's reply lifts
        -- or renews the throttle).
        UPDATE outbox_notifier.targets t
        SET recent_sends = CASE WHEN b.logged THEN (
                SELECT coalesce(array_agg(s ORDER BY s), '{}')
                FROM (
                    SELECT s FROM unnest(t.recent_sends) s
                    WHERE s > v_now - make_interval(secs => 60 + p_margin_s)
                    UNION ALL
                    SELECT v_now FROM generate_series(1, n.sent)
                ) kept
            ) ELSE t.recent_sends END,
            paused_until = CASE WHEN b.probe THEN v_now + make_interval(secs => p_cooloff_s)
                                ELSE t.paused_until END,
            throttled_until = CASE WHEN b.throttle_probe THEN v_now + interval '1 second'
                                   ELSE t.throttled_until END,
            updated_at = now()
        FROM (
            SELECT u.k, count(*)::integer AS sent
            FROM unnest(v_ids, v_keys) AS u(id, k)
            WHERE u.k IS NOT NULL AND u.id = ANY (v_claim)
            GROUP BY u.k
        ) n
        JOIN unnest(v_b_keys, v_b_per_s, v_b_per_min, v_b_probe, v_b_throttle_probe,
                    v_b_logged, v_b_allow)
             AS b(target_key, per_s, per_min, probe, throttle_probe, logged, allow) ON b.target_key = n.k
        WHERE t.target_key = n.k AND (b.logged OR b.probe OR b.throttle_probe);

        -- Deferred records wait, without spending an attempt, until their target can take one
        -- more call: the end of a pause or throttle, or when the call that fills a window
        -- leaves it (the per_s-th / per_min-th newest entry of the log, sorted oldest first).
        UPDATE outbox_notifier.notification_records r
        SET next_retry_at = greatest(
                v_now + make_interval(secs => 0.05),
                CASE WHEN t.paused_until > v_now THEN t.paused_until END,
                CASE WHEN t.throttled_until > v_now THEN t.throttled_until END,
                CASE WHEN b.per_s > 0 AND cardinality(t.recent_sends) >= b.per_s
                     THEN t.recent_sends[cardinality(t.recent_sends) - b.per_s + 1]
                          + make_interval(secs => 1 + p_margin_s) END,
                CASE WHEN b.per_min > 0 AND cardinality(t.recent_sends) >= b.per_min
                     THEN t.recent_sends[cardinality(t.recent_sends) - b.per_min + 1]
                          + make_interval(secs => 60 + p_margin_s) END
            ),
            updated_at = now()
        FROM unnest(v_ids, v_keys) AS u(id, k)
        JOIN outbox_notifier.targets t ON t.target_key = u.k
        JOIN unnest(v_b_keys, v_b_per_s, v_b_per_min, v_b_probe, v_b_throttle_probe,
                    v_b_logged, v_b_allow)
             AS b(target_key, per_s, per_min, probe, throttle_probe, logged, allow) ON b.target_key = u.k
        WHERE r.id = u.id AND NOT (u.id = ANY (v_claim));
    END IF;

    v_token := nextval('outbox_notifier.lease_token_seq');
    RETURN QUERY
    WITH claimed AS (
        UPDATE outbox_notifier.notification_records r
        SET status = 'sending',
            attempt_count = r.attempt_count + 1,
            next_retry_at = NULL,
            last_error_code = NULL,
            last_error = NULL,
            lease_expires_at = now() + make_interval(secs => p_lease_s),
            -- one token per claim: it need only differ from every earlier claim's
            lease_token = v_token,
            updated_at = now()
        WHERE r.id = ANY (v_claim)
        RETURNING r.id, r.channel, r.user_id, r.trigger_id, r.preview_id, r.trigger_type,
                  r.target_type, r.target_id, r.dedupe_key, r.target_url, r.summary_text,
                  r.fallback_text, r.fallback_used, r.trace_id, r.attempt_count,
                  r.max_attempts, r.lease_token
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
