"""The README's first command: `outbox-notifier demo` runs the pipeline and prints the result."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_demo_settles_and_prints_the_table() -> None:
    # As a newcomer runs it: no DSN, so the demo finds or starts its own throwaway PostgreSQL.
    env = {k: v for k, v in os.environ.items() if k != "OUTBOX_NOTIFIER_DSN"}
    result = subprocess.run(
        [sys.executable, "-m", "outbox_notifier", "demo"],
        capture_output=True, text=True, timeout=110, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^settled after \d+\.\ds$", out, re.MULTILINE), out
    rows = {
        m.group(1): (m.group(2), int(m.group(3)))
        for m in re.finditer(r"^\s+\d+\s+\d+\s+(order-\d)\s+(\w+)\s+(\d+)", out, re.MULTILINE)
    }
    assert rows == {
        "order-1": ("sent", 1),  # its duplicate reused this record
        "order-2": ("sent", 1),  # link in the summary: fallback text
        "order-3": ("sent", 2),  # the webhook failed once
        "order-4": ("skipped", 1),  # no channel
        # one record per other provider, DingTalk's signed
        **{f"order-{n}": ("sent", 1) for n in range(5, 10)},
    }
    providers = re.findall(r"^\s+\d+\s+100[4-8]\s+order-\d[^\n]* (\w+) *$", out, re.MULTILINE)
    assert providers == ["feishu_bot", "webhook", "dingtalk_bot", "wecom_bot", "slack_webhook"]
    assert "rejected  invalid payload: Expected `int`, got `str` - at `$.user_id`" in out
    assert "calls received by the local look-alike of the platforms: 9" in out
