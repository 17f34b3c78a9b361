"""`status`, `requeue` and `replay` as an operator runs them: the CLI in a subprocess, a real
database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from tests.support import add_channel, records

SECRET = "sekret-token"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_NOTIFIER_")}
    return subprocess.run(
        [sys.executable, "-m", "outbox_notifier", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def add_record(
    conn: psycopg.Connection[Any], key: str, status: str, error_code: str | None = None
) -> int:
    row = conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, status, attempt_count,"
        "  last_error_code, last_error)"
        " VALUES ('feishu', 1, 'p', %s, '/x', %s, 5, %s, %s) RETURNING id",
        (key, status, error_code, None if error_code is None else f"{error_code}: boom"),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_migrate_names_each_migration_once(empty_db: str) -> None:
    from outbox_notifier import sqlfiles

    first = cli("migrate", "--dsn", empty_db)
    assert first.returncode == 0, first.stderr
    names = [m.name for m in sqlfiles.migrations()]
    assert first.stdout.splitlines() == [f"applied {name}" for name in names]
    assert not any(name in first.stderr for name in names), first.stderr
    again = cli("migrate", "--dsn", empty_db)
    assert (again.returncode, again.stdout, again.stderr) == (0, "schema is up to date\n", "")


def test_status_json(db: str, conn: psycopg.Connection[Any]) -> None:
    add_channel(
        conn,
        1,
        "https://open.feishu.cn/flow/api/trigger-webhook/hook-abc",
        auth_kind="bearer",
        secret=SECRET,
    )
    add_record(conn, "p", "pending")
    dead = add_record(conn, "d", "dead", "provider_auth_failed")
    conn.execute("INSERT INTO outbox_notifier.outbox (event_type, payload) VALUES ('t', '{}')")

    result = cli("status", "--json", "--dsn", db)

    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert [(r["status"], r["count"]) for r in shown["records"]] == [("pending", 1), ("dead", 1)]
    assert shown["outbox"]["pending"] == 1
    assert shown["stuck_sending"]["count"] == 0
    assert [(d["id"], d["error_code"]) for d in shown["dead_letters"]] == [
        (dead, "provider_auth_failed")
    ]
    assert SECRET not in result.stdout + result.stderr
    assert "hook-abc" not in result.stdout + result.stderr


def test_status_table(db: str, conn: psycopg.Connection[Any]) -> None:
    add_record(conn, "d", "dead", "provider_5xx")
    result = cli("status", "--dsn", db)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for heading in ("records", "outbox", "stuck in sending", "recent dead letters (newest 10)"):
        assert heading in lines


def test_requeue_dry_run_then_for_real(db: str, conn: psycopg.Connection[Any]) -> None:
    auth = add_record(conn, "a", "dead", "provider_auth_failed")
    add_record(conn, "b", "dead", "provider_5xx")
    add_record(conn, "c", "sent")
    before = records(conn)

    dry = cli("requeue", "--dry-run", "--error-code", "provider_auth_failed", "--dsn", db)

    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == "would requeue 1 dead record:"
    assert lines[2].split()[:3] == [str(auth), "feishu", "provider_auth_failed"]
    assert records(conn) == before

    real = cli("requeue", "--error-code", "provider_auth_failed", "--since", "1h", "--dsn", db)

    assert real.returncode == 0, real.stderr
    assert real.stdout == f"requeued 1 dead record: {auth}\n"
    assert {r["id"]: r["status"] for r in records(conn)}[auth] == "pending"


def test_requeue_by_id_refused_exits_1(db: str, conn: psycopg.Connection[Any]) -> None:
    sent = add_record(conn, "s", "sent")
    result = cli("requeue", "--id", str(sent), "--dsn", db)
    assert result.returncode == 1
    assert result.stdout == f"record {sent} was not requeued: status is sent\n"


def add_sent(conn: psycopg.Connection[Any], key: str, minutes_ago: float) -> int:
    row = conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, status, attempt_count,"
        "  sent_at, updated_at)"
        " VALUES ('feishu', 1, 'p', %s, '/x', 'sent', 1,"
        "  now() - make_interval(mins => %s), now() - make_interval(mins => %s)) RETURNING id",
        (key, minutes_ago, minutes_ago),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_replay_dry_run_then_for_real(db: str, conn: psycopg.Connection[Any]) -> None:
    lost = [add_sent(conn, f"lost-{i}", 90 + i) for i in range(3)]
    kept = add_sent(conn, "recent", 10)
    dead = add_record(conn, "d", "dead", "provider_5xx")  # updated now: out of the range
    before = records(conn)
    args = ("replay", "--since", "3h", "--until", "1h", "--reason", "INC-42: lost a day",
            "--rate", "5", "--dsn", db)  # fmt: skip

    dry = cli(*args, "--dry-run")

    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == "would replay 3 records (3 sent) at 5/s, over 0.4s:"
    assert lines[1].split() == ["id", "user", "provider", "status", "attempts", "error", "code",
                                "updated", "at"]  # fmt: skip
    assert [int(line.split()[0]) for line in lines[2:]] == lost
    assert records(conn) == before

    real = cli(*args)

    assert real.returncode == 0, real.stderr
    assert real.stdout == (
        "replayed 3 records at 5/s, the last due in 0.4s: " + ", ".join(map(str, lost)) + "\n"
    )
    after = {r["id"]: r for r in records(conn)}
    assert [after[i]["replay_reason"] for i in lost] == ["INC-42: lost a day"] * 3
    assert [after[i]["status"] for i in lost] == ["failed"] * 3
    assert (after[kept]["status"], after[dead]["status"]) == ("sent", "dead")

    again = cli(*args, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["replayed"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "1h", "--until", "3h", "--reason", "r"), "--until must be after --since"),
        (("--since", "3h", "--until", "1h"), "--reason is required: it goes into the attempt log"),
        (("--since", "3h", "--until", "1h", "--reason", " "),
         "--reason is required: it goes into the attempt log"),
        (("--since", "3h", "--until", "1h", "--reason", "r", "--limit", "10001"),
         "--limit must be between 1 and 10000, got 10001"),
        (("--until", "1h", "--reason", "r"),
         "a time range is required: pass --since and --until"),
        (("--since", "3h", "--until", "1h", "--reason", "r", "--rate", "0"),
         "--rate must be a positive number of records a second, got 0.0"),
        (("--since", "3h", "--until", "1h", "--reason", "r", "--provider", "fax"),
         "unknown provider 'fax': one of feishu_flow, feishu_bot, webhook, dingtalk_bot, "
         "wecom_bot, slack_webhook"),
    ],
)  # fmt: skip
def test_replay_bad_input_is_one_line_and_exit_2(
    db: str, conn: psycopg.Connection[Any], args: tuple[str, ...], message: str
) -> None:
    add_sent(conn, "s", 120)
    before = records(conn)
    result = cli("replay", *args, "--dsn", db)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"outbox-notifier: replay: {message}\n"
    assert records(conn) == before
