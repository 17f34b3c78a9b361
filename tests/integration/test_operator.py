"""The operator commands `status` and `requeue` against real Postgres, called in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_notifier import operator
from outbox_notifier.daemon import Daemon
from outbox_notifier.testing.feishu_server import FeishuServer
from tests.support import (
    FLOW_PREFIX,
    add_channel,
    attempts,
    eventually,
    records,
    running,
    scalar,
    settings_for,
)

SECRET = "sekret-token"
HOOK_TOKEN = "hook-tok-123"


def insert_record(
    conn: psycopg.Connection[Any],
    dedupe_key: str,
    *,
    status: str = "pending",
    channel: str = "feishu",
    user_id: int = 1,
    error_code: str | None = None,
    error: str | None = None,
    attempt_count: int = 0,
    age_s: float = 0.0,
    lease_s: float | None = None,
) -> int:
    """A record in any status, last changed ``age_s`` ago; ``lease_s`` < 0: an expired lease."""
    row = conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, status, attempt_count,"
        "  last_error_code, last_error, lease_expires_at, lease_token, created_at, updated_at)"
        " VALUES (%(channel)s, %(user_id)s, 'asp_1', %(key)s, '/assistant/preview/asp_1',"
        "  %(status)s, %(attempts)s, %(code)s, %(error)s,"
        "  CASE WHEN %(lease_s)s::float8 IS NOT NULL"
        "       THEN now() + make_interval(secs => %(lease_s)s::float8) END,"
        "  CASE WHEN %(lease_s)s::float8 IS NOT NULL"
        "       THEN nextval('outbox_notifier.lease_token_seq') END,"
        "  now() - make_interval(secs => %(age_s)s), now() - make_interval(secs => %(age_s)s))"
        " RETURNING id",
        {
            "channel": channel,
            "user_id": user_id,
            "key": dedupe_key,
            "status": status,
            "attempts": attempt_count,
            "code": error_code,
            "error": error,
            "lease_s": lease_s,
            "age_s": age_s,
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def insert_outbox(conn: psycopg.Connection[Any], status: str, age_s: float = 0.0) -> int:
    row = conn.execute(
        "INSERT INTO outbox_notifier.outbox (event_type, payload, status, created_at)"
        " VALUES ('notification.feishu.requested', '{}', %s, now() - make_interval(secs => %s))"
        " RETURNING id",
        (status, age_s),
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def backlog(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Records in every status over two channels, dead letters, stuck sends and outbox rows."""
    add_channel(
        conn,
        1,
        f"https://open.feishu.cn/flow/api/trigger-webhook/{HOOK_TOKEN}",
        auth_kind="bearer",
        secret=SECRET,
    )
    ids: dict[str, Any] = {}
    insert_record(conn, "p1", age_s=600)
    insert_record(conn, "p2", age_s=30)
    insert_record(conn, "w1", channel="webhook", age_s=5)
    insert_record(conn, "f1", status="failed", error_code="provider_5xx", attempt_count=1)
    insert_record(conn, "s1", status="sent", attempt_count=1)
    ids["expired"] = insert_record(conn, "send1", status="sending", lease_s=-90)
    insert_record(conn, "send2", status="sending", lease_s=60)
    # Twelve dead letters, the newest last; the error text carries a webhook URL with a token.
    ids["dead"] = [
        insert_record(
            conn,
            f"d{i}",
            status="dead",
            error_code="provider_auth_failed" if i % 2 else "payload_invalid",
            error=f"POST https://open.feishu.cn/open-apis/bot/v2/hook/{HOOK_TOKEN} -> 401\nbad",
            attempt_count=5,
            age_s=1000 - i,
        )
        for i in range(12)
    ]
    insert_outbox(conn, "pending", age_s=3600)
    insert_outbox(conn, "pending")
    for _ in range(3):
        insert_outbox(conn, "relayed", age_s=60)
    insert_outbox(conn, "rejected")
    return ids


