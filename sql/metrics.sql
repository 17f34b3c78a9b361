-- The statements behind /metrics gauges and /readyz. Loaded by outbox_notifier.sqlfiles.
--
-- The snapshot runs every few seconds, so it reads only live work: each status is counted on
-- its own arm so that each arm can use the partial index that holds exactly its rows, and its
-- cost follows the backlog, not the history. 'sent', 'skipped' and 'dead' are history: no
-- partial index separates them, so counting them would scan every retained record; their rates
-- come from the delivery counters (records_dead_total), and the dead_letters view lists them.

-- name: metrics_snapshot
-- Live records per channel and status with the age of the oldest due one ('pending' since it
-- last became pending, 'failed' since its retry came due), then one 'outbox' row: pending rows
-- and the oldest one's age, then the number of paused and of throttled targets. Ages are in
-- seconds on the database clock.
WITH live AS (
    SELECT channel, status, updated_at AS due_at
    FROM outbox_notifier.notification_records WHERE status = 'pending'
    UNION ALL
    SELECT channel, status, CASE WHEN next_retry_at <= now() THEN next_retry_at END
    FROM outbox_notifier.notification_records WHERE status = 'failed'
    UNION ALL
    SELECT channel, status, NULL::timestamptz
    FROM outbox_notifier.notification_records WHERE status = 'sending'
)
SELECT 'records' AS kind, channel, status, count(*)::bigint AS n,
       greatest(extract(epoch FROM now() - min(due_at)), 0)::float8 AS oldest_age_s
FROM live
GROUP BY channel, status
UNION ALL
SELECT 'outbox', NULL, NULL, count(*)::bigint,
       greatest(extract(epoch FROM now() - min(created_at)), 0)::float8
FROM outbox_notifier.outbox
WHERE status = 'pending'
UNION ALL
-- targets paused by endpoint protection (the table has one row per webhook: small), and
-- targets slowed down by their own 429s (pacing, not failure)
SELECT 'paused_targets', NULL, NULL, count(*)::bigint, NULL
FROM outbox_notifier.targets
WHERE paused_until > now()
UNION ALL
SELECT 'throttled_targets', NULL, NULL, count(*)::bigint, NULL
FROM outbox_notifier.targets
WHERE throttled_until > now() OR slowed_until > now();
