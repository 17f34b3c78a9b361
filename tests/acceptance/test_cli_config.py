"""The CLI as a subprocess: help, configuration errors, masking. No database needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUBCOMMANDS = ["migrate", "run", "status", "requeue", "demo", "check-config"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_NOTIFIER_")}
    env.update(extra)
    return env


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox_notifier", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=60,
        check=False,
    )


def test_help() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: outbox-notifier {command}" in result.stdout
    for option in ("--config", "--dsn", "--set", "--log-format", "--log-level"):
        assert option in result.stdout


def test_bad_env_value_is_one_line_exit_2() -> None:
    result = cli("check-config", OUTBOX_NOTIFIER_POLL_INTERVAL_S="-1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("outbox-notifier: invalid setting poll_interval_s")
    assert "OUTBOX_NOTIFIER_POLL_INTERVAL_S" in lines[0]


def test_bad_config_file_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("lease_s = [\n", encoding="utf-8")
    result = cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert str(config) in result.stderr


def test_unknown_set_name_exit_2() -> None:
    result = cli("check-config", "--set", "no_such_setting=1")
    assert result.returncode == 2
    assert "unknown setting 'no_such_setting'" in result.stderr


def test_check_config_masks_password() -> None:
    result = cli(
        "check-config",
        "--set",
        "poll_interval_s=2",
        OUTBOX_NOTIFIER_DSN="postgresql://app:hunter2@db.internal:5432/app",
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert 'dsn = "postgresql://app:***@db.internal:5432/app"' in result.stdout
    assert "poll_interval_s = 2.0" in result.stdout


def test_check_config_json_masks_password_from_flag() -> None:
    # Global options work after the subcommand as well as before it.
    result = cli("--log-level", "debug", "check-config", "--json", "--dsn", "host=db password=pw1")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert "pw1" not in result.stdout
    assert "password=***" in shown["dsn"]
    assert shown["log_level"] == "DEBUG"
    assert shown["flow_allowed_schemes"] == ["https"]


def test_flag_wins_over_env_and_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_attempts = 7\nretry_base_s = 10\n", encoding="utf-8")
    result = cli(
        "check-config",
        "--json",
        "--set",
        "max_attempts=9",
        OUTBOX_NOTIFIER_DSN="host=db",
        OUTBOX_NOTIFIER_CONFIG=str(config),
        OUTBOX_NOTIFIER_MAX_ATTEMPTS="8",
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["max_attempts"], shown["retry_base_s"]) == (9, 10.0)


@pytest.mark.parametrize("command", ["migrate", "check-config"])
def test_no_dsn_is_one_line_exit_2(command: str) -> None:
    result = cli(command, OUTBOX_NOTIFIER_DSN="")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "outbox-notifier: no database: pass --dsn or set OUTBOX_NOTIFIER_DSN\n"


def test_migrate_unreachable_database_is_one_line_exit_1(tmp_path: Path) -> None:
    # A Unix socket directory with no server in it: fails at once, without the network.
    result = cli("migrate", "--dsn", f"host={tmp_path} dbname=x connect_timeout=2")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("outbox-notifier: cannot connect to the database: ")


def test_requeue_needs_a_selection() -> None:
    result = cli("requeue", "--dsn", "dbname=x")
    assert result.returncode == 2
    assert "pass --id N" in result.stderr


def test_usage_error_exits_2() -> None:
    result = cli("check-config", "--log-format", "xml")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_check_config_shows_listen_dsn_defaulting_to_dsn() -> None:
    result = cli(
        "check-config", OUTBOX_NOTIFIER_DSN="postgresql://app:hunter2@db.internal:5432/app"
    )
    assert result.returncode == 0, result.stderr
    assert 'listen_dsn = "postgresql://app:***@db.internal:5432/app"' in result.stdout
    own = cli("check-config", "--dsn", "host=a", OUTBOX_NOTIFIER_LISTEN_DSN="host=b")
    assert 'listen_dsn = "host=b"' in own.stdout
