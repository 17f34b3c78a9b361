-- kind: additive
-- 0012: the producer's W3C trace context travels with the outbox row and its record.
--
-- A producer with a span open hands its context to enqueue in the same call (the overload
-- below, with the traceparent and tracestate headers of W3C Trace Context as text); it is kept
-- in the outbox row, copied to the record by the relay, and the daemon's delivery spans take it
-- as their parent and link (README, "Tracing"). This is the shape of Debezium's outbox router,
-- which reads the span context from a column of its own beside the payload: trace context is
-- transport metadata, not part of the event, so the event contract is unchanged.
--
-- A record's traceparent is the trace its deliveries belong to: the producer's context, or,
-- when there was none, the context of the record's first traced attempt (apply_results keeps
-- the first one written), so that the retries of one record are children of its first attempt,
-- in one trace.
--
-- A malformed context must not cost the producer its business transaction, nor the notification:
-- enqueue keeps the row and drops the context (NULL) with a WARNING that says why. A row
-- inserted directly with a malformed value is ignored by the daemon the same way (with a log
-- line). So there is no CHECK constraint here.
--
-- Additive: the columns are nullable without default (no rewrite); enqueue(text, jsonb, text)
-- is unchanged and older producers keep calling it; daemons of earlier releases neither read
-- nor write the new columns.
ALTER TABLE outbox_notifier.outbox
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate  text;
ALTER TABLE outbox_notifier.notification_records
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate  text;

COMMENT ON COLUMN outbox_notifier.outbox.traceparent IS
    'The producer''s W3C traceparent, when it handed one to enqueue.';
COMMENT ON COLUMN outbox_notifier.notification_records.traceparent IS
    'The trace of this record''s deliveries: the producer''s W3C traceparent, else that of the '
    'first traced attempt.';

-- enqueue with the producer's trace context: the 3-argument enqueue plus traceparent (required
-- here, so that a call with 2 or 3 arguments still resolves to the original alone) and an
-- optional tracestate. traceparent follows W3C Trace Context level 1: version 00 is exactly
-- 55 characters; a later version may append fields; lowercase hex, ids not all zero, version
-- ff invalid. tracestate is kept only beside a valid traceparent, and only up to 512
-- characters of visible ASCII (what the recommendation says a vendor must propagate).
CREATE FUNCTION outbox_notifier.enqueue(
    event_type text, payload jsonb, event_version text, traceparent text,
    tracestate text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_parent text := nullif(btrim(enqueue.traceparent), '');
    v_state text := nullif(btrim(enqueue.tracestate), '');
    v_id bigint;
BEGIN
    IF v_parent IS NOT NULL AND NOT (
        length(v_parent) <= 256
        AND v_parent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$'
        AND left(v_parent, 2) <> 'ff'
        AND (left(v_parent, 2) <> '00' OR length(v_parent) = 55)
        AND substr(v_parent, 4, 32) <> repeat('0', 32)
        AND substr(v_parent, 37, 16) <> repeat('0', 16)
    ) THEN
        RAISE WARNING 'outbox_notifier.enqueue: traceparent ignored (not a W3C traceparent, '
            'e.g. 00-<32 hex trace id>-<16 hex span id>-01); the event is enqueued without it';
        v_parent := NULL;
    END IF;
    IF v_parent IS NULL THEN
        v_state := NULL;
    ELSIF v_state IS NOT NULL AND (length(v_state) > 512 OR v_state !~ '^[\x20-\x7e]*$') THEN
        RAISE WARNING 'outbox_notifier.enqueue: tracestate ignored (over 512 characters or not '
            'printable ASCII); the event is enqueued with its traceparent';
        v_state := NULL;
    END IF;
    INSERT INTO outbox_notifier.outbox (event_type, event_version, payload, traceparent, tracestate)
    VALUES (enqueue.event_type, enqueue.event_version, enqueue.payload, v_parent, v_state)
    RETURNING id INTO v_id;
    RETURN v_id;
END;
$$;

-- As for the original enqueue (0004): its owner's rights, so producers only ever get EXECUTE.
REVOKE EXECUTE ON FUNCTION outbox_notifier.enqueue(text, jsonb, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_notifier.enqueue(text, jsonb, text, text, text)
    TO outbox_notifier_producer;

-- The trace contexts of claimed records, for a daemon that traces (sql/queries.sql,
-- claim_records_traced): the delivery claim returns no trace context, so that a daemon that
-- does not trace pays nothing, and one that does reads the contexts beside the claim in the
-- same statement. VOLATILE on purpose: its query takes a fresh snapshot after the claim ran,
-- and so sees every record the claim just took (one committed after the calling statement
-- began included); a STABLE function would read the caller's older snapshot. Caller's rights,
-- PostgreSQL's default EXECUTE (0004): the daemon's SELECT on the records decides.
CREATE FUNCTION outbox_notifier.trace_contexts_v1(p_ids bigint[])
RETURNS TABLE (id bigint, traceparent text, tracestate text)
LANGUAGE sql VOLATILE AS $$
    SELECT r.id, r.traceparent, r.tracestate
    FROM outbox_notifier.notification_records r
    WHERE r.id = ANY (p_ids) AND r.traceparent IS NOT NULL;
$$;
