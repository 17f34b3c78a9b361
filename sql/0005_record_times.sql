-- kind: additive
-- A record keeps both times it is asked about, each under its own name:
-- * requested_at: the producer's own time, from the payload's required `requested_at`;
-- * outbox_created_at: when the outbox row was written (its transaction's time), the start of
--   end-to-end latency.
-- Until now requested_at held the outbox time and the producer's value was dropped. The column
-- is nullable: records written by older daemons have it NULL, and latency then falls back to
-- requested_at, which those daemons filled with the outbox time.
ALTER TABLE outbox_notifier.notification_records
    ADD COLUMN IF NOT EXISTS outbox_created_at timestamptz;

COMMENT ON COLUMN outbox_notifier.notification_records.requested_at IS
    'The producer''s requested_at from the event payload (the outbox time for records written '
    'before migration 0005, where outbox_created_at is NULL).';
COMMENT ON COLUMN outbox_notifier.notification_records.outbox_created_at IS
    'When the outbox row was written: end-to-end latency is measured from here.';
