"""A real Prometheus server scrapes a running daemon and sees its deliveries.

Prometheus (Debian's ``prometheus`` package, which also brings promtool) runs as a child process
on a free loopback port with its storage in the test's temporary directory, scraping the
in-process daemon every second as job ``outbox-notifier`` and loading the shipped alert rules.
Its configuration names only loopback targets and no remote write, Alertmanager or service
discovery, so it reaches nothing beyond this machine. The tool is required: missing, the test
fails with the package to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from outbox_notifier.daemon import Daemon
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.support import (
    FLOW_PREFIX,
    add_channel,
    enqueue,
    eventually,
    payload,
    running,
    settings_for,
)

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-notifier.json"
JOB = "outbox-notifier"  # the job name the alert rules select on
SENT = 3  # events of the workload, each delivered once in the end

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus not found: install it (apt-get install -y prometheus)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def write_config(directory: Path, *daemon_ports: int) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in daemon_ports]}],
            }
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _stop(process: subprocess.Popen[bytes], url: str) -> None:
    if process.poll() is not None:
        return
    # The lifecycle API asks for a clean shutdown (TSDB closed); SIGTERM does the same.
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{url}/-/quit", timeout=2, trust_env=False)
    try:
        process.wait(timeout=10)
        return
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.asynccontextmanager
async def prometheus_server(directory: Path, config: Path) -> AsyncIterator[Prometheus]:
    """Prometheus on a free loopback port, ready to query; stopped cleanly afterwards."""
    binary = prometheus_binary()
    for attempt in range(3):  # a free port can be taken between the probe and the bind
        port = free_port()
        log = directory / f"prometheus-{attempt}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / f'data-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--web.enable-lifecycle",
                    "--log.level=info",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=directory,
            )
        server = Prometheus(process, f"http://127.0.0.1:{port}", log)
        try:
            if await _wait_ready(server):
                yield server
                return
        finally:
            _stop(process, server.url)
    pytest.fail(f"prometheus did not become ready:\n{server.log_tail()}")


async def _wait_ready(server: Prometheus, timeout_s: float = 15.0) -> bool:
    """True once /-/ready answers 200; False if the process exited (say, its port was taken)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{server.url}/-/ready")).status_code == 200:
                    return True
            await asyncio.sleep(0.1)
    pytest.fail(f"prometheus not ready after {timeout_s}s:\n{server.log_tail()}")


async def query(client: httpx.AsyncClient, server: Prometheus, promql: str) -> list[Any]:
    response = await client.get(f"{server.url}/api/v1/query", params={"query": promql})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    result: list[Any] = body["data"]["result"]
    return result


async def scalar_value(client: httpx.AsyncClient, server: Prometheus, promql: str) -> float | None:
    """The value of a query returning one series, None while it returns none."""
    result = await query(client, server, promql)
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


async def poll(
    client: httpx.AsyncClient,
    server: Prometheus,
    promql: str,
    expected: float,
    timeout_s: float = 30.0,
) -> None:
    deadline = time.monotonic() + timeout_s
    seen: list[float | None] = []
    while True:
        value = await scalar_value(client, server, promql)
        if not seen or seen[-1] != value:
            seen.append(value)
        if value == expected:
            return
        if time.monotonic() > deadline or server.process.poll() is not None:
            raise AssertionError(
                f"{promql} never reached {expected} in {timeout_s}s (values seen: {seen})\n"
                f"{server.log_tail()}"
            )
        await asyncio.sleep(0.25)


@pytest.fixture
def feishu() -> Iterator[FeishuServer]:
    with FeishuServer.in_thread() as srv:
        yield srv


