-- 0001: the outbox, notification records, channels, the attempt log and the operator surface.
-- Released migrations are never edited; later changes go into new numbered files.

CREATE SCHEMA IF NOT EXISTS outbox_notifier;

-- The producers' table. Applications insert through outbox_notifier.enqueue() inside their own
-- business transaction; the relay turns each pending row into a notification record.
CREATE TABLE outbox_notifier.outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type    text        NOT NULL,
    event_version text        NOT NULL DEFAULT '1',
    payload       jsonb       NOT NULL,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'relayed', 'rejected')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    relayed_at    timestamptz,
    error         text
);

-- The relay claims the oldest pending rows; finished rows stay out of this index however many
-- accumulate, so the claim stays flat with a large history.
CREATE INDEX outbox_pending_idx ON outbox_notifier.outbox (id) WHERE status = 'pending';
-- Retention deletes finished rows by age.
CREATE INDEX outbox_finished_idx ON outbox_notifier.outbox (created_at) WHERE status <> 'pending';

-- One NOTIFY per inserting statement (not per row): pollers wake at once after the commit, and a
-- bulk insert costs one notification. Notifications are delivered only if the transaction commits.
CREATE FUNCTION outbox_notifier.notify_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_notifier_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox_notifier.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notifier.notify_outbox();

-- The supported way to write an outbox row from any language, inside the caller's transaction.
CREATE FUNCTION outbox_notifier.enqueue(
    event_type text, payload jsonb, event_version text DEFAULT '1'
) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    INSERT INTO outbox_notifier.outbox (event_type, event_version, payload)
    VALUES (enqueue.event_type, enqueue.event_version, enqueue.payload)
    RETURNING id;
$$;

-- Per-user delivery targets. auth_secret is a bearer token or a bot signing secret; the operator
-- views never select it.
CREATE TABLE outbox_notifier.notification_channels (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         bigint      NOT NULL,
    channel         text        NOT NULL DEFAULT 'feishu',
    enabled         boolean     NOT NULL DEFAULT true,
    webhook_url     text        NOT NULL,
    auth_kind       text        NOT NULL DEFAULT 'none'
                    CHECK (auth_kind IN ('none', 'bearer', 'bot_secret')),
    auth_secret     text,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, channel),
    CHECK (auth_kind = 'none' OR auth_secret IS NOT NULL)
);

-- Fencing tokens: every claim of a record takes a fresh value, and a result is applied only while
-- the record still carries the token its worker was given.
CREATE SEQUENCE outbox_notifier.lease_token_seq;

CREATE TABLE outbox_notifier.notification_records (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel                text        NOT NULL,
    user_id                bigint      NOT NULL,
    trigger_id             text        NOT NULL DEFAULT '',
    preview_id             text        NOT NULL,
    trigger_type           text        NOT NULL DEFAULT '',
    target_type            text        NOT NULL DEFAULT '',
    target_id              bigint      NOT NULL DEFAULT 0,
    dedupe_key             text        NOT NULL,
    target_url             text        NOT NULL,
    summary_text           text        NOT NULL DEFAULT '',
    fallback_text          text        NOT NULL DEFAULT '',
    fallback_used          boolean     NOT NULL DEFAULT false,
    status                 text        NOT NULL DEFAULT 'pending'
                           CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'dead', 'skipped')),
    attempt_count          integer     NOT NULL DEFAULT 0,
    max_attempts           integer     NOT NULL DEFAULT 5 CHECK (max_attempts > 0),
    next_retry_at          timestamptz,
    last_error_code        text,
    last_error             text,
    provider_message_id    text,
    provider_request_json  jsonb,
    provider_response_json jsonb,
    sent_at                timestamptz,
    trace_id               text        NOT NULL DEFAULT '',
    -- when the outbox row was written: the start of end-to-end latency
    requested_at           timestamptz,
    outbox_id              bigint,
    -- crash safety: a record in 'sending' belongs to the worker holding lease_token until
    -- lease_expires_at; after that the retry loop takes it back.
    lease_expires_at       timestamptz,
    lease_token            bigint,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notification_records_channel_dedupe_key_key UNIQUE (channel, dedupe_key),
    CHECK (status <> 'sending' OR (lease_expires_at IS NOT NULL AND lease_token IS NOT NULL))
);