def test_status_json_counts_everything_exactly(
    db: str, backlog: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert operator.status(settings_for(db), as_json=True) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert len(out.splitlines()) == 1
    shown = json.loads(out)
    assert list(shown) == [
        "records", "outbox", "stuck_sending", "dead_letters", "pauses", "digest_queues",
    ]  # fmt: skip
    assert shown["pauses"] == []  # nothing is paused in this backlog
    assert shown["digest_queues"] == []  # no chat bot over its budget either

    by_key = {(r["channel"], r["status"]): r for r in shown["records"]}
    assert [(r["channel"], r["status"], r["count"]) for r in shown["records"]] == [
        ("feishu", "pending", 2),
        ("feishu", "sending", 2),
        ("feishu", "failed", 1),
        ("feishu", "sent", 1),
        ("feishu", "dead", 12),
        ("webhook", "pending", 1),
    ]
    assert 600 <= by_key[("feishu", "pending")]["oldest_age_s"] < 700
    assert 5 <= by_key[("webhook", "pending")]["oldest_age_s"] < 100

    outbox = shown["outbox"]
    assert (outbox["pending"], outbox["relayed"], outbox["rejected"]) == (2, 3, 1)
    assert 3600 <= outbox["oldest_pending_age_s"] < 3700

    stuck = shown["stuck_sending"]
    assert (stuck["count"], stuck["lease_expired"]) == (2, 1)
    assert 90 <= stuck["oldest_expired_for_s"] < 190

    dead = shown["dead_letters"]
    assert [d["id"] for d in dead] == backlog["dead"][::-1][:10]
    assert set(dead[0]) == {"id", "channel", "error_code", "error", "updated_at"}
    assert dead[0]["channel"] == "feishu"
    assert dead[0]["error_code"] == "provider_auth_failed"  # d11
    assert dead[0]["error"] == "POST https://open.feishu.cn/... -> 401 bad"
    assert SECRET not in out
    assert HOOK_TOKEN not in out


def test_status_table_has_headings_and_no_secrets(
    db: str, backlog: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert operator.status(settings_for(db), as_json=False) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for heading in ("records", "outbox", "stuck in sending", "recent dead letters (newest 10)"):
        assert heading in lines
    assert "  channel  status   count  oldest age" in lines
    assert any(line.split()[:3] == ["feishu", "dead", "12"] for line in lines)
    assert any(line.split()[:2] == ["pending", "2"] for line in lines)
    assert SECRET not in out
    assert HOOK_TOKEN not in out
    assert "webhook_url" not in out


def test_status_shows_each_digest_queue_by_target_never_its_url(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bot_url = f"https://oapi.dingtalk.com/robot/send?access_token={HOOK_TOKEN}"
    other_url = f"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={SECRET}"
    with psycopg.connect(db, autocommit=True) as conn:
        busy, paused = (
            scalar(conn, "SELECT outbox_notifier.target_key(%s)", (url,))
            for url in (bot_url, other_url)
        )
        conn.execute(
            "INSERT INTO outbox_notifier.targets (target_key, provider, host, paused_until)"
            " VALUES (%s, 'dingtalk_bot', 'oapi.dingtalk.com', NULL),"
            "        (%s, 'wecom_bot', 'qyapi.weixin.qq.com', now() + interval '1 minute')",
            (busy, paused),
        )
        queued = {
            busy: [("pending", 300), ("pending", 5), ("sending", 30)],
            paused: [("pending", 60)],
        }
        for target, rows in queued.items():
            for n, (status, age_s) in enumerate(rows):
                key = f"{target[:6]}-{n}"
                lease_s = 30.0 if status == "sending" else None
                record_id = insert_record(conn, key, status=status, age_s=age_s, lease_s=lease_s)
                conn.execute(
                    "UPDATE outbox_notifier.notification_records SET digest_target = %s"
                    " WHERE id = %s",
                    (target, record_id),
                )
        # out of every queue: a finished record that once waited in one
        done = insert_record(conn, "done", status="sent", age_s=900)
        conn.execute(
            "UPDATE outbox_notifier.notification_records SET digest_target = %s WHERE id = %s",
            (busy, done),
        )

    assert operator.status(settings_for(db), as_json=True) == 0
    out = capsys.readouterr().out
    queues = json.loads(out)["digest_queues"]
    assert [(q["target_key"], q["provider"], q["host"], q["waiting"], q["sending"],
             q["breaker_open"]) for q in queues] == [
        (busy, "dingtalk_bot", "oapi.dingtalk.com", 2, 1, False),
        (paused, "wecom_bot", "qyapi.weixin.qq.com", 1, 0, True),
    ]  # fmt: skip
    assert 300 <= queues[0]["oldest_age_s"] < 400  # the oldest waiting, not the sent one
    assert 60 <= queues[1]["oldest_age_s"] < 160

    assert operator.status(settings_for(db), as_json=False) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    at = lines.index("waiting for a digest (chat bots over their budget)")
    assert lines[at + 1].split() == [
        "target", "provider", "host", "waiting", "sending", "oldest", "age", "breaker",
    ]  # fmt: skip
    assert lines[at + 2].split()[:5] == [busy[:12], "dingtalk_bot", "oapi.dingtalk.com", "2", "1"]
    assert lines[at + 3].split()[-1] == "open"
    for text in (out, table):
        assert HOOK_TOKEN not in text and SECRET not in text and "https://" not in text


def test_status_of_an_empty_database(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert operator.status(settings_for(db), as_json=False) == 0
    out = capsys.readouterr().out
    assert "(no records)" in out
    assert operator.status(settings_for(db), as_json=True) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["records"] == []
    assert shown["outbox"] == {
        "pending": 0,
        "relayed": 0,
        "rejected": 0,
        "oldest_pending_age_s": None,
    }
    assert shown["stuck_sending"] == {
        "count": 0,
        "lease_expired": 0,
        "oldest_expired_for_s": None,
    }
    assert shown["dead_letters"] == []


def test_unreachable_database_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(f"host={tmp_path} dbname=x connect_timeout=2")
    assert operator.status(settings, as_json=True) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("outbox-notifier: cannot connect to the database: ")


def test_missing_schema_says_migrate(empty_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert operator.status(settings_for(empty_db), as_json=False) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "run `outbox-notifier migrate`" in err


def test_short_error_cuts_urls_and_length() -> None:
    text = "timeout calling https://open.feishu.cn/open-apis/bot/v2/hook/abc?x=1 after 5s"
    assert operator.short_error(text) == "timeout calling https://open.feishu.cn/... after 5s"
    long = operator.short_error("x" * 500)
    assert long is not None and len(long) == operator.ERROR_EXCERPT_RUNES
    assert operator.short_error(None) is None


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (0.42, "0.4s"), (75, "1m15s"), (3 * 86_400 + 4 * 3600 + 59, "3d4h")],
)
def test_format_age(seconds: float | None, shown: str) -> None:
    assert operator.format_age(seconds) == shown


# -- requeue by id -----------------------------------------------------------------------------


def _requeue(
    db: str, *, record_id: int | None = None, dry_run: bool = False, **filters: Any
) -> int:
    return operator.requeue(
        settings_for(db),
        operator.DeadLetterFilters(**filters),
        record_id=record_id,
        dry_run=dry_run,
    )


def test_requeue_dead_record_by_id(
    db: str, conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    record_id = insert_record(
        conn, "d", status="dead", error_code="provider_5xx", error="boom", attempt_count=5
    )
    assert _requeue(db, record_id=record_id) == 0
    assert capsys.readouterr().out == f"requeued record {record_id}\n"
    [record] = records(conn)
    assert record["status"] == "pending"
    assert record["attempt_count"] == 0
    assert (record["last_error_code"], record["last_error"]) == (None, None)


@pytest.mark.parametrize(
    ("status", "lease_s", "reason"),
    [
        ("sent", None, "status is sent"),
        ("sending", 60.0, "it is in flight (status sending)"),
        ("pending", None, "it is already pending"),
    ],
)
def test_requeue_by_id_refuses_and_says_why(
    db: str,
    conn: psycopg.Connection[Any],
    capsys: pytest.CaptureFixture[str],
    status: str,
    lease_s: float | None,
    reason: str,
) -> None:
    record_id = insert_record(conn, "k", status=status, attempt_count=1, lease_s=lease_s)
    before = records(conn)
    assert _requeue(db, record_id=record_id) == 1
    assert capsys.readouterr().out == f"record {record_id} was not requeued: {reason}\n"
    assert records(conn) == before


def test_requeue_missing_record(
    db: str, conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _requeue(db, record_id=4242) == 1
    assert capsys.readouterr().out == "record 4242 was not requeued: no such record\n"


def test_requeue_by_id_dry_run_changes_nothing(
    db: str, conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    dead = insert_record(conn, "d", status="dead", attempt_count=5)
    sent = insert_record(conn, "s", status="sent", attempt_count=1)
    before = records(conn)
    assert _requeue(db, record_id=dead, dry_run=True) == 0
    assert _requeue(db, record_id=sent, dry_run=True) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"would requeue record {dead} (status dead)",
        f"record {sent} would not be requeued: status is sent",
    ]
    assert records(conn) == before


# -- requeue by filters ------------------------------------------------------------------------


@pytest.fixture
def dead_mix(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Dead records across channels, error codes and ages, plus records in other statuses."""
    spec = {
        "feishu_5xx_old": ("feishu", "provider_5xx", 7200),
        "feishu_5xx_new": ("feishu", "provider_5xx", 60),
        "feishu_auth_mid": ("feishu", "provider_auth_failed", 1800),
        "webhook_5xx_new": ("webhook", "provider_5xx", 60),
        "webhook_auth_old": ("webhook", "provider_auth_failed", 7200),
    }
    ids = {
        name: insert_record(
            conn,
            name,
            status="dead",
            channel=channel,
            error_code=code,
            error="boom",
            attempt_count=5,
            age_s=age,
        )
        for name, (channel, code, age) in spec.items()
    }
    # Same channel and code as the matches, but not dead: never picked.
    insert_record(conn, "failed", status="failed", error_code="provider_5xx", attempt_count=1)
    insert_record(conn, "sent", status="sent", attempt_count=1, age_s=60)
    return ids


def _ago(conn: psycopg.Connection[Any], seconds: float) -> Any:
    return scalar(conn, "SELECT now() - make_interval(secs => %s)", (seconds,))


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"channel": "feishu"}, ["feishu_5xx_old", "feishu_5xx_new", "feishu_auth_mid"]),
        ({"error_code": "provider_5xx"}, ["feishu_5xx_old", "feishu_5xx_new", "webhook_5xx_new"]),
        ({"channel": "webhook", "error_code": "provider_auth_failed"}, ["webhook_auth_old"]),
        ({"since_s": 3600}, ["feishu_5xx_new", "feishu_auth_mid", "webhook_5xx_new"]),
        ({"until_s": 3600}, ["feishu_5xx_old", "webhook_auth_old"]),
        ({"since_s": 3600, "until_s": 600}, ["feishu_auth_mid"]),
        ({"channel": "feishu", "since_s": 600}, ["feishu_5xx_new"]),
        ({"channel": "nope"}, []),
    ],
)
def test_filters_pick_exactly_the_matching_dead_records(
    db: str,
    conn: psycopg.Connection[Any],
    dead_mix: dict[str, int],
    capsys: pytest.CaptureFixture[str],
    filters: dict[str, Any],
    expected: list[str],
) -> None:
    kwargs: dict[str, Any] = {k: v for k, v in filters.items() if not k.endswith("_s")}
    if "since_s" in filters:
        kwargs["since"] = _ago(conn, filters["since_s"])
    if "until_s" in filters:
        kwargs["until"] = _ago(conn, filters["until_s"])
    want = sorted(dead_mix[name] for name in expected)

    # The dry run lists them and changes nothing.
    before = records(conn)
    assert _requeue(db, dry_run=True, **kwargs) == 0
    dry = capsys.readouterr().out.splitlines()
    assert records(conn) == before
    if want:
        assert dry[0] == f"would requeue {len(want)} dead record{'s' if len(want) > 1 else ''}:"
        assert dry[1].split() == ["id", "channel", "error", "code", "updated", "at"]
        assert [int(line.split()[0]) for line in dry[2:]] == want
    else:
        assert dry == ["no dead records match"]

    # The real run requeues exactly those.
    assert _requeue(db, **kwargs) == 0
    out = capsys.readouterr().out
    if want:
        assert out == (
            f"requeued {len(want)} dead record{'s' if len(want) > 1 else ''}: "
            + ", ".join(map(str, want))
            + "\n"
        )
    else:
        assert out == "no dead records match\n"
    after = {r["id"]: r for r in records(conn)}
    assert sorted(i for i in dead_mix.values() if after[i]["status"] == "pending") == want
    assert all(after[i]["attempt_count"] == 0 for i in want)
    untouched = set(dead_mix.values()) - set(want)
    assert all(after[i]["status"] == "dead" for i in untouched)
    # The records in other statuses were never touched.
    others = [r for i, r in after.items() if i not in dead_mix.values()]
    assert sorted(r["status"] for r in others) == ["failed", "sent"]


def test_dry_run_table_shows_id_channel_and_error_code(
    db: str,
    conn: psycopg.Connection[Any],
    dead_mix: dict[str, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _requeue(db, channel="webhook", dry_run=True) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {int(line.split()[0]): line.split()[1:3] for line in out[2:]}
    assert rows == {
        dead_mix["webhook_5xx_new"]: ["webhook", "provider_5xx"],
        dead_mix["webhook_auth_old"]: ["webhook", "provider_auth_failed"],
    }


def test_bulk_requeue_skips_a_record_held_elsewhere_and_says_so(
    db: str,
    conn: psycopg.Connection[Any],
    dead_mix: dict[str, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    held = dead_mix["feishu_5xx_new"]
    with psycopg.connect(db) as other:
        other.execute(
            "SELECT 1 FROM outbox_notifier.notification_records WHERE id = %s FOR UPDATE", (held,)
        )
        assert _requeue(db, channel="feishu") == 1
        other.rollback()
    out = capsys.readouterr().out.splitlines()
    done = sorted([dead_mix["feishu_5xx_old"], dead_mix["feishu_auth_mid"]])
    assert out == [
        f"requeued 2 dead records: {done[0]}, {done[1]}",
        f"skipped 1 record held by another transaction: {held}; run the command again",
    ]
    status = {r["id"]: r["status"] for r in records(conn)}
    assert status[held] == "dead"
    assert [status[i] for i in done] == ["pending", "pending"]
    # Once released, the next run picks it up.
    assert _requeue(db, channel="feishu") == 0
    assert capsys.readouterr().out == f"requeued 1 dead record: {held}\n"


# -- a requeued record is delivered ------------------------------------------------------------


async def test_requeued_dead_record_is_delivered(
    db: str, conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    async with FeishuServer() as server:
        add_channel(conn, 1, server.flow_url("alice"))
        record_id = insert_record(
            conn, "d", status="dead", error_code="provider_5xx", error="boom", attempt_count=5
        )
        assert _requeue(db, error_code="provider_5xx") == 0
        assert capsys.readouterr().out == f"requeued 1 dead record: {record_id}\n"

        def sent() -> bool:
            return bool(
                scalar(
                    conn,
                    "SELECT status = 'sent' FROM outbox_notifier.notification_records"
                    " WHERE id = %s",
                    (record_id,),
                )
            )

        async with running(Daemon(settings_for(db))):
            await eventually(sent, what="the requeued record sent")

        assert server.count(FLOW_PREFIX) == 1
        [record] = records(conn)
        assert record["attempt_count"] == 1
        assert [a["outcome"] for a in attempts(conn, record_id)] == ["success"]
