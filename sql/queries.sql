-- Every statement the daemon runs, by name. Loaded by outbox_notifier.sqlfiles.
--
-- Locking discipline, written once:
-- * claims take row locks with FOR UPDATE SKIP LOCKED inside one short transaction, so replicas
--   take disjoint batches and never wait on each other;
-- * every transition that starts work on a record (claim, lease rescue, requeue) also takes the
--   transaction-scoped advisory lock outbox_notifier.record_lock_key(channel, dedupe_key) with a
--   try-lock: a record whose key is held anywhere else is skipped, not waited for. Transaction
--   scope releases it at commit, which keeps it correct behind a transaction-mode pooler;
-- * no lock or transaction is held across a provider call: a claimed record is protected by its
--   lease (status 'sending', lease_expires_at) and its fencing token (lease_token), and a result
--   is applied only while the record still carries the token its worker was given.

-- name: claim_outbox
-- Oldest pending outbox rows; concurrent relays take disjoint batches.
SELECT id, event_type, event_version, payload::text, created_at
FROM outbox_notifier.outbox
WHERE status = 'pending'
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: relay_outbox
-- Inserts the records of valid rows (an existing (channel, dedupe_key) is a dedupe hit and is
-- reused), marks them relayed and the invalid rows rejected; returns (outbox_id, record_id) of
-- the records created.
WITH input AS (
    SELECT *
    FROM unnest(
        %(outbox_ids)s::bigint[], %(user_ids)s::bigint[], %(trigger_ids)s::text[],
        %(preview_ids)s::text[], %(trigger_types)s::text[], %(target_types)s::text[],
        %(target_ids)s::bigint[], %(dedupe_keys)s::text[], %(target_urls)s::text[],
        %(summary_texts)s::text[], %(fallback_texts)s::text[], %(fallback_useds)s::boolean[],
        %(trace_ids)s::text[], %(requested_ats)s::timestamptz[]
    ) AS t(outbox_id, user_id, trigger_id, preview_id, trigger_type, target_type, target_id,
           dedupe_key, target_url, summary_text, fallback_text, fallback_used, trace_id,
           requested_at)
), inserted AS (
    INSERT INTO outbox_notifier.notification_records (
        channel, user_id, trigger_id, preview_id, trigger_type, target_type, target_id,
        dedupe_key, target_url, summary_text, fallback_text, fallback_used, trace_id,
        requested_at, outbox_id, max_attempts
    )
    SELECT %(channel)s, user_id, trigger_id, preview_id, trigger_type, target_type, target_id,
           dedupe_key, target_url, summary_text, fallback_text, fallback_used, trace_id,
           requested_at, outbox_id, %(max_attempts)s
    FROM input
    ORDER BY outbox_id
    ON CONFLICT (channel, dedupe_key) DO NOTHING
    RETURNING outbox_id, id
), relayed AS (
    UPDATE outbox_notifier.outbox o
    SET status = 'relayed', relayed_at = now()
    FROM input
    WHERE o.id = input.outbox_id
), rejected AS (
    UPDATE outbox_notifier.outbox o
    SET status = 'rejected', relayed_at = now(), error = r.reason
    FROM unnest(%(rejected_ids)s::bigint[], %(reasons)s::text[]) AS r(id, reason)
    WHERE o.id = r.id
)
SELECT outbox_id, id FROM inserted;

-- name: claim_records
-- Claims due records (pending, then failed whose next_retry_at has come), each on its partial
-- index: row lock, advisory try-lock, then 'sending' with a fresh lease and fencing token. Returns
-- the claimed records with their user's channel row.
WITH due AS (
    (SELECT id FROM outbox_notifier.notification_records
     WHERE status = 'pending' ORDER BY id LIMIT %(limit)s)
    UNION ALL
    (SELECT id FROM outbox_notifier.notification_records
     WHERE status = 'failed' AND next_retry_at <= now() ORDER BY next_retry_at LIMIT %(limit)s)
    LIMIT %(limit)s
), locked AS MATERIALIZED (
    -- re-checked under the row lock: another replica may have moved the row since the scan
    SELECT r.id, r.channel, r.dedupe_key
    FROM outbox_notifier.notification_records r
    WHERE r.id IN (SELECT id FROM due)
      AND (r.status = 'pending' OR (r.status = 'failed' AND r.next_retry_at <= now()))
    FOR UPDATE SKIP LOCKED
), claimable AS MATERIALIZED (
    SELECT id FROM locked
    WHERE pg_try_advisory_xact_lock(outbox_notifier.record_lock_key(channel, dedupe_key))
), claimed AS (
    UPDATE outbox_notifier.notification_records r
    SET status = 'sending',
        attempt_count = r.attempt_count + 1,
        next_retry_at = NULL,
        last_error_code = NULL,
        last_error = NULL,
        lease_expires_at = now() + make_interval(secs => %(lease_s)s),
        lease_token = nextval('outbox_notifier.lease_token_seq'),
        updated_at = now()
    FROM claimable
    WHERE r.id = claimable.id
    RETURNING r.id, r.channel, r.user_id, r.trigger_id, r.preview_id, r.trigger_type,
              r.target_type, r.target_id, r.dedupe_key, r.target_url, r.summary_text,
              r.fallback_text, r.fallback_used, r.trace_id, r.attempt_count, r.max_attempts,
              r.lease_token
)
SELECT claimed.*, ch.enabled, ch.webhook_url, ch.auth_kind, ch.auth_secret
FROM claimed
LEFT JOIN outbox_notifier.notification_channels ch
       ON ch.user_id = claimed.user_id AND ch.channel = claimed.channel
