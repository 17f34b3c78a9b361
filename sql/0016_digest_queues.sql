-- kind: additive
-- 0016: the digest queues as an operator sees them. A chat-bot record that waits for a slot of
-- its target over its budget joins the target's queue (0015); until now nothing but the
-- records' own columns showed why such a record stays pending. The view digest_queues has one
-- row per target with a queue: how many records wait, how many are in the call in flight, how
-- long the oldest has waited, and whether the target is paused by its breaker. The target is
-- named by its key (md5 of the URL), provider and host (targets), never its URL, so the
-- operator role may read it. `outbox-notifier status` shows it under "waiting for a digest".
--
-- Reads only the partial index records_digest_queue_idx (its predicate is the view's filter):
-- one short scan however large the records table is.
--
-- Additive: a new view; no daemon's statement changes.

CREATE VIEW outbox_notifier.digest_queues AS
SELECT q.target_key, t.provider, t.host, q.waiting, q.sending, q.oldest_age,
       coalesce(t.paused_until > now(), false) AS breaker_open
FROM (
    SELECT r.digest_target AS target_key,
           count(*) FILTER (WHERE r.status = 'pending') AS waiting,
           count(*) FILTER (WHERE r.status = 'sending') AS sending,
           now() - min(coalesce(r.outbox_created_at, r.created_at)) AS oldest_age
    FROM outbox_notifier.notification_records r
    WHERE r.digest_target IS NOT NULL AND r.status IN ('pending', 'sending')
    GROUP BY r.digest_target
) q
LEFT JOIN outbox_notifier.targets t ON t.target_key = q.target_key;

GRANT SELECT ON outbox_notifier.digest_queues TO outbox_notifier_operator;
