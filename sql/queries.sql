-- The pipeline's statements (outbox_notifier.store, with the timeouts and the probe of
-- outbox_notifier.timeouts and .connections and the schema check of .migrations), by name; the maintenance loop's are in
-- maintenance.sql, the operator commands' in operator.sql. Loaded by outbox_notifier.sqlfiles.
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
-- Oldest pending outbox rows past the relay's cursor up to a row and a byte budget, a payload
-- over its limit left in the database; concurrent relays take disjoint batches. See
-- outbox_notifier.claim_outbox_v2, and relay_cursor.py for the two transaction ids (as bigint:
-- xid8 has no binary loader). The payload comes as UTF-8 bytea (convert_to only checks it in a
-- UTF-8 database) so that, read in binary, it arrives as the bytes the relay decodes, with no
-- str copy in between.
SELECT c.id, c.event_type, c.event_version, convert_to(c.payload, 'UTF8') AS payload,
       c.payload_bytes, c.created_at, c.running_xmin::text::bigint AS running_xmin,
       c.claim_xid::text::bigint AS claim_xid
FROM outbox_notifier.claim_outbox_v2(%(limit)s, %(max_batch_bytes)s, %(max_payload_bytes)s,
                                     %(after_id)s) AS c;

-- name: relay_outbox
-- Inserts the records of valid rows (an existing (channel, dedupe_key) is a dedupe hit and is
-- reused), marks them relayed and the invalid rows rejected; returns (outbox_id, record_id) of
-- the records created. The batch arrives as one JSON document (cheaper to send than one array
-- per column). The two placeholders in braces (each column's name and type; the names) are
-- rendered from the fields of store.NewRecord (store.RELAY_OUTBOX), so a new field is added
-- there and in the table, not here. The producer's trace context goes from the outbox row to
-- the record here, in the database: the daemon never reads it on the way (migration 0012).
WITH input AS (
    SELECT *
    FROM jsonb_to_recordset(%(records)s::jsonb) AS t({new_record_columns})
), inserted AS (
    INSERT INTO outbox_notifier.notification_records (
        channel, max_attempts, {new_record_fields}, traceparent, tracestate
    )
    SELECT %(channel)s, %(max_attempts)s, {new_record_fields}, o.traceparent, o.tracestate
    FROM input
    LEFT JOIN outbox_notifier.outbox o ON o.id = input.outbox_id
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
    FROM jsonb_to_recordset(%(rejected)s::jsonb) AS r(id bigint, reason text)
    WHERE o.id = r.id
)
SELECT outbox_id, id FROM inserted;

-- name: claim_records
-- Claims due records with pacing (the 429 throttle included) and the breaker; see
-- outbox_notifier.claim_due_v1 (with the ordering rule of 0013 and the digests of 0015). First
-- attempts are looked for past %(after_id)s, the delivery loop's cursor (0: a sweep from the
-- start), so that the scan does not revisit the index entries of records claimed before it
-- (which a long-open snapshot keeps from being cleaned up). The records of a chat bot in
-- %(digest)s whose budget cannot take them one call each come as digests of at most
-- %(digest_max_records)s: the rows of one digest share a message_id (NULL: a call of its own).
-- Unless %(durable)s (the durable_claims setting), the claim commits without waiting for its WAL
-- to reach disk: synchronous_commit is off for this transaction only. A database crash (not a
-- clean restart, which flushes the WAL) may then lose the claims of its last moments: their
-- records are due again and their calls are made again. Nothing is lost: a result's apply
-- commits durably, and with it every earlier commit in the WAL. About a quarter of the database
-- side's throughput (bench/README.md).
-- The columns are listed in store.ClaimedRecord's field order, records.RecordFields first (it
-- is built from the row by position); the function's target_key is left out: apply_results
-- derives the target anew.
SELECT c.user_id, c.trigger_id, c.preview_id, c.trigger_type, c.target_type, c.target_id,
       c.dedupe_key, c.target_url, c.trace_id, c.id, c.channel, c.summary_text, c.fallback_text,
       c.fallback_used, c.attempt_count, c.max_attempts, c.lease_token, c.enabled,
       c.webhook_url, c.auth_kind, c.auth_secret, c.provider, c.message_id
