-- kind: additive
-- 0013: delivery in order per ordering key.
--
-- A producer may give an event an ordering_key (optional, additive: events.py). Records of one
-- channel and ordering key are delivered in the order of their outbox rows (outbox_id, not the
-- record's id: two relays committing side by side create records out of outbox order): a keyed
-- record is not claimed while a record before it in its key is pending, failed or sending.
-- A failing record holds back only its own key; once it ends dead the next one goes, and the
-- dead one stays in dead_letters. A record without a key is claimed as before.
--
-- * notification_records.ordering_key, nullable: NULL is today's behaviour.
-- * records_ordering_idx (channel, ordering_key, outbox_id), partial on keyed records that are
--   not finished: the probe for a key's head reads one entry of it. It holds only live keyed
--   records, so it stays small whatever the history, and unkeyed records never enter it.
-- * claim_due_v6: claim_due_v5 with the ordering rule (the candidates' keys are looked at only
--   when one of them has a key: an unkeyed claim pays an array test). A keyed candidate waits
--   (1) while its key's head, the live record with the smallest outbox_id, is before it, and
--   (2) while an outbox row with a smaller id is still pending: a relay that claimed that row
--   may commit its record after another relay committed this one, which (1) alone cannot see
--   (the relay's low-water mark, one probe of outbox_pending_idx per claim that has a keyed
--   candidate). Both are read in one statement, so in one snapshot. Within one claim, two
--   records of one key: the later one sees the earlier (pending) as its head, so only the first
--   is taken. A held record is deferred as pacing defers, without spending an attempt, until a
--   second past the moment its head can next move (the head's lease end, retry time or
--   deferral; 0.2 s when it waits for the relay only), and the daemon wakes the next record of
--   a key as soon as a result finishes the one before it (release_next_in_order in
--   queries.sql). So a backlog behind a failing head is walked once per attempt of the head,
--   not by every claim.
--
-- What "outbox order" promises: rows whose producing transactions did not overlap are
-- delivered in id order (a row committed after another is relayed after it, or waits for it
-- at (2)). Two producer transactions that run at the same time have no order to keep: the
-- later id may commit, and be delivered, first. A kill mid-call may repeat a record
-- (at-least-once), never after the next record of its key: the next one waits until the
-- repeated one's lease has been taken back and its retry has succeeded or ended dead.
-- While daemons of the previous release (claim_due_v5) run beside this one in a rolling
-- upgrade, they claim keyed records without the rule.
--
-- Additive: a nullable column, a new index and a new function; claim_due_v5 and the older
-- claims stay for daemons of the previous releases and ignore the key.

ALTER TABLE outbox_notifier.notification_records ADD COLUMN ordering_key text;

-- Built in the migration's transaction (not CONCURRENTLY): no record has a key before this
-- migration, so the partial index is empty and the build only scans the table once.
CREATE INDEX records_ordering_idx ON outbox_notifier.notification_records
    (channel, ordering_key, outbox_id)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'failed', 'sending');

