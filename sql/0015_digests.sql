-- kind: additive
-- 0015: digests. A chat-bot target over its budget gets one message carrying several records
-- per call (a digest) instead of one call per record, so a burst arrives in a few calls within
-- the budget rather than one call per slot (a DingTalk group robot's 20 a minute made a burst
-- of 300 take a quarter of an hour). Every record keeps its own transition and attempt row.
--
-- When. The claim (claim_due_v1, created here: it reads this migration's columns) merges the
-- records of a target whose provider is in p_digest (the chat bots whose digest setting is
-- on) when they do not fit its remaining budget one call each, or when records of the target
-- already wait in its queue (below). A target whose records fit gets one call per record, as
-- before. A breaker or throttle probe is always one record alone. Each digest is one entry in
-- the target's pacing log (it is one call), so budgets hold across replicas as before: the
-- claim decides under the target's row lock.
--
-- The queue, and why. A digest must take its target's oldest waiting records: records that
-- wait for a slot are deferred, and newer records a later claim meets first would otherwise
-- jump ahead of them. So a chat-bot record that waits for a slot, or for a call of its target
-- in flight, joins its target's queue (notification_records.digest_target, the target's key),
-- and a claim that meets any record of the target also takes the queue's oldest records as
-- candidates (records_digest_queue_idx: one probe per target, and one probe of the whole
-- index per claim while no queue holds a record). A digest's records stay in the queue while
-- their call is in flight; meanwhile the target is busy: its other records wait until a second
-- past that call's lease, and the result that lands wakes the queue's head at once
-- (apply_results), so one digest per target is in flight at a time and digests go out in
-- record order, across replicas too. A record leaves the queue when its call ends (any
-- result), when a pause or the ordering rule holds it, or when it goes out alone. A record
-- with an ordering key is in a digest only as its key's head, as it is claimed alone.
--
-- * notification_records.digest_target (nullable): the queue the record waits in, or whose
--   call it is in; NULL: none. Read only through the partial index, whose predicate includes
--   the status, so a record that left pending and sending leaves the index whatever wrote it.
-- * notification_records.digest_alone: the next call carries this record alone. Set when a
--   digest holding it was refused for its payload (payload_invalid): each record is tried once
--   on its own before anything is declared dead, so one bad record cannot end its neighbours.
--   The claim clears it.
-- * delivery_attempts.message_id (nullable): shared by the attempt rows of one digest call;
--   NULL for a call that carried one record. message_id_seq gives them. Indexed (partial) for
--   the operator's "which records went out in this message?".
-- * view digest_messages: one row per digest call: when, how many records, which, the outcome.
--
-- Additive: nullable or defaulted columns (no rewrite), a sequence, indexes, a view, and the
-- claim. Releases before 0.2.0 neither set nor read them.

ALTER TABLE outbox_notifier.notification_records
    ADD COLUMN digest_target text,
    ADD COLUMN digest_alone boolean NOT NULL DEFAULT false;
ALTER TABLE outbox_notifier.delivery_attempts ADD COLUMN message_id bigint;

-- Built in the migration's transaction: no record is in a queue and no attempt has a message
-- id before it, so both partial indexes are empty and each build scans its table once.
CREATE INDEX records_digest_queue_idx ON outbox_notifier.notification_records
    (digest_target, status, id)
    WHERE digest_target IS NOT NULL AND status IN ('pending', 'sending');
CREATE INDEX delivery_attempts_message_idx ON outbox_notifier.delivery_attempts (message_id)
    WHERE message_id IS NOT NULL;

CREATE SEQUENCE outbox_notifier.message_id_seq;

-- The digest calls: one row per message, its records (ids, oldest first) and how it ended
-- (every record of a call gets the call's outcome; applied is false when a result came after
-- its lease was taken over).
CREATE VIEW outbox_notifier.digest_messages AS
SELECT a.message_id, min(a.started_at) AS started_at, max(a.duration_ms) AS duration_ms,
       count(*) AS records, array_agg(a.record_id ORDER BY a.record_id) AS record_ids,
       min(a.outcome) AS outcome, min(a.error_code) AS error_code,
       min(a.http_status) AS http_status, bool_and(a.applied) AS applied
FROM outbox_notifier.delivery_attempts a
WHERE a.message_id IS NOT NULL
GROUP BY a.message_id;

