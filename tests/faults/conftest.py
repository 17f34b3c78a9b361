"""Fixtures of the fault-injection scenarios: the local Feishu-like server, in a thread, so the
daemon subprocesses can reach it while the test drives faults."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from outbox_notifier.testing.feishu_server import FeishuServer


@pytest.fixture
def server() -> Iterator[FeishuServer]:
    with FeishuServer.in_thread() as srv:
        yield srv
