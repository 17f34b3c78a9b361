-- 0002: one filter for the dead-letter commands, and the lease that elects the maintenance replica.
-- Released migrations are never edited; later changes go into new numbered files.

-- The dead records that a bulk requeue with these filters would pick; all filters optional.
-- since/until bound updated_at, the time of the record's last change (for a dead record, when it
-- died): since inclusive, until exclusive. This is the only copy of the filter: requeue_dead
-- below and `outbox-notifier requeue --dry-run` both select through it, so a dry run shows
-- exactly what the real run would requeue.
CREATE FUNCTION outbox_notifier.dead_letters_matching(
    p_channel text DEFAULT NULL,
    p_error_code text DEFAULT NULL,
    p_since timestamptz DEFAULT NULL,
    p_until timestamptz DEFAULT NULL
) RETURNS SETOF outbox_notifier.dead_letters
LANGUAGE sql STABLE AS $$
    -- A single STABLE SELECT: the planner inlines it into the caller's query.
    SELECT *
    FROM outbox_notifier.dead_letters
    WHERE (p_channel IS NULL OR channel = p_channel)
      AND (p_error_code IS NULL OR last_error_code = p_error_code)
      AND (p_since IS NULL OR updated_at >= p_since)
      AND (p_until IS NULL OR updated_at < p_until);
$$;

-- Bulk requeue of dead records (back to pending with a fresh attempt budget), picked through
-- dead_letters_matching. Rows are re-checked under the row lock; a record locked or held
-- elsewhere is skipped, not waited for. Returns the ids requeued.
CREATE FUNCTION outbox_notifier.requeue_dead(
    p_channel text DEFAULT NULL,
    p_error_code text DEFAULT NULL,
    p_since timestamptz DEFAULT NULL,
    p_until timestamptz DEFAULT NULL
) RETURNS SETOF bigint
LANGUAGE sql VOLATILE AS $$
    WITH picked AS MATERIALIZED (
        SELECT r.id, r.channel, r.dedupe_key
        FROM outbox_notifier.notification_records r
        WHERE r.id IN (
                SELECT m.id
                FROM outbox_notifier.dead_letters_matching(p_channel, p_error_code, p_since, p_until) m
            )
          AND r.status = 'dead'
        ORDER BY r.id
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox_notifier.notification_records r
    SET status = 'pending', attempt_count = 0, next_retry_at = NULL, last_error_code = NULL,
        last_error = NULL, lease_expires_at = NULL, lease_token = NULL, updated_at = now()
    FROM picked
    WHERE r.id = picked.id
      AND pg_try_advisory_xact_lock(outbox_notifier.record_lock_key(picked.channel, picked.dedupe_key))
    RETURNING r.id;
$$;

-- Leadership of periodic jobs (retention, metric snapshots) that one replica at a time should
-- run. A lease is a row, taken and renewed by single conditional statements on the database
-- clock, so it works through a transaction-mode pooler, where a session advisory lock would be
-- lost between transactions. A holder that dies stops renewing and loses the lease after it
-- expires.
CREATE TABLE outbox_notifier.maintenance_leases (
    name        text        PRIMARY KEY,
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
