-- kind: additive
-- 0019: the first ANALYZE of the busy tables, run by the daemon as soon as they have rows.
--
-- On a freshly migrated database the daemon's statements are first planned while the outbox
-- and the records are empty, and those plans are kept: PL/pgSQL functions and prepared
-- statements keep a plan per session until the table's statistics change. A plan made for a
-- table of a few rows reads it whole, through a full index scan where sequential scans are off,
-- and costs more with every row added. Autovacuum gives the tables their first statistics only
-- at its first visit after enough rows changed (autovacuum_naptime, a minute by default, or
-- more), and until then every batch walks whole indexes. Measured at 300 events/s on fresh
-- tables (bench/README.md, *Held snapshot*): applying a batch of results read 3,000 buffers
-- after 20 s and 16,000 after 60 s (86 once analyzed), claiming records 570 then 2,500 (40),
-- and commit-to-delivery p99 climbed to 200 ms, then fell to 30 ms at the first autoanalyze.
--
-- analyze_fresh_tables_v1(p_min_rows) analyzes each of the two tables that was never analyzed
-- (pg_stat_user_tables: no last_analyze and no last_autoanalyze) and holds at least p_min_rows
-- live rows, and returns one row for each of them never analyzed before the call: its name and
-- whether it was analyzed now. ANALYZE invalidates every session's plans on the table, so each
-- statement is planned again at its next call, on the table as it is. The other tables are
-- left to autovacuum: the daemon's hot statements read them by unique key or not at all.
--
-- The daemon calls it from its maintenance loop until no row comes back. It acts with its
-- owner's rights, because ANALYZE needs the table's owner and the daemon's role is not; only
-- the daemon's role may call it. A lock held on a table (a migration, a manual VACUUM, an
-- autovacuum of it, another replica's call) makes it fail after 100 ms rather than wait: the
-- next turn, a second later, tries again, and by then the table has often been analyzed by
-- whoever held the lock. Additive: a new function, which a daemon of an earlier build never
-- calls.

CREATE FUNCTION outbox_notifier.analyze_fresh_tables_v1(p_min_rows bigint)
RETURNS TABLE (table_name text, analyzed boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '100ms'
AS $$
DECLARE
    fresh record;
BEGIN
    FOR fresh IN
        SELECT s.relname::text AS name, s.n_live_tup >= p_min_rows AS due
        FROM pg_stat_user_tables AS s
        WHERE s.schemaname = 'outbox_notifier'
          AND s.relname IN ('outbox', 'notification_records')
          AND s.last_analyze IS NULL AND s.last_autoanalyze IS NULL
        ORDER BY s.relname
    LOOP
        IF fresh.due THEN
            EXECUTE format('ANALYZE outbox_notifier.%I', fresh.name);
        END IF;
        table_name := fresh.name;
        analyzed := fresh.due;
        RETURN NEXT;
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION outbox_notifier.analyze_fresh_tables_v1(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_notifier.analyze_fresh_tables_v1(bigint)
    TO outbox_notifier_daemon;