FROM outbox_notifier.claim_due_v1(
    %(limit)s, %(lease_s)s, %(paced)s::text[], %(per_s)s::integer[], %(per_min)s::integer[],
    %(margin_s)s, %(breaker_failures)s, %(cooloff_s)s, %(slow_per_s)s, %(after_id)s,
    %(digest)s::text[], %(digest_max_records)s
) AS c,
    set_config(
        'synchronous_commit',
        CASE WHEN %(durable)s THEN current_setting('synchronous_commit') ELSE 'off' END,
        true
    ) AS claim_commit;

-- name: claim_records_traced
-- claim_records for a daemon that traces (the tracing setting): the same claim, each record
-- with its trace context (traceparent, tracestate; NULL when it has none) appended, read by
-- outbox_notifier.trace_contexts_v1 after the claim in the same statement (see its comment in
-- migration 0012). A daemon that does not trace runs claim_records and pays nothing for it.
WITH claimed AS MATERIALIZED (
    SELECT c.user_id, c.trigger_id, c.preview_id, c.trigger_type, c.target_type, c.target_id,
           c.dedupe_key, c.target_url, c.trace_id, c.id, c.channel, c.summary_text,
           c.fallback_text, c.fallback_used, c.attempt_count, c.max_attempts, c.lease_token,
           c.enabled, c.webhook_url, c.auth_kind, c.auth_secret, c.provider, c.message_id
    FROM outbox_notifier.claim_due_v1(
        %(limit)s, %(lease_s)s, %(paced)s::text[], %(per_s)s::integer[], %(per_min)s::integer[],
        %(margin_s)s, %(breaker_failures)s, %(cooloff_s)s, %(slow_per_s)s, %(after_id)s,
        %(digest)s::text[], %(digest_max_records)s
    ) AS c,
        set_config(
            'synchronous_commit',
            CASE WHEN %(durable)s THEN current_setting('synchronous_commit') ELSE 'off' END,
            true
        ) AS claim_commit
)
SELECT claimed.*, t.traceparent, t.tracestate
FROM claimed
LEFT JOIN outbox_notifier.trace_contexts_v1(ARRAY(SELECT claimed.id FROM claimed)) AS t
       ON t.id = claimed.id
ORDER BY claimed.id;

-- name: next_due
-- Seconds until the earliest deferred or failed record becomes due (NULL when none waits).
SELECT extract(epoch FROM least(
    (SELECT min(next_retry_at) FROM outbox_notifier.notification_records
     WHERE status = 'pending' AND next_retry_at IS NOT NULL),
    (SELECT min(next_retry_at) FROM outbox_notifier.notification_records
     WHERE status = 'failed')
) - now());

