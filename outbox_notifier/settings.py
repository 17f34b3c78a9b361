"""Settings: one frozen struct, loaded from defaults, a TOML file, the environment and flags.

Precedence, later wins::

    defaults < TOML file < OUTBOX_NOTIFIER_* environment variables < command-line flags

The TOML file is ``config_path`` (``--config``) or ``OUTBOX_NOTIFIER_CONFIG``; its keys are the
field names below, at top level. The variable for field ``x_y`` is ``OUTBOX_NOTIFIER_X_Y``; its
string value is converted to the field's type, and tuple fields are comma-separated.

Upgrades must not stop a daemon whose settings were valid for the previous release, so:

* a setting the user did not set adapts to those they did (`derived`: ``db_deadline_s``
  follows ``health_stale_s``); only explicit contradictory values are an error;
* a removed setting (`REMOVED`) is accepted, ignored, and named in one warning saying what
  replaced it, from the file and the environment alike, for at least one release;
* an ``OUTBOX_NOTIFIER_*`` variable that names no setting gets a warning, not silence.

Warnings go to ``warn`` (one line each); the CLI logs them once logging is configured.

Every problem raises `SettingsError`, whose message is one line naming the setting, where the
value came from and what is wrong, e.g.::

    invalid setting poll_interval_s (from OUTBOX_NOTIFIER_POLL_INTERVAL_S):
    expected a number > 0, got '-1'

(shown wrapped here; it is one line). Secret values (the DSNs) are never echoed in messages;
use `masked` to print settings.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import tomllib
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from psycopg import conninfo

from outbox_notifier import egress, eventloop, tracing

logger = logging.getLogger(__name__)

ENV_PREFIX = "OUTBOX_NOTIFIER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# Variables with the prefix that are not settings: the config file path, and the test suite's
# own (OUTBOX_NOTIFIER_TEST_DSN, ...).
NON_SETTING_ENV = frozenset({CONFIG_ENV})
TEST_ENV_PREFIX = ENV_PREFIX + "TEST_"

# Settings of earlier releases that are gone: name -> what replaced it. Accepted with a warning
# (never an error) for at least one release after the removal, so an upgrade keeps starting.
REMOVED: Mapping[str, str] = {
    "http_transport": "provider calls always go through httpx over aiohttp since 0.2.0; "
    "delete the setting",
}

LogFormat = Literal["plain", "json"]
EventLoop = Literal["auto", "uvloop", "asyncio"]  # auto: uvloop when installed
BotMessageFormat = Literal["text", "card"]  # text, or an interactive card with a button
LOG_FORMATS = frozenset(typing.get_args(LogFormat))
LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
ALLOWED_FLOW_SCHEMES = frozenset({"http", "https"})

_MASK = "***"
_SECRET_FIELDS = frozenset({"dsn", "listen_dsn"})
_SECRET_WORDS = ("secret", "token", "password")

# db_deadline_s when unset: this default, or this share of a lower health_stale_s (the share
# the default takes of health_stale_s's default, 35 s of 60), so a loop's bounded wait stays
# well inside the staleness that would fail liveness.
DB_DEADLINE_MAX_S = 35.0
DB_DEADLINE_SHARE = 35.0 / 60.0

Positive = Annotated[float, msgspec.Meta(gt=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class SettingsError(Exception):
    """A setting, the config file or a flag is invalid. ``str()`` is one line for the operator.

    ``setting`` names the offending setting when there is one; ``reason`` is the message
    without the setting and source, so a loader can add where the value came from.
    """

    def __init__(
        self,
        message: str,
        *,
        setting: str | None = None,
        reason: str | None = None,
        related: str | None = None,
    ) -> None:
        super().__init__(_one_line(message))
        self.setting = setting
        self.reason = reason
        self.related = related


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _invalid(
    setting: str, reason: str, *, source: str | None = None, related: str | None = None
) -> SettingsError:
    where = f" (from {source})" if source else ""
    return SettingsError(
        f"invalid setting {setting}{where}: {reason}",
        setting=setting,
        reason=reason,
        related=related,
    )


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the daemon can be told. Units are in the names (``_s`` seconds)."""

    # Secret: the password is masked whenever settings are printed.
    dsn: str = ""
    # Direct DSN for LISTEN when ``dsn`` goes through PgBouncer in transaction mode, where
    # LISTEN does not work; empty means use ``dsn``.
    listen_dsn: str = ""
    # Behind PgBouncer in transaction mode (before 1.21) server-side prepared statements break:
    # set false there. listen_dsn must then point at Postgres directly.
    prepared_statements: bool = True
    pool_min_size: NonNegativeInt = 2
    pool_max_size: AtLeastOne = 10
    poll_interval_s: Positive = 5.0  # fallback poll when no NOTIFY arrives
    relay_batch_size: AtLeastOne = 500
    # A relay batch also stops before its payloads (JSON text) pass this many bytes.
    relay_batch_bytes: AtLeastOne = 8 * 1024 * 1024
    # A larger payload is rejected without being read. One the event contract accepts is at
    # most about 140 KB of JSON (its strings are capped), and what a chat robot takes is far
    # smaller (a Feishu bot 20 KB a request): the margin is for fields a newer producer adds.
    max_payload_bytes: AtLeastOne = 1024 * 1024
    delivery_batch_size: AtLeastOne = 100
    delivery_concurrency: AtLeastOne = 50
    retry_interval_s: Positive = 5.0  # lease rescue / retry scan interval
    # A lease must outlive the HTTP call it guards, or a healthy but slow call would be
    # rescued and delivered twice; checked in __post_init__.
    lease_s: Positive = 60.0
    # true: a claim waits for its WAL flush, so a database crash never repeats a call
    durable_claims: bool = False
    shutdown_deadline_s: Positive = 20.0
    max_attempts: AtLeastOne = 5
    retry_base_s: Positive = 300.0
    retry_max_s: Positive = 1800.0  # must be >= retry_base_s
    retry_after_max_s: Positive = 3600.0  # clamp for a provider's Retry-After
    summary_max_runes: AtLeastOne = 180  # the seed's defaultSummaryMaxRunes
    http_timeout_s: Positive = 5.0
    response_body_max_bytes: AtLeastOne = 65536
    frontend_base_url: str = ""  # action_url = frontend_base_url + target_url
    flow_allowed_schemes: tuple[str, ...] = ("https",)
    # A webhook host must equal one of these or be a subdomain of one.
    flow_allowed_hosts: tuple[str, ...] = ("feishu.cn", "larksuite.com", "feishu-boe.cn")
    flow_path_prefix: str = "/flow/api/trigger-webhook/"
    ca_bundle: str = ""  # CAs added to the system trust store; TLS verification is always on
    http_listen: str = "127.0.0.1:9464"  # host:port for /metrics, /healthz, /readyz
    log_format: LogFormat = "plain"
    # "auto": uvloop when installed, else asyncio's loop; "uvloop" or "asyncio" to insist.
    event_loop: EventLoop = "auto"
    log_level: str = "INFO"
    maintenance_interval_s: Positive = 60.0  # retention pass and metric snapshot interval
    # A snapshot older than this that holds back vacuum (the xmin horizon) is named in the log
    # and on /readyz, which stays ready (outbox_notifier.horizon).
    horizon_warn_s: Positive = 30.0
    outbox_retention_s: Positive = 7 * 86400.0  # relayed/rejected outbox rows older are deleted
    records_retention_s: Positive = 30 * 86400.0  # sent/dead/skipped records older are deleted
    retention_batch_size: AtLeastOne = 1000  # rows per retention statement (and transaction)
    # after each full retention batch, rest this many times as long as it took (0: no rest)
    retention_pause_factor: NonNegativeFloat = 1.0
    health_stale_s: Positive = 60.0  # /healthz fails when a loop has not progressed for this long
    # Per-target pacing, shared by all replicas through Postgres (0 = no limit). Feishu bots
    # accept 5 requests/s and 100/min per bot.
    bot_max_per_s: NonNegativeInt = 5
    bot_max_per_min: NonNegativeInt = 100
    flow_max_per_s: NonNegativeInt = 0
    flow_max_per_min: NonNegativeInt = 0
    webhook_max_per_s: NonNegativeInt = 0
    webhook_max_per_min: NonNegativeInt = 0
    # DingTalk and WeCom robots take 20 messages a minute each; Slack about one a second.
    dingtalk_max_per_s: NonNegativeInt = 0
    dingtalk_max_per_min: NonNegativeInt = 20
    wecom_max_per_s: NonNegativeInt = 0
    wecom_max_per_min: NonNegativeInt = 20
    slack_max_per_s: NonNegativeInt = 1
    slack_max_per_min: NonNegativeInt = 0
    pacing_margin_s: Positive = 0.05  # widens pacing windows for network jitter
    # Endpoint protection: a target pauses for breaker_cooloff_s when, over the calls that
    # started in the last breaker_window_s, at least breaker_min_calls were made, at least
    # breaker_failures of them failed and the failures reach breaker_failure_ratio. A 429 is
    # not a failure: it throttles the target until its Retry-After, then halves its budget
    # for throttle_slowdown_s (throttle_max_per_s calls a second for a target with none).
    breaker_failures: AtLeastOne = 5
    breaker_cooloff_s: Positive = 60.0
    breaker_window_s: Positive = 30.0
    breaker_min_calls: AtLeastOne = 20
    breaker_failure_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    throttle_slowdown_s: NonNegativeFloat = 60.0
    throttle_max_per_s: NonNegativeInt = 5
    bot_message_format: BotMessageFormat = "text"
    bot_allowed_schemes: tuple[str, ...] = ("https",)
    bot_allowed_hosts: tuple[str, ...] = ("open.feishu.cn", "open.larksuite.com")
    bot_path_prefix: str = "/open-apis/bot/v2/hook/"
    webhook_allowed_schemes: tuple[str, ...] = ("https",)
    webhook_allowed_hosts: tuple[str, ...] = ()  # empty: any host
    webhook_path_prefix: str = "/"
    dingtalk_allowed_schemes: tuple[str, ...] = ("https",)
    dingtalk_allowed_hosts: tuple[str, ...] = ("oapi.dingtalk.com",)
    dingtalk_path_prefix: str = "/robot/send"
    wecom_allowed_schemes: tuple[str, ...] = ("https",)
    wecom_allowed_hosts: tuple[str, ...] = ("qyapi.weixin.qq.com",)
    wecom_path_prefix: str = "/cgi-bin/webhook/send"
    slack_allowed_schemes: tuple[str, ...] = ("https",)
    slack_allowed_hosts: tuple[str, ...] = ("hooks.slack.com",)
    slack_path_prefix: str = "/services/"
    # Digests: records a chat robot's budget cannot send one by one go as one message per
    # slot, each of at most digest_max_records records; one switch per chat robot (the Flow
    # webhook and the signed webhook never digest: their receivers expect one event a call).
    digest_max_records: AtLeastOne = 20
    bot_digest: bool = True
    dingtalk_digest: bool = True
    wecom_digest: bool = True
    slack_digest: bool = True
    # Egress: the guard refuses loopback, private, link-local and metadata addresses for every
    # provider; these ranges are allowed explicitly (internal webhooks, tests, the demo).
    egress_allow_cidrs: tuple[str, ...] = ()
    # One HTTP proxy for every provider call (https targets go through CONNECT), and whether
    # to honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment instead.
    http_proxy: str = ""
    http_proxy_from_env: bool = False
    # -- database stalls and start-up ------------------------------------------------------
    # Server-side bounds on every daemon statement: startup options of each connection when
    # prepared_statements (a direct connection), else set per transaction (set_config(...,
    # true)) so they also hold behind a transaction-mode pooler, which drops startup options.
    lock_timeout_s: Positive = 5.0
    statement_timeout_s: Positive = 30.0
    # Client-side bounds for when packets stop arriving (server timeouts cannot help then):
    # libpq's TCP_USER_TIMEOUT and keepalives, and a deadline around each loop's database
    # work, after which the call is abandoned and its connection discarded by the pool.
    tcp_user_timeout_s: Positive = 10.0
    keepalives_idle_s: AtLeastOne = 10
    keepalives_interval_s: AtLeastOne = 5
    keepalives_count: AtLeastOne = 3
    # Must be below health_stale_s: a loop waiting on a bounded call is alive (checked). Left
    # unset, it follows health_stale_s (see `derived`).
    db_deadline_s: Positive = DB_DEADLINE_MAX_S
    # How long `run` waits for the database at start; 0 waits for ever.
    startup_timeout_s: NonNegativeFloat = 0.0
    # -- tracing ---------------------------------------------------------------------------
    # OpenTelemetry spans for every delivery attempt, provider call and database batch (needs
    # the otel extra). The exporter, sampler and resource are configured the OpenTelemetry
    # way, by the standard OTEL_* variables (README, "Tracing").
    tracing: bool = False

    def __post_init__(self) -> None:
        # msgspec checks Meta constraints only when decoding or converting; check them here
        # too so a struct built directly in code is held to the same rules.
        for name, tp in _field_types().items():
            value = getattr(self, name)
            try:
                msgspec.convert(value, tp)
            except msgspec.ValidationError:
                raise _invalid(name, _describe(name, value, tp)) from None
            if isinstance(value, float) and not math.isfinite(value):
                raise _invalid(name, f"expected a finite number, got {value!r}")
        _check_values(self)

    @property
    def effective_listen_dsn(self) -> str:
        """The DSN for the LISTEN connection: ``listen_dsn``, else ``dsn``."""
        return self.listen_dsn or self.dsn


