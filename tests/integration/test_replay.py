"""`replay` against real Postgres, called in-process: the selection its dry run shares with
replay_v1, the records and the attempt log after a daemon delivers the replay, the rate that
keeps new records flowing, and a daemon of the previous release on the new columns."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import statistics
import time
from collections import Counter
from datetime import datetime
from typing import Any

import psycopg
import pytest

from outbox_notifier import operator
from outbox_notifier.daemon import Daemon
from outbox_notifier.sqlfiles import migrations, query
from outbox_notifier.testing.feishu_server import FeishuServer, Reply, max_in_window
from tests.support import (
    add_channel,
    enqueue,
    eventually,
    payload,
    records,
    running,
    scalar,
    settings_for,
)

REASON = "receiver restored a backup (INC-42)"


def insert_records(
    conn: psycopg.Connection[Any],
    prefix: str,
    count: int,
    *,
    status: str = "sent",
    hours_ago: float,
    user_id: int = 1,
    error_code: str | None = None,
    attempt_count: int = 1,
) -> list[int]:
    """``count`` records that reached ``status`` about ``hours_ago`` hours ago (one second
    apart, the newest first), as the completer leaves them: sent_at = updated_at for sent."""
    rows = conn.execute(
        "INSERT INTO outbox_notifier.notification_records"
        " (channel, user_id, preview_id, dedupe_key, target_url, status, attempt_count,"
        "  last_error_code, trace_id, provider_message_id, sent_at, updated_at)"
        " SELECT 'feishu', %(user)s, 'p', %(prefix)s || g, '/assistant/preview/p', %(status)s,"
        "  %(attempts)s, %(code)s, %(prefix)s || g,"
        "  CASE WHEN %(status)s = 'sent' THEN 'first-' || %(prefix)s || g END,"
        "  CASE WHEN %(status)s = 'sent' THEN t END, t"
        " FROM generate_series(1, %(n)s) g,"
        "  LATERAL (SELECT now() - make_interval(secs => %(h)s * 3600 + g)) AS at(t)"
        " ORDER BY g RETURNING id",
        {
            "user": user_id,
            "prefix": prefix,
            "status": status,
            "attempts": attempt_count,
            "code": error_code,
            "n": count,
            "h": hours_ago,
        },
    ).fetchall()
    return [int(row[0]) for row in rows]


def ago(conn: psycopg.Connection[Any], hours: float) -> datetime:
    value = scalar(conn, "SELECT now() - make_interval(secs => %s)", (hours * 3600,))
    assert isinstance(value, datetime)
    return value


def run_replay(
    db: str,
    selection: operator.ReplaySelection,
    capsys: pytest.CaptureFixture[str],
    *,
    dry_run: bool,
    rate_per_s: float = 1000.0,
    reason: str = REASON,
    expect: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    code = operator.replay(
        settings_for(db, **overrides),
        selection,
        reason=reason,
        rate_per_s=rate_per_s,
        dry_run=dry_run,
        as_json=True,
    )
    out, err = capsys.readouterr()
    assert code == expect, err
    report: dict[str, Any] = json.loads(out)
    return report


def ids_of(report: dict[str, Any]) -> list[int]:
    return [c["id"] for c in report["selected"]]


def replayed_attempts(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """The README's query: which attempts were a replay, and why."""
    return conn.execute(
        "SELECT record_id, attempt, outcome, replay_reason FROM outbox_notifier.delivery_attempts"
        " WHERE replay_reason IS NOT NULL ORDER BY record_id, attempt"
    ).fetchall()


# -- the 1,000 ---------------------------------------------------------------------------------


