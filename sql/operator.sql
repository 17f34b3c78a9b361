-- The statements of the operator commands (`status`, `requeue`) and of the maintenance loop
-- (retention, leadership). Loaded by outbox_notifier.sqlfiles.
--
-- None of them selects a channel's webhook_url or auth_secret: operator output never shows them.

-- name: status_records
-- Record counts and the oldest record's age per channel and status, in lifecycle order.
SELECT channel, status, records, extract(epoch FROM oldest_age)::float8
FROM outbox_notifier.backlog
ORDER BY channel,
         array_position(ARRAY['pending', 'sending', 'failed', 'sent', 'dead', 'skipped'], status),
         status;

-- name: status_outbox
-- Outbox row counts by status and the age of the oldest pending row.
SELECT count(*) FILTER (WHERE status = 'pending'),
       count(*) FILTER (WHERE status = 'relayed'),
       count(*) FILTER (WHERE status = 'rejected'),
       extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending'))::float8
FROM outbox_notifier.outbox;

-- name: status_stuck_sending
-- Records in 'sending', how many of them have an expired lease, and the longest expiry.
SELECT count(*),
       count(*) FILTER (WHERE expired_for > interval '0'),
       extract(epoch FROM max(expired_for) FILTER (WHERE expired_for > interval '0'))::float8
FROM outbox_notifier.stuck_sending;

-- name: status_dead_letters
-- The most recent dead records, newest first.
SELECT id, channel, last_error_code, last_error, updated_at
FROM outbox_notifier.dead_letters
ORDER BY updated_at DESC, id DESC
LIMIT %(limit)s;

-- name: requeue_record
-- Puts one dead, failed or skipped record back to pending; false when it was not requeued.
SELECT outbox_notifier.requeue(%(id)s);

-- name: record_status
-- The status of one record (no row when it does not exist): why a requeue was refused.
SELECT status FROM outbox_notifier.notification_records WHERE id = %(id)s;

-- name: dead_letters_matching
-- The dead records that requeue_dead would pick with the same filters: the dry run.
SELECT id, channel, last_error_code, updated_at
FROM outbox_notifier.dead_letters_matching(
    %(channel)s::text, %(error_code)s::text, %(since)s::timestamptz, %(until)s::timestamptz
)
ORDER BY id;

-- name: requeue_dead
-- Requeues the dead records matching the filters; returns the ids requeued.
SELECT id
FROM outbox_notifier.requeue_dead(
    %(channel)s::text, %(error_code)s::text, %(since)s::timestamptz, %(until)s::timestamptz
) AS requeued(id)
ORDER BY id;

-- name: purge_outbox_batch
-- Deletes one batch of finished (relayed or rejected) outbox rows created before the cutoff,
-- oldest first, on outbox_finished_idx; rows locked elsewhere are left for the next pass.
DELETE FROM outbox_notifier.outbox
WHERE id IN (
    SELECT id
    FROM outbox_notifier.outbox
    WHERE status <> 'pending'
      AND created_at < now() - make_interval(secs => %(max_age_s)s)
    ORDER BY created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
);

-- name: purge_records_batch
-- Deletes one batch of terminal (sent, dead, skipped) records last changed before the cutoff,
-- oldest first, on records_terminal_idx; their delivery_attempts go with them (ON DELETE
-- CASCADE). The row lock re-checks the status, so a record requeued meanwhile is kept.
DELETE FROM outbox_notifier.notification_records
WHERE id IN (
    SELECT id
    FROM outbox_notifier.notification_records
    WHERE status IN ('sent', 'dead', 'skipped')
      AND updated_at < now() - make_interval(secs => %(max_age_s)s)
    ORDER BY updated_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
);

-- name: acquire_lease
-- Takes the named lease when it is free or expired, or renews it for its holder; returns a row
-- only when the caller holds it afterwards. Concurrent callers serialise on the row: one wins.
INSERT INTO outbox_notifier.maintenance_leases AS l (name, holder, expires_at)
VALUES (%(name)s, %(holder)s, now() + make_interval(secs => %(ttl_s)s))
ON CONFLICT (name) DO UPDATE
SET holder = excluded.holder,
    expires_at = excluded.expires_at,
    acquired_at = CASE WHEN l.holder = excluded.holder THEN l.acquired_at ELSE now() END
WHERE l.holder = excluded.holder OR l.expires_at <= now()
RETURNING l.holder;

-- name: renew_lease
-- Extends the lease while the caller still holds it; no row when it was taken over.
UPDATE outbox_notifier.maintenance_leases
SET expires_at = now() + make_interval(secs => %(ttl_s)s)
WHERE name = %(name)s AND holder = %(holder)s
RETURNING holder;

-- name: release_lease
-- Gives the lease up at once (on shutdown) so another replica can take it without waiting.
UPDATE outbox_notifier.maintenance_leases
SET expires_at = now()
WHERE name = %(name)s AND holder = %(holder)s;
