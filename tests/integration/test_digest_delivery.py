"""Digests end to end: the daemon (one replica or three) relays a burst for one chat robot, and
the local look-alike of each platform receives it as digests within the robot's budget.

Each record's summary names it (``record <i> moved.``), so what every message carried is read
back from the bodies the look-alike received, whatever the platform's format. The burst sizes
are the issue's (300 records) where the budget lets them arrive in seconds; the full figures
beside digests off are the bench's (``python -m bench --only digests``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from outbox_notifier.daemon import Daemon
from outbox_notifier.testing.feishu_server import (
    BOT_PREFIX,
    DINGTALK_PREFIX,
    SLACK_PREFIX,
    WECOM_PREFIX,
    FeishuServer,
    Recorded,
    Reply,
)
from tests.support import (
    add_channel,
    enqueue,
    eventually,
    payload,
    running,
    scalar,
    settings_for,
)

RECORD = re.compile(rb"record (\d+) moved")
SETTLED = (
    "SELECT count(*) FROM outbox_notifier.notification_records"
    " WHERE status IN ('sent', 'dead', 'skipped')"
)


def carried(request: Recorded) -> list[int]:
    """The records a message carried, in the order it lists them (once each: Slack's single
    message names its record twice, as the fallback text and in its block)."""
    return [int(n) for n in dict.fromkeys(RECORD.findall(request.body))]


def commit_burst(
    conn: psycopg.Connection[Any], n: int, summary: Callable[[int], str] | None = None
) -> None:
    """``n`` events for user 1, committed in one transaction (record i: ``k-<i>``)."""
    with conn.transaction():
        for i in range(n):
            text = summary(i) if summary else f"record {i} moved."
            enqueue(conn, payload(f"k-{i}", summary_text=text))


def attempt_rows(conn: psycopg.Connection[Any]) -> list[tuple[int, int, int | None, str]]:
    """(record number, attempt, message id, outcome) of every attempt, in the order logged."""
    rows = conn.execute(
        "SELECT r.dedupe_key, a.attempt, a.message_id, a.outcome"
        " FROM outbox_notifier.delivery_attempts a"
        " JOIN outbox_notifier.notification_records r ON r.id = a.record_id ORDER BY a.id"
    ).fetchall()
    return [(int(key.removeprefix("k-")), attempt, msg, out) for key, attempt, msg, out in rows]


async def deliver(
    db: str, conn: psycopg.Connection[Any], n: int, *, replicas: int = 1, **settings: Any
) -> float | None:
    """Starts the replicas, commits a burst of ``n`` once they listen, and returns when every
    record has settled: the seconds from the commit to the last record sent, as the database
    recorded both (None: none was sent)."""
    daemons = [Daemon(settings_for(db, **settings)) for _ in range(replicas)]
    async with contextlib.AsyncExitStack() as stack:
        for daemon in daemons:
            await stack.enter_async_context(running(daemon))
        await eventually(lambda: all(d.listener_up for d in daemons), what="listening")
        commit_burst(conn, n)
        await eventually(lambda: scalar(conn, SETTLED) == n, timeout_s=60, what="all settled")
    took_s = scalar(
        conn,
        "SELECT extract(epoch FROM max(sent_at) - min(outbox_created_at))"
        " FROM outbox_notifier.notification_records",
    )
    return None if took_s is None else float(took_s)


# provider, the look-alike's path, records, budget a second and a minute, and the time the
# issue gives the burst. Slack's 1 a second makes 300 records 15 calls and 15 s: 120 here.
BURSTS = [
    ("dingtalk_bot", DINGTALK_PREFIX, 300, 0, 20, 120.0),
    ("wecom_bot", WECOM_PREFIX, 300, 0, 20, 120.0),
    ("feishu_bot", BOT_PREFIX, 300, 5, 100, 30.0),
    ("slack_webhook", SLACK_PREFIX, 120, 1, 0, 30.0),
]


def url_of(srv: FeishuServer, provider: str) -> str:
    return {
        "dingtalk_bot": srv.dingtalk_url,
        "wecom_bot": srv.wecom_url,
        "feishu_bot": srv.bot_url,
        "slack_webhook": srv.slack_url,
    }[provider]()


@pytest.mark.parametrize(
    ("provider", "prefix", "n", "per_s", "per_min", "within_s"),
    [pytest.param(*burst, id=burst[0]) for burst in BURSTS],
)
async def test_a_burst_arrives_in_digests_within_the_budget_and_in_commit_order(
    db: str,
    conn: psycopg.Connection[Any],
    srv: FeishuServer,
    provider: str,
    prefix: str,
    n: int,
    per_s: int,
    per_min: int,
    within_s: float,
) -> None:
    add_channel(conn, 1, url_of(srv, provider), provider=provider)
    took_s = await deliver(db, conn, n)
    assert took_s is not None and took_s <= within_s
    messages = srv.requests_to(prefix.partition("?")[0])
    assert {m.status_sent for m in messages} == {200}
    # each record in exactly one message; in commit order within and across messages
    assert [i for m in messages for i in carried(m)] == list(range(n))
    # within the budget (the look-alike's clock; the daemon's windows are 50 ms wider)
    if per_min:
        assert len(messages) <= per_min
        assert srv.max_per_window(60.0, prefix.partition("?")[0]) <= per_min
    if per_s:
        assert srv.max_per_window(1.0, prefix.partition("?")[0]) <= per_s
    # accounting per record: one attempt each, the rows of a digest sharing its message id
    rows = attempt_rows(conn)
    assert sorted(i for i, *_ in rows) == list(range(n))
    by_message: dict[int | None, list[int]] = {}
    for i, _, message_id, _ in rows:
        by_message.setdefault(message_id, []).append(i)
    alone = by_message.pop(None, [])
    assert sorted(map(sorted, by_message.values())) == sorted(
        sorted(carried(m)) for m in messages if len(carried(m)) > 1
    )
    assert sorted(alone) == sorted(i for m in messages if len(carried(m)) == 1 for i in carried(m))


async def burst_to_replicas(
    conn: psycopg.Connection[Any], url: str, daemons: list[Daemon], n: int, timeout_s: float
) -> None:
    """``n`` records for the robot at ``url``, held by an operator pause while the first
    replica relays them (relays running side by side may split one producer transaction's rows
    between them, and the records of an unkeyed event are created in the order the relays
    commit); then every replica runs, the pause is lifted, and all of them find the burst due
    at once. Returns when every record has settled."""
    conn.execute("SELECT outbox_notifier.pause_v1('a burst for several replicas', %s)", (url,))
    held = (
        "SELECT count(*) FROM outbox_notifier.notification_records"
        " WHERE status = 'pending' AND next_retry_at > now()"
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running(daemons[0]))
        await eventually(lambda: daemons[0].listener_up, what="listening")
        commit_burst(conn, n)
        await eventually(lambda: scalar(conn, held) == n, what="the burst held by the pause")
        for daemon in daemons[1:]:
            await stack.enter_async_context(running(daemon))
        await eventually(lambda: all(d.listener_up for d in daemons), what="listening")
        conn.execute("SELECT outbox_notifier.resume_v1(%s)", (url,))
        await eventually(lambda: scalar(conn, SETTLED) == n, timeout_s=timeout_s, what="settled")


async def test_three_replicas_claiming_one_burst_keep_the_budget_and_the_order(
    db: str, conn: psycopg.Connection[Any], srv: FeishuServer
) -> None:
    url = srv.dingtalk_url()
    add_channel(conn, 1, url, provider="dingtalk_bot")
    await burst_to_replicas(conn, url, [Daemon(settings_for(db)) for _ in range(3)], 300, 60)
    took_s = scalar(
        conn,
        "SELECT extract(epoch FROM max(r.sent_at) - max(p.resumed_at))"
        " FROM outbox_notifier.notification_records r, outbox_notifier.pauses p",
    )
    assert took_s <= 120.0
    messages = srv.requests_to("/robot/send")
    assert [i for m in messages for i in carried(m)] == list(range(300))
    assert len(messages) <= 20 and srv.max_per_window(60.0, "/robot/send") <= 20
    # the operator's view: the messages and the records each carried
    view = conn.execute(
        "SELECT records, record_ids, outcome FROM outbox_notifier.digest_messages"
        " ORDER BY message_id"
    ).fetchall()
    ids = dict(conn.execute("SELECT id, dedupe_key FROM outbox_notifier.notification_records"))
    assert [[int(ids[r].removeprefix("k-")) for r in row[1]] for row in view] == [
        carried(m) for m in messages if len(carried(m)) > 1
    ]
    assert {row[2] for row in view} == {"success"}


# a budget by the second, so that the slowest mix (every call a single) still drains in 20 s
PER_S = 10
PACED = {"dingtalk_max_per_s": PER_S, "dingtalk_max_per_min": 0}


@pytest.mark.timeout(60)
async def test_replicas_with_digests_on_and_off_share_the_budget_and_deliver_each_once(
    db: str, conn: psycopg.Connection[Any], srv: FeishuServer
) -> None:
    # A fleet halfway through a settings change: one replica of three has DingTalk digests
    # off. Its claims send one record a call, the others digests; the target's budget is one
    # log for all of them, and every record still goes out once. (Its singles may go ahead of
    # the queue: these records have no ordering key, so no order is promised.)
    url = srv.dingtalk_url()
    add_channel(conn, 1, url, provider="dingtalk_bot")
    daemons = [
        Daemon(settings_for(db, **PACED)),
        Daemon(settings_for(db, **PACED, dingtalk_digest=False)),
        Daemon(settings_for(db, **PACED)),
    ]
    await burst_to_replicas(conn, url, daemons, 200, 40)
    messages = srv.requests_to("/robot/send")
    delivered = [i for m in messages for i in carried(m)]
    assert sorted(delivered) == list(range(200))  # each record once
    assert srv.max_per_window(1.0, "/robot/send") <= PER_S
    assert any(len(carried(m)) > 1 for m in messages)  # the digest replicas merged
    statuses = conn.execute(
        "SELECT status, count(*) FROM outbox_notifier.notification_records GROUP BY status"
    ).fetchall()
    assert statuses == [("sent", 200)]
    # one attempt a record: no record was sent twice or retried for the mix
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.delivery_attempts") == 200


async def test_a_target_with_little_traffic_still_gets_a_message_per_record(
    db: str, conn: psycopg.Connection[Any], srv: FeishuServer
) -> None:
    # one record at a time, each once the one before was delivered: never over the budget
    add_channel(conn, 1, srv.dingtalk_url(), provider="dingtalk_bot")

    async def settled(count: int) -> None:
        await eventually(lambda: scalar(conn, SETTLED) == count, what=f"{count} settled")

    async with running(Daemon(settings_for(db))):
        for i in range(4):
            enqueue(conn, payload(f"k-{i}", summary_text=f"record {i} moved."))
            await settled(i + 1)
    messages = srv.requests_to("/robot/send")
    assert [carried(m) for m in messages] == [[0], [1], [2], [3]]
    shapes = [m.json["msgtype"] for m in messages if isinstance(m.json, dict)]
    assert shapes == ["text"] * 4  # a single message's body, not a digest's markdown
    assert {message_id for _, _, message_id, _ in attempt_rows(conn)} == {None}


async def test_a_digest_refused_for_its_payload_is_retried_record_by_record(
    db: str, conn: psycopg.Connection[Any], srv: FeishuServer
) -> None:
    # DingTalk refuses any message holding record 3 (a parameter error: payload_invalid)
    srv.judge(
        DINGTALK_PREFIX,
        lambda r: Reply.errcode(400105, "invalid content") if 3 in carried(r) else None,
    )
    add_channel(conn, 1, srv.dingtalk_url(), provider="dingtalk_bot")
    # 2 a second: six records are over the budget, so they go as one digest first
    await deliver(db, conn, 6, dingtalk_max_per_s=2, dingtalk_max_per_min=0)
    statuses = dict(
        conn.execute(
            "SELECT dedupe_key, status || ' ' || coalesce(last_error_code, '')"
            " FROM outbox_notifier.notification_records"
        ).fetchall()
    )
    assert statuses == {f"k-{i}": "sent " for i in (0, 1, 2, 4, 5)} | {
        "k-3": "dead payload_invalid"
    }
    messages = srv.requests_to("/robot/send")
    assert carried(messages[0]) == [0, 1, 2, 3, 4, 5]  # the refused digest
    assert sorted(carried(m) for m in messages[1:]) == [[i] for i in range(6)]  # then alone
    rows = attempt_rows(conn)
    [digest_id] = {message_id for _, attempt, message_id, _ in rows if attempt == 1}
    assert digest_id is not None
    assert sorted((i, attempt, message_id) for i, attempt, message_id, _ in rows) == sorted(
        [(i, 1, digest_id) for i in range(6)] + [(i, 2, None) for i in range(6)]
    )


@pytest.mark.parametrize(
    ("provider", "reply", "code"),
    [
        ("dingtalk_bot", Reply(status=401), "provider_auth_failed"),
        ("slack_webhook", Reply.slack_error(410, "channel_is_archived"), "endpoint_gone"),
    ],
    ids=["dingtalk-401", "slack-410"],
)
async def test_an_auth_failure_or_a_gone_endpoint_ends_every_record_of_the_digest(
    db: str,
    conn: psycopg.Connection[Any],
    srv: FeishuServer,
    provider: str,
    reply: Reply,
    code: str,
) -> None:
    url = url_of(srv, provider)
    srv.script(url.removeprefix(srv.url), [], then=reply)
    add_channel(conn, 1, url, provider=provider)
    await deliver(db, conn, 5, dingtalk_max_per_min=3)  # over the budget: one digest
    [message] = srv.requests
    assert carried(message) == [0, 1, 2, 3, 4]
    ended = conn.execute(
        "SELECT DISTINCT status, last_error_code FROM outbox_notifier.notification_records"
    ).fetchall()
    assert ended == [("dead", code)]
    if code == "endpoint_gone":  # as a single call's 410 would, the channel is switched off
        assert scalar(conn, "SELECT enabled FROM outbox_notifier.notification_channels") is False


async def test_records_a_message_cannot_hold_go_in_the_next_without_spending_attempts(
    db: str, conn: psycopg.Connection[Any], srv: FeishuServer
) -> None:
    # WeCom's markdown content holds 4096 bytes: records of ~170 CJK characters, 7 or so a
    # message. 5 a minute: the twenty records are over the budget and go as digests.
    add_channel(conn, 1, srv.wecom_url(), provider="wecom_bot")
    daemon = Daemon(settings_for(db, wecom_max_per_min=5))
    async with running(daemon):
        await eventually(lambda: daemon.listener_up, what="listening")
        commit_burst(conn, 20, lambda i: f"record {i} moved. " + "日程调整" * 40)
        await eventually(lambda: scalar(conn, SETTLED) == 20, timeout_s=30, what="settled")
    messages = srv.requests_to("/cgi-bin/webhook/send")
    assert [i for m in messages for i in carried(m)] == list(range(20))
    assert 3 <= len(messages) <= 5
    for m in messages:
        assert isinstance(m.json, dict)
        assert len(m.json["markdown"]["content"].encode()) <= 4096
    # every record once, on its first attempt: being left out of a message spent nothing
    assert sorted((i, attempt) for i, attempt, _, _ in attempt_rows(conn)) == [
        (i, 1) for i in range(20)
    ]
    assert scalar(conn, "SELECT max(attempt_count) FROM outbox_notifier.notification_records") == 1


async def test_users_sharing_a_robot_share_its_digests_one_recipient_a_message(
    db: str, conn: psycopg.Connection[Any], srv: FeishuServer
) -> None:
    # A group robot three users' channels name: alike for users 1 and 2, signed for user 3 (a
    # message is signed with one secret, so user 3's records go in messages of their own).
    # In turn, as here, the records of a message are the oldest that share a recipient: eight
    # calls for twelve records, within a budget of 10 a minute that the 12 exceed.
    url = srv.dingtalk_url("group")
    add_channel(conn, 1, url, provider="dingtalk_bot")
    add_channel(conn, 2, url, provider="dingtalk_bot")
    add_channel(conn, 3, url, provider="dingtalk_bot", auth_kind="bot_secret", secret="SEC-x")
    daemon = Daemon(settings_for(db, dingtalk_max_per_min=10))
    async with running(daemon):
        await eventually(lambda: daemon.listener_up, what="listening")
        with conn.transaction():
            for i in range(12):  # users 1, 2, 3, 1, 2, 3, ...
                enqueue(
                    conn, payload(f"k-{i}", user_id=i % 3 + 1, summary_text=f"record {i} moved.")
                )
        await eventually(lambda: scalar(conn, SETTLED) == 12, timeout_s=30, what="settled")
    messages = srv.requests_to("/robot/send")
    signed = [carried(m) for m in messages if "sign=" in m.query]
    assert signed == [[2], [5], [8], [11]]  # user 3's, and only theirs, signed
    assert [carried(m) for m in messages if "sign=" not in m.query] == [
        [0, 1], [3, 4], [6, 7], [9, 10],
    ]  # fmt: skip
    assert [i for m in messages for i in carried(m)] == list(range(12))
    assert scalar(conn, "SELECT max(attempt_count) FROM outbox_notifier.notification_records") == 1


async def test_a_recipient_no_message_can_reach_ends_the_whole_digest_at_once(
    db: str, conn: psycopg.Connection[Any], srv: FeishuServer
) -> None:
    # the channel's URL is outside the DingTalk policy (host 127.0.0.1 only): no message can
    # be made for any of its records, and each gets that answer at once, not a slot each
    add_channel(conn, 1, srv.dingtalk_url().replace("127.0.0.1", "localhost"),
                provider="dingtalk_bot")  # fmt: skip
    await deliver(db, conn, 5, dingtalk_max_per_min=3)
    ended = conn.execute(
        "SELECT DISTINCT status, last_error_code FROM outbox_notifier.notification_records"
    ).fetchall()
    assert ended == [("dead", "invalid_url")]
    assert srv.requests == []
    assert scalar(conn, "SELECT cardinality(recent_sends) FROM outbox_notifier.targets") == 1
