"""The burst figures: N records committed at once for one chat robot, delivered by the CLI
daemon with digests on and off, timed from the commit to the last record sent.

The look-alike (``bench.fixtures.feishu_server``) answers every platform; what each message
carried is read back from its body (each record's summary names it), so the calls, the records
per call and the busiest window are the platform's view, and every record must arrive exactly
once. The budgets are the defaults (DingTalk and WeCom 20 a minute, a Feishu bot 5 a second
and 100 a minute, Slack 1 a second): with digests off a burst of 300 for DingTalk takes a
quarter of an hour, which is the figure the digests are measured against.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

import psycopg

from bench.fixtures import Databases, Process, daemon_args, event_payload, wait_done
from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.testing.feishu_server import RemoteFeishuServer, max_in_window

# provider -> (settings prefix, the look-alike's path of its endpoint, the budget a minute or
# a second that bounds its calls)
PLATFORMS = {
    "dingtalk_bot": ("dingtalk", "/robot/send", "20/min"),
    "feishu_bot": ("bot", "/open-apis/bot/v2/hook/", "5/s, 100/min"),
    "slack_webhook": ("slack", "/services/", "1/s"),
}
_RECORD = re.compile(rb"record (\d+) moved")


@dataclass(frozen=True)
class Burst:
    """One burst delivered: seconds from the commit to the last record sent (database
    clock), the calls the platform received, records per call, the most calls in any second
    and in any minute."""

    last_delivery_s: float
    calls: int
    records_per_call: float
    peak_per_s: int
    peak_per_min: int


def _url(server: RemoteFeishuServer, provider: str) -> str:
    return {
        "dingtalk_bot": server.dingtalk_url,
        "feishu_bot": server.bot_url,
        "slack_webhook": server.slack_url,
    }[provider]("bench-burst")


def _commit(dsn: str, run: str, n: int) -> None:
    """``n`` events for user 1, in one transaction; record i's summary names it."""
    payloads = [
        event_payload(run, i, user_id=1, summary=f"record {i} moved.").decode() for i in range(n)
    ]
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "SELECT outbox_notifier.enqueue(%s, p) FROM unnest(%s::jsonb[]) AS p",
            (EVENT_TYPE, payloads),
        )
        conn.commit()


def burst(
    dbs: Databases, server: RemoteFeishuServer, provider: str, n: int, *, digests: bool
) -> Burst:
    """Delivers a burst of ``n`` records to one ``provider`` target with the CLI daemon."""
    prefix, path, _ = PLATFORMS[provider]
    dsn = dbs.new()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox_notifier.notification_channels (user_id, webhook_url, provider)"
            " VALUES (1, %s, %s)",
            (_url(server, provider), provider),
        )
    server.reset()
    settings = {
        f"{prefix}_allowed_schemes": "http",
        f"{prefix}_allowed_hosts": "127.0.0.1",
        f"{prefix}_digest": "true" if digests else "false",
    }
    proc = Process.start(daemon_args(dsn, "cli", settings))
    try:
        proc.wait_line("outbox-notifier running")
        time.sleep(0.5)  # the listener connected: the commit wakes the relay
        _commit(dsn, uuid.uuid4().hex[:8], n)
        # without digests a DingTalk burst of 300 takes 15 minutes: wait for it
        wait_done(dsn, n, timeout_s=n * 3.5 + 120, poll_s=1.0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM max(sent_at) - min(outbox_created_at))::float8"
                " FROM outbox_notifier.notification_records"
            ).fetchone()
    finally:
        code = proc.stop()
    if code != 0:
        raise RuntimeError(f"daemon exited {code}:\n" + "\n".join(proc.lines[-20:]))
    calls = server.requests(path)
    # a record once per call, however often its body names it (Slack's single message has
    # its text both as the fallback and in its block)
    carried = [int(i) for call in calls for i in dict.fromkeys(_RECORD.findall(call.body))]
    if sorted(carried) != list(range(n)):
        raise RuntimeError(f"{provider}: the {n} records did not arrive once each")
    dbs.drop(dsn)
    assert row is not None
    received = [call.received_at for call in calls]
    return Burst(
        last_delivery_s=float(row[0]),
        calls=len(calls),
        records_per_call=n / len(calls),
        peak_per_s=max_in_window(received, 1.0),
        peak_per_min=max_in_window(received, 60.0),
    )
