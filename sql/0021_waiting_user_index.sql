-- kind: additive
-- 0021: the records' index by recipient holds only the records still waiting.
--
-- records_user_idx (0001) indexed every record by user_id. A record is written three times
-- (relay, claim, result), none of them a HOT update (its status is in the predicates of the
-- claims' partial indexes), so each version took an entry: three entries a delivered record,
-- 196 B of its WAL (of 3,866) and three index insertions of CPU, measured with the bench's
-- footprint drain (bench/README.md, *Footprint*). What reads records by recipient is the
-- pauses' records_behind_pause (0013), for a recipient and for a target (through the
-- recipient's channel), and it reads only pending and failed records.
--
-- records_waiting_user_idx indexes those alone, by (user_id, channel): a record takes an entry
-- when the relay writes it, and again only if it fails. records_user_idx goes: no daemon's
-- statement (of this build or an earlier one) names it, and what it served, a pause's lookup,
-- the new index serves as well (a replay by user reads terminal records by time through
-- records_terminal_idx). An operator's ad hoc query for every record of one user now reads
-- the table; the backlog of one user is still an index lookup:
--   SELECT * FROM outbox_notifier.notification_records
--   WHERE user_id = 42 AND status IN ('pending', 'failed');
--
-- Building the index reads the records table once, and writes to it wait meanwhile (as for
-- the indexes of 0013 and 0015): run migrate when a pause of that length is acceptable.
-- Additive: an index replaced by one that serves the same statements; no daemon's statement
-- changes.
CREATE INDEX records_waiting_user_idx ON outbox_notifier.notification_records (user_id, channel)
    WHERE status IN ('pending', 'failed');
DROP INDEX outbox_notifier.records_user_idx;
