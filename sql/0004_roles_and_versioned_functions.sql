-- kind: additive
-- 0004: versioned schema functions for the daemon, and least-privilege roles with their grants.
-- Released migrations are never edited; later changes go into new numbered files.

-- Versioned functions -------------------------------------------------------------------------
-- The daemon calls its schema functions by a versioned name. A later migration that must change
-- one adds claim_due_v2 beside claim_due_v1 (additive), the next daemon calls _v2, and daemons
-- still calling _v1 keep working through a rolling upgrade or a rollback; _v1 goes only in a
-- breaking migration once no daemon calls it. The body below is that of 0003's claim_due,
-- unchanged (a test compares them); the unversioned names stay for 0.1.0 daemons. The breaker's
-- bookkeeping is record_target_results_v1, created in 0011.
-- record_lock_key and target_key are not versioned on purpose: every daemon version must
-- compute the same keys to exclude each other, so changing them is breaking by nature.

-- Claims due records for delivery in one round trip: 0003's claim_due (see its comment there).
CREATE FUNCTION outbox_notifier.claim_due_v1(
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
LANGUAGE plpgsql VOLATILE AS $$
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
        (SELECT r.id FROM outbox_notifier.notification_records r
         WHERE r.status = 'pending' AND (r.next_retry_at IS NULL OR r.next_retry_at <= now())
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

-- Roles ---------------------------------------------------------------------------------------
-- Group roles, NOLOGIN: a login role is made a member of one of them (README, "Roles").
-- Roles belong to the whole cluster, not to one database: another database of the cluster may
-- have created them already, even concurrently, so each creation tolerates that. Creating them
-- needs CREATEROLE only the first time.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox_notifier_producer', 'outbox_notifier_daemon',
                             'outbox_notifier_operator'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a migrate of another database
            END;
        END IF;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA outbox_notifier
    TO outbox_notifier_producer, outbox_notifier_daemon, outbox_notifier_operator;

-- Functions that act with their owner's rights, so that a role can be given the function
-- without the table privileges behind it. Their bodies name every object with its schema; the
-- pinned search_path keeps a caller's objects from standing in for pg_catalog's.
ALTER FUNCTION outbox_notifier.enqueue(text, jsonb, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox_notifier.requeue(bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox_notifier.requeue_dead(text, text, timestamptz, timestamptz)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- Functions are executable by PUBLIC by default; for these three that would hand their owner's
-- rights to anyone who can reach the schema.
REVOKE EXECUTE ON FUNCTION outbox_notifier.enqueue(text, jsonb, text),
    outbox_notifier.requeue(bigint),
    outbox_notifier.requeue_dead(text, text, timestamptz, timestamptz)
    FROM PUBLIC;

-- Producers: outbox_notifier.enqueue() and nothing else.
GRANT EXECUTE ON FUNCTION outbox_notifier.enqueue(text, jsonb, text) TO outbox_notifier_producer;

-- The daemon: exactly what its statements need (sql/queries.sql, sql/metrics.sql, the
-- retention and lease statements of sql/operator.sql), statement by statement:
-- * relay: claim_outbox reads and row-locks the outbox (FOR UPDATE needs UPDATE), relay_outbox
--   inserts records and marks outbox rows; retention deletes finished outbox rows;
GRANT SELECT, UPDATE, DELETE ON outbox_notifier.outbox TO outbox_notifier_daemon;
-- * records: claims, results, lease rescue, retention (their attempts go by ON DELETE CASCADE,
--   which runs with the table owner's rights);
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_notifier.notification_records
    TO outbox_notifier_daemon;
-- * channels: read by claims (the secret signs or authorises the call); on 410 Gone a channel
--   is switched off, which touches these three columns only;
GRANT SELECT ON outbox_notifier.notification_channels TO outbox_notifier_daemon;
GRANT UPDATE (enabled, disabled_reason, updated_at) ON outbox_notifier.notification_channels
    TO outbox_notifier_daemon;
-- * the audit trail is written, never read or changed;
GRANT INSERT ON outbox_notifier.delivery_attempts TO outbox_notifier_daemon;
-- * pacing and protection state, maintenance leadership;
GRANT SELECT, INSERT, UPDATE ON outbox_notifier.targets TO outbox_notifier_daemon;
GRANT SELECT, INSERT, UPDATE ON outbox_notifier.maintenance_leases TO outbox_notifier_daemon;
-- * fencing tokens (nextval in claim_due_v1);
GRANT USAGE ON SEQUENCE outbox_notifier.lease_token_seq TO outbox_notifier_daemon;
-- * the compatibility check at start-up and in /readyz.
GRANT SELECT ON outbox_notifier.schema_migrations TO outbox_notifier_daemon;
-- The functions it calls (claim_due_v1, record_target_results_v1, record_lock_key, target_key)
-- keep PostgreSQL's default EXECUTE for PUBLIC: they run with the caller's rights, so the grants
-- above decide what they may touch.

-- Operators: the views, the requeue functions, every table read-only except the channels'
-- webhook_url and auth_secret (a bot's URL carries its token).
GRANT SELECT ON outbox_notifier.backlog, outbox_notifier.dead_letters,
    outbox_notifier.stuck_sending, outbox_notifier.target_health
    TO outbox_notifier_operator;
GRANT SELECT ON outbox_notifier.outbox, outbox_notifier.notification_records,
    outbox_notifier.delivery_attempts, outbox_notifier.targets,
    outbox_notifier.maintenance_leases, outbox_notifier.schema_migrations
    TO outbox_notifier_operator;
GRANT SELECT (id, user_id, channel, enabled, auth_kind, disabled_reason, created_at, updated_at,
              provider)
    ON outbox_notifier.notification_channels TO outbox_notifier_operator;
GRANT EXECUTE ON FUNCTION outbox_notifier.requeue(bigint),
    outbox_notifier.requeue_dead(text, text, timestamptz, timestamptz)
    TO outbox_notifier_operator;
