-- The statements of the operator commands (`status`, `requeue`, `replay`). Loaded by
-- outbox_notifier.sqlfiles.
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

-- name: replay_selection
-- The records a replay with these arguments takes (outbox_notifier.replay_matching_v1, the
-- filter replay_v1 selects through): the dry run, and what the real run expects to replay.
SELECT id, user_id, provider, status, last_error_code, updated_at, attempt_count
FROM outbox_notifier.replay_matching_v1(
    %(since)s::timestamptz, %(until)s::timestamptz, %(user_id)s::bigint, %(provider)s::text,
    %(target_url)s::text, %(error_code)s::text, %(limit)s::integer
)
WHERE selected
ORDER BY id;

-- name: replay_left_out
-- The records of the range a replay leaves, by status: sent or dead ones over the limit (the
-- next run takes them), and those that are not sent or dead (never touched).
SELECT status, count(*)
FROM outbox_notifier.replay_matching_v1(
    %(since)s::timestamptz, %(until)s::timestamptz, %(user_id)s::bigint, %(provider)s::text,
    %(target_url)s::text, %(error_code)s::text, %(limit)s::integer
)
WHERE NOT selected
GROUP BY status
ORDER BY status;

-- name: replay
-- Replays the records replay_selection shows (less those held elsewhere); returns their ids.
SELECT id
FROM outbox_notifier.replay_v1(
    %(since)s::timestamptz, %(until)s::timestamptz, %(user_id)s::bigint, %(provider)s::text,
    %(target_url)s::text, %(error_code)s::text, %(reason)s::text, %(limit)s::integer,
    %(rate_per_s)s::float8, %(attempts)s::integer
) AS replayed(id)
ORDER BY id;

-- name: pause
-- Pauses one scope (0013's pause_v1: exactly one of target URL, user, provider); returns the
-- pause's id. Amends the scope's active pause if there is one.
SELECT outbox_notifier.pause_v1(
    %(reason)s::text, %(target_url)s::text, %(user_id)s::bigint, %(channel)s::text,
    %(provider)s::text, %(until)s::timestamptz
);

-- name: resume
-- Resumes one scope's active pause (0013's resume_v1); the records it released, NULL when no
-- such pause is active.
SELECT outbox_notifier.resume_v1(
    %(target_url)s::text, %(user_id)s::bigint, %(channel)s::text, %(provider)s::text
);

-- name: active_pause
-- One active pause by id, as the paused view shows it (never a URL).
SELECT paused, reason, paused_by, since, until, records_waiting
FROM outbox_notifier.paused
WHERE id = %(id)s;

-- name: status_pauses
-- The operator's active pauses, oldest first: what, why, by whom, since, until, what waits.
SELECT id, scope, paused, reason, paused_by, since, until, ended, records_waiting
FROM outbox_notifier.paused
ORDER BY since, id;

-- name: status_digest_queues
-- Chat-bot targets whose records wait for a digest (0016), the longest wait first.
SELECT target_key, provider, host, waiting, sending, extract(epoch FROM oldest_age)::float8,
       breaker_open
FROM outbox_notifier.digest_queues
ORDER BY oldest_age DESC, target_key;
