-- kind: additive
-- 0014: replay: deliver chosen sent or dead records again, as new attempts of the same records.
--
-- `requeue` revives dead records with a fresh budget (attempt_count back to 0); a receiver that
-- lost what it was sent (a restored backup, a bug on its side) needs the sent ones again, and
-- an audit of which calls were a replay. The dedupe contract does not change: a replay never
-- writes a record, it puts an existing one back on the retry path.
--
-- * What a replay does to a record: status 'failed' with next_retry_at staggered at the
--   caller's rate (the k-th record of one call, in id order, due at now() + k / rate), so the
--   delivery claim's retry branch takes it (no claim changes) and a large replay is at most
--   `rate` calls a second on top of new work; the claim looks at first attempts before retries,
--   so new records are not queued behind it. attempt_count keeps counting (attempt numbers in
--   delivery_attempts only increase) and max_attempts becomes attempt_count + p_attempts: the
--   replay gets the budget of a new record (the daemon's max_attempts setting, which the CLI
--   passes) instead of dying at once on the spent budget of the first delivery.
--   replay_reason holds the operator's reason until the record ends (sent, dead or skipped).
--   last_error_code and last_error stay until the claim clears them; sent_at and
--   provider_message_id stay until the replay's own result overwrites them: after a replay
--   the record's columns describe the latest delivery, and the earlier ones are in
--   delivery_attempts.
-- * delivery_attempts.replay_reason: written by apply_results and rescue_expired_leases from
--   the record as it was when the call was made, so "which attempts were a replay and why" is
--   one query on the attempt log.
-- * The time range is on updated_at, which for a sent record is its sent_at (the completer sets
--   both from one now()) and for a dead one when it died, as requeue_dead's: records_terminal_idx
--   answers it. A replayed record's updated_at moves to the replay, so running the same replay
--   again does not deliver its records a third time; with a limit, it takes the next ones.
-- * Records in the range that are pending, failed, sending or skipped are reported, never
--   touched: they are on their way, or (skipped) have no recipient to replay to.
-- * replay_matching_v1 is the only copy of the filter: replay_v1 and `outbox-notifier replay
--   --dry-run` both select through it, so a dry run shows the set the real run takes (less any
--   record held by another transaction at that moment, which is skipped, not waited for).
--   Both are SECURITY DEFINER: the target filter compares the channel's webhook URL, which the
--   operator role may not read; neither returns it.
--
-- Additive: two nullable columns (no rewrite, no default to fill) and two new functions. A
-- daemon of the previous release claims and applies replayed records as any retry; it does not
-- write delivery_attempts.replay_reason nor clear the record's, so replay once every replica
-- runs this release (README, "Replay").

ALTER TABLE outbox_notifier.notification_records ADD COLUMN replay_reason text;
ALTER TABLE outbox_notifier.delivery_attempts ADD COLUMN replay_reason text;

-- The records a replay with these arguments would take, and the others in its range: every
-- record whose updated_at is in [p_since, p_until) and which matches the optional filters
-- (NULL: any): user, provider of the user's channel ('feishu_flow' without a channel row, as
-- the claim reads it), target (the channel's webhook URL, compared by target_key: the endpoint
-- the next call would go to), last error code. selected: sent or dead and among the first
-- p_limit of those by (updated_at, id); a sent or dead record not selected is over the cap.
CREATE FUNCTION outbox_notifier.replay_matching_v1(
    p_since timestamptz,
    p_until timestamptz,
    p_user_id bigint,
    p_provider text,
    p_target_url text,
    p_error_code text,
    p_limit integer
) RETURNS TABLE (
    id bigint, channel text, user_id bigint, provider text, status text,
    last_error_code text, updated_at timestamptz, attempt_count integer, selected boolean
)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF p_since IS NULL OR p_until IS NULL OR NOT p_until > p_since THEN
        RAISE EXCEPTION 'replay: a time range is required, with until after since (got % to %)',
            p_since, p_until USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'replay: the limit must be between 1 and 10000 (got %)', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH found AS (
        -- each branch on the partial index of its statuses
        SELECT r.id, r.channel, r.user_id, r.status, r.last_error_code, r.updated_at,
               r.attempt_count
        FROM outbox_notifier.notification_records r
        WHERE r.status IN ('sent', 'dead', 'skipped')
          AND r.updated_at >= p_since AND r.updated_at < p_until
        UNION ALL
        SELECT r.id, r.channel, r.user_id, r.status, r.last_error_code, r.updated_at,
               r.attempt_count
        FROM outbox_notifier.notification_records r
        WHERE r.status = 'pending' AND r.updated_at >= p_since AND r.updated_at < p_until
        UNION ALL
        SELECT r.id, r.channel, r.user_id, r.status, r.last_error_code, r.updated_at,
               r.attempt_count
        FROM outbox_notifier.notification_records r
        WHERE r.status = 'failed' AND r.updated_at >= p_since AND r.updated_at < p_until
        UNION ALL
        SELECT r.id, r.channel, r.user_id, r.status, r.last_error_code, r.updated_at,
               r.attempt_count
        FROM outbox_notifier.notification_records r
        WHERE r.status = 'sending' AND r.updated_at >= p_since AND r.updated_at < p_until
    ), matching AS (
        SELECT f.id, f.channel, f.user_id, coalesce(ch.provider, 'feishu_flow') AS provider,
               f.status, f.last_error_code, f.updated_at, f.attempt_count,
               f.status IN ('sent', 'dead') AS replayable
        FROM found f
        LEFT JOIN outbox_notifier.notification_channels ch
               ON ch.user_id = f.user_id AND ch.channel = f.channel
        WHERE (p_user_id IS NULL OR f.user_id = p_user_id)
          AND (p_provider IS NULL OR coalesce(ch.provider, 'feishu_flow') = p_provider)
          AND (p_target_url IS NULL
               OR outbox_notifier.target_key(ch.webhook_url)
                  = outbox_notifier.target_key(p_target_url))
          AND (p_error_code IS NULL OR f.last_error_code = p_error_code)
    )
    SELECT m.id, m.channel, m.user_id, m.provider, m.status, m.last_error_code, m.updated_at,
           m.attempt_count,
           m.replayable
           AND row_number() OVER (PARTITION BY m.replayable ORDER BY m.updated_at, m.id)
               <= p_limit
    FROM matching m;
