-- kind: additive
-- 0020: applying results reads each request as JSON once.
--
-- The daemon hands a batch of results to apply_results_v1 (0018) as one JSON document, in which
-- each result's request (the body as sent, kept in provider_request_json) travelled as a JSON
-- string: escaped by the daemon, parsed out of the document as text, then parsed again by
-- ::jsonb. The request is the largest part of a result (about 560 of a Flow call's 1,000 bytes
-- of record), so the second parse was a fifth of the statement: measured outside the daemon,
-- batches of 80 results over 4,000 records, 4 runs each, 54.6-57.1 us a result with v1 and
-- 41.4-46.2 us with the request carried as JSON (bench/README.md, *Footprint*, has the drain).
--
-- apply_results_v2 is apply_results_v1 with the recordset's request_json read as jsonb: the
-- daemon puts the request into the document as the JSON value it is (it was built by the
-- daemon's own encoder, so it is always valid JSON, without NUL). Everything else is 0018's,
-- which describes what the statement does. response_json stays text: its first 2,000
-- characters, as the provider sent them, are the attempt's response_excerpt.
--
-- apply_results_v1 becomes v2 behind the old contract: it turns each result's request from a
-- JSON string into the value it holds and calls v2, so that a daemon of an earlier 0.2.0 build
-- applies its results through the same statement as this one, and the logic lives in one place
-- (as 0017 did for claim_outbox_v1). Additive: a new function, and v1 keeps its parameters,
-- its result and its effect.

CREATE FUNCTION outbox_notifier.apply_results_v2(
    p_results jsonb,
    p_host_now timestamptz,
    p_retry_after_max_s double precision,
    p_window_s double precision,
    p_min_calls integer,
    p_breaker_failures integer,
    p_failure_ratio double precision,
    p_cooloff_s double precision,
    p_slowdown_s double precision
) RETURNS TABLE (
    record_id bigint, channel text, status text, latency_s double precision, trace_id text,
    dedupe_key text, tripped_keys text[], ordered boolean, woke boolean
)
LANGUAGE plpgsql VOLATILE
SET enable_bitmapscan = off
SET enable_seqscan = off
AS $$
#variable_conflict use_column
    -- Applies a batch of provider results in one atomic statement. Each result carries only what
    -- its call produced; the record's channel, user, trace and dedupe key, and the target it was
    -- sent to, are derived here from record_id instead of travelling through the daemon.
    -- * a result is applied only while the record still holds the worker's fencing token
    --   (applied = false in delivery_attempts for a late result that lost its lease);
    -- * every call is logged in delivery_attempts; next_retry_at is computed on the database clock,
    --   from a Retry-After date too when the reply had no Date header to read it against (retry_at,
    --   bounded as backoff.next_delay_s bounds a Retry-After: at least 1 s, at most
    --   p_retry_after_max_s);
    -- * a result with disable_channel (the target answered 410 Gone) switches its user's channel
    --   row off (enabled = false, the reason kept);
    -- * a record without a trace context takes that of its attempt (a daemon that traces);
    -- * the breaker counts each call in the second it started, a 429 throttles its target
    --   until its Retry-After (outbox_notifier.record_target_results_v1, which writes only the
    --   targets whose state the batch can change, locked in key order);
    -- * a replay's reason (0014) goes from the record into its attempt row, and off the record once
    --   the record ends (anything but 'failed', which the replay's retries still belong to);
    -- * digests (0015): the records of one call share its message_id in their attempt rows, and
    --   only the result with call_records (the one that stands for the call) counts it for the
    --   breaker and the throttle (one call, however many records). A record the call did not
    --   carry (unsent: the digest left it out to keep the platform's limits) gets no attempt row:
    --   it goes back to pending, due at once, its attempt not spent, and stays first in its
    --   target's queue. A record to be tried alone next (alone_next: its digest was refused for
    --   its payload) is marked digest_alone.
    --   Every other result takes its record out of its queue, and wakes the queue's head (due at
    --   once; a head another transaction holds is passed over, never waited for), so the target's
    --   next digest goes as soon as this one's result has landed.
    -- All of it commits together or is retried together. Returns one row per result whose record
    -- exists, with what logging and metrics need (status NULL: a late result, not applied), on
    -- each row the keys of the targets whose breaker this batch tripped (their paused_until set),
    -- whether the record has an ordering key (the next of its key is then released by
    -- release_next_in_order in queries.sql, a statement of its own), and whether the batch made a
    -- digest queue's records due (woke). The target is the channel's current webhook URL: a URL
    -- edited during the call is tallied against its new target, the one the next claim paces.
BEGIN
    RETURN QUERY
    WITH input AS (
        SELECT *
        FROM jsonb_to_recordset(p_results) AS t(
            record_id bigint, lease_token bigint, attempt integer, status text, outcome text,
            error_code text, error text, delay_s float8, provider_message_id text,
            request_json jsonb, response_json text, http_status integer, started_at timestamptz,
            duration_ms float8, disable_channel boolean, retry_at timestamptz, retry_after_s float8,
            traceparent text, message_id bigint, call_records integer, unsent boolean,
            alone_next boolean
        )
    ), known AS MATERIALIZED (
        SELECT input.record_id, r.channel, r.user_id, r.trace_id, r.dedupe_key,
               CASE WHEN ch.webhook_url IS NOT NULL
                    THEN outbox_notifier.target_key(ch.webhook_url) END AS target_key,
               r.replay_reason, r.digest_target
        FROM input
        JOIN outbox_notifier.notification_records r ON r.id = input.record_id
        LEFT JOIN outbox_notifier.notification_channels ch
               ON ch.user_id = r.user_id AND ch.channel = r.channel
    ), disabled_channels AS (
        UPDATE outbox_notifier.notification_channels ch
        SET enabled = false, disabled_reason = coalesce(input.error, 'target gone'),
            updated_at = now()
        FROM input JOIN known USING (record_id)
        WHERE input.disable_channel AND ch.user_id = known.user_id AND ch.channel = known.channel
    ), applied AS (
        UPDATE outbox_notifier.notification_records r
        SET status = input.status,
            last_error_code = input.error_code,
            last_error = input.error,
            next_retry_at = CASE
                WHEN input.status <> 'failed' THEN NULL
                WHEN input.retry_at IS NOT NULL
                    THEN now() + least(greatest(input.retry_at - now(), interval '1 second'),
                                       make_interval(secs => p_retry_after_max_s))
                ELSE now() + make_interval(secs => input.delay_s) END,
            sent_at = CASE WHEN input.status = 'sent' THEN now() ELSE r.sent_at END,
            provider_message_id = input.provider_message_id,
            provider_request_json = coalesce(input.request_json, r.provider_request_json),
            provider_response_json = input.response_json::jsonb,
            -- the attempt's own trace context, kept only by a record that has none yet (no
            -- producer context): its later attempts then join the first one's trace
            traceparent = coalesce(r.traceparent, input.traceparent),
            lease_expires_at = NULL,
            lease_token = NULL,
            replay_reason = CASE WHEN input.status = 'failed' THEN r.replay_reason END,
            digest_target = NULL,
            digest_alone = input.alone_next,
            updated_at = now()
        FROM input
        -- status compared in the C collation: records_sending_lease_idx (status = 'sending'
        -- in the default collation) cannot serve this clause, so each record is read by id
        WHERE r.id = input.record_id AND r.status COLLATE "C" = 'sending'
          AND r.lease_token = input.lease_token
          AND NOT input.unsent
        RETURNING r.id, r.status,
                  extract(epoch FROM now() - coalesce(r.outbox_created_at, r.requested_at))
                  AS latency_s,
                  r.ordering_key IS NOT NULL AS ordered
    ), unsent AS (
        UPDATE outbox_notifier.notification_records r
        SET status = 'pending',
            attempt_count = r.attempt_count - 1,
            next_retry_at = now(),
            lease_expires_at = NULL,
            lease_token = NULL,
            updated_at = now()
        FROM input
        WHERE r.id = input.record_id AND r.status COLLATE "C" = 'sending'  -- by id, as above
          AND r.lease_token = input.lease_token
          AND input.unsent
        RETURNING r.id, r.status, NULL::float8 AS latency_s, r.ordering_key IS NOT NULL AS ordered
    ), settled AS (
        SELECT * FROM applied UNION ALL SELECT * FROM unsent
    ), woken AS (
        -- each queue a result left: its head (oldest pending record) is due at once
        UPDATE outbox_notifier.notification_records r
        SET next_retry_at = least(r.next_retry_at, now()), updated_at = now()
        FROM (SELECT DISTINCT known.digest_target FROM known JOIN input USING (record_id)
              WHERE known.digest_target IS NOT NULL AND NOT input.unsent) q
        CROSS JOIN LATERAL (
            SELECT h.id FROM outbox_notifier.notification_records h
            WHERE h.digest_target = q.digest_target AND h.status = 'pending'
            ORDER BY h.id
            LIMIT 1
            FOR UPDATE SKIP LOCKED
        ) head
        WHERE r.id = head.id
        RETURNING r.id
    ), logged AS (
        INSERT INTO outbox_notifier.delivery_attempts (
            record_id, attempt, lease_token, started_at, duration_ms, outcome, error_code,
            http_status, response_excerpt, applied, replay_reason, message_id
        )
        -- started_at was read on this host's clock: moved onto the database clock, as every
        -- other time the daemon writes
        SELECT input.record_id, input.attempt, input.lease_token,
               now() - (p_host_now - input.started_at), input.duration_ms,
               input.outcome, input.error_code, input.http_status,
               left(input.response_json, 2000), applied.id IS NOT NULL, known.replay_reason,
               input.message_id
        FROM input LEFT JOIN applied ON applied.id = input.record_id
        LEFT JOIN known ON known.record_id = input.record_id
        WHERE NOT input.unsent
    ), calls AS MATERIALIZED (
        -- the calls that reached a target: when each started (database clock), what the reply
        -- means to the breaker, and for a 429 until when the target asked to be left alone
        SELECT input.record_id, input.lease_token, known.target_key,
               now() - (p_host_now - input.started_at) AS started,
               CASE
                   WHEN input.outcome = 'success' THEN 'success'
                   WHEN input.error_code = 'provider_rate_limited' THEN 'throttled'
                   WHEN input.outcome = 'temporary_fail' THEN 'failure'
                   ELSE 'answered'
               END AS kind,
               input.error_code,
               CASE WHEN input.error_code = 'provider_rate_limited' THEN now() + least(greatest(
                   coalesce(input.retry_at - now(), make_interval(secs => input.retry_after_s)),
                   interval '1 second'), make_interval(secs => p_retry_after_max_s)) END AS until
        FROM input JOIN known USING (record_id)
        WHERE known.target_key IS NOT NULL AND input.call_records > 0 AND NOT input.unsent
          AND (input.outcome IN ('success', 'temporary_fail') OR input.http_status IS NOT NULL)
    ), tripped AS MATERIALIZED (
        SELECT array_agg(p.key) FILTER (WHERE p.key IS NOT NULL) AS keys
        FROM outbox_notifier.record_target_results_v1(
            ARRAY(SELECT target_key FROM calls ORDER BY record_id, lease_token),
            ARRAY(SELECT started FROM calls ORDER BY record_id, lease_token),
            ARRAY(SELECT kind FROM calls ORDER BY record_id, lease_token),
            ARRAY(SELECT error_code FROM calls ORDER BY record_id, lease_token),
            ARRAY(SELECT until FROM calls ORDER BY record_id, lease_token),
            p_window_s, p_min_calls, p_breaker_failures, p_failure_ratio, p_cooloff_s,
            p_slowdown_s
        ) AS p(key)
    )
    SELECT known.record_id, known.channel, settled.status, settled.latency_s, known.trace_id,
           known.dedupe_key, tripped.keys, coalesce(settled.ordered, false),
           -- records of a queue due now: the woken heads, and those a digest left out
           EXISTS (SELECT FROM woken) OR EXISTS (SELECT FROM unsent) AS woke
    FROM known LEFT JOIN settled ON settled.id = known.record_id CROSS JOIN tripped;