GRANT USAGE ON SEQUENCE outbox_notifier.message_id_seq TO outbox_notifier_daemon;
GRANT SELECT ON outbox_notifier.digest_messages TO outbox_notifier_operator;

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
-- A chat-bot target over its budget gets digests (see the header): p_digest names the
-- providers whose records are merged, at most p_digest_max records a call.
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
    p_after_id bigint,
    p_digest text[] DEFAULT '{}',
    p_digest_max integer DEFAULT 20
) RETURNS TABLE (
    id bigint, channel text, user_id bigint, trigger_id text, preview_id text,
    trigger_type text, target_type text, target_id bigint, dedupe_key text, target_url text,
    summary_text text, fallback_text text, fallback_used boolean, trace_id text,
    attempt_count integer, max_attempts integer, lease_token bigint,
    enabled boolean, webhook_url text, auth_kind text, auth_secret text, provider text,
    target_key text, message_id bigint
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
    v_alone boolean[];
    -- due records another transaction held when this claim locked its candidates
    v_skipped bigint[];
    -- per chat-bot target met by this claim, read before its lock: whether another claim
    -- holds part of the front of its queue
    v_q_keys text[] := '{}';
    v_q_contended boolean[] := '{}';
    -- queue records passed over for an advisory lock held elsewhere (an operator's hold)
    v_passed bigint[] := '{}';
    v_key text;
    v_head bigint;
    v_contended boolean;
    -- the same targets, read under their lock: the queue's head (the oldest record waiting in
    -- it; NULL: none), until when a call of it is in flight (NULL: none), and the oldest due
    -- record of the target that another claim held (NULL: none)
    v_d_keys text[] := '{}';
    v_d_heads bigint[] := '{}';
    v_d_busy timestamptz[] := '{}';
    v_d_skipped bigint[] := '{}';
    -- the claimed records' message ids (NULL: a call of one record) and queues (NULL: none);
    -- the deferred ones' time (NULL: when their target's budget allows) and queue
    v_claim_msg bigint[];
    v_claim_queue text[];
    v_wait bigint[];
    v_wait_until timestamptz[];
    v_wait_queue text[];
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
        -- re-checked under the row lock: another replica may have moved the row since the scan.
        -- A record in a digest queue only with the queue's lock (see the queues below).
        SELECT r.id, r.channel, r.dedupe_key, r.user_id, r.ordering_key, r.outbox_id,
               r.digest_alone
        FROM outbox_notifier.notification_records r
        WHERE r.id IN (SELECT due.id FROM due)
          AND (r.status IN ('pending', 'failed'))
          AND (r.next_retry_at IS NULL OR r.next_retry_at <= now())
          AND (r.digest_target IS NULL
               OR pg_try_advisory_xact_lock(hashtextextended('digest|' || r.digest_target, 7244)))
        ORDER BY r.id
        FOR UPDATE OF r SKIP LOCKED
    ), candidates AS MATERIALIZED (
        SELECT l.id, ch.webhook_url, coalesce(ch.provider, 'feishu_flow') AS provider,
               l.channel, l.ordering_key, l.outbox_id, l.user_id, l.digest_alone
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
           coalesce(array_agg(c.user_id ORDER BY c.id), '{}'),
           coalesce(array_agg(c.digest_alone ORDER BY c.id), '{}'),
           -- digests: what another claim held, which may be older than this claim's records
           ARRAY(SELECT d.id FROM due d WHERE NOT EXISTS (SELECT FROM locked l WHERE l.id = d.id))
    INTO v_ids, v_keys, v_providers, v_hosts, v_channels, v_okeys, v_oids, v_users, v_alone,
         v_skipped
    FROM candidates c;

    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;

    -- Digest queues (see the header). For each chat-bot target met here, take the oldest
    -- records of its queue as candidates too (one probe of records_digest_queue_idx each, and
    -- none at all while no queue holds a record): a digest goes out oldest first, whichever
    -- records brought this claim to the target. They go through the pause and ordering checks
    -- below like every candidate. One claim at a time owns a queue: a transaction-scoped
    -- advisory lock on it (the due scan above takes a queued record only with it), so claims
    -- running together do not split the front of a queue between them; a claim that does not
    -- get it, or finds part of the front held all the same, takes no call of the queue
    -- (contended). A queue record held by its own advisory lock (an operator holding it) is
    -- passed over, as a candidate would be. What decides the call, whether the queue is busy
    -- and its head, is read again under the target's lock (below).
    IF v_providers && p_digest
       AND EXISTS (SELECT FROM outbox_notifier.notification_records q
                   WHERE q.digest_target IS NOT NULL AND q.status IN ('pending', 'sending')) THEN
        FOR v_key IN
            SELECT DISTINCT u.k FROM unnest(v_keys, v_providers) AS u(k, p)
            WHERE u.k IS NOT NULL AND u.p = ANY (p_digest)
        LOOP
            SELECT q.id INTO v_head FROM outbox_notifier.notification_records q
            WHERE q.digest_target = v_key AND q.status = 'pending'
            ORDER BY q.id LIMIT 1;
            CONTINUE WHEN v_head IS NULL
                OR EXISTS (SELECT FROM outbox_notifier.notification_records q
                           WHERE q.digest_target = v_key AND q.status = 'sending');
            IF NOT pg_try_advisory_xact_lock(hashtextextended('digest|' || v_key, 7244)) THEN
                v_q_keys := v_q_keys || v_key;
                v_q_contended := v_q_contended || true;
                CONTINUE;
            END IF;
            WITH queued AS MATERIALIZED (
                SELECT q.id, q.channel, q.dedupe_key, q.user_id, q.ordering_key, q.outbox_id,
                       q.digest_alone
                FROM outbox_notifier.notification_records q
                WHERE q.digest_target = v_key AND q.status = 'pending'
                ORDER BY q.id
                LIMIT p_digest_max
                FOR UPDATE OF q SKIP LOCKED
            ), joined AS MATERIALIZED (
                SELECT l.id, ch.webhook_url, coalesce(ch.provider, 'feishu_flow') AS provider,
                       l.channel, l.ordering_key, l.outbox_id, l.user_id, l.digest_alone
                FROM queued l
                LEFT JOIN outbox_notifier.notification_channels ch
                       ON ch.user_id = l.user_id AND ch.channel = l.channel AND ch.enabled
                WHERE NOT (l.id = ANY (v_ids))
                  AND pg_try_advisory_xact_lock(
                          outbox_notifier.record_lock_key(l.channel, l.dedupe_key))
            )
            SELECT NOT EXISTS (SELECT FROM queued WHERE queued.id = v_head)
                       OR (SELECT count(*) FROM outbox_notifier.notification_records q
                           WHERE q.digest_target = v_key AND q.status = 'pending'
                             AND q.id BETWEEN v_head AND (SELECT max(queued.id) FROM queued))
                          > (SELECT count(*) FROM queued),
                   v_ids || coalesce((SELECT array_agg(j.id ORDER BY j.id)
                                      FROM joined j), '{}'),
                   v_keys || coalesce((SELECT array_agg(CASE WHEN j.webhook_url IS NOT NULL
                               THEN outbox_notifier.target_key(j.webhook_url) END
                               ORDER BY j.id) FROM joined j), '{}'),
                   v_providers || coalesce((SELECT array_agg(j.provider ORDER BY j.id)
                                            FROM joined j), '{}'),
                   v_hosts || coalesce((SELECT array_agg(
                               substring(j.webhook_url FROM '^[a-z]+://([^/:?#]+)')
                               ORDER BY j.id) FROM joined j), '{}'),
                   v_channels || coalesce((SELECT array_agg(j.channel ORDER BY j.id)
                                           FROM joined j), '{}'),
                   v_okeys || coalesce((SELECT array_agg(j.ordering_key ORDER BY j.id)
                                        FROM joined j), '{}'),
                   v_oids || coalesce((SELECT array_agg(j.outbox_id ORDER BY j.id)
                                       FROM joined j), '{}'),
                   v_users || coalesce((SELECT array_agg(j.user_id ORDER BY j.id)
                                        FROM joined j), '{}'),
                   v_alone || coalesce((SELECT array_agg(j.digest_alone ORDER BY j.id)
                                        FROM joined j), '{}'),
                   v_passed || ARRAY(SELECT q.id FROM queued q WHERE NOT (q.id = ANY (v_ids))
                                       AND NOT EXISTS (SELECT FROM joined j WHERE j.id = q.id))
            INTO v_contended, v_ids, v_keys, v_providers, v_hosts, v_channels, v_okeys,
                 v_oids, v_users, v_alone, v_passed;
            v_q_keys := v_q_keys || v_key;
            v_q_contended := v_q_contended || v_contended;
        END LOOP;
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
            SET next_retry_at = h.until, digest_target = NULL, updated_at = now()
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
    -- Digests (0015) follow the rule: a keyed record goes into a digest only as its key's
    -- head, as it goes alone, so one digest holds at most one record of a key.
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
            SET next_retry_at = h.until, digest_target = NULL, updated_at = now()
            FROM unnest(v_held, v_held_until) AS h(id, until)
            WHERE r.id = h.id;
            v_out := v_out || v_held;
        END IF;
    END IF;

    IF cardinality(v_out) > 0 THEN
        SELECT coalesce(array_agg(u.id ORDER BY u.n), '{}'),
               coalesce(array_agg(u.k ORDER BY u.n), '{}'),
               coalesce(array_agg(u.p ORDER BY u.n), '{}'),
               coalesce(array_agg(u.h ORDER BY u.n), '{}'),
               coalesce(array_agg(u.a ORDER BY u.n), '{}')
        INTO v_ids, v_keys, v_providers, v_hosts, v_alone
        FROM unnest(v_ids, v_keys, v_providers, v_hosts, v_alone)
             WITH ORDINALITY AS u(id, k, p, h, a, n)
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
        v_claim_msg := array_fill(NULL::bigint, ARRAY[cardinality(v_ids)]);
        v_claim_queue := array_fill(NULL::text, ARRAY[cardinality(v_ids)]);
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

        -- The chat-bot targets' queues, read under the targets' locks (a claim that took a
        -- target's lock before this one has committed: what it queued, or sent, is seen here).
        -- A due record of the target that another claim held when this one locked its own
        -- (still waiting, or sent by it since), older than the newest this claim's digest
        -- would hold: the digest would leave a hole, so this claim takes no call of the queue
        -- (it queues its records, and the next claim of the target takes the front in order).
        IF v_providers && p_digest
           AND (cardinality(v_skipped) > 0
                OR EXISTS (SELECT FROM outbox_notifier.notification_records q
                           WHERE q.digest_target IS NOT NULL
                             AND q.status IN ('pending', 'sending'))) THEN
            SELECT coalesce(array_agg(d.k), '{}'), coalesce(array_agg(h.id), '{}'),
                   coalesce(array_agg(b.until), '{}'), coalesce(array_agg(o.id), '{}')
            INTO v_d_keys, v_d_heads, v_d_busy, v_d_skipped
            FROM (SELECT DISTINCT u.k FROM unnest(v_keys, v_providers) AS u(k, p)
                  WHERE u.k IS NOT NULL AND u.p = ANY (p_digest)) d
            LEFT JOIN LATERAL (
                SELECT q.id FROM outbox_notifier.notification_records q
                WHERE q.digest_target = d.k AND q.status = 'pending'
                ORDER BY q.id LIMIT 1
            ) h ON true
            LEFT JOIN LATERAL (
                SELECT max(q.lease_expires_at) AS until FROM outbox_notifier.notification_records q
                WHERE q.digest_target = d.k AND q.status = 'sending'
            ) b ON true
            LEFT JOIN LATERAL (
                SELECT min(o.id) AS id
                FROM outbox_notifier.notification_records o
                JOIN outbox_notifier.notification_channels ch
                  ON ch.user_id = o.user_id AND ch.channel = o.channel AND ch.enabled
                WHERE o.id = ANY (v_skipped) AND NOT o.digest_alone
                  AND (o.status = 'sending'
                       OR o.status = 'pending'
                          AND (o.next_retry_at IS NULL OR o.next_retry_at <= now()))
                  AND outbox_notifier.target_key(ch.webhook_url) = d.k
            ) o ON true;
        END IF;

        -- What each candidate gets: a call of its own ('single'), a place in its target's
        -- digest ('digest'), or a wait ('wait': until the budget allows; 'busy': a call of its
        -- target's queue is in flight; 'contended': another claim has the front of the queue,
        -- or holds records the call would have to leave behind; 'next': behind this claim's
        -- digest). A target whose provider digests and whose slot
        -- is not a probe: its records to be sent alone (digest_alone) take the budget first,
        -- one call each; the others go one call each while they fit what is left and its queue
        -- is empty, else the oldest p_digest_max go as one call, the digest, when a call is
        -- left and none of its queue is in flight. Any other target: as many calls as its
        -- allowance, oldest first.
        WITH ranked AS (
            SELECT u.id, u.k, u.alone, u.k IS NOT NULL AND u.p = ANY (p_digest) AS digests,
                   row_number() OVER (PARTITION BY u.k ORDER BY u.id) AS rn,
                   row_number() OVER (PARTITION BY u.k, u.alone ORDER BY u.id) AS rn_kind,
                   count(*) FILTER (WHERE u.alone) OVER (PARTITION BY u.k) AS n_alone,
                   count(*) FILTER (WHERE NOT u.alone) OVER (PARTITION BY u.k) AS n_queued,
                   min(u.id) FILTER (WHERE NOT u.alone) OVER (PARTITION BY u.k) AS oldest,
                   max(u.id) FILTER (WHERE NOT u.alone) OVER (PARTITION BY u.k) AS newest
            FROM unnest(v_ids, v_keys, v_providers, v_alone) AS u(id, k, p, alone)
        ), c AS (
            -- the newest record a digest of the target would hold
            SELECT r.*, max(r.id) FILTER (WHERE NOT r.alone AND r.rn_kind <= p_digest_max)
                            OVER (PARTITION BY r.k) AS last_member
            FROM ranked r
        ), queues AS (
            -- contended: another claim held the front of the queue when this one took it, or
            -- holds its head now (a head passed over for an operator's hold is not the front)
            SELECT d.k, d.head, d.busy, d.skipped,
                   coalesce(q.contended, false)
                   OR d.head IS NOT NULL AND NOT d.head = ANY (v_ids || v_passed) AS contended
            FROM unnest(v_d_keys, v_d_heads, v_d_busy, v_d_skipped) AS d(k, head, busy, skipped)
            LEFT JOIN unnest(v_q_keys, v_q_contended) AS q(k, contended) ON q.k = d.k
        ), fate AS (
            SELECT c.id, c.k, c.alone, c.digests, c.oldest, q.busy,
                   CASE
                       WHEN c.k IS NULL THEN 'single'
                       WHEN NOT c.digests OR b.probe OR b.throttle_probe OR c.alone THEN
                           CASE WHEN (CASE WHEN c.digests AND NOT b.probe
                                                AND NOT b.throttle_probe
                                           THEN c.rn_kind ELSE c.rn END) <= b.allow
                                THEN 'single' ELSE 'wait' END
                       WHEN q.busy IS NOT NULL THEN 'busy'
                       WHEN q.head IS NULL
                            AND c.n_queued <= b.allow - least(c.n_alone, b.allow) THEN
                           CASE WHEN q.skipped < c.newest THEN 'contended' ELSE 'single' END
                       WHEN q.contended OR q.skipped < c.last_member THEN 'contended'
                       WHEN b.allow - least(c.n_alone, b.allow) < 1 THEN 'wait'
                       WHEN c.rn_kind <= p_digest_max THEN 'digest'
                       ELSE 'next'
                   END AS fate
            FROM c
            LEFT JOIN unnest(v_b_keys, v_b_probe, v_b_throttle_probe, v_b_allow)
                 AS b(target_key, probe, throttle_probe, allow) ON b.target_key = c.k
            LEFT JOIN queues q ON q.k = c.k
        ), messages AS (
            -- one message id per digest of two records or more
            SELECT f.k, nextval('outbox_notifier.message_id_seq') AS id
            FROM fate f WHERE f.fate = 'digest' GROUP BY f.k HAVING count(*) > 1
        ), decided AS MATERIALIZED (
            SELECT f.id, f.fate, m.id AS message_id,
                   -- a digest's records, and the chat-bot records that wait, are in the queue
                   CASE WHEN f.digests AND NOT f.alone AND f.fate <> 'single' THEN f.k END
                       AS queue,
                   CASE f.fate
                       WHEN 'busy' THEN greatest(v_now, f.busy) + interval '1 second'
                       -- one record looks again soon; the claim that meets it takes the
                       -- queue's front, the others with it (they wait in the queue)
                       WHEN 'contended' THEN CASE WHEN f.id = f.oldest
                                                  THEN v_now + interval '0.25 seconds'
                                                  ELSE v_now + make_interval(secs => p_lease_s + 1)
                                             END
                       WHEN 'next' THEN v_now + make_interval(secs => p_lease_s + 1)
                   END AS until
            FROM fate f LEFT JOIN messages m ON m.k = f.k AND f.fate = 'digest'
        )
        SELECT coalesce(array_agg(d.id) FILTER (WHERE d.fate IN ('single', 'digest')), '{}'),
               coalesce(array_agg(d.message_id) FILTER (WHERE d.fate IN ('single', 'digest')),
                        '{}'),
               coalesce(array_agg(d.queue) FILTER (WHERE d.fate IN ('single', 'digest')), '{}'),
               coalesce(array_agg(d.id) FILTER (WHERE d.fate NOT IN ('single', 'digest')), '{}'),
               coalesce(array_agg(d.until) FILTER (WHERE d.fate NOT IN ('single', 'digest')),
                        '{}'),
               coalesce(array_agg(d.queue) FILTER (WHERE d.fate NOT IN ('single', 'digest')),
                        '{}')
        INTO v_claim, v_claim_msg, v_claim_queue, v_wait, v_wait_until, v_wait_queue
        FROM decided d;

        -- The calls about to be made (a digest is one call) go into the log of each paced or
        -- slowed target (entries older than a minute drop out); a probe re-arms the pause so
        -- no other replica probes meanwhile, and a throttle probe holds the target a second
        -- (the probe's reply lifts or renews the throttle).
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
            SELECT u.k, count(DISTINCT coalesce(m.message_id, -u.id))::integer AS sent
            FROM unnest(v_ids, v_keys) AS u(id, k)
            JOIN unnest(v_claim, v_claim_msg) AS m(id, message_id) ON m.id = u.id
            WHERE u.k IS NOT NULL
            GROUP BY u.k
        ) n
        JOIN unnest(v_b_keys, v_b_per_s, v_b_per_min, v_b_probe, v_b_throttle_probe,
                    v_b_logged, v_b_allow)
             AS b(target_key, per_s, per_min, probe, throttle_probe, logged, allow) ON b.target_key = n.k
        WHERE t.target_key = n.k AND (b.logged OR b.probe OR b.throttle_probe);

        -- Deferred records wait, without spending an attempt, until their target can take one
        -- more call: the end of a pause or throttle, or when the call that fills a window
        -- leaves it (the per_s-th / per_min-th newest entry of the log, sorted oldest first).
        -- Records waiting behind a call of their queue wait until a second past its lease (a
        -- result that lands wakes the queue's head at once: apply_results); of a contended
        -- queue's, the oldest is looked at again in a quarter of a second. A chat-bot record
        -- that waits joins its target's queue; any other leaves the queue it was in.
        UPDATE outbox_notifier.notification_records r
        SET next_retry_at = coalesce(w.until, greatest(
                v_now + make_interval(secs => 0.05),
                CASE WHEN t.paused_until > v_now THEN t.paused_until END,
                CASE WHEN t.throttled_until > v_now THEN t.throttled_until END,
                CASE WHEN b.per_s > 0 AND cardinality(t.recent_sends) >= b.per_s
                     THEN t.recent_sends[cardinality(t.recent_sends) - b.per_s + 1]
                          + make_interval(secs => 1 + p_margin_s) END,
                CASE WHEN b.per_min > 0 AND cardinality(t.recent_sends) >= b.per_min
                     THEN t.recent_sends[cardinality(t.recent_sends) - b.per_min + 1]
                          + make_interval(secs => 60 + p_margin_s) END
            )),
            digest_target = w.queue,
            updated_at = now()
        FROM unnest(v_wait, v_wait_until, v_wait_queue) AS w(id, until, queue)
        JOIN unnest(v_ids, v_keys) AS u(id, k) ON u.id = w.id
        JOIN outbox_notifier.targets t ON t.target_key = u.k
        JOIN unnest(v_b_keys, v_b_per_s, v_b_per_min, v_b_probe, v_b_throttle_probe,
                    v_b_logged, v_b_allow)
             AS b(target_key, per_s, per_min, probe, throttle_probe, logged, allow) ON b.target_key = u.k
        WHERE r.id = w.id;
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
            -- a call of the queue stays in it while in flight: its target is busy meanwhile
            digest_target = m.queue,
            digest_alone = false,
            updated_at = now()
        FROM unnest(v_claim, v_claim_queue) AS m(id, queue)
        WHERE r.id = m.id
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
           outbox_notifier.target_key(ch.webhook_url), m.message_id
    FROM claimed
    JOIN unnest(v_claim, v_claim_msg) AS m(id, message_id) ON m.id = claimed.id
    LEFT JOIN outbox_notifier.notification_channels ch
           ON ch.user_id = claimed.user_id AND ch.channel = claimed.channel
    ORDER BY claimed.id;
END;
$$;
