"""Every metric the alert rules and the dashboard query is exported by a running daemon.

test_deploy_files checks the PromQL against the collectors ``Metrics`` registers on a fresh
registry. This goes one step further and reads what Prometheus would actually read: a real
daemon, after a small workload (a delivery that fails once with 500, then succeeds), scraped
over HTTP on ``/metrics``. Every ``outbox_notifier_*`` name in the rules' ``expr`` and in the
dashboard's target expressions and variable queries must be among the scraped sample names:
histograms by ``_bucket``/``_sum``/``_count``, counters by ``_total``, as PromQL names them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from outbox_notifier.daemon import Daemon
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.support import (
    FLOW_PREFIX,
    add_channel,
    enqueue,
    eventually,
    payload,
    running,
    scalar,
    settings_for,
)

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-notifier.json"

# Labels Prometheus attaches to every scraped series; the daemon does not export them.
TARGET_LABELS = frozenset({"job", "instance"})

# A metric name of ours: not the tail of a longer identifier (``foo_outbox_notifier_x``) nor part
# of a recording rule name (``job:outbox_notifier_x:rate5m``). Deliberately no look-ahead: a name
# with a character outside [a-z0-9_] is cut short there, and the stub is then reported missing.
_OUR_NAME = re.compile(r"(?<![A-Za-z0-9_:])outbox_notifier_[a-z0-9_]+")
# String literals (label values, regexes) are not metric names...
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# ...except a selector by name: {__name__="outbox_notifier_x"} or {__name__=~"..."}.
_NAME_MATCHER = re.compile(r'__name__\s*=~?\s*"((?:[^"\\]|\\.)*)"')
# A selector with its matchers, and the label names of the matchers.
_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])(outbox_notifier_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


# -- the expressions ------------------------------------------------------------------------


def rule_expressions() -> list[tuple[str, str]]:
    """(where, expr) of every rule in alerts.yml."""
    found = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            found.append((f"alerts.yml {group['name']}/{name}", str(rule["expr"])))
    return found


def _panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if "expr" in target:
                found.append((f"dashboard panel {panel['title']!r}", str(target["expr"])))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue  # the data source variable's query is a plugin type, not PromQL
        where = f"dashboard variable {variable['name']!r}"
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        for text in (variable.get("definition"), query):
            if isinstance(text, str) and text:
                found.append((where, text))
    return found


def all_expressions() -> list[tuple[str, str]]:
    return rule_expressions() + dashboard_expressions()


def referenced_names(expr: str) -> set[str]:
    """Every ``outbox_notifier_*`` metric name an expression reads."""
    by_name = set(_NAME_MATCHER.findall(expr))
    code = _STRING.sub('""', expr)
    names = set(_OUR_NAME.findall(code))
    for value in by_name:
        names |= set(_OUR_NAME.findall(value))
    return names


def missing_names(expressions: Iterable[tuple[str, str]], scraped: Iterable[str]) -> dict[str, str]:
    """Referenced names that were not scraped, each with where it was first seen."""
    available = set(scraped)
    missing: dict[str, str] = {}
    for where, expr in expressions:
        for name in sorted(referenced_names(expr) - available):
            missing.setdefault(name, where)
    return missing


def unknown_labels(
    expressions: Iterable[tuple[str, str]], scraped: dict[str, set[str]]
) -> list[str]:
    """Matchers on a label the selected metric does not carry in the scrape."""
    problems = []
    for where, expr in expressions:
        for name, matchers in _SELECTOR.findall(expr):
            labels = set(_MATCHER.findall(_STRING.sub('""', matchers)))
            unknown = labels - scraped.get(name, set()) - TARGET_LABELS - {"__name__"}
            if unknown:
                problems.append(f"{where}: {name} has no label {sorted(unknown)}")
    return problems


# -- a running daemon, scraped -------------------------------------------------------------


@pytest.fixture
async def server() -> Any:
    async with FeishuServer() as srv:
        yield srv


async def scrape_after_workload(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> dict[str, set[str]]:
    """Sample name -> label names, from /metrics of a daemon that delivered a few events."""
    add_channel(conn, 1, server.flow_url("ok"))
    add_channel(conn, 2, server.flow_url("flaky"))
    server.script(FLOW_PREFIX + "flaky", [Reply(status=500)])  # then the default 200
    enqueue(conn, payload("a", user_id=1))
    enqueue(conn, payload("b", user_id=1))
    enqueue(conn, payload("c", user_id=2))

    daemon = Daemon(settings_for(db, retry_base_s=0.5, retry_max_s=1.0))
    async with running(daemon):

        def settled() -> bool:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'sent'), count(*)"
                " FROM outbox_notifier.notification_records"
            ).fetchone()
            return row == (3, 3)

        await eventually(settled, timeout_s=20, what="three records sent")
        assert daemon.http_port is not None
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://127.0.0.1:{daemon.http_port}/metrics")
    assert response.status_code == 200
    temporary = "SELECT count(*) FROM outbox_notifier.delivery_attempts WHERE http_status = 500"
    assert scalar(conn, temporary) == 1  # the workload did include the failure

    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture
async def scraped(db: str, conn: psycopg.Connection[Any], server: FeishuServer) -> Any:
    return await scrape_after_workload(db, conn, server)


# -- tests ---------------------------------------------------------------------------------


def _query_fields(node: object) -> Iterable[str]:
    """Every string under an ``expr``, ``definition`` or ``query`` key, however deep."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition", "query") and isinstance(value, str):
                yield value
            else:
                yield from _query_fields(value)
    elif isinstance(node, list):
        for item in node:
            yield from _query_fields(item)


