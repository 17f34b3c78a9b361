"""Settings: defaults, precedence, one-line errors naming setting and source, and masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox_notifier import settings
from outbox_notifier.settings import Settings, SettingsError, load_settings, masked


def load(
    *,
    config_path: str | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
) -> Settings:
    return load_settings(config_path=config_path, env=env or {}, overrides=overrides or {})


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "outbox-notifier.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(**kwargs: object) -> str:
    with pytest.raises(SettingsError) as info:
        load(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults() -> None:
    s = load()
    assert s == Settings()
    assert s.dsn == ""
    assert s.effective_listen_dsn == ""
    assert (s.pool_min_size, s.pool_max_size) == (2, 10)
    assert s.poll_interval_s == 5.0
    assert (s.relay_batch_size, s.delivery_batch_size, s.delivery_concurrency) == (500, 100, 50)
    assert (s.lease_s, s.http_timeout_s, s.shutdown_deadline_s) == (60.0, 5.0, 20.0)
    assert (s.max_attempts, s.retry_base_s, s.retry_max_s) == (5, 300.0, 1800.0)
    assert s.retry_after_max_s == 3600.0
    assert s.summary_max_runes == 180
    assert s.response_body_max_bytes == 65536
    assert s.flow_allowed_schemes == ("https",)
    assert s.flow_allowed_hosts == ("feishu.cn", "larksuite.com", "feishu-boe.cn")
    assert s.flow_path_prefix == "/flow/api/trigger-webhook/"
    assert s.http_listen == "127.0.0.1:9464"
    assert (s.log_format, s.log_level) == ("plain", "INFO")
    assert s.maintenance_interval_s == 60.0


def test_listen_dsn_defaults_to_dsn() -> None:
    assert load(env={"OUTBOX_NOTIFIER_DSN": "dbname=a"}).effective_listen_dsn == "dbname=a"
    s = load(overrides={"dsn": "dbname=a", "listen_dsn": "dbname=b"})
    assert s.effective_listen_dsn == "dbname=b"


def test_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'poll_interval_s = 1.5\nrelay_batch_size = 7\nlog_level = "DEBUG"\n'
        'flow_allowed_hosts = ["example.test"]\n',
    )
    env = {"OUTBOX_NOTIFIER_RELAY_BATCH_SIZE": "8", "OUTBOX_NOTIFIER_LOG_LEVEL": "WARNING"}
    s = load(config_path=path, env=env, overrides={"log_level": "ERROR"})
    assert s.poll_interval_s == 1.5  # file
    assert s.relay_batch_size == 8  # env over file
    assert s.log_level == "ERROR"  # flag over env
    assert s.flow_allowed_hosts == ("example.test",)
    assert s.delivery_batch_size == 100  # default


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max_attempts = 9\n")
    assert load(env={"OUTBOX_NOTIFIER_CONFIG": path}).max_attempts == 9


def test_config_flag_wins_over_config_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max_attempts = 9\n")
    env = {"OUTBOX_NOTIFIER_CONFIG": str(tmp_path / "absent.toml")}
    assert load(config_path=path, env=env).max_attempts == 9


def test_env_values_are_converted() -> None:
    s = load(
        env={
            "OUTBOX_NOTIFIER_POLL_INTERVAL_S": "0.25",
            "OUTBOX_NOTIFIER_MAX_ATTEMPTS": " 3 ",
            "OUTBOX_NOTIFIER_FLOW_ALLOWED_SCHEMES": "https, http",
            "OUTBOX_NOTIFIER_FLOW_ALLOWED_HOSTS": "localhost,",
            "OUTBOX_NOTIFIER_DSN": "host=db dbname=app",
        }
    )
    assert s.poll_interval_s == 0.25
    assert s.max_attempts == 3
    assert s.flow_allowed_schemes == ("https", "http")
    assert s.flow_allowed_hosts == ("localhost",)
    assert s.dsn == "host=db dbname=app"


def test_unknown_prefixed_env_vars_warn_and_are_ignored() -> None:
    warned: list[str] = []
    env = {
        "OUTBOX_NOTIFIER_TEST_DSN": "dbname=test",
        "OUTBOX_NOTIFIER_TEST_REQUIRE_IMAGE": "1",
        "OUTBOX_NOTIFIER_CONFIG": "",
        "OUTBOX_NOTIFIER_SOMETHING_ELSE": "x",
        "OUTBOX_NOTIFIER_POLL_INTERVAL": "2",
        "PATH": "/bin",
    }
    assert load_settings(config_path=None, env=env, overrides={}, warn=warned.append) == Settings()
    assert warned == [
        "environment variable OUTBOX_NOTIFIER_POLL_INTERVAL names no setting and is ignored; "
        "did you mean OUTBOX_NOTIFIER_POLL_INTERVAL_S?",
        "environment variable OUTBOX_NOTIFIER_SOMETHING_ELSE names no setting and is ignored",
    ]


def test_a_removed_setting_warns_once_naming_every_source_and_its_replacement(
    tmp_path: Path,
) -> None:
    warned: list[str] = []
    path = write_toml(tmp_path, 'http_transport = "httpx"\n')
    s = load_settings(
        config_path=path,
        env={"OUTBOX_NOTIFIER_HTTP_TRANSPORT": "keepalive"},
        overrides={"http_transport": "httpx"},
        warn=warned.append,
    )
    assert s == Settings()
    assert warned == [
        f"setting http_transport (from config file {path}, OUTBOX_NOTIFIER_HTTP_TRANSPORT, "
        "--set http_transport) was removed and is ignored: " + settings.REMOVED["http_transport"]
    ]
    assert "httpx over aiohttp" in warned[0]


def test_settings_load_without_warnings_when_all_is_current(tmp_path: Path) -> None:
    warned: list[str] = []
    path = write_toml(tmp_path, "health_stale_s = 90\n")
    env = {"OUTBOX_NOTIFIER_DSN": "host=db", "OUTBOX_NOTIFIER_CONFIG": path}
    load_settings(config_path=None, env=env, overrides={}, warn=warned.append)
    assert warned == []


def test_string_overrides_are_parsed_like_env() -> None:
    s = load(overrides={"retry_base_s": "10", "flow_allowed_schemes": "http"})
    assert s.retry_base_s == 10.0
    assert s.flow_allowed_schemes == ("http",)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"OUTBOX_NOTIFIER_POLL_INTERVAL_S": "-1"},
            "invalid setting poll_interval_s (from OUTBOX_NOTIFIER_POLL_INTERVAL_S): "
            "expected a number > 0, got '-1'",
        ),
        (
            {"OUTBOX_NOTIFIER_RELAY_BATCH_SIZE": "0"},
            "invalid setting relay_batch_size (from OUTBOX_NOTIFIER_RELAY_BATCH_SIZE): "
            "expected an integer >= 1, got '0'",
        ),
        (
            {"OUTBOX_NOTIFIER_MAX_ATTEMPTS": "many"},
            "invalid setting max_attempts (from OUTBOX_NOTIFIER_MAX_ATTEMPTS): "
            "expected an integer >= 1, got 'many'",
        ),
        (
            {"OUTBOX_NOTIFIER_LEASE_S": "inf"},
            "invalid setting lease_s (from OUTBOX_NOTIFIER_LEASE_S): "
            "expected a finite number, got 'inf'",
        ),
        (
            {"OUTBOX_NOTIFIER_HTTP_TIMEOUT_S": ""},
            "invalid setting http_timeout_s (from OUTBOX_NOTIFIER_HTTP_TIMEOUT_S): "
            "expected a number > 0, got ''",
        ),
    ],
)
def test_bad_env_value(env: dict[str, str], expected: str) -> None:
    assert error_of(env=env) == expected


def test_wrong_type_in_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'poll_interval_s = "5"\n')
    assert error_of(config_path=path) == (
        f"invalid setting poll_interval_s (from config file {path}): expected a number > 0, got '5'"
    )


def test_out_of_range_in_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "pool_min_size = -1\n")
    message = error_of(config_path=path)
    assert message.startswith(f"invalid setting pool_min_size (from config file {path}):")
    assert "expected an integer >= 0, got -1" in message


def test_list_setting_wrong_type_in_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'flow_allowed_hosts = "feishu.cn"\n')
    message = error_of(config_path=path)
    assert "flow_allowed_hosts" in message
    assert "expected a list of strings" in message


def test_bad_flag_value_names_the_flag() -> None:
    message = error_of(overrides={"delivery_concurrency": "0"})
    assert message == (
        "invalid setting delivery_concurrency (from --set delivery_concurrency): "
        "expected an integer >= 1, got '0'"
    )


def test_override_source_names_the_flag() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(
            config_path=None,
            env={},
            overrides={"log_level": "LOUD"},
            override_sources={"log_level": "--log-level"},
        )
    assert str(info.value).startswith("invalid setting log_level (from --log-level):")


@pytest.mark.parametrize(
    ("env", "setting", "fragment"),
    [
        ({"OUTBOX_NOTIFIER_LEASE_S": "5"}, "lease_s", "must be greater than http_timeout_s"),
        (
            {"OUTBOX_NOTIFIER_RETRY_MAX_S": "60"},
            "retry_max_s",
            "must be >= retry_base_s, got 60.0 while retry_base_s = 300.0 (from default)",
        ),
        (
            {"OUTBOX_NOTIFIER_POOL_MIN_SIZE": "20"},
            "pool_max_size",
            "while pool_min_size = 20 (from OUTBOX_NOTIFIER_POOL_MIN_SIZE)",
        ),
        ({"OUTBOX_NOTIFIER_LOG_FORMAT": "xml"}, "log_format", "expected 'plain' or 'json'"),
        ({"OUTBOX_NOTIFIER_LOG_LEVEL": "LOUD"}, "log_level", "expected one of"),
        ({"OUTBOX_NOTIFIER_HTTP_LISTEN": "9464"}, "http_listen", "expected host:port"),
        ({"OUTBOX_NOTIFIER_HTTP_LISTEN": "host:99999"}, "http_listen", "port must be"),
        (
            {"OUTBOX_NOTIFIER_FLOW_ALLOWED_SCHEMES": "https,ftp"},
            "flow_allowed_schemes",
            "only 'http' and 'https' are allowed, got 'ftp'",
        ),
        ({"OUTBOX_NOTIFIER_FLOW_ALLOWED_SCHEMES": ""}, "flow_allowed_schemes", "at least one"),
        ({"OUTBOX_NOTIFIER_FLOW_PATH_PREFIX": "flow/"}, "flow_path_prefix", "must start with"),
        (
            {"OUTBOX_NOTIFIER_FRONTEND_BASE_URL": "example.com"},
            "frontend_base_url",
            "expected an http:// or https:// URL",
        ),
        ({"OUTBOX_NOTIFIER_CA_BUNDLE": "/nonexistent/ca.pem"}, "ca_bundle", "no such file"),
    ],
)
def test_invalid_values_name_setting_and_source(
    env: dict[str, str], setting: str, fragment: str
) -> None:
    message = error_of(env=env)
    assert message.startswith(f"invalid setting {setting} (from ")
    assert fragment in message


def test_cross_field_error_names_both_sources(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "http_timeout_s = 100\n")
    message = error_of(config_path=path)
    assert message.startswith("invalid setting lease_s (from default): ")
    assert f"http_timeout_s = 100.0 (from config file {path})" in message


def test_bad_dsn_is_reported_without_its_content() -> None:
    message = error_of(env={"OUTBOX_NOTIFIER_DSN": "host=db password"})
    assert message.startswith("invalid setting dsn (from OUTBOX_NOTIFIER_DSN): ")
    assert "password" not in message.split(": ", 1)[1].replace("postgresql://", "")


def test_unknown_toml_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "pol_interval_s = 1\n")
    message = error_of(config_path=path)
    assert "unknown setting 'pol_interval_s'" in message
    assert path in message
    assert "did you mean 'poll_interval_s'" in message


def test_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[database]\ndsn = 'x'\n")
    assert "unknown setting 'database'" in error_of(config_path=path)


def test_unknown_override() -> None:
    assert "unknown setting 'nope' (from --set nope)" in error_of(overrides={"nope": "1"})


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max_attempts = 3\npoll_interval_s = = 2\n")
    message = error_of(config_path=path)
    assert message.startswith(f"invalid config file {path}: ")
    assert "line 2" in message


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    message = error_of(config_path=path)
    assert message.startswith(f"cannot read config file {path} (from --config): ")


def test_missing_config_file_from_env(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    message = error_of(env={"OUTBOX_NOTIFIER_CONFIG": path})
    assert f"(from {settings.CONFIG_ENV})" in message


def test_direct_construction_is_validated() -> None:
    with pytest.raises(SettingsError, match="invalid setting poll_interval_s: "):
        Settings(poll_interval_s=-1)
    with pytest.raises(SettingsError, match="invalid setting lease_s: "):
        Settings(lease_s=1, http_timeout_s=2)


def test_parse_host_port() -> None:
    assert settings.parse_host_port("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert settings.parse_host_port("[::1]:0") == ("::1", 0)
    for bad in ("9464", ":9464", "host:", "::1:9464", "host:port"):
        with pytest.raises(ValueError):
            settings.parse_host_port(bad)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("", ""),
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgres://app@db/app", "postgres://app@db/app"),
        (
            "postgresql://app:s3cret@h1,h2/app?password=s3cret&sslmode=require",
            "postgresql://app:***@h1,h2/app?password=***&sslmode=require",
        ),
    ],
)
def test_mask_url_dsn(dsn: str, shown: str) -> None:
    assert settings.mask_dsn(dsn) == shown


def test_mask_key_value_dsn() -> None:
    shown = settings.mask_dsn("host=db dbname=app user=app password='s 3cret'")
    assert "s 3cret" not in shown
    assert "3cret" not in shown
    assert "password=***" in shown
    assert "host=db" in shown


def test_masked_settings() -> None:
    s = load(
        overrides={
            "dsn": "host=db password=topsecret",
            "listen_dsn": "postgresql://u:alsosecret@db/app",
        }
    )
    shown = masked(s)
    assert list(shown) == list(Settings.__struct_fields__)
    assert "topsecret" not in str(shown)
    assert "alsosecret" not in str(shown)
    assert shown["listen_dsn"] == "postgresql://u:***@db/app"
    assert shown["poll_interval_s"] == 5.0


def test_egress_settings_defaults_and_env() -> None:
    s = load()
    assert (s.egress_allow_cidrs, s.http_proxy, s.http_proxy_from_env) == ((), "", False)
    s = load(
        env={
            "OUTBOX_NOTIFIER_EGRESS_ALLOW_CIDRS": "10.20.0.0/16, fd00::/8",
            "OUTBOX_NOTIFIER_HTTP_PROXY": "http://proxy.internal:3128",
            "OUTBOX_NOTIFIER_HTTP_PROXY_FROM_ENV": "true",
        }
    )
    assert s.egress_allow_cidrs == ("10.20.0.0/16", "fd00::/8")
    assert (s.http_proxy, s.http_proxy_from_env) == ("http://proxy.internal:3128", True)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"OUTBOX_NOTIFIER_EGRESS_ALLOW_CIDRS": "10.0.0.1/8"},
            "invalid setting egress_allow_cidrs (from OUTBOX_NOTIFIER_EGRESS_ALLOW_CIDRS): "
            "'10.0.0.1/8' is not a CIDR range",
        ),
        (
            {"OUTBOX_NOTIFIER_HTTP_PROXY": "socks5://u:hunter2@proxy:1080"},
            "invalid setting http_proxy (from OUTBOX_NOTIFIER_HTTP_PROXY): "
            "expected an http://host:port URL",
        ),
    ],
)
def test_bad_egress_settings_are_one_line_naming_the_setting(
    env: dict[str, str], expected: str
) -> None:
    message = error_of(env=env)
    assert message.startswith(expected)
    assert "hunter2" not in message


def test_http_transport_is_gone() -> None:
    # Only one maintained stack carries the egress guard; the old switch is accepted with a
    # warning (above) for upgrades, and changes nothing.
    assert "http_transport" not in settings.setting_names()
    assert "http_transport" not in masked(load(overrides={"http_transport": "httpx"}))


def test_ipv6_literal_hosts_are_allowed_in_url_policies() -> None:
    assert load(overrides={"webhook_allowed_hosts": "::1"}).webhook_allowed_hosts == ("::1",)
    assert "expected bare host names" in error_of(overrides={"flow_allowed_hosts": "a:443"})


def test_proxy_password_is_masked() -> None:
    shown = masked(load(overrides={"http_proxy": "http://user:hunter2@proxy:3128"}))
    assert shown["http_proxy"] == "http://user:***@proxy:3128"


def test_a_lowered_health_stale_brings_the_unset_deadline_down(tmp_path: Path) -> None:
    # health_stale_s = 30 was valid in 0.1.0, before db_deadline_s existed
    s = load(config_path=write_toml(tmp_path, "health_stale_s = 30\n"))
    assert (s.health_stale_s, s.db_deadline_s) == (30.0, 17.5)
    assert load(overrides={"health_stale_s": "600"}).db_deadline_s == settings.DB_DEADLINE_MAX_S


def test_a_raised_deadline_brings_the_unset_health_stale_up() -> None:
    s = load(env={"OUTBOX_NOTIFIER_DB_DEADLINE_S": "70"})
    assert (s.db_deadline_s, s.health_stale_s) == (70.0, 120.0)
    assert load(overrides={"db_deadline_s": "10"}).health_stale_s == Settings().health_stale_s


def test_health_stale_must_exceed_the_database_deadline() -> None:
    with pytest.raises(SettingsError) as info:
        load(overrides={"health_stale_s": "30", "db_deadline_s": "35"})
    message = str(info.value)
    assert message.startswith("invalid setting health_stale_s (from --set health_stale_s)")
    assert "db_deadline_s = 35.0 (from --set db_deadline_s)" in message


def test_stall_settings_defaults_sit_under_health_stale() -> None:
    s = Settings()
    assert s.lock_timeout_s < s.statement_timeout_s < s.db_deadline_s < s.health_stale_s
    assert s.startup_timeout_s == 0  # wait for the database for ever