-- name: apply_results
-- Applies a batch of provider results in one atomic statement. Each result carries only what
-- its call produced; the record's channel, user, trace and dedupe key, and the target it was
-- sent to, are derived here from record_id instead of travelling through the daemon.
-- * a result is applied only while the record still holds the worker's fencing token
--   (applied = false in delivery_attempts for a late result that lost its lease);
-- * every call is logged in delivery_attempts; next_retry_at is computed on the database clock,
--   from a Retry-After date too when the reply had no Date header to read it against (retry_at,
--   bounded as backoff.next_delay_s bounds a Retry-After: at least 1 s, at most
--   %(retry_after_max_s)s);
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
-- release_next_in_order, a statement of its own: see there), and whether the batch made a
-- digest queue's records due (woke). The target is the channel's current webhook URL: a URL
-- edited during the call is tallied against its new target, the one the next claim paces.
WITH input AS (
    SELECT *
    FROM jsonb_to_recordset(%(results)s::jsonb) AS t(
        record_id bigint, lease_token bigint, attempt integer, status text, outcome text,
        error_code text, error text, delay_s float8, provider_message_id text,
        request_json text, response_json text, http_status integer, started_at timestamptz,
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
                                   make_interval(secs => %(retry_after_max_s)s))
            ELSE now() + make_interval(secs => input.delay_s) END,
        sent_at = CASE WHEN input.status = 'sent' THEN now() ELSE r.sent_at END,
        provider_message_id = input.provider_message_id,
        provider_request_json = coalesce(input.request_json::jsonb, r.provider_request_json),
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
    WHERE r.id = input.record_id AND r.status = 'sending' AND r.lease_token = input.lease_token
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
    WHERE r.id = input.record_id AND r.status = 'sending' AND r.lease_token = input.lease_token
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
           now() - (%(host_now)s::timestamptz - input.started_at), input.duration_ms,
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
           now() - (%(host_now)s::timestamptz - input.started_at) AS started,
           CASE
               WHEN input.outcome = 'success' THEN 'success'
               WHEN input.error_code = 'provider_rate_limited' THEN 'throttled'
               WHEN input.outcome = 'temporary_fail' THEN 'failure'
               ELSE 'answered'
           END AS kind,
           input.error_code,
           CASE WHEN input.error_code = 'provider_rate_limited' THEN now() + least(greatest(
               coalesce(input.retry_at - now(), make_interval(secs => input.retry_after_s)),
               interval '1 second'), make_interval(secs => %(retry_after_max_s)s)) END AS until
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
        %(window_s)s, %(min_calls)s, %(breaker_failures)s, %(failure_ratio)s, %(cooloff_s)s,
        %(slowdown_s)s
    ) AS p(key)
)
SELECT known.record_id, known.channel, settled.status, settled.latency_s, known.trace_id,
       known.dedupe_key, tripped.keys, coalesce(settled.ordered, false),
       -- records of a queue due now: the woken heads, and those a digest left out
       EXISTS (SELECT FROM woken) OR EXISTS (SELECT FROM unsent) AS woke
FROM known LEFT JOIN settled ON settled.id = known.record_id CROSS JOIN tripped;

