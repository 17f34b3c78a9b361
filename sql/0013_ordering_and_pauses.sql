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
-- * claim_due_v1, the delivery claim (created in 0015), with the ordering rule (the candidates'
--   keys are looked at only when one of them has a key: an unkeyed claim pays an array test). A
--   keyed candidate waits (1) while its key's head, the live record with the smallest outbox_id, is
--   before it, and (2) while an outbox row with a smaller id is still pending: a relay that claimed
--   that row may commit its record after another relay committed this one, which (1) alone cannot
--   see (the relay's low-water mark, one probe of outbox_pending_idx per claim that has a keyed
--   candidate). Both are read in one statement, so in one snapshot. Within one claim, two records
--   of one key: the later one sees the earlier (pending) as its head, so only the first is taken. A
--   held record is deferred as pacing defers, without spending an attempt, until a second past the
--   moment its head can next move (the head's lease end, retry time or deferral; 0.2 s when it
--   waits for the relay only), and the daemon wakes the next record of a key as soon as a result
--   finishes the one before it (release_next_in_order in queries.sql). So a backlog behind a
--   failing head is walked once per attempt of the head, not by every claim.
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
-- The delivery claim with the ordering rule and the pause check described here is created in
-- 0015, the first migration in which every object it reads exists: it is 0003's claim_due with
-- the changes of 0006, 0008, 0009 and 0011 (see their headers), the ordering keys and operator
-- pauses of this one, and 0015's digests.
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
