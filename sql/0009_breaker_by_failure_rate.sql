-- kind: additive
-- 0009: the breaker opens on a failure rate keyed on the calls' start times; a 429 slows its
-- target instead of counting against it.
--
-- 0.1.0's breaker (0003's record_target_results) counts consecutive failures in the order
-- batches of results arrive. Under concurrency that is not the order of the calls: a fast 5xx
-- lands before the slower successes that started beside it, and failure-only batches of several
-- replicas add up to breaker_failures before any success resets them (5% random 5xx paused a
-- healthy target 41 times in 10,000 events, three replicas). A call's outcome is now counted in
-- the second its call started (on the database clock), in a window of the last p_window_s
-- seconds kept on the target row: whatever order the results arrive in, they land in the same
-- buckets. The target pauses when the window holds at least p_min_calls calls, at least
-- p_min_failures of them failed (the breaker_failures setting) and the failures reach
-- p_failure_ratio of the calls. A target that is down fails every call and pauses as soon as
-- p_min_calls calls have failed, within the first wave of calls to it (a wave is up to
-- delivery_concurrency calls per replica); 5% random failures would need p_min_calls calls to
-- fail before a single success lands, which is why successes are counted too.
--
-- A success is therefore written to its target's row (0.1.0's breaker writes only failures):
-- one row per target per batch of results, whose columns no index holds, so the update is HOT.
-- The bookkeeping is record_target_results_v1, created in 0011, which also leaves the row of a
-- target at rest unwritten (its window then starts at its first failure: see there). Claims do
-- not read the window: a claim of healthy targets takes 0008's cheap path.
--
-- A 429 (provider_rate_limited, which includes the bots' "frequency limited" replies) is not a
-- failure of the endpoint but its pacing: it is not counted in the window; it throttles the
-- target until its Retry-After (at least 1 s, at most retry_after_max_s), then one probe call
-- is let through at a time until a reply that is not a 429 lifts the throttle, and the target's
-- budget stays halved for p_slowdown_s (a target without a budget gets p_slow_per_s calls a
-- second). Records waiting for a throttled target are deferred without spending an attempt, as
-- for pacing; paused_until and paused_targets are left to the breaker alone.
--
-- The delivery claim, claim_due_v1 (created in 0015), acts on these columns: the breaker's
-- pause and probe follow breaker_open, a throttled target takes no call until its Retry-After,
-- then one probe at a time, and a slowed one half its budget (p_slow_per_s a second when its
-- provider has none).
--
-- Additive: 0.1.0's claim_due and record_target_results read and write only the columns they
-- knew, and a pause either release's breaker sets is honoured by both releases' claims. The new
-- columns have defaults, so the ALTERs rewrite nothing.
ALTER TABLE outbox_notifier.targets
    ADD COLUMN window_seconds   timestamptz[] NOT NULL DEFAULT '{}',
    ADD COLUMN window_calls     integer[]     NOT NULL DEFAULT '{}',
    ADD COLUMN window_failures  integer[]     NOT NULL DEFAULT '{}',
    ADD COLUMN breaker_open     boolean       NOT NULL DEFAULT false,
    ADD COLUMN breaker_opened_at timestamptz,
    ADD COLUMN throttled_at     timestamptz,
    ADD COLUMN throttled_until  timestamptz,
    ADD COLUMN slowed_until     timestamptz;

-- Targets the delivery claim must lock and budget: failing or paused ones, open breakers,
-- throttled and slowed targets. Empty while every target is healthy. It is built in the
-- migration's transaction (not CONCURRENTLY): targets holds one row per webhook URL, and the
-- build takes a moment's SHARE lock that claims (readers) pass and result writes wait out.
CREATE INDEX targets_trouble_idx ON outbox_notifier.targets (target_key)
    WHERE consecutive_failures > 0 OR paused_until IS NOT NULL OR breaker_open
          OR throttled_until IS NOT NULL OR slowed_until IS NOT NULL;

-- Targets that are paused now, or have failed recently; now also with their window's calls and
-- failures, and whether they are throttled (by 429s) or slowed.
CREATE OR REPLACE VIEW outbox_notifier.target_health AS
SELECT target_key, provider, host, consecutive_failures, paused_until,
       paused_until > now() AS paused, last_error_code, updated_at,
       cardinality(recent_sends) AS recent_sends,
       (SELECT coalesce(sum(n), 0)::integer FROM unnest(window_calls) n) AS window_calls,
       (SELECT coalesce(sum(n), 0)::integer FROM unnest(window_failures) n) AS window_failures,
       breaker_open, throttled_until,
       coalesce(throttled_until > now() OR slowed_until > now(), false) AS throttled,
       slowed_until
FROM outbox_notifier.targets;
