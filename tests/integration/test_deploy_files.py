"""The files under deploy/ checked by the tools that will read them, offline.

- systemd units: ``systemd-analyze verify`` and ``systemd-analyze security --offline``;
- Kubernetes manifests: the API's JSON schemas (``kubernetes-validate``, strict: unknown fields
  fail); the Prometheus Operator's and KEDA's kinds are CRDs it has no schema for, checked here
  by hand (KEDA's backlog query runs against a migrated database as the daemon's role);
- alert rules: ``promtool check rules`` and ``promtool test rules``;
- every PromQL expression of the rules and the dashboard: syntax (promtool) and only metric
  and label names that ``outbox_notifier.metrics`` exports.

The tools are required, not optional: a missing one fails the test with the package to install.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, LiteralString

import kubernetes_validate  # type: ignore[import-untyped]
import psycopg
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.types.json import Jsonb

from outbox_notifier import settings
from outbox_notifier.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "outbox-notifier.json"

MAIN_UNIT = "outbox-notifier.service"
MIGRATE_UNIT = "outbox-notifier-migrate.service"
INSTALLED_SCRIPT = "/opt/outbox-notifier/venv/bin/outbox-notifier"
# Oldest Kubernetes minor still validated against; strict schemas reject unknown fields.
KUBERNETES_VERSION = "1.30.0"
# Labels Prometheus attaches to every scraped series, not exported by the daemon itself.
TARGET_LABELS = frozenset({"job", "instance"})
# Grafana's variables, as Prometheus would see them after substitution.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$instance": ".*",
    "$job": "outbox-notifier",
}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install it (apt-get install -y {package})")
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


# -- systemd ---------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value, in order (a unit may repeat a key)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def installable_copy(unit: str, directory: Path, *, replace: tuple[str, str] | None = None) -> Path:
    """The unit with ExecStart pointing at this environment's script, which verify requires."""
    script = Path(sys.executable).parent / "outbox-notifier"
    assert script.is_file(), f"{script} missing: install the package (pip install -e .)"
    text = (SYSTEMD / unit).read_text().replace(INSTALLED_SCRIPT, str(script))
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    path = directory / unit
    path.write_text(text)
    return path


def verify(path: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify's exit code and the lines of its output about this unit."""
    result = run(tool("systemd-analyze", "systemd"), "verify", "--man=no", str(path))
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if path.name in line]


@pytest.mark.parametrize("unit", [MAIN_UNIT, MIGRATE_UNIT])
def test_units_pass_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    code, complaints = verify(installable_copy(unit, tmp_path))
    assert code == 0
    assert complaints == []


@pytest.mark.parametrize(
    "replace",
    [
        ("Type=notify", "Type=notifyy"),
        ("WatchdogSec=30", "WatchdogSec=thirty"),
        ("ProtectSystem=strict", "ProtectSystem=stricter"),
    ],
)
def test_a_broken_unit_is_reported(replace: tuple[str, str], tmp_path: Path) -> None:
    path = installable_copy(MAIN_UNIT, tmp_path, replace=replace)
    lineno = path.read_text().splitlines().index(replace[1]) + 1
    # systemd ignores a setting it cannot parse (exit code 0) and says so, naming the line.
    _, complaints = verify(path)
    assert any(f"{path.name}:{lineno}: Failed to parse" in line for line in complaints), complaints


def test_a_unit_whose_program_is_missing_fails_verify(tmp_path: Path) -> None:
    path = tmp_path / MAIN_UNIT
    shutil.copy(SYSTEMD / MAIN_UNIT, path)  # ExecStart names the install path, absent here
    code, complaints = verify(path)
    assert code != 0
    assert any("is not executable" in line for line in complaints), complaints


