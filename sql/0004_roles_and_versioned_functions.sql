-- kind: additive
-- 0004: least-privilege roles with their grants, and the versioned names of the schema
-- functions the daemon calls.
-- Released migrations are never edited; later changes go into new numbered files.

-- Versioned functions -------------------------------------------------------------------------
-- From release 0.2.0 on, the daemon calls the schema functions it needs by a versioned name:
-- claim_outbox_v1 (created in 0010), record_target_results_v1 (0011) and claim_due_v1 (0015).
-- A later migration that must change one adds its _v2 beside the _v1 (additive), the next
-- daemon calls _v2, and daemons still calling _v1 keep working through a rolling upgrade or a
-- rollback; _v1 goes only in a breaking migration once no daemon calls it. 0003's
-- unversioned claim_due and record_target_results are what 0.1.0 daemons call: they stay, so
-- that those daemons keep delivering on the upgraded schema until they are replaced.
-- record_lock_key and target_key are not versioned on purpose: every daemon version must
-- compute the same keys to exclude each other, so changing them is breaking by nature.

-- Roles ---------------------------------------------------------------------------------------
-- Group roles, NOLOGIN: a login role is made a member of one of them (README, "Roles").
-- Roles belong to the whole cluster, not to one database: another database of the cluster may
-- have created them already, even concurrently, so each creation tolerates that. Creating them
-- needs CREATEROLE only the first time.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox_notifier_producer', 'outbox_notifier_daemon',
                             'outbox_notifier_operator'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a migrate of another database
            END;
        END IF;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA outbox_notifier
    TO outbox_notifier_producer, outbox_notifier_daemon, outbox_notifier_operator;

-- Functions that act with their owner's rights, so that a role can be given the function
-- without the table privileges behind it. Their bodies name every object with its schema; the
-- pinned search_path keeps a caller's objects from standing in for pg_catalog's.
ALTER FUNCTION outbox_notifier.enqueue(text, jsonb, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox_notifier.requeue(bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox_notifier.requeue_dead(text, text, timestamptz, timestamptz)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- Functions are executable by PUBLIC by default; for these three that would hand their owner's
-- rights to anyone who can reach the schema.
REVOKE EXECUTE ON FUNCTION outbox_notifier.enqueue(text, jsonb, text),
    outbox_notifier.requeue(bigint),
    outbox_notifier.requeue_dead(text, text, timestamptz, timestamptz)
    FROM PUBLIC;

-- Producers: outbox_notifier.enqueue() and nothing else.
GRANT EXECUTE ON FUNCTION outbox_notifier.enqueue(text, jsonb, text) TO outbox_notifier_producer;

-- The callers of 0.1.0 keep their calls. There, these functions ran with the caller's rights, so
-- a producer role needed INSERT on outbox and an operator role UPDATE on notification_records;
-- the REVOKE above would take enqueue (and requeue) from them the moment this migration
-- commits, failing the application's own transactions until someone grants the new roles.
-- Each role granted those table rights by name keeps EXECUTE on the functions it could call
-- (granted by the functions' owner, who runs migrate: no CREATEROLE needed). The table rights
-- alone already let such a role write the rows these functions write, so this gives nothing
-- new. A grant to PUBLIC is not carried over (that would undo the REVOKE): a warning says so.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee, c.relname
        FROM pg_catalog.pg_class c, aclexplode(c.relacl) a
        WHERE (c.oid, a.privilege_type) IN (('outbox_notifier.outbox'::regclass, 'INSERT'),
                                            ('outbox_notifier.notification_records'::regclass,
                                             'UPDATE'))
          AND a.grantee <> c.relowner
    LOOP
        IF r.grantee = 0 THEN
            RAISE WARNING 'PUBLIC may write %, but outbox_notifier''s functions are no longer '
                          'executable by PUBLIC: grant outbox_notifier_producer (enqueue) or '
                          'outbox_notifier_operator (requeue) to the roles that call them',
                          r.relname;
        ELSIF r.relname = 'outbox' THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION outbox_notifier.enqueue(text, jsonb, text) '
                           'TO %s', r.grantee::regrole);
        ELSE
            EXECUTE format('GRANT EXECUTE ON FUNCTION outbox_notifier.requeue(bigint), '
                           'outbox_notifier.requeue_dead(text, text, timestamptz, timestamptz) '
                           'TO %s', r.grantee::regrole);
        END IF;
    END LOOP;
END
$$;

-- The daemon: exactly what its statements need (sql/queries.sql, sql/metrics.sql, the
-- retention and lease statements of sql/operator.sql), statement by statement:
-- * relay: claim_outbox reads and row-locks the outbox (FOR UPDATE needs UPDATE), relay_outbox
--   inserts records and marks outbox rows; retention deletes finished outbox rows;
GRANT SELECT, UPDATE, DELETE ON outbox_notifier.outbox TO outbox_notifier_daemon;
-- * records: claims, results, lease rescue, retention (their attempts go by ON DELETE CASCADE,
--   which runs with the table owner's rights);
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_notifier.notification_records
    TO outbox_notifier_daemon;
-- * channels: read by claims (the secret signs or authorises the call); on 410 Gone a channel
--   is switched off, which touches these three columns only;
GRANT SELECT ON outbox_notifier.notification_channels TO outbox_notifier_daemon;
GRANT UPDATE (enabled, disabled_reason, updated_at) ON outbox_notifier.notification_channels
    TO outbox_notifier_daemon;
-- * the audit trail is written, never read or changed;
GRANT INSERT ON outbox_notifier.delivery_attempts TO outbox_notifier_daemon;
-- * pacing and protection state, maintenance leadership;
GRANT SELECT, INSERT, UPDATE ON outbox_notifier.targets TO outbox_notifier_daemon;
GRANT SELECT, INSERT, UPDATE ON outbox_notifier.maintenance_leases TO outbox_notifier_daemon;
-- * fencing tokens (nextval in the claims);
GRANT USAGE ON SEQUENCE outbox_notifier.lease_token_seq TO outbox_notifier_daemon;
-- * the compatibility check at start-up and in /readyz.
GRANT SELECT ON outbox_notifier.schema_migrations TO outbox_notifier_daemon;
-- The functions it calls (the claims and record_target_results of 0003 and of the later
-- migrations, record_lock_key, target_key) keep PostgreSQL's default EXECUTE for PUBLIC: they
-- run with the caller's rights, so the grants above decide what they may touch.

-- Operators: the views, the requeue functions, every table read-only except the channels'
-- webhook_url and auth_secret (a bot's URL carries its token).
GRANT SELECT ON outbox_notifier.backlog, outbox_notifier.dead_letters,
    outbox_notifier.stuck_sending, outbox_notifier.target_health
    TO outbox_notifier_operator;
GRANT SELECT ON outbox_notifier.outbox, outbox_notifier.notification_records,
    outbox_notifier.delivery_attempts, outbox_notifier.targets,
    outbox_notifier.maintenance_leases, outbox_notifier.schema_migrations
    TO outbox_notifier_operator;
GRANT SELECT (id, user_id, channel, enabled, auth_kind, disabled_reason, created_at, updated_at,
              provider)
    ON outbox_notifier.notification_channels TO outbox_notifier_operator;
GRANT EXECUTE ON FUNCTION outbox_notifier.requeue(bigint),
    outbox_notifier.requeue_dead(text, text, timestamptz, timestamptz)
    TO outbox_notifier_operator;
