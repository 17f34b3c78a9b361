"""The egress guard through the running daemon, for every provider.

The providers' URL policies are opened to every host below, so the guard is what refuses:
with default settings each delivery ends ``dead`` with ``destination_forbidden`` after one
attempt and the loopback listeners see no connection at all; allowing loopback with
``egress_allow_cidrs`` lets the loopback ones through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from outbox_notifier.daemon import Daemon
from outbox_notifier.names import PROVIDER_NAMES
from outbox_notifier.providers import REGISTRY
from outbox_notifier.testing.feishu_server import (
    BOT_PREFIX,
    DINGTALK_PREFIX,
    FLOW_PREFIX,
    SLACK_PREFIX,
    WECOM_PREFIX,
    FeishuServer,
)
from tests.support import add_channel, attempts, enqueue, eventually, payload, records, running
from tests.support import settings_for as base_settings

# Host (as written in the URL) -> whether it denotes loopback (reachable once allowed).
HOSTS: dict[str, bool] = {
    "127.0.0.1": True,
    "localhost": True,
    "127.1": True,
    "2130706433": True,
    "0x7f.1": True,
    "[::1]": True,
    "10.0.0.1": False,
    "169.254.169.254": False,
    "metadata.google.internal": False,
}
PROVIDERS = PROVIDER_NAMES  # the guard applies to every provider
TERMINAL = ("sent", "dead", "skipped")


@pytest.fixture
async def listeners() -> AsyncIterator[tuple[FeishuServer, FeishuServer]]:
    """Look-alikes on IPv4 and IPv6 loopback, on the same port so one URL fits both."""
    async with FeishuServer("127.0.0.1") as v4, FeishuServer("::1", v4.port) as v6:
        yield v4, v6


def settings_for(db: str, **overrides: Any) -> Any:
    hosts = tuple(h.strip("[]") for h in HOSTS)
    values: dict[str, Any] = {
        **{
            f"{spec.settings_prefix}_allowed_hosts": hosts
            for spec in REGISTRY
            if spec.name != "webhook"  # any host already
        },
        "egress_allow_cidrs": (),  # the default: the guard refuses loopback too
    }
    return base_settings(db, **(values | overrides))


def url(provider: str, host: str, port: int, token: str) -> str:
    prefix = {
        "feishu_flow": FLOW_PREFIX,
        "feishu_bot": BOT_PREFIX,
        "webhook": "/hooks/",
        "dingtalk_bot": DINGTALK_PREFIX,
        "wecom_bot": WECOM_PREFIX,
        "slack_webhook": SLACK_PREFIX,
    }
    return f"http://{host}:{port}{prefix[provider]}{token}"


def add_every_target(conn: psycopg.Connection[Any], port: int) -> dict[str, tuple[str, str]]:
    """One channel and one event per (provider, host); dedupe key -> (provider, host)."""
    cases: dict[str, tuple[str, str]] = {}
    user_id = 0
    for provider in PROVIDERS:
        for host in HOSTS:
            user_id += 1
            key = f"{provider}-{user_id}"
            add_channel(conn, user_id, url(provider, host, port, key), provider=provider)
            enqueue(conn, payload(key, user_id=user_id))
            cases[key] = (provider, host)
    return cases


def settled(conn: psycopg.Connection[Any], n: int) -> bool:
    rows = records(conn)
    return len(rows) == n and all(r["status"] in TERMINAL for r in rows)


async def test_every_private_destination_is_refused_without_a_connection(
    db: str, conn: psycopg.Connection[Any], listeners: tuple[FeishuServer, FeishuServer]
) -> None:
    v4, v6 = listeners
    cases = add_every_target(conn, v4.port)
    async with running(Daemon(settings_for(db))):
        await eventually(lambda: settled(conn, len(cases)), what="every record settled")
    for record in records(conn):
        provider, host = cases[record["dedupe_key"]]
        where = f"{provider} -> {host}"
        assert record["status"] == "dead", where
        assert record["last_error_code"] == "destination_forbidden", where
        assert record["attempt_count"] == 1, where
        assert "egress guard refused" in record["last_error"], where
        assert record["provider_request_json"] is None, where  # nothing was sent
        [attempt] = attempts(conn, record["id"])
        assert attempt["error_code"] == "destination_forbidden", where
        assert attempt["outcome"] == "permanent_fail", where
    assert v4.connections_total == 0
    assert v6.connections_total == 0


async def test_allowed_ranges_are_delivered(
    db: str, conn: psycopg.Connection[Any], listeners: tuple[FeishuServer, FeishuServer]
) -> None:
    v4, v6 = listeners
    cases = add_every_target(conn, v4.port)
    settings = settings_for(db, egress_allow_cidrs=("127.0.0.0/8", "::1/128"))
    async with running(Daemon(settings)):
        await eventually(lambda: settled(conn, len(cases)), what="every record settled")
    for record in records(conn):
        provider, host = cases[record["dedupe_key"]]
        where = f"{provider} -> {host}"
        if HOSTS[host]:
            assert (record["status"], record["last_error_code"]) == ("sent", None), where
        else:
            assert record["status"] == "dead", where
            assert record["last_error_code"] == "destination_forbidden", where
    loopback = sum(HOSTS.values()) * len(PROVIDERS)
    assert len(v4.requests) + len(v6.requests) == loopback
    assert len(v6.requests) >= len(PROVIDERS)  # at least the [::1] deliveries