-- Claims due records for delivery: claim_due_v5 where a record with an ordering key waits for
-- the records before it in its key, and for the relay below it (see the header).
CREATE FUNCTION outbox_notifier.claim_due_v6(
    p_limit integer,
    p_lease_s double precision,
    p_paced text[],
    p_per_s integer[],
    p_per_min integer[],
    p_margin_s double precision,
    p_breaker_failures integer,
    p_cooloff_s double precision,
    p_slow_per_s integer,
    p_after_id bigint
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
    v_channels text[];
    v_okeys text[];
    v_oids bigint[];
    v_held bigint[];
    v_held_until timestamptz[];
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
        -- first attempts from the caller's cursor on: the index range starts past the entries
        -- of the records claimed before it (see the header)
        (SELECT r.id FROM outbox_notifier.notification_records r
         WHERE r.status = 'pending' AND r.next_retry_at IS NULL AND r.id > p_after_id
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
        SELECT r.id, r.channel, r.dedupe_key, r.user_id, r.ordering_key, r.outbox_id
        FROM outbox_notifier.notification_records r
        WHERE r.id IN (SELECT due.id FROM due)
          AND (r.status IN ('pending', 'failed'))
          AND (r.next_retry_at IS NULL OR r.next_retry_at <= now())
        ORDER BY r.id
        FOR UPDATE OF r SKIP LOCKED
    ), candidates AS MATERIALIZED (
        SELECT l.id, ch.webhook_url, coalesce(ch.provider, 'feishu_flow') AS provider,
               l.channel, l.ordering_key, l.outbox_id
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
                    '{}'),
           coalesce(array_agg(c.channel ORDER BY c.id), '{}'),
           coalesce(array_agg(c.ordering_key ORDER BY c.id), '{}'),
           coalesce(array_agg(c.outbox_id ORDER BY c.id), '{}')
    INTO v_ids, v_keys, v_providers, v_hosts, v_channels, v_okeys, v_oids
    FROM candidates c;

    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;

    -- Ordering (see the header): a keyed candidate waits while a record before it in its
    -- channel and ordering key is pending, failed or sending (one probe of
    -- records_ordering_idx, which finds the key's head), or while an outbox row below it is
    -- still pending (another relay may yet create a record before it). Both are read in this
    -- one statement, so in one snapshot: a relay commits the outbox row and its record
    -- together, so a row seen relayed has its record seen too. Candidates without a key pay
    -- the array test below and nothing more.
    -- A held record waits, without spending an attempt, until a second past the moment its
    -- key's head can next be decided (its lease's end, its retry, its deferral), and is woken
    -- at once when the record before it finishes (release_next_in_order, after a result is
    -- applied): it is walked once per attempt of the head, not by every claim. Held behind
    -- the relay only, it is looked at again in 0.2 s.
    -- Digests (a later feature) hook in here: a digest of a key takes the key's head and
    -- the records right behind it that this claim locked, in outbox_id order, as one message;
    -- every record of the key still transitions on its own.
    IF cardinality(array_remove(v_okeys, NULL)) > 0 THEN
        SELECT coalesce(array_agg(h.id), '{}'), coalesce(array_agg(h.until), '{}')
        INTO v_held, v_held_until
        FROM (
            SELECT u.id,
                   CASE WHEN head.id IS NULL THEN now() + interval '0.2 seconds'
                        ELSE greatest(now(), CASE WHEN head.status = 'sending'
                                                  THEN head.lease_expires_at
                                                  ELSE coalesce(head.next_retry_at, now()) END)
                             + interval '1 second'
                   END AS until
            FROM unnest(v_ids, v_channels, v_okeys, v_oids) AS u(id, ch, okey, oid)
            LEFT JOIN LATERAL (
                SELECT e.id, e.status, e.next_retry_at, e.lease_expires_at
                FROM outbox_notifier.notification_records e
                WHERE e.channel = u.ch AND e.ordering_key = u.okey
                  AND e.status IN ('pending', 'failed', 'sending') AND e.outbox_id < u.oid
                ORDER BY e.outbox_id
                LIMIT 1
            ) head ON true
            WHERE u.okey IS NOT NULL
              AND (head.id IS NOT NULL
                   OR u.oid > (SELECT min(o.id) FROM outbox_notifier.outbox o
                               WHERE o.status = 'pending'))
        ) h;

        IF cardinality(v_held) > 0 THEN
            UPDATE outbox_notifier.notification_records r
            SET next_retry_at = h.until, updated_at = now()
            FROM unnest(v_held, v_held_until) AS h(id, until)
            WHERE r.id = h.id;

            SELECT coalesce(array_agg(u.id ORDER BY u.n), '{}'),
                   coalesce(array_agg(u.k ORDER BY u.n), '{}'),
                   coalesce(array_agg(u.p ORDER BY u.n), '{}'),
                   coalesce(array_agg(u.h ORDER BY u.n), '{}')
            INTO v_ids, v_keys, v_providers, v_hosts
            FROM unnest(v_ids, v_keys, v_providers, v_hosts) WITH ORDINALITY AS u(id, k, p, h, n)
            WHERE NOT (u.id = ANY (v_held));

            IF cardinality(v_ids) = 0 THEN
                RETURN;
            END IF;
        END IF;
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
