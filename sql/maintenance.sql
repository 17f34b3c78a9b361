-- The maintenance loop's statements, run by outbox_notifier.maintenance_store: retention purges,
-- the leader lease, the metrics snapshot. Loaded by outbox_notifier.sqlfiles.
--
-- Each runs under the daemon's lock_timeout and statement_timeout, as the pipeline's statements
-- do (outbox_notifier.timeouts), so a lock held elsewhere costs the maintenance loop one failed
-- statement, not its liveness. None of them needs a longer bound: a purge is one batch of at
-- most retention_batch_size rows, and the snapshot reads only live work.
--
-- The snapshot runs every few seconds, so it reads only live work: each status is counted on
-- its own arm so that each arm can use the partial index that holds exactly its rows, and its
-- cost follows the backlog, not the history. 'sent', 'skipped' and 'dead' are history: no
-- partial index separates them, so counting them would scan every retained record; their rates
-- come from the delivery counters (records_dead_total), and the dead_letters view lists them.

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

-- name: metrics_snapshot
-- Live records per channel and status with the age of the oldest due one ('pending' since it
-- last became pending, 'failed' since its retry came due), then one 'outbox' row: pending rows
-- and the oldest one's age, then the number of paused and of throttled targets, then the
-- operator's pauses. Ages are in seconds on the database clock.
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
WHERE throttled_until > now() OR slowed_until > now()
UNION ALL
-- operator pauses (0013), not the breaker's: the active ones by scope (channel: the scope) with
-- the oldest one's age, those past their end that the maintenance loop has not yet marked
-- resumed, and the records waiting behind the pauses in force. A handful of rows; the
-- records are counted only while something is paused.
SELECT 'operator_pauses', p.scope, NULL, count(*)::bigint,
       max(extract(epoch FROM now() - p.since))::float8
FROM outbox_notifier.pauses p
WHERE p.resumed_at IS NULL
GROUP BY p.scope
UNION ALL
SELECT 'operator_pauses_ended', NULL, NULL, count(*)::bigint, NULL
FROM outbox_notifier.pauses
WHERE resumed_at IS NULL AND until <= now()
UNION ALL
SELECT 'operator_paused_records', NULL, NULL, count(DISTINCT held.id)::bigint, NULL
FROM outbox_notifier.pauses p
CROSS JOIN LATERAL outbox_notifier.records_behind_pause(p) AS held(id)
WHERE p.resumed_at IS NULL AND (p.until IS NULL OR p.until > now());

-- name: end_pauses
-- Marks resumed the operator pauses whose end has passed (claims stopped honouring them at
-- that moment; their records were deferred to it); returns what the log line names. Run by
-- every replica's maintenance loop: the row lock lets one of them log each pause.
UPDATE outbox_notifier.pauses
SET resumed_at = until, resumed_by = 'expired'
WHERE resumed_at IS NULL AND until <= now()
RETURNING id, scope, coalesce(host, 'user ' || user_id, 'provider ' || provider), reason,
          paused_by, since, until;

-- name: xmin_horizon
-- What holds back vacuum of this database's tables, oldest first: sessions with a snapshot or a
-- transaction id (backend_xmin, backend_xid), replication slots' data xmin, prepared
-- transactions; with the age in seconds where there is a clock (a slot has none) and in xids.
--
-- Vacuum keeps every row version a snapshot might still need, so while one holder stays, the
-- daemon's tables grow dead tuples and its claims walk over them. Left out, because they hold
-- nothing back for these tables: this statement's own session; autovacuum workers (vacuum
-- ignores other vacuums' snapshots); sessions of other databases (their snapshots bind only
-- their own database, PostgreSQL >= 14 for data, and the shared catalogs); and a slot's
-- catalog_xmin (it holds back the system catalogs only: a logical slot that falls behind keeps
-- WAL and catalog rows, not the daemon's). A walsender for a standby with hot_standby_feedback
-- and no slot shows as a session of no database. A session's age in seconds counts from its
-- transaction's start (xact_start), an upper bound of its snapshot's age.
--
-- Other roles' sessions show backend_xmin only to superusers and members of
-- pg_read_all_stats: sees_all says whether this role sees them all (else the answer is a
-- lower bound and the daemon reports the horizon as unknown). The holder is described without
-- its query text, which may hold secrets.
WITH holders AS (
    SELECT extract(epoch FROM now() - a.xact_start)::float8 AS age_s,
           greatest(age(a.backend_xmin), age(a.backend_xid))::bigint AS age_xids,
           format('pid %s (user %s, state %s, application_name %s, %s)',
                  a.pid, coalesce(a.usename, '?'), coalesce(a.state, '?'),
                  coalesce(nullif(a.application_name, ''), '-'),
                  CASE WHEN a.xact_start IS NULL THEN a.backend_type
                       ELSE 'transaction started ' || to_char(a.xact_start AT TIME ZONE 'UTC',
                                                              'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                  END) AS holder
    FROM pg_stat_activity a
    WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
      AND a.pid <> pg_backend_pid()
      AND a.backend_type <> 'autovacuum worker'
      AND (a.datid IS NULL OR a.datname = current_database())
    UNION ALL
    SELECT NULL, age(s.xmin)::bigint,
           format('replication slot %s (%s, %s)', s.slot_name, s.slot_type,
                  CASE WHEN s.active THEN 'active pid ' || s.active_pid ELSE 'inactive' END)
    FROM pg_replication_slots s
    WHERE s.xmin IS NOT NULL
    UNION ALL
    SELECT extract(epoch FROM now() - p.prepared)::float8, age(p.transaction)::bigint,
           format('prepared transaction %L (owner %s, prepared %s)', p.gid, p.owner,
                  to_char(p.prepared AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))
    FROM pg_prepared_xacts p
    WHERE p.database = current_database()
)
SELECT pg_has_role('pg_read_all_stats', 'USAGE') AS sees_all,
       coalesce((SELECT max(age_s) FROM holders), 0)::float8 AS age_s,
       coalesce((SELECT max(age_xids) FROM holders), 0)::bigint AS age_xids,
       (SELECT holder FROM holders
        ORDER BY age_xids DESC NULLS LAST, age_s DESC NULLS LAST LIMIT 1) AS holder;

-- name: table_tuples
-- Live and dead row versions of each table of the schema, as the statistics system last
-- counted them (pg_stat_user_tables: updated within a second or so of each change, and by
-- vacuum and analyze). Dead tuples that keep growing while vacuum runs mean a held horizon.
SELECT relname::text, n_live_tup::bigint, n_dead_tup::bigint
FROM pg_stat_user_tables
WHERE schemaname = 'outbox_notifier'
ORDER BY relname;

-- name: analyze_fresh_tables
-- The first ANALYZE of the outbox and the records once they hold min_rows live rows, if
-- autovacuum has not given it yet (migration 0019); one row per table never analyzed before:
-- its name and whether it was analyzed now. Run by every replica's maintenance loop until it
-- returns nothing.
SELECT table_name, analyzed FROM outbox_notifier.analyze_fresh_tables_v1(%(min_rows)s);
