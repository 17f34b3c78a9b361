-- kind: additive
-- 0008: a cheaper delivery claim for the common case.
--
-- Three changes to the delivery claim (claim_due_v1, created in 0015), measured with the
-- database-side benchmark (bench/README.md):
-- * Reading all of the batch's targets on every claim to find the paced, failing or paused ones
--   cost a tenth of the database side's throughput. The claim first asks whether any
--   candidate's provider is paced, and looks for targets in trouble in a partial index that is
--   empty while every target is healthy; only when either finds one does it lock targets and
--   budget them. targets_attention_idx, below, holds failing or paused targets; the claim reads
--   targets_trouble_idx (0009), which also holds open breakers, throttled and slowed targets.
-- * One lease token per claim instead of one per record: a token only has to differ from the
--   tokens of every other claim, which nextval() ensures.
-- * The claiming UPDATE returns the columns the result needs, not the whole row.
--
-- Additive: an index. It is built in the migration's transaction (not CONCURRENTLY): targets
-- holds one row per webhook URL, and the build takes a moment's SHARE lock that claims
-- (readers) pass and result writes wait out.
CREATE INDEX targets_attention_idx ON outbox_notifier.targets (target_key)
    WHERE consecutive_failures > 0 OR paused_until IS NOT NULL;
