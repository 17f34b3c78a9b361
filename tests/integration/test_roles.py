"""The least-privilege roles of 0004, used through login roles that have one of them only.

Roles belong to the cluster, not to a database: the group roles already exist when another
test's database was migrated first, and each login role here has a unique name and is dropped.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox_notifier import migrations, sqlfiles
from outbox_notifier.daemon import Daemon
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.support import add_channel, enqueue, eventually, payload, running, scalar, settings_for

LoginAs = Callable[[str], str]


@pytest.fixture
def login_as(db: str) -> Iterator[LoginAs]:
    """Makes a login role that is a member of one group role only; returns its DSN."""
    made: list[str] = []

    def make(group: str) -> str:
        name = f"on_login_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(db, autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(name), sql.Identifier(group)
                )
            )
        made.append(name)
        return psycopg.conninfo.make_conninfo(db, user=name)

    yield make
    with psycopg.connect(db, autocommit=True) as admin:
        for name in made:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_roles_are_group_roles_that_cannot_log_in(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles"
        " WHERE rolname LIKE 'outbox\\_notifier\\_%' ORDER BY rolname"
    ).fetchall()
    assert rows == [
        (f"outbox_notifier_{r}", False, False, False, False)
        for r in ("daemon", "operator", "producer")
    ]


async def test_daemon_delivers_as_a_login_role_with_only_the_daemon_role(
    db: str,
    conn: psycopg.Connection[Any],
    login_as: LoginAs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = login_as("outbox_notifier_daemon")
    async with FeishuServer() as server:
        add_channel(conn, 1, server.flow_url("alice"))
        add_channel(conn, 2, server.url + "/hooks/gone", provider="webhook")
        server.script("/hooks/gone", [], then=Reply(status=410))
        enqueue(conn, payload("roles-sent", user_id=1))
        enqueue(conn, payload("roles-gone", user_id=2))
        enqueue(conn, {"user_id": 0})  # rejected by validation
        # a record whose worker died mid-call (lease expired) and a month-old sent record
        # with its attempt log, for the rescue loop and retention
        conn.execute(
            "INSERT INTO outbox_notifier.notification_records (channel, user_id, preview_id,"
            " dedupe_key, target_url, status, attempt_count, lease_expires_at, lease_token)"
            " VALUES ('feishu', 1, 'p', 'roles-stuck', '/x', 'sending', 1,"
            " now() - interval '1 minute', 1)"
        )
        old = scalar(
            conn,
            "INSERT INTO outbox_notifier.notification_records (channel, user_id, preview_id,"
            " dedupe_key, target_url, status, updated_at)"
            " VALUES ('feishu', 1, 'p', 'roles-old', '/x', 'sent', now() - interval '40 days')"
            " RETURNING id",
        )
        conn.execute(
            "INSERT INTO outbox_notifier.delivery_attempts (record_id, attempt, started_at,"
            " duration_ms, outcome) VALUES (%s, 1, now() - interval '40 days', 1, 'success')",
            (old,),
        )

        def status(key: str) -> str | None:
            row = conn.execute(
                "SELECT status FROM outbox_notifier.notification_records WHERE dedupe_key = %s",
                (key,),
            ).fetchone()
            return None if row is None else str(row[0])

        settings = settings_for(dsn, records_retention_s=86400.0)
        with caplog.at_level(logging.INFO):
            async with running(Daemon(settings)):
                await eventually(lambda: status("roles-sent") == "sent", what="sent")
                await eventually(lambda: status("roles-gone") == "dead", what="dead on 410")
                await eventually(lambda: status("roles-stuck") == "failed", what="rescued")
                await eventually(lambda: status("roles-old") is None, what="purged")
                await eventually(
                    lambda: (
                        scalar(conn, "SELECT count(*) FROM outbox_notifier.maintenance_leases") == 1
                    ),
                    what="the maintenance lease taken",
                )
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.outbox WHERE status = 'pending'") == 0
    assert (
        scalar(conn, "SELECT enabled FROM outbox_notifier.notification_channels WHERE user_id = 2")
        is False
    )
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.delivery_attempts") >= 3
    assert "permission denied" not in caplog.text
    assert "InsufficientPrivilege" not in caplog.text


def test_the_daemon_role_cannot_touch_what_the_loops_do_not_need(
    conn: psycopg.Connection[Any], login_as: LoginAs
) -> None:
    add_channel(conn, 1, "http://127.0.0.1/hooks/x", auth_kind="bearer", secret="s3cret")
    with psycopg.connect(login_as("outbox_notifier_daemon"), autocommit=True) as daemon:
        for statement in (
            "UPDATE outbox_notifier.notification_channels SET webhook_url = 'http://evil'",
            "DELETE FROM outbox_notifier.notification_channels",
            "SELECT * FROM outbox_notifier.delivery_attempts",
            "DELETE FROM outbox_notifier.delivery_attempts",
            "INSERT INTO outbox_notifier.outbox (event_type, payload) VALUES ('t', '{}')",
            "SELECT outbox_notifier.requeue(1)",
            "DELETE FROM outbox_notifier.schema_migrations",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                daemon.execute(statement)


def test_producer_can_enqueue_and_nothing_else(
    conn: psycopg.Connection[Any], login_as: LoginAs
) -> None:
    add_channel(conn, 1, "http://127.0.0.1/hooks/x", auth_kind="bearer", secret="s3cret")
    with psycopg.connect(login_as("outbox_notifier_producer"), autocommit=True) as producer:
        outbox_id = enqueue(producer, payload("from-producer"))
        for statement in (
            "SELECT * FROM outbox_notifier.notification_channels",
            "SELECT user_id FROM outbox_notifier.notification_channels",
            "SELECT * FROM outbox_notifier.outbox",
            "SELECT * FROM outbox_notifier.notification_records",
            "SELECT * FROM outbox_notifier.backlog",
            "SELECT outbox_notifier.requeue(1)",
            "INSERT INTO outbox_notifier.outbox (event_type, payload) VALUES ('t', '{}')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                producer.execute(statement)
    row = conn.execute(
        "SELECT payload ->> 'dedupe_key', status FROM outbox_notifier.outbox WHERE id = %s",
        (outbox_id,),
    ).fetchone()
    assert row == ("from-producer", "pending")


def test_operator_can_read_and_requeue_but_not_see_secrets_or_write(
    db: str, conn: psycopg.Connection[Any], login_as: LoginAs
) -> None:
    add_channel(conn, 1, "http://127.0.0.1/hooks/x", auth_kind="bearer", secret="s3cret")
    dead = scalar(
        conn,
        "INSERT INTO outbox_notifier.notification_records (channel, user_id, preview_id,"
        " dedupe_key, target_url, status, attempt_count, last_error_code)"
        " VALUES ('feishu', 1, 'p', 'op-dead', '/x', 'dead', 5, 'provider_5xx') RETURNING id",
    )
    dsn = login_as("outbox_notifier_operator")
    with psycopg.connect(dsn, autocommit=True) as operator:
        assert operator.execute("SELECT count(*) FROM outbox_notifier.dead_letters").fetchone() == (
            1,
        )
        assert operator.execute(
            "SELECT user_id, enabled, auth_kind FROM outbox_notifier.notification_channels"
        ).fetchall() == [(1, True, "bearer")]
        assert operator.execute("SELECT outbox_notifier.requeue(%s)", (dead,)).fetchone() == (True,)
        for statement in (
            "SELECT auth_secret FROM outbox_notifier.notification_channels",
            "SELECT webhook_url FROM outbox_notifier.notification_channels",
            "SELECT * FROM outbox_notifier.notification_channels",
            "UPDATE outbox_notifier.notification_records SET status = 'sent'",
            "DELETE FROM outbox_notifier.delivery_attempts",
            "SELECT outbox_notifier.enqueue('t', '{}')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                operator.execute(statement)
    assert (
        scalar(
            conn, "SELECT status FROM outbox_notifier.notification_records WHERE id = %s", (dead,)
        )
        == "pending"
    )
    # The operator commands work with this role too.
    for args in (["status"], ["requeue", "--channel", "feishu", "--dry-run"]):
        proc = subprocess.run(
            [sys.executable, "-m", "outbox_notifier", *args, "--dsn", dsn],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_readme_role_statements_make_login_roles_of_one_group_each(
    conn: psycopg.Connection[Any],
) -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    match = re.search(r"<!-- roles-sql: [^>]*-->\s*```sql\n(.*?)```", text, re.S)
    assert match, "README has no roles-sql block"
    statements = [s.strip() for s in match.group(1).split(";") if s.strip()]
    names = [re.match(r"CREATE ROLE (\w+)", s).group(1) for s in statements]  # type: ignore[union-attr]
    try:
        for statement in statements:
            conn.execute(statement.encode())
        rows = conn.execute(
            "SELECT r.rolname, r.rolcanlogin, array_agg(g.rolname ORDER BY g.rolname)"
            " FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid"
            " JOIN pg_roles g ON g.oid = m.roleid WHERE r.rolname = ANY(%s)"
            " GROUP BY r.rolname, r.rolcanlogin ORDER BY r.rolname",
            (names,),
        ).fetchall()
        assert rows == [
            ("notifier_daemon", True, ["outbox_notifier_daemon"]),
            ("notifier_operator", True, ["outbox_notifier_operator"]),
            ("shop_app", True, ["outbox_notifier_producer"]),
        ]
    finally:
        for name in names:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_migrate_works_as_a_schema_owner_that_is_not_a_superuser(empty_db: str) -> None:
    # The admin DSN of a managed database is rarely a superuser: the database's owner, with
    # CREATEROLE, must be enough (the group roles already exist in this cluster).
    owner = f"on_owner_{uuid.uuid4().hex[:10]}"
    dbname = psycopg.conninfo.conninfo_to_dict(empty_db)["dbname"]
    assert isinstance(dbname, str)
    with psycopg.connect(empty_db, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(sql.Identifier(owner)))
        admin.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(dbname), sql.Identifier(owner)
            )
        )
        try:
            applied = migrations.migrate(psycopg.conninfo.make_conninfo(empty_db, user=owner))
            assert applied == [m.name for m in sqlfiles.migrations()]
            assert (
                scalar(
                    admin,
                    "SELECT pg_get_userbyid(p.proowner) FROM pg_proc p"
                    " WHERE p.oid = 'outbox_notifier.claim_due_v1'::regproc",
                )
                == owner
            )
            assert scalar(
                admin,
                "SELECT has_table_privilege('outbox_notifier_daemon',"
                " 'outbox_notifier.delivery_attempts', 'INSERT')",
            )
        finally:
            admin.execute(sql.SQL("REASSIGN OWNED BY {} TO postgres").format(sql.Identifier(owner)))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(owner)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(owner)))


def _grants(conn: psycopg.Connection[Any], role: str) -> set[tuple[str, str]]:
    """(object, privilege) of every table, column, sequence and function grant to ``role``
    in schema outbox_notifier; column grants as table(column)."""
    rows = conn.execute(
        """
        SELECT table_name, privilege_type FROM information_schema.role_table_grants
        WHERE grantee = %(r)s AND table_schema = 'outbox_notifier'
        UNION ALL
        SELECT table_name || '(' || column_name || ')', privilege_type
        FROM information_schema.column_privileges
        WHERE grantee = %(r)s AND table_schema = 'outbox_notifier'
          AND (table_name, privilege_type) NOT IN (
              SELECT table_name, privilege_type FROM information_schema.role_table_grants
              WHERE grantee = %(r)s AND table_schema = 'outbox_notifier')
        UNION ALL
        SELECT c.relname, p.privilege_type
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
             aclexplode(c.relacl) p
        WHERE n.nspname = 'outbox_notifier' AND c.relkind = 'S'
          AND p.grantee = %(r)s::regrole
        UNION ALL
        SELECT f.proname, p.privilege_type
        FROM pg_proc f JOIN pg_namespace n ON n.oid = f.pronamespace,
             aclexplode(f.proacl) p
        WHERE n.nspname = 'outbox_notifier' AND p.grantee = %(r)s::regrole
        """,
        {"r": role},
    ).fetchall()
    return {(obj, priv) for obj, priv in rows}


def test_each_role_has_exactly_its_grants(conn: psycopg.Connection[Any]) -> None:
    # The least-privilege contract, written out: a migration that grants more (or less) must
    # change this list too, in review.
    both = {"SELECT", "INSERT", "UPDATE"}
    assert _grants(conn, "outbox_notifier_daemon") == {
        *{("outbox", p) for p in ("SELECT", "UPDATE", "DELETE")},
        *{("notification_records", p) for p in (*both, "DELETE")},
        ("notification_channels", "SELECT"),
        *{(f"notification_channels({c})", "UPDATE")
          for c in ("enabled", "disabled_reason", "updated_at")},
        ("delivery_attempts", "INSERT"),
        *{("targets", p) for p in both},
        *{("maintenance_leases", p) for p in both},
        ("schema_migrations", "SELECT"),
        ("lease_token_seq", "USAGE"),
        ("message_id_seq", "USAGE"),  # 0015: one id per digest call
        # 0013: claims read the operator's pauses, maintenance marks an ended one resumed
        ("pauses", "SELECT"),
        *{(f"pauses({c})", "UPDATE") for c in ("resumed_at", "resumed_by")},
        ("records_behind_pause", "EXECUTE"),
        # 0019: the busy tables' first ANALYZE, with the function owner's rights
        ("analyze_fresh_tables_v1", "EXECUTE"),
    }  # fmt: skip
    assert _grants(conn, "outbox_notifier_producer") == {("enqueue", "EXECUTE")}
    readable = ("backlog", "dead_letters", "stuck_sending", "target_health", "outbox",
                "notification_records", "delivery_attempts", "targets", "maintenance_leases",
                "schema_migrations", "digest_messages", "digest_queues")  # fmt: skip
    channel_columns = ("id", "user_id", "channel", "enabled", "auth_kind", "disabled_reason",
                       "created_at", "updated_at", "provider")  # fmt: skip
    assert _grants(conn, "outbox_notifier_operator") == {
        *{(name, "SELECT") for name in readable},
        *{(f"notification_channels({c})", "SELECT") for c in channel_columns},
        ("requeue", "EXECUTE"),
        ("requeue_dead", "EXECUTE"),
        ("replay_v1", "EXECUTE"),
        ("replay_matching_v1", "EXECUTE"),
        # 0013: operator pauses
        ("pauses", "SELECT"),
        ("paused", "SELECT"),
        ("pause_v1", "EXECUTE"),
        ("resume_v1", "EXECUTE"),
        ("records_behind_pause", "EXECUTE"),
    }


REPLAY_SQL = (
    "SELECT * FROM outbox_notifier.replay_v1(now() - interval '1 hour', now(), NULL, NULL,"
    " NULL, NULL, 'the receiver lost it', 10, 100)"
)
REPLAY_MATCHING_SQL = (
    "SELECT id FROM outbox_notifier.replay_matching_v1(now() - interval '1 hour', now(), NULL,"
    " NULL, %s, NULL, 10)"
)


def test_the_operator_can_replay_and_the_producer_and_daemon_cannot(
    db: str, conn: psycopg.Connection[Any], login_as: LoginAs
) -> None:
    url = "http://127.0.0.1/hooks/secret-token"
    add_channel(conn, 1, url, provider="webhook")
    sent = scalar(
        conn,
        "INSERT INTO outbox_notifier.notification_records (channel, user_id, preview_id,"
        " dedupe_key, target_url, status, attempt_count, sent_at)"
        " VALUES ('feishu', 1, 'p', 'op-sent', '/x', 'sent', 1, now()) RETURNING id",
    )
    for role in ("outbox_notifier_producer", "outbox_notifier_daemon"):
        with psycopg.connect(login_as(role), autocommit=True) as other:
            for statement, params in ((REPLAY_SQL, ()), (REPLAY_MATCHING_SQL, (url,))):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    other.execute(statement, params)
    dsn = login_as("outbox_notifier_operator")
    with psycopg.connect(dsn, autocommit=True) as operator:
        # the target filter reads the webhook URL the role itself may not select
        assert operator.execute(REPLAY_MATCHING_SQL, (url,)).fetchall() == [(sent,)]
        assert operator.execute(REPLAY_SQL).fetchall() == [(sent,)]
    assert (
        scalar(
            conn,
            "SELECT status || ' ' || replay_reason FROM outbox_notifier.notification_records",
        )
        == "failed the receiver lost it"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "outbox_notifier", "replay", "--since", "1h", "--until", "0s",
         "--reason", "again", "--target", url, "--dry-run", "--dsn", dsn],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not touched: 1 record of the range is not sent or dead (1 failed)" in proc.stdout
    assert "secret-token" not in proc.stdout + proc.stderr


def test_the_operator_role_pauses_and_resumes_and_the_producer_cannot(
    conn: psycopg.Connection[Any], login_as: LoginAs
) -> None:
    add_channel(conn, 1, "https://down.example/flow/api/trigger-webhook/t")
    operator_dsn, producer_dsn = (
        login_as("outbox_notifier_operator"),
        login_as("outbox_notifier_producer"),
    )
    pause = "SELECT outbox_notifier.pause_v1('maintenance', p_user_id => 1)"
    with psycopg.connect(producer_dsn, autocommit=True) as producer:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            producer.execute(pause)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            producer.execute("SELECT * FROM outbox_notifier.paused")
    with psycopg.connect(operator_dsn, autocommit=True) as operator:
        operator.execute(pause)
        row = operator.execute("SELECT paused_by, records_waiting FROM outbox_notifier.paused")
        assert row.fetchall() == [(psycopg.conninfo.conninfo_to_dict(operator_dsn)["user"], 0)]
        # the pause is the functions' to write, not the operator's by hand
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            operator.execute("UPDATE outbox_notifier.pauses SET reason = 'x'")
        assert scalar(operator, "SELECT outbox_notifier.resume_v1(p_user_id => 1)") == 0
    with (
        psycopg.connect(producer_dsn, autocommit=True) as producer,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        producer.execute("SELECT outbox_notifier.resume_v1(p_user_id => 1)")


def test_roles_that_called_the_0_1_0_functions_keep_calling_them(empty_db: str) -> None:
    # 0.1.0 (schema 3) ran enqueue and requeue with the caller's rights: a producer held INSERT
    # on the outbox, an operator UPDATE on the records. 0004 makes them owner's-rights functions
    # that PUBLIC may not execute; such roles must keep their calls through the migrate, or the
    # application's own transactions fail until someone grants the new roles.
    all_migrations = sqlfiles.migrations()
    released = [m for m in all_migrations if m.version <= 3]
    suffix = uuid.uuid4().hex[:10]
    producer, operator, bystander = (f"on_{kind}_{suffix}" for kind in ("prod", "oper", "none"))
    migrations.migrate(empty_db, released)
    with psycopg.connect(empty_db, autocommit=True) as admin:
        try:
            for name in (producer, operator, bystander):
                admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
                admin.execute(
                    sql.SQL("GRANT USAGE ON SCHEMA outbox_notifier TO {}").format(
                        sql.Identifier(name)
                    )
                )
            admin.execute(
                sql.SQL("GRANT INSERT ON outbox_notifier.outbox TO {}").format(
                    sql.Identifier(producer)
                )
            )
            admin.execute(
                sql.SQL(
                    "GRANT SELECT, UPDATE ON outbox_notifier.notification_records TO {}"
                ).format(sql.Identifier(operator))
            )
            migrations.migrate(empty_db, all_migrations)

            as_producer = psycopg.conninfo.make_conninfo(empty_db, user=producer)
            with psycopg.connect(as_producer, autocommit=True) as conn:
                assert enqueue(conn, payload("kept-after-upgrade")) > 0
            as_operator = psycopg.conninfo.make_conninfo(empty_db, user=operator)
            with psycopg.connect(as_operator, autocommit=True) as conn:
                assert conn.execute("SELECT outbox_notifier.requeue(0)").fetchone() == (False,)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    enqueue(conn, payload("not-a-producer"))
            # a role that had neither right gets nothing: PUBLIC's EXECUTE stays revoked
            as_bystander = psycopg.conninfo.make_conninfo(empty_db, user=bystander)
            with (
                psycopg.connect(as_bystander, autocommit=True) as conn,
                pytest.raises(psycopg.errors.InsufficientPrivilege),
            ):
                enqueue(conn, payload("nobody"))
        finally:
            for name in (producer, operator, bystander):
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
