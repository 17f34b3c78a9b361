"""A 0.1.0 installation's settings start this release's daemon.

Every setting 0.1.0 had, in a settings file and again in the environment (as a systemd
EnvironmentFile or a Kubernetes env list would hold them), with 0.1.0's values: its defaults,
``health_stale_s = 30`` (valid then, below this release's default database deadline) and the
removed ``http_transport = "httpx"``. The daemon must start, deliver, and warn once about the
removed setting.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg

from outbox_notifier import settings
from outbox_notifier.testing.feishu_server import FeishuServer
from tests import release_surface
from tests.acceptance.test_daemon_processes import stop, wait_until
from tests.support import add_channel, enqueue, payload, scalar

OLD = next(r for r in release_surface.releases() if r.version == "0.1.0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_env_text(value: object) -> str:
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def test_every_0_1_0_setting_from_file_and_environment_starts_the_daemon(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    port = _free_port()
    values: dict[str, object] = {
        **OLD.settings,
        "dsn": db,
        "health_stale_s": 30.0,
        "http_transport": "httpx",
        "http_listen": f"127.0.0.1:{port}",
        "poll_interval_s": 0.5,
        "pool_min_size": 1,
        "flow_allowed_schemes": ["http"],
        "flow_allowed_hosts": ["127.0.0.1"],
    }
    config = tmp_path / "outbox-notifier.toml"
    # JSON literals of strings, numbers, booleans and string lists are TOML literals too
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    env = {settings.env_var(k): _as_env_text(v) for k, v in values.items()}
    env[settings.CONFIG_ENV] = str(config)
    assert len(env) == len(OLD.settings) + 1
    others = {k: v for k, v in os.environ.items() if not k.startswith(settings.ENV_PREFIX)}

    with FeishuServer.in_thread() as server:
        add_channel(conn, 1, server.flow_url("alice"))
        enqueue(conn, payload("after-the-upgrade"))
        # 0.1.0 had no egress guard; the look-alike listens on loopback, which it refuses.
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox_notifier", "run",
             "--set", "egress_allow_cidrs=127.0.0.0/8"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**others, **env},
        )  # fmt: skip
        try:
            _wait_ready_and_sent(proc, port, conn)
        finally:
            code, out = stop(proc)
        assert server.count("/flow/api/trigger-webhook/alice") == 1
    assert code == 0, out[-4000:]
    mentions = [line for line in out.splitlines() if "http_transport" in line]
    assert len(mentions) == 1, out[-4000:]
    assert f"config file {config}, OUTBOX_NOTIFIER_HTTP_TRANSPORT" in mentions[0]
    assert "WARNING" in mentions[0]
    assert "names no setting" not in out


def _wait_ready_and_sent(
    proc: subprocess.Popen[str], port: int, conn: psycopg.Connection[Any]
) -> None:
    def ready_and_sent() -> bool:
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
        except httpx.TransportError:
            return False
        sent = scalar(conn, "SELECT count(*) FROM outbox_notifier.notification_records"
                      " WHERE status = 'sent'")  # fmt: skip
        return ready == 200 and sent == 1 and proc.poll() is None

    wait_until(lambda: ready_and_sent() or proc.poll() is not None, 60, "ready and sent")