ORDER BY claimed.id;

-- name: apply_results
-- Applies provider results, each only while the record still holds the worker's fencing token,
-- and logs every call in delivery_attempts (applied = false for a late result that lost its
-- lease). next_retry_at is computed on the database clock. Returns the records updated.
WITH input AS (
    SELECT *
    FROM unnest(
        %(ids)s::bigint[], %(tokens)s::bigint[], %(attempts)s::integer[], %(statuses)s::text[],
        %(outcomes)s::text[], %(error_codes)s::text[], %(errors)s::text[],
        %(delays_s)s::float8[], %(message_ids)s::text[], %(requests)s::text[],
        %(responses)s::text[], %(http_statuses)s::integer[], %(started_ats)s::timestamptz[],
        %(durations_ms)s::float8[]
    ) AS t(id, token, attempt, status, outcome, error_code, error, delay_s, message_id, request,
           response, http_status, started_at, duration_ms)
), applied AS (
    UPDATE outbox_notifier.notification_records r
    SET status = input.status,
        last_error_code = input.error_code,
        last_error = input.error,
        next_retry_at = CASE WHEN input.status = 'failed'
                             THEN now() + make_interval(secs => input.delay_s) END,
        sent_at = CASE WHEN input.status = 'sent' THEN now() ELSE r.sent_at END,
        provider_message_id = input.message_id,
        provider_request_json = coalesce(input.request::jsonb, r.provider_request_json),
        provider_response_json = input.response::jsonb,
        lease_expires_at = NULL,
        lease_token = NULL,
        updated_at = now()
    FROM input
    WHERE r.id = input.id AND r.status = 'sending' AND r.lease_token = input.token
    RETURNING r.id, r.channel, r.status, extract(epoch FROM now() - r.requested_at) AS latency_s
), logged AS (
    INSERT INTO outbox_notifier.delivery_attempts (
        record_id, attempt, lease_token, started_at, duration_ms, outcome, error_code,
        http_status, response_excerpt, applied
    )
    SELECT input.id, input.attempt, input.token, input.started_at, input.duration_ms,
           input.outcome, input.error_code, input.http_status, left(input.response, 2000),
           applied.id IS NOT NULL
    FROM input LEFT JOIN applied ON applied.id = input.id
)
SELECT id, channel, status, latency_s FROM applied;

-- name: rescue_expired_leases
-- Takes back records whose worker died or stalled in 'sending': a temporary failure with code
-- sending_lease_expired (dead once attempts are spent), logged as an attempt of its own. The
-- backoff delay for attempt n is %(delays_s)s[n], computed by outbox_notifier.backoff.
WITH expired AS (
    SELECT id, channel, dedupe_key, lease_token
    FROM outbox_notifier.notification_records
    WHERE status = 'sending' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimable AS MATERIALIZED (
    SELECT id FROM expired
    WHERE pg_try_advisory_xact_lock(outbox_notifier.record_lock_key(channel, dedupe_key))
), rescued AS (
    UPDATE outbox_notifier.notification_records r
    SET status = CASE WHEN r.attempt_count >= r.max_attempts THEN 'dead' ELSE 'failed' END,
        next_retry_at = CASE WHEN r.attempt_count < r.max_attempts
            THEN now() + make_interval(secs => (%(delays_s)s::float8[])[
                least(greatest(r.attempt_count, 1), cardinality(%(delays_s)s::float8[]))])
            END,
        last_error_code = 'sending_lease_expired',
        last_error = 'lease expired while sending: the worker stopped or stalled mid-call',
        lease_expires_at = NULL,
        lease_token = NULL,
        updated_at = now()
    FROM claimable
    WHERE r.id = claimable.id
    RETURNING r.id, r.channel, r.status, r.attempt_count
), logged AS (
    INSERT INTO outbox_notifier.delivery_attempts (
        record_id, attempt, lease_token, started_at, duration_ms, outcome, error_code
    )
    SELECT rescued.id, rescued.attempt_count, expired.lease_token, now(), 0, 'temporary_fail',
           'sending_lease_expired'
    FROM rescued JOIN expired USING (id)
)
SELECT id, channel, status FROM rescued;

-- name: schema_version
-- The newest applied migration.
SELECT max(version) FROM outbox_notifier.schema_migrations;
