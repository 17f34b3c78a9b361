-- kind: additive
-- 0013: delivery in order per ordering key, and pauses an operator sets and lifts.
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
-- * claim_due_v1, the delivery claim (below), with the ordering rule (the candidates' keys are
--   looked at only when one of them has a key: an unkeyed claim pays an array test). A keyed
--   candidate waits (1) while its key's head, the live record with the smallest outbox_id, is
--   before it, and
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
-- While 0.1.0 daemons run beside this release's during the upgrade, they claim keyed records
-- without the rule (0003's claim_due knows nothing of keys).
--
-- Operator pauses (below, with their own notes): a table, its functions for the operator role,
-- a view, and their check in claim_due_v1: one probe of a partial index per claim while
-- nothing is paused. 0.1.0 daemons do not honour them.
--
-- The delivery claim is created here, the first migration in which every object it reads
-- exists: it is 0003's claim_due with the changes of 0006, 0008, 0009 and 0011 (see their
-- headers) and the ordering keys and operator pauses of this one.
--
-- Additive: a nullable column, a table, indexes, a view and new functions; 0003's claim_due
-- stays for 0.1.0 daemons and ignores keys and pauses.

ALTER TABLE outbox_notifier.notification_records ADD COLUMN ordering_key text;

-- Built in the migration's transaction (not CONCURRENTLY): no record has a key before this
-- migration, so the partial index is empty and the build only scans the table once.
CREATE INDEX records_ordering_idx ON outbox_notifier.notification_records
    (channel, ordering_key, outbox_id)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'failed', 'sending');

-- Operator pauses ------------------------------------------------------------------------------
--
-- An operator who knows a receiver is down for maintenance holds its deliveries: a target (a
-- webhook URL, kept as its target_key: the URL carries the bot's token and is never stored
-- here), a user's channel (or all of the user's channels), or a whole provider, with a reason
-- and an optional end. Held records stay pending or failed: claim_due_v1 defers them, as pacing
-- does, without an attempt and without a call; nothing is skipped. resume_v1 makes them due at
-- once (ordering keys and pacing still apply); a pause past its end is no longer honoured by
-- the claim, and the maintenance loop marks it resumed. This is the operator's pause, never the
-- breaker's (targets.paused_until, "tripped" in code), which the daemon sets on its own.
CREATE TABLE outbox_notifier.pauses (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope      text        NOT NULL CHECK (scope IN ('target', 'recipient', 'provider')),
    target_key text,        -- scope target: outbox_notifier.target_key(the webhook URL)
    host       text,        -- scope target: the URL's host, for people
    user_id    bigint,      -- scope recipient
    channel    text,        -- scope recipient: NULL for every channel of the user
    provider   text,        -- scope provider
    reason     text        NOT NULL CHECK (reason <> ''),
    paused_by  text        NOT NULL,
    since      timestamptz NOT NULL DEFAULT now(),
    until      timestamptz, -- NULL: until resumed
    resumed_at timestamptz,
    resumed_by text,        -- 'expired' when its end passed
    CHECK (CASE scope
               WHEN 'target' THEN target_key IS NOT NULL AND num_nonnulls(user_id, channel, provider) = 0
               WHEN 'recipient' THEN user_id IS NOT NULL AND num_nonnulls(target_key, host, provider) = 0
               ELSE provider IS NOT NULL AND num_nonnulls(target_key, host, user_id, channel) = 0
           END)
);

-- One active pause per scope (pausing it again amends it); also what the claim's "is anything
-- paused?" reads: the active pauses only, a handful of rows however long the history.
CREATE UNIQUE INDEX pauses_active_idx ON outbox_notifier.pauses
    (scope, coalesce(target_key, ''), coalesce(user_id, 0), coalesce(channel, ''),
     coalesce(provider, ''))
    WHERE resumed_at IS NULL;

-- A target pause finds the channels that point at the target by its key.
CREATE INDEX channels_target_key_idx ON outbox_notifier.notification_channels
    (outbox_notifier.target_key(webhook_url));