END
$$;

CREATE OR REPLACE FUNCTION outbox_notifier.apply_results_v1(
    p_results jsonb,
    p_host_now timestamptz,
    p_retry_after_max_s double precision,
    p_window_s double precision,
    p_min_calls integer,
    p_breaker_failures integer,
    p_failure_ratio double precision,
    p_cooloff_s double precision,
    p_slowdown_s double precision
) RETURNS TABLE (
    record_id bigint, channel text, status text, latency_s double precision, trace_id text,
    dedupe_key text, tripped_keys text[], ordered boolean, woke boolean
)
LANGUAGE sql VOLATILE AS $$
    SELECT a.*
    FROM outbox_notifier.apply_results_v2(
        (SELECT coalesce(jsonb_agg(CASE WHEN jsonb_typeof(e.r -> 'request_json') = 'string'
                                        THEN jsonb_set(e.r, '{request_json}',
                                                       (e.r ->> 'request_json')::jsonb)
                                        ELSE e.r END
                                   ORDER BY e.n), '[]'::jsonb)
         FROM jsonb_array_elements(p_results) WITH ORDINALITY AS e(r, n)),
        p_host_now, p_retry_after_max_s, p_window_s, p_min_calls, p_breaker_failures,
        p_failure_ratio, p_cooloff_s, p_slowdown_s
    ) AS a;
$$;