def test_main_unit_is_a_notify_service_with_a_watchdog_and_a_drain() -> None:
    service = unit_settings((SYSTEMD / MAIN_UNIT).read_text())["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]  # bad configuration: no restart loop
    assert float(service["TimeoutStopSec"][0]) > settings.Settings().shutdown_deadline_s
    assert service["ExecStart"] == [f"{INSTALLED_SCRIPT} run"]
    assert "ExecStartPre" not in service  # migrating is a separate, deliberate step
    assert service["EnvironmentFile"] == ["-/etc/outbox-notifier/env"]


@pytest.mark.parametrize("unit", [MAIN_UNIT, MIGRATE_UNIT])
def test_units_are_hardened(unit: str) -> None:
    service = unit_settings((SYSTEMD / unit).read_text())["Service"]
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key
    assert service["SystemCallFilter"][0] == "@system-service"


def test_migrate_unit_is_a_oneshot_running_migrate() -> None:
    service = unit_settings((SYSTEMD / MIGRATE_UNIT).read_text())["Service"]
    assert service["Type"] == ["oneshot"]
    assert service["ExecStart"] == [f"{INSTALLED_SCRIPT} migrate"]


@pytest.mark.parametrize("unit", [MAIN_UNIT, MIGRATE_UNIT])
def test_units_expose_little(unit: str, tmp_path: Path) -> None:
    path = installable_copy(unit, tmp_path)
    result = run(
        tool("systemd-analyze", "systemd"), "security", "--offline=true", "--no-pager", str(path)
    )
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout  # 0 = locked down, 10 = exposed


# -- Kubernetes --------------------------------------------------------------------------------


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path.name, doc


def by_kind() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for _, doc in manifests():
        assert doc["kind"] not in found, f"two {doc['kind']}s"
        found[doc["kind"]] = doc
    return found


#: Custom resources, which kubernetes-validate has no schema for, and their API group.
CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}
#: Shipped beside the manifests but not applied with them: an example Secret, the migration
#: (its own step of an upgrade), and the autoscaler (needs KEDA's CRDs).
NOT_APPLIED = frozenset({"secret.example.yaml", "migrate-job.yaml", "keda-scaledobject.yaml"})


@pytest.mark.parametrize(
    ("name", "doc"), [pytest.param(n, d, id=f"{n}:{d['kind']}") for n, d in manifests()]
)
def test_manifest_matches_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in CRD_KINDS:
        # Custom resources have no schema in kubernetes-validate;
        # test_prometheus_operator_resources and test_keda_* check them.
        assert doc["apiVersion"] == CRD_KINDS[doc["kind"]]
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "replicas"), "two"),
        (("spec", "template", "spec", "terminationGracePeriod"), 30),  # unknown field
        (("spec", "template", "spec", "containers"), [{"image": "no-name"}]),
    ],
)
def test_a_broken_manifest_fails_validation(path: tuple[str, ...], value: object) -> None:
    broken = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_kind_is_there_and_kustomization_lists_the_applied_ones() -> None:
    kinds = by_kind()
    assert set(kinds) == {
        "ConfigMap",
        "Deployment",
        "Job",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Secret",
        "Service",
        "ServiceMonitor",
        "ScaledObject",
        "TriggerAuthentication",
    }
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == on_disk - NOT_APPLIED


def loaded_config(tmp_path: Path) -> settings.Settings:
    """The ConfigMap's TOML, loaded by the daemon's own settings loader."""
    config = by_kind()["ConfigMap"]["data"]["config.toml"]
    path = tmp_path / "config.toml"
    path.write_text(config)
    return settings.load_settings(config_path=str(path), env={}, overrides={})


