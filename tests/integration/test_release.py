"""Release hygiene: one version, one license, the Containerfile lint, the deployment's DSNs."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

import outbox_notifier
from outbox_notifier import settings
from tests import release_surface

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example.com/outbox-notifier"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_has_one_source() -> None:
    project = _pyproject()["project"]
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    assert (
        _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
        == "outbox_notifier.__version__"
    )
    version = outbox_notifier.__version__
    assert importlib.metadata.version("outbox-notifier") == version
    cli = subprocess.run([sys.executable, "-m", "outbox_notifier", "--version"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert cli.stdout.strip() == f"outbox-notifier {version}"


def test_a_changed_surface_ships_as_a_new_version_with_its_changelog(
    conn: psycopg.Connection[Any],
) -> None:
    released = release_surface.releases()[-1]
    now = release_surface.current(conn)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert release_surface.problems(released, now, changelog) == []
    assert release_surface.unaccepted_removed_settings(released, now, settings.REMOVED) == []


def test_every_description_names_every_platform() -> None:
    help_text = subprocess.run([sys.executable, "-m", "outbox_notifier", "--help"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    label = re.search(r'org\.opencontainers\.image\.description="([^"]+)"',
                      (ROOT / "Containerfile").read_text())  # fmt: skip
    assert label is not None
    readme_opening = (ROOT / "README.md").read_text().split("\n## ")[0]
    for where, text in {
        "pyproject": _pyproject()["project"]["description"],
        "docstring": outbox_notifier.__doc__ or "",
        "--help": help_text,
        "image label": label.group(1),
        "README": readme_opening,
    }.items():
        flat = " ".join(text.split())
        for platform in ("Feishu", "DingTalk", "WeCom", "Slack", "Flow", "signed webhooks"):
            assert platform in flat, (where, platform)


def test_manifests_name_the_image_of_this_version() -> None:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "deploy/kubernetes").glob("*.yaml")))
    assert set(re.findall(r"image: (\S+)", text)) == {f"{IMAGE}:{outbox_notifier.__version__}"}


def test_license_is_one_spdx_expression_everywhere() -> None:
    expression = _pyproject()["project"]["license"]
    assert expression == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    metadata = importlib.metadata.metadata("outbox-notifier")
    assert metadata["License-Expression"] == expression
    label = re.search(r'org\.opencontainers\.image\.licenses="([^"]+)"',
                      (ROOT / "Containerfile").read_text())  # fmt: skip
    assert label is not None and label.group(1) == expression


def test_changelog_has_this_version_and_every_migration() -> None:
    from outbox_notifier import sqlfiles

    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{outbox_notifier.__version__}]" in text
    for migration in sqlfiles.migrations():
        assert f"`{migration.name}` ({migration.kind}" in text, migration.name


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return subprocess.run([binary, str(path)], capture_output=True, text=True, check=False)


def test_containerfile_passes_hadolint(tmp_path: Path) -> None:
    assert _hadolint(ROOT / "Containerfile").returncode == 0
    # and the check can fail: an unpinned base and a root user are reported
    broken = tmp_path / "Containerfile"
    broken.write_text("FROM debian\nRUN apt-get install -y curl\n")
    result = _hadolint(broken)
    assert result.returncode != 0
    assert "DL3006" in result.stdout


def test_containerignore_keeps_the_context_small_and_lets_the_wheelhouse_through() -> None:
    rules = [
        line for line in (ROOT / ".containerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]  # fmt: skip
    for excluded in (".git", ".venv", "tests", "bench"):
        assert excluded in rules
    assert not any("wheelhouse" in rule for rule in rules)


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes" / name).read_text()) if d]


def _env(doc: dict[str, Any]) -> dict[str, Any]:
    [container] = doc["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_only_the_migration_job_reads_the_admin_dsn() -> None:
    [job] = _docs("migrate-job.yaml")
    [deployment] = _docs("deployment.yaml")
    [secret] = _docs("secret.example.yaml")
    assert _env(job)["OUTBOX_NOTIFIER_DSN"]["valueFrom"]["secretKeyRef"]["key"] == "admin-dsn"
    assert _env(deployment)["OUTBOX_NOTIFIER_DSN"]["valueFrom"]["secretKeyRef"]["key"] == "dsn"
    assert "admin-dsn" not in (ROOT / "deploy/kubernetes/deployment.yaml").read_text()
    assert {"dsn", "admin-dsn"} <= set(secret["stringData"])


@pytest.mark.parametrize(
    ("unit", "wanted", "unwanted"),
    [
        ("outbox-notifier-migrate.service", "EnvironmentFile=/etc/outbox-notifier/migrate.env",
         None),
        ("outbox-notifier.service", None, "migrate.env"),
    ],
)  # fmt: skip
def test_only_the_migrate_unit_reads_the_admin_dsn(
    unit: str, wanted: str | None, unwanted: str | None
) -> None:
    lines = (ROOT / "deploy/systemd" / unit).read_text().splitlines()
    if wanted is not None:
        assert wanted in lines  # required: no silent fallback to the daemon's DSN
    if unwanted is not None:
        assert not any(unwanted in line for line in lines if not line.startswith("#"))
    example = (ROOT / "deploy/systemd/outbox-notifier-migrate.env.example").read_text()
    assert re.search(r"^OUTBOX_NOTIFIER_DSN=postgresql://", example, re.M)