async def test_replay_of_1000_sent_records_by_time_range_delivers_each_once_more_while_new_records_keep_flowing(  # noqa: E501
    db: str, conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rate = 200.0
    async with FeishuServer() as server:
        add_channel(conn, 1, server.flow_url("alice"))
        older = insert_records(conn, "older-", 50, hours_ago=6)
        wanted = insert_records(conn, "lost-", 1000, hours_ago=2)
        newer = insert_records(conn, "newer-", 50, hours_ago=0.25)
        # in the range, but not sent or dead: reported, never touched
        skipped = insert_records(conn, "skip-", 3, status="skipped", hours_ago=2)
        selection = operator.ReplaySelection(
            since=ago(conn, 3), until=ago(conn, 1), limit=operator.REPLAY_DEFAULT_LIMIT
        )

        # The dry run shows exactly those and changes nothing.
        before = records(conn)
        dry = run_replay(db, selection, capsys, dry_run=True, rate_per_s=rate)
        assert ids_of(dry) == wanted
        assert {c["status"] for c in dry["selected"]} == {"sent"}
        assert (dry["replayed"], dry["over_limit"]) == ([], 0)
        assert dry["not_replayable"] == {"skipped": len(skipped)}
        assert records(conn) == before

        latencies: dict[str, list[float]] = {"before": [], "during": []}

        def sent_new(keys: list[str]) -> bool:
            return bool(
                scalar(
                    conn,
                    "SELECT count(*) = %s FROM outbox_notifier.notification_records"
                    " WHERE dedupe_key = ANY(%s) AND status = 'sent'",
                    (len(keys), keys),
                )
            )

        def latency_of(keys: list[str]) -> list[float]:
            rows = conn.execute(
                "SELECT extract(epoch FROM sent_at - outbox_created_at)::float8"
                " FROM outbox_notifier.notification_records WHERE dedupe_key = ANY(%s)",
                (keys,),
            ).fetchall()
            return [float(row[0]) for row in rows]

        async with running(Daemon(settings_for(db))):
            # the usual latency, with nothing else to do
            usual: list[str] = []
            for i in range(5):
                enqueue(conn, payload(f"usual-{i}"))
                usual.append(f"usual-{i}")
                await eventually(functools.partial(sent_new, usual), what="the usual records")
            latencies["before"] = latency_of(usual)

            started = time.monotonic()
            real = run_replay(db, selection, capsys, dry_run=False, rate_per_s=rate)
            assert real["replayed"] == wanted == ids_of(real)
            assert real["held"] == []

            # new records while the replay is due, one every 0.2 s over its spread
            fresh: list[str] = []
            while time.monotonic() - started < len(wanted) / rate:
                key = f"fresh-{len(fresh)}"
                enqueue(conn, payload(key))
                fresh.append(key)
                await eventually(functools.partial(sent_new, [key]), what=f"{key} delivered")
                await asyncio.sleep(0.2)

            def replay_done() -> bool:
                return bool(
                    scalar(
                        conn,
                        "SELECT count(*) = %s FROM outbox_notifier.notification_records"
                        " WHERE id = ANY(%s) AND status = 'sent' AND replay_reason IS NULL",
                        (len(wanted), wanted),
                    )
                )

            await eventually(replay_done, timeout_s=60, what="the replay delivered")
            await eventually(lambda: sent_new(fresh), what="the new records delivered")
            latencies["during"] = latency_of(fresh)

    # Exactly those records delivered once more, each once; nothing else called again.
    calls = Counter(r.json["notification_id"] for r in server.requests)  # type: ignore[index]
    assert {i: calls[i] for i in wanted} == dict.fromkeys(wanted, 1)
    assert not any(calls[i] for i in older + newer + skipped)
    replay_calls = sorted(r.received_at for r in server.requests
                          if r.json["notification_id"] in set(wanted))  # type: ignore[index]  # fmt: skip
    # at the rate asked for: spread over ~5 s, never much more than `rate` in one second
    assert replay_calls[-1] - replay_calls[0] >= 0.8 * (len(wanted) - 1) / rate
    assert max_in_window(replay_calls, 1.0) <= 1.5 * rate

    # New records kept their usual latency during the replay.
    assert len(latencies["during"]) >= 10
    usual_max = max(latencies["before"])
    assert max(latencies["during"]) < max(1.0, 5 * usual_max), latencies
    assert statistics.median(latencies["during"]) < max(0.5, 3 * usual_max), latencies

    # No new record: the same records, each with a second attempt audited as the replay.
    by_id = {r["id"]: r for r in records(conn)}
    assert len(by_id) == len(older + wanted + newer + skipped) + 5 + len(fresh)
    for record_id in wanted:
        record = by_id[record_id]
        assert (record["status"], record["attempt_count"], record["max_attempts"]) == ("sent", 2, 6)
        assert record["replay_reason"] is None
        assert record["provider_message_id"] != f"first-{record['dedupe_key']}"
    assert replayed_attempts(conn) == [(i, 2, "success", REASON) for i in wanted]
    assert {by_id[i]["status"] for i in older + newer} == {"sent"}
    assert {by_id[i]["attempt_count"] for i in older + newer} == {1}
    assert {by_id[i]["status"] for i in skipped} == {"skipped"}
    # Run again: the replayed records left the range when they were sent again.
    again = run_replay(db, selection, capsys, dry_run=True)
    assert again["selected"] == []


# -- the selection -----------------------------------------------------------------------------


@pytest.fixture
def mix(conn: psycopg.Connection[Any]) -> dict[str, list[int]]:
    """Two users on two providers, sent and dead records in and out of the range, and records
    of the range that are on their way."""
    add_channel(conn, 1, "http://127.0.0.1/flow/api/trigger-webhook/one")
    add_channel(conn, 2, "http://127.0.0.1/hooks/two", provider="webhook")
    return {
        "sent_1": insert_records(conn, "s1-", 3, hours_ago=2, user_id=1),
        "sent_2": insert_records(conn, "s2-", 2, hours_ago=2, user_id=2),
        "dead_1_5xx": insert_records(
            conn, "d1-", 2, status="dead", hours_ago=2, user_id=1,
            error_code="provider_5xx", attempt_count=5,
        ),
        "dead_2_auth": insert_records(
            conn, "d2-", 1, status="dead", hours_ago=2, user_id=2,
            error_code="provider_auth_failed", attempt_count=5,
        ),
        "pending": insert_records(conn, "p-", 1, status="pending", hours_ago=2),
        "failed": insert_records(conn, "f-", 2, status="failed", hours_ago=2),
        "old": insert_records(conn, "o-", 2, hours_ago=8),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, ["sent_1", "sent_2", "dead_1_5xx", "dead_2_auth"]),
        ({"user_id": 2}, ["sent_2", "dead_2_auth"]),
        ({"provider": "webhook"}, ["sent_2", "dead_2_auth"]),
        ({"provider": "feishu_flow"}, ["sent_1", "dead_1_5xx"]),
        ({"target_url": "http://127.0.0.1/flow/api/trigger-webhook/one"}, ["sent_1", "dead_1_5xx"]),
        ({"target_url": "http://127.0.0.1/hooks/other"}, []),
        ({"error_code": "provider_5xx"}, ["dead_1_5xx"]),
        ({"user_id": 1, "error_code": "provider_auth_failed"}, []),
    ],
)
def test_the_dry_run_shows_the_set_the_real_run_replays(
    db: str,
    conn: psycopg.Connection[Any],
    mix: dict[str, list[int]],
    capsys: pytest.CaptureFixture[str],
    filters: dict[str, Any],
    expected: list[str],
) -> None:
    selection = operator.ReplaySelection(since=ago(conn, 3), until=ago(conn, 1), **filters)
    want = sorted(i for name in expected for i in mix[name])
    before = records(conn)

    dry = run_replay(db, selection, capsys, dry_run=True)
    assert ids_of(dry) == want
    assert records(conn) == before
    real = run_replay(db, selection, capsys, dry_run=False, rate_per_s=4.0)
    assert real["replayed"] == want

    after = {r["id"]: r for r in records(conn)}
    for i in want:
        record, was = after[i], next(r for r in before if r["id"] == i)
        assert (record["status"], record["replay_reason"]) == ("failed", REASON)
        assert record["attempt_count"] == was["attempt_count"]  # attempt numbers keep counting
        assert record["max_attempts"] == was["attempt_count"] + 5  # a new record's budget
    # staggered at the rate: record k due k / rate seconds after the first
    due = sorted(after[i]["next_retry_at"] for i in want)
    assert [round((d - due[0]).total_seconds(), 3) for d in due] == [k / 4 for k in range(len(due))]
    untouched = [r for r in before if r["id"] not in want]
    assert [after[r["id"]] for r in untouched] == untouched