-- The records a pause holds: pending or failed, of the pause's scope, the recipient read as
-- the claim reads it (its enabled channel row; none: provider feishu_flow, no target). Ids
-- only: SECURITY DEFINER so that the operator's view can count them without reading channels'
-- URLs itself.
CREATE FUNCTION outbox_notifier.records_behind_pause(p outbox_notifier.pauses)
RETURNS SETOF bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p.scope = 'recipient' THEN
        RETURN QUERY
        SELECT r.id FROM outbox_notifier.notification_records r
        WHERE r.user_id = p.user_id AND (p.channel IS NULL OR r.channel = p.channel)
          AND r.status IN ('pending', 'failed');
    ELSIF p.scope = 'target' THEN
        RETURN QUERY
        SELECT r.id
        FROM outbox_notifier.notification_channels ch
        JOIN outbox_notifier.notification_records r
          ON r.user_id = ch.user_id AND r.channel = ch.channel
        WHERE outbox_notifier.target_key(ch.webhook_url) = p.target_key AND ch.enabled
          AND r.status IN ('pending', 'failed');
    ELSE
        RETURN QUERY
        SELECT r.id
        FROM outbox_notifier.notification_records r
        LEFT JOIN outbox_notifier.notification_channels ch
               ON ch.user_id = r.user_id AND ch.channel = r.channel AND ch.enabled
        WHERE r.status IN ('pending', 'failed')
          AND coalesce(ch.provider, 'feishu_flow') = p.provider;
    END IF;
END;
$$;

-- Makes the records a pause holds due now (the next claim decides again: another pause, the
-- ordering rule and pacing still apply); returns how many.
CREATE FUNCTION outbox_notifier.release_pause(p outbox_notifier.pauses) RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH released AS (
        UPDATE outbox_notifier.notification_records r
        SET next_retry_at = now(), updated_at = now()
        WHERE r.id IN (SELECT outbox_notifier.records_behind_pause(p))
          AND r.next_retry_at > now()
        RETURNING r.id
    )
    SELECT count(*) FROM released;
$$;