-- The claim queries, each on a partial index that holds only the rows it looks for.
-- Pending records may carry next_retry_at as "not before" (held back by pacing or a paused
-- target, without spending an attempt): claims take the undeferred ones first.
CREATE INDEX records_pending_due_idx ON outbox_notifier.notification_records
    (next_retry_at NULLS FIRST, id) WHERE status = 'pending';
CREATE INDEX records_failed_due_idx ON outbox_notifier.notification_records (next_retry_at)
    WHERE status = 'failed';
CREATE INDEX records_sending_lease_idx ON outbox_notifier.notification_records (lease_expires_at)
    WHERE status = 'sending';
-- Operators and retention look for terminal records by age.
CREATE INDEX records_terminal_idx ON outbox_notifier.notification_records (updated_at)
    WHERE status IN ('sent', 'dead', 'skipped');
CREATE INDEX records_user_idx ON outbox_notifier.notification_records (user_id);

-- The audit trail: one row per provider call.
CREATE TABLE outbox_notifier.delivery_attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    record_id       bigint      NOT NULL
                    REFERENCES outbox_notifier.notification_records (id) ON DELETE CASCADE,
    attempt         integer     NOT NULL,
    lease_token     bigint,
    started_at      timestamptz NOT NULL,
    duration_ms     double precision NOT NULL,
    outcome         text        NOT NULL,
    error_code      text,
    http_status     integer,
    response_excerpt text,
    -- false when the result arrived after the lease was taken over and was not applied
    applied         boolean     NOT NULL DEFAULT true
);
CREATE INDEX delivery_attempts_record_idx ON outbox_notifier.delivery_attempts (record_id, attempt);

-- Advisory-lock key of a record: every transition of one (channel, dedupe_key) takes this lock, so
-- loops and replicas never act on one record at once. Operators can take it too to hold a record.
CREATE FUNCTION outbox_notifier.record_lock_key(channel text, dedupe_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtextextended(channel || '|' || dedupe_key, 7244);
$$;

-- Operator views ------------------------------------------------------------------------------

-- Counts and oldest age per status and channel.
CREATE VIEW outbox_notifier.backlog AS
SELECT channel,
       status,
       count(*)                        AS records,
       min(created_at)                 AS oldest_created_at,
       now() - min(created_at)         AS oldest_age,
       min(next_retry_at)              AS next_retry_at
FROM outbox_notifier.notification_records
GROUP BY channel, status;

-- Records that will not be tried again without an operator.
CREATE VIEW outbox_notifier.dead_letters AS
SELECT id, channel, user_id, dedupe_key, attempt_count, max_attempts, last_error_code, last_error,
       trace_id, created_at, updated_at
FROM outbox_notifier.notification_records
WHERE status = 'dead';

-- Records in 'sending', with how long ago their lease expired (negative: still held).
CREATE VIEW outbox_notifier.stuck_sending AS
SELECT id, channel, user_id, dedupe_key, attempt_count, lease_token, lease_expires_at,
       now() - lease_expires_at AS expired_for, updated_at
FROM outbox_notifier.notification_records
WHERE status = 'sending';

-- Operator functions --------------------------------------------------------------------------

-- Sends a dead, failed or skipped record once more: back to pending with a fresh attempt budget.
-- Returns false when the record is missing, sent, in flight, or its lock is held elsewhere.
CREATE FUNCTION outbox_notifier.requeue(record_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    rec outbox_notifier.notification_records%ROWTYPE;
BEGIN
    SELECT * INTO rec FROM outbox_notifier.notification_records WHERE id = record_id FOR UPDATE;
    IF NOT FOUND OR rec.status NOT IN ('dead', 'failed', 'skipped') THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(outbox_notifier.record_lock_key(rec.channel, rec.dedupe_key));
    UPDATE outbox_notifier.notification_records
    SET status = 'pending', attempt_count = 0, next_retry_at = NULL, last_error_code = NULL,
        last_error = NULL, lease_expires_at = NULL, lease_token = NULL, updated_at = now()
    WHERE id = record_id;
    RETURN true;
END;
$$;

-- The bulk requeue of dead records, outbox_notifier.requeue_dead(), is in 0002 beside the one
-- filter it shares with the dry run.