-- name: lock_next_in_order
-- Ordering (0013), the first of the two statements of a release, in one transaction: locks the
-- next record of each finished keyed record's channel and ordering key (%(ids)s, as in
-- release_next_in_order) while it is pending, waiting for a claim that has it locked. That
-- claim may be holding it behind the head it read as sending just before the head's result
-- committed (until a second past the head's lease): release_next_in_order, a statement of its
-- own, then reads the record with the claim's hold committed. Read in one statement with the
-- claim still open, the record's visible version (due: a first attempt, or a deferral that
-- has passed, as an operator pause's end leaves a whole backlog) would be skipped, the hold
-- would commit after it, and the record and its key would wait out the lease. Ordered by id,
-- so two releases take shared rows in one order.
SELECT n.id
FROM outbox_notifier.notification_records f
CROSS JOIN LATERAL (
    SELECT e.id
    FROM outbox_notifier.notification_records e
    WHERE e.channel = f.channel AND e.ordering_key = f.ordering_key
      AND e.status IN ('pending', 'failed', 'sending') AND e.outbox_id > f.outbox_id
    ORDER BY e.outbox_id
    LIMIT 1
) nxt
JOIN outbox_notifier.notification_records n ON n.id = nxt.id
WHERE f.id = ANY (%(ids)s::bigint[])
  AND f.ordering_key IS NOT NULL AND f.status IN ('sent', 'dead', 'skipped')
  AND n.status = 'pending'
ORDER BY n.id
FOR UPDATE OF n;

-- name: release_next_in_order
-- Ordering (0013): the next record of each finished keyed record's channel and ordering key
-- (%(ids)s: records a result batch left sent, dead or skipped), held by claim_due_v1 until its
-- head could move, becomes due now, so it goes without waiting out its hold. After
-- lock_next_in_order in the same transaction (see there: this statement's snapshot is taken
-- once a claim deferring the record has committed). Not a step of apply_results: it waits for
-- a claim that has the next record locked, and inside apply_results, which locks targets rows,
-- that wait could close a cycle with a claim that holds the record and waits for a target. Run
-- only for batches with keyed records; if it fails, the hold's end releases the record all the
-- same.
UPDATE outbox_notifier.notification_records n
SET next_retry_at = now(), updated_at = now()
FROM outbox_notifier.notification_records f
CROSS JOIN LATERAL (
    SELECT e.id
    FROM outbox_notifier.notification_records e
    WHERE e.channel = f.channel AND e.ordering_key = f.ordering_key
      AND e.status IN ('pending', 'failed', 'sending') AND e.outbox_id > f.outbox_id
    ORDER BY e.outbox_id
    LIMIT 1
) nxt
WHERE f.id = ANY (%(ids)s::bigint[])
  AND f.ordering_key IS NOT NULL AND f.status IN ('sent', 'dead', 'skipped')
  AND n.id = nxt.id AND n.status = 'pending' AND n.next_retry_at > now();

-- name: rescue_expired_leases
-- Takes back records whose worker died or stalled in 'sending': a temporary failure with code
-- sending_lease_expired (dead once attempts are spent), logged as an attempt of its own. The
-- backoff delay for attempt n is %(delays_s)s[n], computed by outbox_notifier.backoff, times a
-- jitter factor in [1 - %(jitter)s, 1 + %(jitter)s) drawn per record (random() is evaluated per
-- row), so records of one dead worker do not all come due at the same instant. A replay's reason
-- goes into the attempt row and off a record that ends dead, as in apply_results.
WITH expired AS (
    SELECT id, channel, dedupe_key, lease_token, replay_reason
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
                least(greatest(r.attempt_count, 1), cardinality(%(delays_s)s::float8[]))]
                * (1 + %(jitter)s::float8 * (2 * random() - 1)))
            END,
        last_error_code = 'sending_lease_expired',
        last_error = 'lease expired while sending: the worker stopped or stalled mid-call',
        lease_expires_at = NULL,
        lease_token = NULL,
        replay_reason = CASE WHEN r.attempt_count < r.max_attempts THEN r.replay_reason END,
        updated_at = now()
    FROM claimable
    WHERE r.id = claimable.id
    RETURNING r.id, r.channel, r.status, r.attempt_count
), logged AS (
    INSERT INTO outbox_notifier.delivery_attempts (
        record_id, attempt, lease_token, started_at, duration_ms, outcome, error_code,
        replay_reason
    )
    SELECT rescued.id, rescued.attempt_count, expired.lease_token, now(), 0, 'temporary_fail',
           'sending_lease_expired', expired.replay_reason
    FROM rescued JOIN expired USING (id)
)
SELECT id, channel, status FROM rescued;

-- name: applied_migrations
-- Every applied migration with its kind. Read through to_jsonb so that a schema migrated by
-- release 0.1.0, before schema_migrations had a kind column, still answers (kind NULL).
SELECT m.version, m.name, to_jsonb(m) ->> 'kind', m.applied_at
FROM outbox_notifier.schema_migrations m
ORDER BY m.version;

-- name: set_timeouts
-- Bounds the current transaction's lock waits and statements (transaction-local: safe behind a
-- transaction-mode pooler, and gone at commit).
SELECT set_config('lock_timeout', %(lock_timeout)s, true),
       set_config('statement_timeout', %(statement_timeout)s, true);

-- name: session_timeouts
-- The session's lock_timeout and statement_timeout in milliseconds: did the startup options
-- take (a pooler may drop them)?
SELECT (SELECT setting::integer FROM pg_settings WHERE name = 'lock_timeout'),
       (SELECT setting::integer FROM pg_settings WHERE name = 'statement_timeout');

-- name: ping
-- The cheapest round trip: is the database there at all (start-up waits on it)?
SELECT 1;
