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
-- Applies a batch of provider results in one atomic statement: apply_results_v2 (0020: each
-- result's request_json is the request's JSON itself, not a string holding it; 0018 describes
-- what each result does). Returns one row per result whose record exists (status
-- NULL: a late result, not applied), with on each row the keys of the targets whose breaker
-- the batch tripped, whether the record has an ordering key, and whether the batch made a
-- digest queue's records due.
SELECT a.record_id, a.channel, a.status, a.latency_s, a.trace_id, a.dedupe_key,
       a.tripped_keys, a.ordered, a.woke
FROM outbox_notifier.apply_results_v2(
    %(results)s::jsonb, %(host_now)s::timestamptz, %(retry_after_max_s)s, %(window_s)s,
    %(min_calls)s::integer, %(breaker_failures)s::integer, %(failure_ratio)s, %(cooloff_s)s,
    %(slowdown_s)s
) AS a;

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
