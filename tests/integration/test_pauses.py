"""Operator pauses (0013): pause_v1 / resume_v1, their hold in claim_due_v1, the paused view,
the maintenance loop ending a pause at its end, and the CLI commands."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.store import ClaimPolicy, RecordStore
from tests.support import (
    add_channel,
    enqueue,
    loop_context,
    maintenance_loop,
    payload,
    relay_for,
    scalar,
)

POLICY = ClaimPolicy(lease_s=30)
DOWN = "https://down.example/flow/api/trigger-webhook/secret-token"
UP = "https://up.example/flow/api/trigger-webhook/other"


def _seed(conn: psycopg.Connection[Any], per_user: int = 3) -> None:
    add_channel(conn, 1, DOWN)
    add_channel(conn, 2, UP)
    add_channel(conn, 3, "https://hooks.example/x", provider="webhook")
    for i in range(per_user):
        for user in (1, 2, 3):
            enqueue(conn, payload(f"u{user}-{i}", user_id=user))


def _call(conn: psycopg.Connection[Any], function: str, params: dict[str, Any]) -> Any:
    """``SELECT outbox_notifier.<function>(name => value, ...)``: its one value."""
    args = sql.SQL(", ").join(
        sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder(name)) for name in params
    )
    statement = sql.SQL("SELECT outbox_notifier.{}({})").format(sql.Identifier(function), args)
    row = conn.execute(statement, params).fetchone()
    assert row is not None
    return row[0]


def _pause(conn: psycopg.Connection[Any], reason: str = "maintenance", **scope: Any) -> int:
    return int(_call(conn, "pause_v1", {"p_reason": reason, **scope}))


def _resume(conn: psycopg.Connection[Any], **scope: Any) -> Any:
    return _call(conn, "resume_v1", scope)


async def _claim(db: str, relay: bool = False) -> list[str]:
    async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
        store = RecordStore(pool)
        if relay:
            await relay_for(store).relay_once()
        return sorted(r.dedupe_key for r in await store.claim_records(100, POLICY))


def _held(conn: psycopg.Connection[Any], user: int) -> list[tuple[str, int, bool]]:
    return conn.execute(
        "SELECT status, attempt_count, next_retry_at > now()"
        " FROM outbox_notifier.notification_records WHERE user_id = %s ORDER BY id",
        (user,),
    ).fetchall()


@pytest.mark.parametrize(
    ("scope", "held_user"),
    [({"p_target_url": DOWN}, 1), ({"p_user_id": 1}, 1),
     ({"p_user_id": 1, "p_channel": "feishu"}, 1), ({"p_provider": "webhook"}, 3)],
    ids=["target", "user", "user-channel", "provider"],
)  # fmt: skip
async def test_a_pause_holds_its_scope_without_an_attempt_and_the_rest_flows(
    db: str, conn: psycopg.Connection[Any], scope: dict[str, Any], held_user: int
) -> None:
    _seed(conn)
    _pause(conn, **scope)
    claimed = await _claim(db, relay=True)
    assert claimed == sorted(f"u{u}-{i}" for u in (1, 2, 3) if u != held_user for i in range(3))
    assert _held(conn, held_user) == [("pending", 0, True)] * 3
    view = conn.execute(
        "SELECT scope, reason, paused_by, until, ended, records_waiting, paused"
        " FROM outbox_notifier.paused"
    ).fetchall()
    assert [row[:6] for row in view] == [
        (("target", "recipient", "recipient", "provider")[
            ("p_target_url" in scope) * 0 + ("p_user_id" in scope) * 1 + ("p_provider" in scope) * 3
        ], "maintenance", "postgres", None, False, 3)
    ]  # fmt: skip
    assert "secret-token" not in str(view)
    # held: the next claims do not walk them again
    assert await _claim(db) == []


async def test_resume_makes_the_held_records_due_at_once_in_order(
    db: str, conn: psycopg.Connection[Any]
) -> None:
    add_channel(conn, 1, DOWN)
    for i in range(4):
        keyed: dict[str, Any] = {"ordering_key": "task-1"} if i < 2 else {}
        enqueue(conn, payload(f"k{i}", user_id=1, **keyed))
    _pause(conn, p_target_url=DOWN)
    assert await _claim(db, relay=True) == []
    assert _resume(conn, p_target_url=DOWN) == 4
    assert _resume(conn, p_target_url=DOWN) is None  # nothing active any more
    # due at once; the ordering key still applies: k1 waits for k0
    assert await _claim(db) == ["k0", "k2", "k3"]
    resumed = conn.execute(
        "SELECT resumed_at IS NOT NULL, resumed_by FROM outbox_notifier.pauses"
    ).fetchall()
    assert resumed == [(True, "postgres")]


async def test_a_pause_with_an_end_resumes_by_itself(
    db: str, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    _seed(conn, per_user=1)
    conn.execute(
        "SELECT outbox_notifier.pause_v1('deploy', p_target_url => %s,"
        " p_until => now() + interval '1 second')",
        (DOWN,),
    )
    assert await _claim(db, relay=True) == ["u2-0", "u3-0"]
    assert scalar(conn, "SELECT next_retry_at - now() <= interval '1 second'"
                        " FROM outbox_notifier.notification_records WHERE user_id = 1")  # fmt: skip
    await asyncio.sleep(1.1)
    assert await _claim(db) == ["u1-0"]  # past its end: no longer honoured by the claim
    assert scalar(conn, "SELECT ended FROM outbox_notifier.paused")
    caplog.set_level(logging.INFO, "outbox_notifier.maintenance")
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as aconn:
        await maintenance_loop(aconn)._end_pauses(loop_context())
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.paused") == 0
    assert scalar(conn, "SELECT resumed_by FROM outbox_notifier.pauses") == "expired"
    assert "ended at its end time; resumed" in caplog.text
    assert "down.example" in caplog.text and "secret-token" not in caplog.text


def test_pausing_again_amends_and_bad_selectors_are_refused(conn: psycopg.Connection[Any]) -> None:
    first = _pause(conn, "one", p_user_id=5)
    assert _pause(conn, "two", p_user_id=5) == first
    assert scalar(conn, "SELECT reason FROM outbox_notifier.paused") == "two"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"p_user_id": 5, "p_provider": "webhook"}, "exactly one"),
        ({"p_provider": "carrier_pigeon"}, "unknown provider"),
        ({"p_target_url": "not a url with secret"}, "not a webhook URL"),
        ({"p_channel": "feishu"}, "exactly one"),
    ]
    for scope, message in cases:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message) as info:
            _pause(conn, **scope)
        assert "secret" not in str(info.value)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="needs a reason"):
        _pause(conn, " ", p_user_id=6)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="has passed"):
        conn.execute("SELECT outbox_notifier.pause_v1('x', p_user_id => 6,"
                     " p_until => now() - interval '1 minute')")  # fmt: skip


def _cli(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox_notifier", *args, "--dsn", db],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_cli_pauses_shows_and_resumes(db: str, conn: psycopg.Connection[Any]) -> None:
    _seed(conn, per_user=1)
    paused = _cli(db, "pause", "--target", DOWN, "--reason", "vendor maintenance", "--for", "2h")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.startswith("paused target ") and " at down.example " in paused.stdout
    assert "secret-token" not in paused.stdout + paused.stderr
    status = _cli(db, "status")
    assert "paused by an operator" in status.stdout and "vendor maintenance" in status.stdout
    assert "secret-token" not in status.stdout
    resumed = _cli(db, "resume", "--target", DOWN)
    assert (resumed.returncode, resumed.stdout) == (0, "resumed the target: 0 records due now\n")
    again = _cli(db, "resume", "--target", DOWN)
    assert (again.returncode, again.stdout) == (1, "no active pause for the target\n")
    bad = _cli(db, "pause", "--user", "7", "--reason", "x", "--until", "2001-01-01T00:00:00Z")
    assert bad.returncode == 1 and "has passed" in bad.stderr
    usage = _cli(db, "pause", "--provider", "webhook", "--channel", "feishu", "--reason", "x")
    assert usage.returncode == 2 and "--channel goes with --user" in usage.stderr