def _check_values(s: Settings) -> None:
    """Checks that one field's type cannot express, and those across fields."""
    for name in ("dsn", "listen_dsn"):
        value: str = getattr(s, name)
        if value and not _parses(conninfo.conninfo_to_dict, value):
            # libpq's own message may quote part of the string, password included.
            raise _invalid(
                name,
                "not a valid connection string (expected key=value pairs or a postgresql:// URL)",
            )
    for order in _ORDERS:
        order.check(s)
    if s.event_loop == "uvloop" and not eventloop.uvloop_available():
        raise _invalid("event_loop", "'uvloop' is not installed (pip install uvloop, or 'auto')")
    if s.log_level.upper() not in LOG_LEVELS:
        choices = ", ".join(sorted(LOG_LEVELS))
        raise _invalid("log_level", f"expected one of {choices}, got {s.log_level!r}")
    try:
        parse_host_port(s.http_listen)
    except ValueError as exc:
        raise _invalid("http_listen", f"{exc}, got {s.http_listen!r}") from None
    # Every provider's URL policy, found by the names its settings share.
    for name in Settings.__struct_fields__:
        if name.endswith("_allowed_schemes"):
            _check_url_policy(s, name.removesuffix("_allowed_schemes"))
        if name.endswith("_path_prefix") and not getattr(s, name).startswith("/"):
            raise _invalid(name, f"must start with '/', got {getattr(s, name)!r}")
    try:
        egress.parse_cidrs(s.egress_allow_cidrs)
    except ValueError as exc:
        raise _invalid("egress_allow_cidrs", str(exc)) from None
    if s.http_proxy:
        # The value is not echoed: a proxy URL may carry a password.
        try:
            proxy = urllib.parse.urlsplit(s.http_proxy)
            valid = proxy.scheme == "http" and bool(proxy.hostname) and proxy.port != 0
        except ValueError:  # a port that is not a number in range
            valid = False
        if not valid:
            raise _invalid("http_proxy", "expected an http://host:port URL")
    if s.tracing:
        problem = tracing.missing_extra() or tracing.environment_problem()
        if problem:
            raise _invalid("tracing", problem)
    if s.frontend_base_url:
        parts = urllib.parse.urlsplit(s.frontend_base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _invalid(
                "frontend_base_url",
                f"expected an http:// or https:// URL, got {s.frontend_base_url!r}",
            )


class _Order(NamedTuple):
    """``setting`` must not fall below ``bound`` (another setting): ``strict``, it must be
    greater; ``why`` says what breaks otherwise."""

    setting: str
    bound: str
    strict: bool = False
    why: str = ""

    def check(self, s: Settings) -> None:
        value, bound = getattr(s, self.setting), getattr(s, self.bound)
        if value > bound or (value == bound and not self.strict):
            return
        relation = "greater than" if self.strict else ">="
        because = f" ({self.why})" if self.why else ""
        raise _invalid(
            self.setting,
            f"must be {relation} {self.bound}{because}, got {value} while {self.bound} = {bound}",
            related=self.bound,
        )


# Settings bounded by another, checked in this order: the first broken is the one named.
_ORDERS = (
    _Order("pool_max_size", "pool_min_size"),
    _Order("lease_s", "http_timeout_s", strict=True,
           why="a lease must outlive the call it guards"),
    _Order("health_stale_s", "db_deadline_s", strict=True,
           why="a loop waiting on a bounded database call is alive"),
    _Order("relay_batch_bytes", "max_payload_bytes",
           why="a batch must hold the largest payload allowed"),
    _Order("retry_max_s", "retry_base_s"),
)  # fmt: skip


def _check_url_policy(s: Settings, provider: str) -> None:
    """Schemes and hosts a provider may call; only the generic webhook may allow any host."""
    schemes_name, hosts_name = f"{provider}_allowed_schemes", f"{provider}_allowed_hosts"
    schemes: tuple[str, ...] = getattr(s, schemes_name)
    hosts: tuple[str, ...] = getattr(s, hosts_name)
    if not schemes:
        raise _invalid(schemes_name, "must name at least one scheme")
    for scheme in schemes:
        if scheme not in ALLOWED_FLOW_SCHEMES:
            raise _invalid(schemes_name, f"only 'http' and 'https' are allowed, got {scheme!r}")
    if not hosts and provider != "webhook":
        raise _invalid(hosts_name, "must name at least one host")
    for host in hosts:
        # a colon is a port unless the host is an IP address (an IPv6 one has colons, no port)
        has_port = ":" in host and not _parses(ipaddress.ip_address, host)
        if not host or host != host.strip() or "/" in host or has_port:
            raise _invalid(hosts_name, f"expected bare host names, got {host!r}")


def _parses(parse: Callable[[str], object], text: str) -> bool:
    """Whether ``parse`` accepts ``text`` (an IP address, a DSN: their parsers raise)."""
    try:
        parse(text)
    except Exception:
        return False
    return True


def parse_host_port(value: str) -> tuple[str, int]:
    """Splits ``host:port`` (IPv6 hosts in brackets: ``[::1]:9464``); port 0 means any free."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or (":" in host and not value.startswith("[")):
        raise ValueError("expected host:port (IPv6 hosts in brackets)")
    port = int(port_text)
    if port > 65535:
        raise ValueError("port must be between 0 and 65535")
    return host, port


_FIELD_TYPES: dict[str, Any] = {}


def _field_types() -> dict[str, Any]:
    """Field name -> annotated type (with its msgspec.Meta), in declaration order."""
    if not _FIELD_TYPES:
        hints = typing.get_type_hints(Settings, include_extras=True)
        _FIELD_TYPES.update((name, hints[name]) for name in Settings.__struct_fields__)
    return _FIELD_TYPES


def setting_names() -> tuple[str, ...]:
    """Every setting's name, in declaration order."""
    return Settings.__struct_fields__


def env_var(name: str) -> str:
    """The environment variable for setting ``name``."""
    return ENV_PREFIX + name.upper()


def _describe(name: str, raw: object, tp: Any) -> str:
    """What a field expects, and what it got (never the value of a secret)."""
    base, constraints = tp, []
    if typing.get_origin(tp) is Annotated:
        base, *metas = typing.get_args(tp)
        for meta in metas:
            if isinstance(meta, msgspec.Meta):
                for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                    bound = getattr(meta, attr)
                    if bound is not None:
                        constraints.append(f"{op} {bound}")
    if typing.get_origin(base) is Literal:
        # a choice: msgspec checks it against the Literal; the message names the choices
        choices = [repr(c) for c in typing.get_args(base)]
        noun = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
        return f"expected {noun}, got {raw!r}"[:200]
    if base is bool:
        noun = "true or false"
    elif base is int:
        noun = "an integer"
    elif base is float:
        noun = "a number"
    elif base is str:
        noun = "a string"
    else:
        noun = "a list of strings"
    expected = " ".join([f"expected {noun}", " and ".join(constraints)]).rstrip()
    if name in _SECRET_FIELDS:
        return expected
    shown = repr(raw)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{expected}, got {shown}"


def _convert(name: str, raw: object, source: str, *, from_text: bool) -> object:
    """Converts one raw value to its field's type, or raises a SettingsError naming the source."""
    tp = _field_types()[name]
    value = raw
    if from_text and isinstance(raw, str):
        if tp == tuple[str, ...]:
            value = tuple(part.strip() for part in raw.split(",") if part.strip())
        else:
            value = raw.strip()
    try:
        converted = msgspec.convert(value, tp, strict=not from_text)
    except msgspec.ValidationError:
        raise _invalid(name, _describe(name, raw, tp), source=source) from None
    if isinstance(converted, float) and not math.isfinite(converted):
        reason = f"expected a finite number, got {raw!r}"
        raise _invalid(name, reason, source=source)
    return converted


def _unknown(name: str, source: str) -> SettingsError:
    close = difflib.get_close_matches(name, setting_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return SettingsError(f"unknown setting {name!r} (from {source}){hint}", setting=name)


def derived(given: Mapping[str, object]) -> dict[str, object]:
    """Values for settings not in ``given`` that follow from those that are.

    ``db_deadline_s`` must stay below ``health_stale_s``: a file that lowered ``health_stale_s``
    (to 30, say, valid before ``db_deadline_s`` existed) gets a deadline that fits it, and a
    deadline raised past the default staleness raises the staleness with it.
    """
    stale, deadline = given.get("health_stale_s"), given.get("db_deadline_s")
    if isinstance(stale, float) and deadline is None:
        return {"db_deadline_s": round(min(DB_DEADLINE_MAX_S, stale * DB_DEADLINE_SHARE), 3)}
    if isinstance(deadline, float) and stale is None:
        default_stale: float = Settings.__struct_defaults__[
            Settings.__struct_fields__.index("health_stale_s")
        ]
        return {"health_stale_s": round(max(default_stale, deadline / DB_DEADLINE_SHARE), 3)}
    return {}


def _removed(name: str, sources: list[str]) -> str:
    return f"setting {name} (from {', '.join(sources)}) was removed and is ignored: {REMOVED[name]}"


def _stranger(var: str) -> str:
    close = difflib.get_close_matches(var[len(ENV_PREFIX) :].lower(), setting_names(), n=1)
    hint = f"; did you mean {env_var(close[0])}?" if close else ""
    return f"environment variable {var} names no setting and is ignored{hint}"


def _read_toml(path: str, source: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SettingsError(f"cannot read config file {path} (from {source}): {reason}") from None
    except tomllib.TOMLDecodeError as exc:
        # The message ends "(at line N, column M)".
        raise SettingsError(f"invalid config file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"invalid config file {path}: not valid UTF-8") from None


def load_settings(
    *,
    config_path: str | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object],
    override_sources: Mapping[str, str] | None = None,
    warn: Callable[[str], object] | None = None,
) -> Settings:
    """Builds the settings from defaults, the TOML file, ``env`` and ``overrides``.

    ``overrides`` maps setting names to values from flags; string values are parsed like
    environment values. ``override_sources`` optionally names the flag behind each override
    for error messages (default ``--set NAME``). ``warn`` receives each warning, one line
    (default: this module's logger).

    Raises SettingsError, with a one-line message, for anything invalid.
    """
    warn = warn or _log_warning
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    removed: dict[str, list[str]] = {}
    known = set(setting_names())

    if config_path is not None:
        path, path_source = config_path, "--config"
    else:
        path, path_source = env.get(CONFIG_ENV, ""), CONFIG_ENV
    if path:
        file_source = f"config file {path}"
        for key, raw in _read_toml(path, path_source).items():
            if key in REMOVED:
                removed.setdefault(key, []).append(file_source)
                continue
            if key not in known:
                raise _unknown(key, file_source)
            values[key] = _convert(key, raw, file_source, from_text=False)
            sources[key] = file_source

    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in NON_SETTING_ENV:
            continue
        if var.startswith(TEST_ENV_PREFIX):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key in REMOVED:
            removed.setdefault(key, []).append(var)
            continue
        if key not in known:
            # not an error: a variable of another release or tool must not stop the daemon
            warn(_stranger(var))
            continue
        values[key] = _convert(key, env[var], var, from_text=True)
        sources[key] = var

    for key, raw in overrides.items():
        flag = (override_sources or {}).get(key, f"--set {key}")
        if key in REMOVED:
            removed.setdefault(key, []).append(flag)
            continue
        if key not in known:
            raise _unknown(key, flag)
        values[key] = _convert(key, raw, flag, from_text=isinstance(raw, str))
        sources[key] = flag

    for key, found_in in removed.items():
        warn(_removed(key, found_in))
    for key, value in derived(values).items():
        values[key] = value
        sources[key] = "derived"

    try:
        settings = Settings(**values)  # type: ignore[arg-type]
    except SettingsError as exc:
        if exc.setting is None or exc.reason is None:
            raise
        reason = exc.reason
        if exc.related is not None:
            reason += f" (from {sources.get(exc.related, 'default')})"
        source = sources.get(exc.setting, "default")
        raise _invalid(exc.setting, reason, source=source) from None

    if settings.ca_bundle and not os.path.isfile(settings.ca_bundle):
        raise _invalid(
            "ca_bundle",
            f"no such file: {settings.ca_bundle!r}",
            source=sources.get("ca_bundle", "default"),
        )
    return settings


def _log_warning(line: str) -> None:
    logger.warning("%s", line)


def mask_dsn(dsn: str) -> str:
    """The DSN with its password (and any other secret parameter) replaced by ``***``.

    Handles key=value strings and ``postgresql://`` URLs; a string that cannot be parsed is
    masked whole, since it might hide a password anywhere.
    """
    if not dsn:
        return dsn
    if dsn.startswith(("postgresql://", "postgres://")):
        return _mask_url_dsn(dsn)
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return _MASK
    masked_params = {k: _MASK if _is_secret_name(k) else v for k, v in params.items()}
    return conninfo.make_conninfo("", **masked_params)


def _mask_url_dsn(dsn: str) -> str:
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return _MASK
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{hosts}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode(
            [(k, _MASK if _is_secret_name(k) else v) for k, v in pairs], safe="*"
        )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def masked(settings: Settings) -> dict[str, object]:
    """Every setting by name, safe to print: DSN passwords and anything secret-named masked."""
    out: dict[str, object] = {}
    for name in setting_names():
        value = getattr(settings, name)
        if name == "listen_dsn":
            value = mask_dsn(settings.effective_listen_dsn)  # what LISTEN will use
        elif name in _SECRET_FIELDS:
            value = mask_dsn(value)
        elif name == "http_proxy" and value:
            value = _mask_url_dsn(value)  # a proxy URL may carry user:password
        elif _is_secret_name(name) and value:
            value = _MASK
        out[name] = value
    return out


def database_target(dsn: str) -> tuple[str | None, str | None, int | None]:
    """(database name, host, port) that ``dsn`` names, for span attributes: nothing secret.
    The first host when several are given; None for what it leaves to libpq's defaults."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return None, None, None
    host = str(params.get("host") or "").split(",")[0] or None
    port_text = str(params.get("port") or "").split(",")[0]
    return (
        str(params["dbname"]) if params.get("dbname") else None,
        host,
        int(port_text) if port_text.isdigit() else None,
    )