def test_the_expressions_are_all_found() -> None:
    rules = rule_expressions()
    alerts = yaml.safe_load(ALERTS.read_text())
    assert len(rules) == sum(len(group["rules"]) for group in alerts["groups"])
    dashboard = dashboard_expressions()
    assert any(where.startswith("dashboard panel") for where, _ in dashboard)
    assert any(where.startswith("dashboard variable") for where, _ in dashboard)
    # No query of ours is left out, wherever the dashboard keeps it.
    texts = {expr for _, expr in dashboard}
    for text in _query_fields(json.loads(DASHBOARD.read_text())):
        if "outbox_notifier_" in text:
            assert text in texts, text
    referenced = set().union(*(referenced_names(expr) for _, expr in all_expressions()))
    assert {
        "outbox_notifier_delivery_attempts_total",
        "outbox_notifier_end_to_end_latency_seconds_bucket",
        "outbox_notifier_provider_call_duration_seconds_sum",
        "outbox_notifier_snapshot_timestamp_seconds",
        "outbox_notifier_records",
        "outbox_notifier_build_info",
    } <= referenced


async def test_every_metric_the_rules_and_dashboard_read_is_scraped(
    scraped: dict[str, set[str]],
) -> None:
    # The scrape itself names things the PromQL way.
    assert "outbox_notifier_delivery_attempts_total" in scraped
    assert "outbox_notifier_provider_call_duration_seconds_bucket" in scraped
    assert "le" in scraped["outbox_notifier_provider_call_duration_seconds_bucket"]
    assert "outbox_notifier_provider_call_duration_seconds_sum" in scraped
    assert "outbox_notifier_provider_call_duration_seconds_count" in scraped

    missing = missing_names(all_expressions(), scraped)
    assert not missing, f"read by PromQL but not scraped from a running daemon: {missing}"
    problems = unknown_labels(all_expressions(), scraped)
    assert not problems, problems
    # Names in descriptions and panel texts send operators to a query too: they must exist.
    # (Raw text: here the quotes are JSON's and YAML's, not PromQL string literals.)
    mentioned = set(_OUR_NAME.findall(ALERTS.read_text() + DASHBOARD.read_text()))
    assert len(mentioned) >= 20
    assert not mentioned - set(scraped), sorted(mentioned - set(scraped))


async def test_the_check_reports_a_misspelt_metric(scraped: dict[str, set[str]]) -> None:
    wrong = [
        ("typo", 'sum(rate(outbox_notifier_delivery_attempt_total{outcome="success"}[5m]))'),
        ("no _total", "rate(outbox_notifier_records_dead[5m])"),
        (
            "no _bucket",
            "histogram_quantile(0.9, rate(outbox_notifier_end_to_end_latency_seconds[5m]))",
        ),
        ("camel case", "outbox_notifier_listenerUp == 0"),
        ("by name", '{__name__="outbox_notifier_in_flights"}'),
    ]
    assert missing_names(wrong, scraped) == {
        "outbox_notifier_delivery_attempt_total": "typo",
        "outbox_notifier_records_dead": "no _total",
        "outbox_notifier_end_to_end_latency_seconds": "no _bucket",
        "outbox_notifier_listener": "camel case",
        "outbox_notifier_in_flights": "by name",
    }
    # Names that only look like ours are not read as metrics: label values, recording rules.
    right = [
        ("ok", "sum by (channel) (rate(outbox_notifier_delivery_attempts_total[5m]))"),
        ("string", 'up{job="outbox_notifier_not_a_metric"}'),
        ("recording rule", "job:outbox_notifier_not_a_metric:rate5m"),
    ]
    assert missing_names(right, scraped) == {}
    bad_label = [("label", 'outbox_notifier_delivery_attempts_total{outcom="success"}')]
    assert unknown_labels(bad_label, scraped) == [
        "label: outbox_notifier_delivery_attempts_total has no label ['outcom']"
    ]