def test_limit_takes_the_oldest_first_and_the_next_run_the_rest(
    db: str, conn: psycopg.Connection[Any], mix: dict[str, list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    selection = operator.ReplaySelection(since=ago(conn, 3), until=ago(conn, 1), limit=3)
    everything = sorted(
        mix["sent_1"] + mix["sent_2"] + mix["dead_1_5xx"] + mix["dead_2_auth"],
        key=lambda i: scalar(
            conn, "SELECT updated_at FROM outbox_notifier.notification_records WHERE id = %s", (i,)
        ),
    )
    dry = run_replay(db, selection, capsys, dry_run=True)
    assert ids_of(dry) == sorted(everything[:3])
    assert dry["over_limit"] == len(everything) - 3
    assert dry["not_replayable"] == {"failed": 2, "pending": 1}
    first = run_replay(db, selection, capsys, dry_run=False)
    assert first["replayed"] == ids_of(dry)
    second = run_replay(db, selection, capsys, dry_run=False)
    assert second["replayed"] == sorted(everything[3:6])
    third = run_replay(db, selection, capsys, dry_run=False)
    assert third["replayed"] == sorted(everything[6:])
    assert third["over_limit"] == 0


def test_a_record_held_elsewhere_is_skipped_and_said_so(
    db: str, conn: psycopg.Connection[Any], mix: dict[str, list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    selection = operator.ReplaySelection(since=ago(conn, 3), until=ago(conn, 1), user_id=2)
    held = mix["sent_2"][0]
    with psycopg.connect(db) as other:
        other.execute(
            "SELECT 1 FROM outbox_notifier.notification_records WHERE id = %s FOR UPDATE", (held,)
        )
        report = run_replay(db, selection, capsys, dry_run=False, expect=1)
        other.rollback()
    assert report["held"] == [held]
    assert report["replayed"] == sorted(mix["sent_2"][1:] + mix["dead_2_auth"])
    again = run_replay(db, selection, capsys, dry_run=False)
    assert again["replayed"] == [held]


# -- budget, rescue ----------------------------------------------------------------------------


async def test_a_replay_that_fails_for_good_ends_dead_and_both_attempts_say_replay(
    db: str, conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    async with FeishuServer() as server:
        add_channel(conn, 1, server.flow_url("gone"))
        [dead] = insert_records(
            conn, "d-", 1, status="dead", hours_ago=2, error_code="provider_5xx", attempt_count=5
        )
        server.script("gone", [Reply(status=500)], then=Reply(status=400))
        selection = operator.ReplaySelection(since=ago(conn, 3), until=ago(conn, 1))
        assert run_replay(db, selection, capsys, dry_run=False)["replayed"] == [dead]

        def status() -> Any:
            return scalar(
                conn, "SELECT status FROM outbox_notifier.notification_records WHERE id = %s",
                (dead,),
            )  # fmt: skip

        # a spent budget (5 of 5) does not end the replay at its first failure: it has 5 more
        async with running(Daemon(settings_for(db, retry_base_s=0.2, retry_max_s=0.2))):
            await eventually(lambda: status() == "dead", what="the replay dead on the 400")
    [record] = records(conn)
    assert (record["attempt_count"], record["max_attempts"]) == (7, 10)
    assert record["last_error_code"] == "payload_invalid"
    assert record["replay_reason"] is None
    assert replayed_attempts(conn) == [
        (dead, 6, "temporary_fail", REASON),
        (dead, 7, "permanent_fail", REASON),
    ]


def test_an_expired_lease_of_a_replay_is_logged_as_the_replay(
    db: str, conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    ids = insert_records(conn, "r-", 2, hours_ago=2)
    selection = operator.ReplaySelection(since=ago(conn, 3), until=ago(conn, 1))
    assert run_replay(db, selection, capsys, dry_run=False)["replayed"] == ids
    # both claimed, the worker dies; one had its last attempt
    conn.execute(
        "UPDATE outbox_notifier.notification_records SET status = 'sending',"
        " attempt_count = attempt_count + 1, lease_token = 7,"
        " lease_expires_at = now() - interval '1 second',"
        " max_attempts = CASE WHEN id = %s THEN attempt_count + 1 ELSE max_attempts END"
        " WHERE id = ANY(%s)",
        (ids[1], ids),
    )
    rescued = conn.execute(
        query("rescue_expired_leases"), {"limit": 10, "delays_s": [1.0], "jitter": 0.0}
    ).fetchall()
    assert sorted(rescued) == [(ids[0], "feishu", "failed"), (ids[1], "feishu", "dead")]
    assert replayed_attempts(conn) == [
        (ids[0], 2, "temporary_fail", REASON),
        (ids[1], 2, "temporary_fail", REASON),
    ]
    reasons = {r["id"]: r["replay_reason"] for r in records(conn)}
    assert reasons == {ids[0]: REASON, ids[1]: None}  # a retry still belongs to the replay


# -- compatibility -----------------------------------------------------------------------------

# How 0014 changed the daemon's two statements that write attempts; undone, they give the
# statements as the previous release ships them (with the later changes of 0015 kept: digests).
_EDITS = {
    "apply_results": [
        ("r.replay_reason, r.digest_target\n    FROM input", "r.digest_target\n    FROM input"),
        (
            "        replay_reason = CASE WHEN input.status = 'failed' THEN r.replay_reason END,\n",
            "",
        ),
        ("applied, replay_reason, message_id\n", "applied, message_id\n"),
        (
            ", known.replay_reason,\n           input.message_id\n",
            ",\n           input.message_id\n",
        ),
        ("    LEFT JOIN known ON known.record_id = input.record_id\n", ""),
    ],
    "rescue_expired_leases": [
        ("lease_token, replay_reason\n", "lease_token\n"),
        (
            "        replay_reason = CASE WHEN r.attempt_count < r.max_attempts"
            " THEN r.replay_reason END,\n",
            "",
        ),
        ("error_code,\n        replay_reason\n", "error_code\n"),
        ("'sending_lease_expired', expired.replay_reason\n", "'sending_lease_expired'\n"),
    ],
}


def _apply_results_statement() -> str:
    """apply_results_v1's statement (0018) as the daemon ran it from queries.sql before 0018:
    the function's body with its parameters bound by name."""
    function = next(m.sql for m in migrations() if m.name == "0018_apply_by_primary_key")
    body = function.split("RETURN QUERY\n", 1)[1].rsplit(";\nEND", 1)[0]
    text = "\n".join(line.removeprefix("    ") for line in body.splitlines())
    text = text.replace("p_results", "%(results)s::jsonb").replace(
        "p_host_now", "%(host_now)s::timestamptz"
    )
    return re.sub(r"\bp_(\w+)", r"%(\1)s", text)


def previous_release_query(name: str) -> Any:
    text = _apply_results_statement() if name == "apply_results" else query(name)
    if name in _EDITS:
        for new, old in _EDITS[name]:
            assert text.count(new) == 1, (name, new)
            text = text.replace(new, old)
        assert "replay_reason" not in text
    return text


async def test_a_daemon_of_the_previous_release_delivers_a_replay_as_any_retry(
    db: str,
    conn: psycopg.Connection[Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from outbox_notifier import store

    monkeypatch.setattr(store, "query", previous_release_query)
    async with FeishuServer() as server:
        add_channel(conn, 1, server.flow_url("alice"))
        ids = insert_records(conn, "r-", 3, hours_ago=2)
        selection = operator.ReplaySelection(since=ago(conn, 3), until=ago(conn, 1))
        assert run_replay(db, selection, capsys, dry_run=False)["replayed"] == ids
        enqueue(conn, payload("new-during-replay"))

        def all_sent() -> bool:
            return bool(
                scalar(
                    conn,
                    "SELECT bool_and(status = 'sent') AND count(*) = 4"
                    " FROM outbox_notifier.notification_records",
                )
            )

        async with running(Daemon(settings_for(db))):
            await eventually(all_sent, what="the replay and the new record delivered")
    calls = Counter(r.json["notification_id"] for r in server.requests)  # type: ignore[index]
    assert [calls[i] for i in ids] == [1, 1, 1]
    # what it cannot do: mark the attempts, and take the reason off the record
    assert replayed_attempts(conn) == []
    assert {r["attempt_count"] for r in records(conn) if r["id"] in ids} == {2}
    assert {r["replay_reason"] for r in records(conn) if r["id"] in ids} == {REASON}