def pod_spec(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind()[kind]["spec"]["template"]["spec"]
    return spec


def test_deployment_probes_and_drain_agree_with_the_settings(tmp_path: Path) -> None:
    config = loaded_config(tmp_path)
    deployment = by_kind()["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec("Deployment")
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_deadline_s
    (container,) = spec["containers"]
    assert container["args"] == ["run"]

    host, port = settings.parse_host_port(config.http_listen)
    assert host == "0.0.0.0"  # probes and Prometheus come from outside the pod
    (metrics_port,) = container["ports"]
    assert (metrics_port["name"], metrics_port["containerPort"]) == ("metrics", port)
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe

    env = {e["name"]: e for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert env["OUTBOX_NOTIFIER_CONFIG"]["value"] == mount["mountPath"] + "/config.toml"
    secret_keys = set(by_kind()["Secret"]["stringData"])
    dsn = env["OUTBOX_NOTIFIER_DSN"]["valueFrom"]["secretKeyRef"]
    assert dsn["name"] == by_kind()["Secret"]["metadata"]["name"]
    assert dsn["key"] in secret_keys

    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_locked_down(kind: str) -> None:
    spec = pod_spec(kind)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["runAsNonRoot"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert "limits" in container["resources"]


def test_migration_job_migrates() -> None:
    job = by_kind()["Job"]
    (container,) = pod_spec("Job")["containers"]
    assert container["args"] == ["migrate"]
    assert pod_spec("Job")["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_selectors_pick_the_daemon_pods_only() -> None:
    kinds = by_kind()
    daemon = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    migrate = kinds["Job"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        kinds["Deployment"]["spec"]["selector"]["matchLabels"],
        kinds["Service"]["spec"]["selector"],
        kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert matches(selector, daemon)
        assert not matches(selector, migrate)


def test_prometheus_operator_resources() -> None:
    kinds = by_kind()
    monitor, rule, service = kinds["ServiceMonitor"], kinds["PrometheusRule"], kinds["Service"]
    for doc in (monitor, rule):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["metadata"]["name"]
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
    # The job label is the Service's name; the rules select on it.
    assert service["metadata"]["name"] == "outbox-notifier"
    assert 'up{job="outbox-notifier"}' in (PROMETHEUS / "alerts.yml").read_text()
    # The operator's copy of the rules is the rules file, exactly.
    assert rule["spec"] == yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())


def test_keda_scaled_object_scales_the_deployment() -> None:
    kinds = by_kind()
    scaled, auth = kinds["ScaledObject"], kinds["TriggerAuthentication"]
    deployment, secret = kinds["Deployment"], kinds["Secret"]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    spec = scaled["spec"]
    # Never below what the PodDisruptionBudget and the shipped Deployment expect; bounded.
    assert 2 <= spec["minReplicaCount"] == deployment["spec"]["replicas"]
    assert spec["minReplicaCount"] < spec["maxReplicaCount"] <= 10
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    assert float(trigger["metadata"]["targetQueryValue"]) > 0
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection"
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    # The same Secret key the daemon connects with: the role that may read the backlog.
    (container,) = pod_spec("Deployment")["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["OUTBOX_NOTIFIER_DSN"]["valueFrom"]["secretKeyRef"]["key"] == ref["key"]


def test_keda_backlog_query_counts_due_work_as_the_daemon_role(db: str) -> None:
    """The trigger's query runs as a login role with outbox_notifier_daemon only, returns one
    integer, and counts pending outbox rows plus due records, not history or future retries."""
    (trigger,) = by_kind()["ScaledObject"]["spec"]["triggers"]
    backlog: LiteralString = trigger["metadata"]["query"]
    role = f"on_keda_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(db, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE outbox_notifier_daemon").format(
                sql.Identifier(role)
            )
        )
        try:
            for i in range(3):
                admin.execute(
                    "SELECT outbox_notifier.enqueue('notification.feishu.requested', %s)",
                    (Jsonb({"n": i}),),
                )
            admin.execute(
                "UPDATE outbox_notifier.outbox SET status = 'relayed'"
                " WHERE id = (SELECT min(id) FROM outbox_notifier.outbox)"
            )
            with psycopg.connect(psycopg.conninfo.make_conninfo(db, user=role)) as keda:
                rows = keda.execute(backlog).fetchall()
        finally:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert rows == [(2,)]  # one row, one integer: the two pending outbox rows


# -- Prometheus rules --------------------------------------------------------------------------


def promtool() -> str:
    return tool("promtool", "prometheus")


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rules_pass_promtool_check() -> None:
    result = run(promtool(), "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_unit_tests() -> None:
    result = run(promtool(), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_rule_fails_promtool_check(tmp_path: Path) -> None:
    text = (PROMETHEUS / "alerts.yml").read_text()
    broken = text.replace("outbox_notifier_listener_up == 0", "outbox_notifier_listener_up == (0")
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    result = run(promtool(), "check", "rules", "alerts.yml", cwd=tmp_path)
    assert result.returncode != 0


def test_every_alert_is_unit_tested_and_documented() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts == tested
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- PromQL against the exported metrics -------------------------------------------------------


def exported() -> dict[str, set[str]]:
    """Every sample name the daemon exports, with its label names."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: dict[str, set[str]] = {}
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_expressions() -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition", "query") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def all_expressions() -> list[str]:
    return [rule["expr"] for rule in alert_rules()] + dashboard_expressions()


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_OUR_NAME = re.compile(r"(?<![\w:])outbox_notifier_\w+(?![\w:])")
_SELECTOR = re.compile(r"(?<![\w:])(outbox_notifier_\w+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


def test_expressions_use_only_exported_metrics() -> None:
    names = exported()
    referenced: set[str] = set()
    for expr in all_expressions():
        referenced |= set(_OUR_NAME.findall(_STRING.sub('""', expr)))
    unknown = referenced - set(names)
    assert not unknown, f"not exported by outbox_notifier.metrics: {sorted(unknown)}"
    # The metrics operators need most are all watched somewhere.
    assert {
        "outbox_notifier_delivery_attempts_total",
        "outbox_notifier_provider_errors_total",
        "outbox_notifier_records_dead_total",
        "outbox_notifier_records",
        "outbox_notifier_oldest_due_record_age_seconds",
        "outbox_notifier_outbox_pending",
        "outbox_notifier_outbox_oldest_pending_age_seconds",
        "outbox_notifier_listener_up",
        "outbox_notifier_paused_targets",
        "outbox_notifier_end_to_end_latency_seconds_bucket",
        "outbox_notifier_provider_call_duration_seconds_bucket",
        "outbox_notifier_build_info",
        "outbox_notifier_xmin_horizon_age_seconds",
        "outbox_notifier_dead_tuples",
    } <= referenced


def test_selectors_use_only_exported_labels() -> None:
    names = exported()
    for expr in all_expressions():
        for name, matchers in _SELECTOR.findall(expr):
            labels = set(_MATCHER.findall(_STRING.sub('""', matchers)))
            unknown = labels - names.get(name, set()) - TARGET_LABELS
            assert not unknown, f"{name} has no label {sorted(unknown)} in: {expr}"


def test_the_name_check_catches_a_misspelt_metric() -> None:
    expr = "sum(rate(outbox_notifier_delivery_attempt_total[5m])) and outbox_notifier:x:y"
    assert set(_OUR_NAME.findall(expr)) - set(exported()) == {
        "outbox_notifier_delivery_attempt_total"
    }


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(dashboard_expressions()):
        if expr == "prometheus":  # the data source variable's plugin type, not a query
            continue
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").split(",")[0]
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_templated() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " | ".join(p["title"].lower() for p in panels)
    for word in ("outcome", "latency", "duration", "backlog", "dead", "retries", "paused", "up"):
        assert word in titles, word
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_only_the_prometheus_namespace_may_reach_the_metrics_port() -> None:
    policy = by_kind()["NetworkPolicy"]["spec"]
    pod_labels = by_kind()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    [source] = rule["from"]
    assert set(source) == {"namespaceSelector"}  # no podSelector-only or ipBlock opening
    assert source["namespaceSelector"]["matchLabels"]
    container = pod_spec("Deployment")["containers"][0]
    [port] = container["ports"]
    assert [p["port"] for p in rule["ports"]] == [port["name"]]


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text."""
    found = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = _anchors(runbook)
    rules = alert_rules()
    for rule in rules:
        url = rule["annotations"].get("runbook_url", "")
        page, _, anchor = url.partition("#")
        assert page.endswith("docs/runbook.md"), rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/runbook.md"
    # One section per alert, and no section for an alert that is gone.
    sections = {line[3:].strip() for line in runbook.splitlines() if line.startswith("## ")}
    assert sections == {rule["alert"] for rule in rules}


def test_database_wide_gauges_count_once_per_job() -> None:
    """Every replica exports the database-wide gauges: rules and panels must not sum them
    across replicas, nor alert once per replica."""
    database_wide = (
        "paused_targets", "database_failing", "outbox_pending", "records{",
        "oldest_due_record_age_seconds", "outbox_oldest_pending_age_seconds",
        "xmin_horizon_age_seconds", "xmin_horizon_age_xids", "dead_tuples",
        "operator_pause_oldest_age_seconds",
    )  # fmt: skip
    for expr in all_expressions():
        for gauge in database_wide:
            name = "outbox_notifier_" + gauge
            if name not in expr:
                continue
            assert not re.findall(r"\bsum\b[^()]*\(\s*" + re.escape(name), expr), expr
            assert re.findall(r"\b(max|topk)\b", expr), expr
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert not variables["job"]["multi"] and not variables["job"]["includeAll"]
    for expr in dashboard_expressions():
        if "outbox_notifier_" in expr and not expr.startswith(
            "label_values(outbox_notifier_build_info, job)"
        ):
            assert 'job="$job"' in expr, expr