async def test_prometheus_scrapes_the_delivery_counters(
    db: str, conn: psycopg.Connection[Any], feishu: FeishuServer, tmp_path: Path
) -> None:
    started = time.monotonic()
    add_channel(conn, 1, feishu.flow_url("ok"))
    add_channel(conn, 2, feishu.flow_url("flaky"))
    feishu.script(FLOW_PREFIX + "flaky", [Reply(status=500)])  # then the default 200

    daemon = Daemon(settings_for(db, retry_base_s=0.5, retry_max_s=1.0))
    async with running(daemon):
        await eventually(lambda: daemon.http_port is not None, what="the daemon's HTTP port")
        assert daemon.http_port is not None
        config = write_config(tmp_path, daemon.http_port)
        async with (
            prometheus_server(tmp_path, config) as prometheus,
            httpx.AsyncClient(trust_env=False, timeout=5.0) as client,
        ):
            # The target is up and its counters start at zero (pre-created series).
            await poll(client, prometheus, f'up{{job="{JOB}"}}', 1)
            success = (
                f'sum(outbox_notifier_delivery_attempts_total{{job="{JOB}",outcome="success"}})'
            )
            await poll(client, prometheus, success, 0)

            enqueue(conn, payload("a", user_id=1))
            enqueue(conn, payload("b", user_id=1))
            enqueue(conn, payload("c", user_id=2))  # 500 first, sent on the retry

            await poll(client, prometheus, success, SENT)
            failed = (
                "sum(outbox_notifier_delivery_attempts_total"
                f'{{job="{JOB}",outcome="temporary_fail"}})'
            )
            await poll(client, prometheus, failed, 1)
            errors = (
                "sum(outbox_notifier_provider_errors_total"
                f'{{job="{JOB}",error_code="provider_5xx"}})'
            )
            await poll(client, prometheus, errors, 1)
            latency = f'sum(outbox_notifier_end_to_end_latency_seconds_count{{job="{JOB}"}})'
            await poll(client, prometheus, latency, SENT)

            # The shipped rules load and evaluate against the real series without errors.
            rules_url = f"{prometheus.url}/api/v1/rules"

            async def rules_evaluated() -> bool:
                groups = (await client.get(rules_url)).json()["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                return bool(rules) and all(
                    not rule["lastEvaluation"].startswith("0001-") for rule in rules
                )

            await eventually(rules_evaluated, timeout_s=10, what="every rule evaluated")
            groups = (await client.get(rules_url)).json()["data"]["groups"]
            rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
            assert len(rules) == sum(
                len(group["rules"]) for group in yaml.safe_load(ALERTS.read_text())["groups"]
            )
            unhealthy = {n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}
            assert not unhealthy, unhealthy
            # A healthy daemon that was just scraped sets off neither "down" alert.
            firing = {r["name"] for r in rules.values() if r["state"] != "inactive"}
            assert not firing & {"OutboxNotifierInstanceDown", "OutboxNotifierNoReplicaUp"}

        assert prometheus.process.returncode == 0, prometheus.log_tail()
        assert "See you next time!" in prometheus.log.read_text()
    assert time.monotonic() - started < 60


def _panel_expr(title: str) -> str:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    [panel] = [p for p in panels if p["title"] == title]
    [target] = panel["targets"]
    expr: str = target["expr"]
    return expr.replace("$job", JOB)


async def test_one_paused_target_counts_once_with_two_replicas(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Both replicas export the database-wide paused_targets gauge (1): the dashboard's stat
    shows 1, not 2, and TargetPaused is one alert for the job, not one per replica."""
    conn.execute(
        "INSERT INTO outbox_notifier.targets (target_key, provider, host, paused_until)"
        " VALUES ('k1', 'webhook', 'hooks.example', now() + interval '1 hour')"
    )
    replicas = [Daemon(settings_for(db, maintenance_interval_s=1.0)) for _ in range(2)]
    async with running(replicas[0]), running(replicas[1]):
        await eventually(lambda: all(r.http_port is not None for r in replicas), what="HTTP ports")
        ports = [r.http_port for r in replicas if r.http_port is not None]
        config = write_config(tmp_path, *ports)
        async with (
            prometheus_server(tmp_path, config) as prometheus,
            httpx.AsyncClient(trust_env=False, timeout=5.0) as client,
        ):
            await poll(client, prometheus, f'count(up{{job="{JOB}"}} == 1)', 2)
            # Each replica exports the fact: summing them would say 2.
            per_replica = f'sum(outbox_notifier_paused_targets{{job="{JOB}"}})'
            await poll(client, prometheus, per_replica, 2)
            stat = _panel_expr("Paused targets")
            assert await scalar_value(client, prometheus, stat) == 1
            # The alert waits 15 minutes before firing: while pending it is already one series.
            alerts = 'count(ALERTS{alertname="OutboxNotifierTargetPaused"})'
            await poll(client, prometheus, alerts, 1)
            pending = await query(
                client, prometheus, 'ALERTS{alertname="OutboxNotifierTargetPaused"}'
            )
            assert [a["metric"].get("instance") for a in pending] == [None]