-- Pauses a target (p_target_url), a user's channel (p_user_id, p_channel; no channel: all of
-- the user's) or a provider (p_provider), exactly one of them, with a reason and an optional
-- end; returns the pause's id. The scope already paused: the pause is amended (reason, end,
-- paused_by), and what it held is looked at again under the new end. paused_by is the
-- session's user (the login role, not this function's owner).
CREATE FUNCTION outbox_notifier.pause_v1(
    p_reason text,
    p_target_url text DEFAULT NULL,
    p_user_id bigint DEFAULT NULL,
    p_channel text DEFAULT NULL,
    p_provider text DEFAULT NULL,
    p_until timestamptz DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_scope text;
    v_key text;
    v_host text;
    v_id bigint;
    v_pause outbox_notifier.pauses;
    v_amended boolean;
BEGIN
    IF num_nonnulls(p_target_url, p_user_id, p_provider) <> 1 THEN
        RAISE EXCEPTION 'pause exactly one of a target URL, a user or a provider'
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_channel IS NOT NULL AND p_user_id IS NULL THEN
        RAISE EXCEPTION 'a channel is paused with its user (p_user_id)'
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF coalesce(btrim(p_reason), '') = '' THEN
        RAISE EXCEPTION 'a pause needs a reason' USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_until <= now() THEN
        RAISE EXCEPTION 'the pause would end at %, which has passed', p_until
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_provider IS NOT NULL AND p_provider NOT IN (
        'feishu_flow', 'feishu_bot', 'webhook', 'dingtalk_bot', 'wecom_bot', 'slack_webhook'
    ) THEN
        RAISE EXCEPTION 'unknown provider %', quote_literal(left(p_provider, 40))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_target_url IS NOT NULL THEN
        -- the URL itself is never echoed: it carries the bot's token
        v_host := substring(p_target_url FROM '^[a-z][a-z0-9+.-]*://([^/:?#@]+)');
        IF v_host IS NULL THEN
            RAISE EXCEPTION 'the target is not a webhook URL (scheme://host/...)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_scope := 'target';
        v_key := outbox_notifier.target_key(p_target_url);
    ELSIF p_user_id IS NOT NULL THEN
        v_scope := 'recipient';
    ELSE
        v_scope := 'provider';
    END IF;

    INSERT INTO outbox_notifier.pauses AS p
        (scope, target_key, host, user_id, channel, provider, reason, paused_by, until)
    VALUES (v_scope, v_key, v_host, p_user_id, p_channel, p_provider, btrim(p_reason),
            session_user, p_until)
    ON CONFLICT (scope, coalesce(target_key, ''), coalesce(user_id, 0), coalesce(channel, ''),
                 coalesce(provider, ''))
        WHERE resumed_at IS NULL
    DO UPDATE SET reason = excluded.reason, until = excluded.until,
                  paused_by = excluded.paused_by
    RETURNING p.id, (p.xmax <> 0) INTO v_id, v_amended;
    IF v_amended THEN
        SELECT * INTO v_pause FROM outbox_notifier.pauses WHERE id = v_id;
        PERFORM outbox_notifier.release_pause(v_pause);
    END IF;
    RETURN v_id;
END;
$$;

-- Resumes the active pause of exactly this scope (the selectors of pause_v1) and makes what it
-- held due at once; returns how many records it released, NULL when no such pause is active.
CREATE FUNCTION outbox_notifier.resume_v1(
    p_target_url text DEFAULT NULL,
    p_user_id bigint DEFAULT NULL,
    p_channel text DEFAULT NULL,
    p_provider text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_pause outbox_notifier.pauses;
BEGIN
    IF num_nonnulls(p_target_url, p_user_id, p_provider) <> 1 THEN
        RAISE EXCEPTION 'resume exactly one of a target URL, a user or a provider'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE outbox_notifier.pauses p
    SET resumed_at = now(), resumed_by = session_user
    WHERE p.resumed_at IS NULL
      AND p.scope = CASE WHEN p_target_url IS NOT NULL THEN 'target'
                         WHEN p_user_id IS NOT NULL THEN 'recipient' ELSE 'provider' END
      AND p.target_key IS NOT DISTINCT FROM outbox_notifier.target_key(p_target_url)
      AND p.user_id IS NOT DISTINCT FROM p_user_id
      AND p.channel IS NOT DISTINCT FROM p_channel
      AND p.provider IS NOT DISTINCT FROM p_provider
    RETURNING p.* INTO v_pause;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN outbox_notifier.release_pause(v_pause);
END;
$$;

-- What is paused now, by whom, why, since when, until when, and how many records wait behind
-- it. ended: past its end, not yet marked resumed by the maintenance loop (no longer honoured).
CREATE VIEW outbox_notifier.paused AS
SELECT p.id, p.scope,
       CASE p.scope
           WHEN 'target' THEN 'target ' || left(p.target_key, 12) || ' at ' || p.host
           WHEN 'recipient' THEN 'user ' || p.user_id || coalesce(' channel ' || p.channel, '')
           ELSE 'provider ' || p.provider
       END AS paused,
       p.target_key, p.host, p.user_id, p.channel, p.provider, p.reason, p.paused_by, p.since,
       p.until, now() - p.since AS paused_for, coalesce(p.until <= now(), false) AS ended,
       (SELECT count(*) FROM outbox_notifier.records_behind_pause(p)) AS records_waiting
FROM outbox_notifier.pauses p
WHERE p.resumed_at IS NULL;

-- Roles (0004's discipline): the operator pauses and resumes through the functions only;
-- the daemon reads pauses (claims, the snapshot) and marks an ended one resumed.
REVOKE EXECUTE ON FUNCTION outbox_notifier.records_behind_pause(outbox_notifier.pauses),
    outbox_notifier.release_pause(outbox_notifier.pauses),
    outbox_notifier.pause_v1(text, text, bigint, text, text, timestamptz),
    outbox_notifier.resume_v1(text, bigint, text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_notifier.pause_v1(text, text, bigint, text, text, timestamptz),
    outbox_notifier.resume_v1(text, bigint, text, text),
    outbox_notifier.records_behind_pause(outbox_notifier.pauses)
    TO outbox_notifier_operator;
GRANT EXECUTE ON FUNCTION outbox_notifier.records_behind_pause(outbox_notifier.pauses)
    TO outbox_notifier_daemon;
GRANT SELECT ON outbox_notifier.pauses, outbox_notifier.paused TO outbox_notifier_operator;
GRANT SELECT ON outbox_notifier.pauses TO outbox_notifier_daemon;
GRANT UPDATE (resumed_at, resumed_by) ON outbox_notifier.pauses TO outbox_notifier_daemon;

-- Claims due records for delivery in one round trip, with pacing and endpoint protection
-- (0003's claim_due describes the steps). Due records are read in their partial indexes' order
-- (0006), first attempts past p_after_id, the caller's cursor (0: from the start, the sweep;
-- 0011). Targets are locked and budgeted only when a candidate's provider is paced or a target
-- of the batch is in trouble (0008, 0009). The breaker's pause and probe follow breaker_open; a
-- throttled target takes no call until its Retry-After, then one probe at a time, and a slowed
-- one half its budget (p_slow_per_s a second when its provider has none; 0009). A record an
-- operator pause covers waits for the pause's end (see pauses), and a record with an ordering
-- key waits for the records before it in its key and for the relay below it (see the header).
-- A record held back is deferred without spending an attempt. One lease token per claim (0008).
CREATE FUNCTION outbox_notifier.claim_due_v1(
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
    v_users bigint[];
    v_held bigint[];
    v_held_until timestamptz[];
    v_out bigint[] := '{}';
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
               l.channel, l.ordering_key, l.outbox_id, l.user_id
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
           coalesce(array_agg(c.outbox_id ORDER BY c.id), '{}'),
           coalesce(array_agg(c.user_id ORDER BY c.id), '{}')
    INTO v_ids, v_keys, v_providers, v_hosts, v_channels, v_okeys, v_oids, v_users
    FROM candidates c;

    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;

    -- Operator pauses (see pauses): one probe of pauses_active_idx asks whether anything is
    -- paused at all; only then are the candidates matched against the active pauses. A held
    -- record waits, without an attempt, until the pause's end, looked at again every minute
    -- (resume_v1 and an amending pause_v1 make it due at once).
    IF EXISTS (SELECT FROM outbox_notifier.pauses p
               WHERE p.resumed_at IS NULL AND (p.until IS NULL OR p.until > now())) THEN
        SELECT coalesce(array_agg(h.id), '{}'), coalesce(array_agg(h.until), '{}')
        INTO v_held, v_held_until
        FROM (
            SELECT u.id,
                   least(CASE WHEN bool_or(p.until IS NULL) THEN 'infinity' ELSE max(p.until) END,
                         now() + interval '1 minute') AS until
            FROM unnest(v_ids, v_keys, v_users, v_channels, v_providers)
                 AS u(id, k, usr, ch, prov)
            JOIN outbox_notifier.pauses p
              ON p.resumed_at IS NULL AND (p.until IS NULL OR p.until > now())
             AND CASE p.scope
                     WHEN 'target' THEN p.target_key = u.k
                     WHEN 'recipient' THEN p.user_id = u.usr
                                           AND (p.channel IS NULL OR p.channel = u.ch)
                     ELSE p.provider = u.prov
                 END
            GROUP BY u.id
        ) h;
        IF cardinality(v_held) > 0 THEN
            UPDATE outbox_notifier.notification_records r
            SET next_retry_at = h.until, updated_at = now()
            FROM unnest(v_held, v_held_until) AS h(id, until)
            WHERE r.id = h.id;
            v_out := v_held;
        END IF;
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
            WHERE u.okey IS NOT NULL AND NOT (u.id = ANY (v_out))
              AND (head.id IS NOT NULL
                   OR u.oid > (SELECT min(o.id) FROM outbox_notifier.outbox o
                               WHERE o.status = 'pending'))
        ) h;

        IF cardinality(v_held) > 0 THEN
            UPDATE outbox_notifier.notification_records r
            SET next_retry_at = h.until, updated_at = now()
            FROM unnest(v_held, v_held_until) AS h(id, until)
            WHERE r.id = h.id;
            v_out := v_out || v_held;
        END IF;
    END IF;

    IF cardinality(v_out) > 0 THEN
        SELECT coalesce(array_agg(u.id ORDER BY u.n), '{}'),
               coalesce(array_agg(u.k ORDER BY u.n), '{}'),
               coalesce(array_agg(u.p ORDER BY u.n), '{}'),
               coalesce(array_agg(u.h ORDER BY u.n), '{}')
        INTO v_ids, v_keys, v_providers, v_hosts
        FROM unnest(v_ids, v_keys, v_providers, v_hosts) WITH ORDINALITY AS u(id, k, p, h, n)
        WHERE NOT (u.id = ANY (v_out));

        IF cardinality(v_ids) = 0 THEN
            RETURN;
        END IF;
    END IF;

    INSERT INTO outbox_notifier.targets (target_key, provider, host)
    SELECT DISTINCT ON (k) k, p, coalesce(h, '')
    FROM unnest(v_keys, v_providers, v_hosts) AS u(k, p, h)
    WHERE k IS NOT NULL
    ORDER BY k
    ON CONFLICT (target_key) DO NOTHING;

    -- Only paced targets and targets in trouble (targets_trouble_idx: empty while all is well)
    -- are locked and budgeted; with none, the batch is claimed as it is (0008).
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