END;
$$;

-- Replays the records replay_matching_v1 selects (see the header): each back to 'failed', due
-- at now() + k / p_rate_per_s, with p_attempts more attempts and p_reason recorded. Rows are
-- re-checked under the row lock and take the record's advisory lock with a try-lock, as
-- requeue_dead's do: a record held elsewhere is skipped, not waited for. Returns the ids
-- replayed.
CREATE FUNCTION outbox_notifier.replay_v1(
    p_since timestamptz,
    p_until timestamptz,
    p_user_id bigint,
    p_provider text,
    p_target_url text,
    p_error_code text,
    p_reason text,
    p_limit integer,
    p_rate_per_s double precision,
    p_attempts integer DEFAULT 5
) RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_reason IS NULL OR btrim(p_reason) = '' OR char_length(p_reason) > 500 THEN
        RAISE EXCEPTION 'replay: a reason of 1 to 500 characters is required (it goes into the attempt log)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- NaN compares greater than every number, infinity included
    IF p_rate_per_s IS NULL OR NOT (p_rate_per_s > 0 AND p_rate_per_s < 'Infinity') THEN
        RAISE EXCEPTION 'replay: the rate must be a positive number of records a second (got %)',
            p_rate_per_s USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_attempts IS NULL OR p_attempts < 1 THEN
        RAISE EXCEPTION 'replay: the attempts must be at least 1 (got %)', p_attempts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH picked AS MATERIALIZED (
        SELECT r.id, r.channel, r.dedupe_key
        FROM outbox_notifier.notification_records r
        WHERE r.id IN (
                SELECT m.id
                FROM outbox_notifier.replay_matching_v1(
                    p_since, p_until, p_user_id, p_provider, p_target_url, p_error_code, p_limit
                ) m
                WHERE m.selected
            )
          AND r.status IN ('sent', 'dead')
        ORDER BY r.id
        FOR UPDATE OF r SKIP LOCKED
    ), claimable AS MATERIALIZED (
        -- numbered after the try-lock, so the stagger has no gaps for skipped records
        SELECT picked.id, row_number() OVER (ORDER BY picked.id) - 1 AS k
        FROM picked
        WHERE pg_try_advisory_xact_lock(
            outbox_notifier.record_lock_key(picked.channel, picked.dedupe_key))
    ), replayed AS (
        UPDATE outbox_notifier.notification_records r
        SET status = 'failed',
            next_retry_at = now() + make_interval(secs => claimable.k / p_rate_per_s),
            max_attempts = r.attempt_count + p_attempts,
            replay_reason = p_reason,
            lease_expires_at = NULL,
            lease_token = NULL,
            updated_at = now()
        FROM claimable
        WHERE r.id = claimable.id
        RETURNING r.id
    )
    SELECT replayed.id FROM replayed ORDER BY replayed.id;
END;
$$;

-- Operators only: both act with their owner's rights (see 0004).
REVOKE EXECUTE ON FUNCTION
    outbox_notifier.replay_matching_v1(timestamptz, timestamptz, bigint, text, text, text, integer),
    outbox_notifier.replay_v1(timestamptz, timestamptz, bigint, text, text, text, text, integer,
                              double precision, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    outbox_notifier.replay_matching_v1(timestamptz, timestamptz, bigint, text, text, text, integer),
    outbox_notifier.replay_v1(timestamptz, timestamptz, bigint, text, text, text, text, integer,
                              double precision, integer)
    TO outbox_notifier_operator;
