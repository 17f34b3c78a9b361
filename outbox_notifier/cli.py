"""The ``outbox-notifier`` command: parses arguments, loads settings, dispatches. No business logic.

Exit codes: 0 success; 1 runtime failure (e.g. the database is unreachable); 2 bad usage or
configuration (one line on stderr naming the problem).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import psycopg

from outbox_notifier import __version__, logs, names, operator, settings

# Defined beside the commands that print and return them too (operator, pauses).
from outbox_notifier.operator import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, PROG

if TYPE_CHECKING:
    from outbox_notifier import migrations

NO_DATABASE = "no database: pass --dsn or set OUTBOX_NOTIFIER_DSN"

# (dest, flag) of global options that map straight onto a setting.
_SETTING_FLAGS = (("dsn", "--dsn"), ("log_format", "--log-format"), ("log_level", "--log-level"))
_GLOBAL_DESTS = ("config", "set", *(dest for dest, _ in _SETTING_FLAGS))


def _setting_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _iso_time(text: str, expected: str) -> dt.datetime:
    """An ISO 8601 time, UTC when no offset is given; ``expected`` names the accepted forms
    in the error."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _timestamp(text: str) -> dt.datetime:
    """An ISO 8601 time (UTC when no offset is given) or an age like ``30m``, ``6h``, ``2d``."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount, unit = relative.groups()
        return dt.datetime.now(dt.UTC) - dt.timedelta(**{_UNITS[unit]: int(amount)})
    return _iso_time(text, "an ISO 8601 time or an age like 6h")


def _duration(text: str) -> dt.timedelta:
    """A duration like ``90s``, ``30m``, ``2h``, ``1d``."""
    relative = _RELATIVE.match(text.strip())
    if not relative or int(relative.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m or 2h, got {text!r}")
    amount, unit = relative.groups()
    return dt.timedelta(**{_UNITS[unit]: int(amount)})


def _future_time(text: str) -> dt.datetime:
    """An RFC 3339 / ISO 8601 time (UTC when no offset is given)."""
    return _iso_time(text, "an RFC 3339 time such as 2026-12-01T18:00:00Z")


#: The options accepted before and after the subcommand: (name, add_argument keywords).
_GLOBAL_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("config", {
        "metavar": "PATH", "help": "TOML settings file (default: $OUTBOX_NOTIFIER_CONFIG)",
    }),
    ("dsn", {
        "metavar": "DSN", "help": "PostgreSQL connection string (default: $OUTBOX_NOTIFIER_DSN)",
    }),
    ("set", {
        "metavar": "NAME=VALUE", "action": "append", "type": _setting_assignment,
        "help": "override any setting, e.g. --set poll_interval_s=2 (repeatable)",
    }),
    ("log_format", {
        "choices": sorted(settings.LOG_FORMATS), "help": "log line format (default: plain)",
    }),
    ("log_level", {
        "type": str.upper, "choices": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        "metavar": "LEVEL", "help": "DEBUG, INFO, WARNING, ERROR or CRITICAL (default: INFO)",
    }),
)  # fmt: skip


def _global_options(suffix: str, default: object) -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand.

    argparse lets a subcommand's parser overwrite what the main parser stored under the same
    dest, so each copy stores under its own dest (``suffix``) and `_merged_globals` joins them.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options")
    for name, options in _GLOBAL_OPTIONS:
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name + suffix, default=default, **options)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Relays a PostgreSQL transactional outbox into notifications: chat bots on "
            "Feishu, DingTalk, WeCom and Slack, the Feishu Flow webhook, and signed webhooks. "
            "Relays, delivers, retries, and exports metrics."
        ),
        epilog=(
            "Settings come from defaults < the TOML file < OUTBOX_NOTIFIER_* environment "
            "variables < flags. See 'check-config' to print the effective settings."
        ),
        parents=[_global_options("", None)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    after = [_global_options("_after", None)]

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return subs.add_parser(name, help=summary, description=description, parents=after)

    migrate = add(
        "migrate",
        "create or upgrade the database schema",
        "Apply the pending SQL migrations to schema outbox_notifier, each once, in order. "
        "Serialised by an advisory lock, so replicas may run it at the same time; a re-run "
        "is a no-op. Each migration is additive (daemons of the previous schema keep running "
        "on it) or breaking. Run it with the schema owner's DSN, not the daemon's.",
    )
    migrate_mode = migrate.add_mutually_exclusive_group()
    migrate_mode.add_argument(
        "--status",
        action="store_true",
        help="list applied and pending migrations with their kind, and whether this "
        "release's daemon can run on the schema; change nothing",
    )
    migrate_mode.add_argument(
        "--dry-run",
        action="store_true",
        help="print the SQL of the pending migrations, in order, without running it",
    )
    add(
        "run",
        "run the daemon",
        "Run the daemon: relay outbox rows into notification records, deliver them, retry "
        "failures and rescue expired leases, and serve /metrics, /healthz and /readyz. "
        "SIGTERM or SIGINT stops claiming work and drains in-flight deliveries within "
        "shutdown_deadline_s.",
    )
    status = add(
        "status",
        "show the backlog",
        "Show the backlog: record counts and the oldest record's age by status and channel, "
        "plus dead and stuck-sending records.",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    requeue = add(
        "requeue",
        "send dead or failed records again",
        "Put records back to pending so they are delivered again: one record by --id, or "
        "dead records matching the filters. Times are ISO 8601 (UTC unless an offset is "
        "given) or ages like 30m, 6h, 2d.",
    )
    requeue.add_argument("--id", type=_positive_int, metavar="N", help="requeue record N")
    requeue.add_argument("--channel", help="only records of this channel, e.g. feishu")
    requeue.add_argument("--error-code", help="only records whose last error code is this")
    requeue.add_argument(
        "--since",
        type=_timestamp,
        metavar="TIME",
        help="only dead records whose last change (when they died) is at or after TIME",
    )
    requeue.add_argument(
        "--until",
        type=_timestamp,
        metavar="TIME",
        help="only dead records whose last change is before TIME",
    )
    requeue.add_argument(
        "--dry-run", action="store_true", help="show what would be requeued; change nothing"
    )
    replay = add(
        "replay",
        "deliver sent or dead records again",
        "Deliver chosen sent or dead records again, as new attempts of the same records: no "
        "record is written, so deduplication holds. Records are chosen by when they were sent "
        "or died (updated_at) in [--since, --until) and the optional filters, oldest first, "
        "at most --limit; records of the range that are pending, failed, sending or skipped "
        "are reported and left alone. Each goes back on the retry path, due one every "
        "1/--rate seconds so that new records keep their latency, with the attempts of a new "
        "record (the max_attempts setting) on top of those it made, and --reason on the "
        "record and on every attempt it makes (delivery_attempts.replay_reason). Times are "
        "ISO 8601 (UTC unless an offset is given) or ages like 30m, 6h, 2d.",
    )
    replay.add_argument(
        "--since", type=_timestamp, metavar="TIME", help="records sent or dead at or after TIME"
    )
    replay.add_argument(
        "--until", type=_timestamp, metavar="TIME", help="records sent or dead before TIME"
    )
    replay.add_argument("--user", type=_positive_int, metavar="ID", help="only this user's")
    replay.add_argument(
        "--provider",
        metavar="P",
        help="only records whose user's channel uses this provider: "
        + ", ".join(names.PROVIDER_NAMES),
    )
    replay.add_argument(
        "--target",
        metavar="URL",
        help="only records whose user's channel has this webhook URL (the endpoint that lost "
        "the data); never printed",
    )
    replay.add_argument(
        "--error-code", metavar="CODE", help="only records whose last error code is this"
    )
    replay.add_argument(
        "--reason",
        metavar="TEXT",
        help="why: kept on each attempt of the replay (required, at most 500 characters)",
    )
    replay.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        default=operator.REPLAY_DEFAULT_LIMIT,
        help=f"replay at most N records, oldest first; run again for the rest "
        f"(default {operator.REPLAY_DEFAULT_LIMIT}, at most {operator.REPLAY_MAX_LIMIT})",
    )
    replay.add_argument(
        "--rate",
        type=float,
        metavar="R",
        default=operator.REPLAY_DEFAULT_RATE_PER_S,
        help=f"records falling due per second (default "
        f"{operator.REPLAY_DEFAULT_RATE_PER_S:g}); keep it below the pacing limit of a chat bot "
        "the records go to",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="show what would be replayed; change nothing"
    )
    replay.add_argument("--json", action="store_true", help="print JSON instead of text")
    for name, summary, description in (
        (
            "pause",
            "hold the deliveries of a target, a user's channel or a provider",
            "Hold deliveries to one target (a webhook URL), one user's channel (all of the "
            "user's channels without --channel) or a whole provider, e.g. while the receiver "
            "is down for maintenance. Held records stay pending: no attempt is spent, no call "
            "is made, nothing is skipped. The pause lasts until `resume`, or until --until / "
            "--for when given, and shows in `status` and the outbox_notifier.paused view. "
            "Pausing a scope already paused amends its reason and end. Needs the "
            "outbox_notifier_operator role. Not the breaker, which pauses a failing target "
            "by itself.",
        ),
        (
            "resume",
            "lift an operator's pause",
            "Lift the active pause of exactly this scope (the selectors given to `pause`): "
            "its records are due at once, delivered in order under pacing.",
        ),
    ):
        command = add(name, summary, description)
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("--target", metavar="URL", help="the webhook URL of the target")
        which.add_argument("--user", type=_positive_int, metavar="ID", help="the user's id")
        which.add_argument("--provider", choices=names.PROVIDER_NAMES, help="every target of it")
        command.add_argument(
            "--channel", help="with --user: only this channel of the user, e.g. feishu"
        )
        if name == "pause":
            command.add_argument("--reason", required=True, help="why, for the other operators")
            end = command.add_mutually_exclusive_group()
            end.add_argument(
                "--until", type=_future_time, metavar="TIME",
                help="resume by itself at TIME (RFC 3339; UTC unless an offset is given)",
            )  # fmt: skip
            end.add_argument(
                "--for", dest="for_", type=_duration, metavar="DURATION",
                help="resume by itself after DURATION, e.g. 90s, 30m, 2h, 1d",
            )  # fmt: skip
    add(
        "demo",
        "see the pipeline work end to end",
        "Enqueue a sample notification event and follow it through relay and delivery, "
        "printing each step.",
    )
    check = add(
        "check-config",
        "validate and print the effective settings",
        "Load the settings from defaults, the config file, the environment and flags; print "
        "them with secrets masked. Exit 2 with one line naming the problem if any is invalid "
        "or no DSN is given.",
    )
    check.add_argument("--json", action="store_true", help="print a JSON object")
    return parser


def _merged_globals(args: argparse.Namespace) -> None:
    """Joins each global option given before the subcommand with its copy given after."""
    for dest in _GLOBAL_DESTS:
        before = getattr(args, dest)
        later = getattr(args, dest + "_after", None)
        if dest == "set":
            setattr(args, dest, (before or []) + (later or []))
        elif later is not None:
            setattr(args, dest, later)


def _load(args: argparse.Namespace, warn: Callable[[str], object]) -> settings.Settings:
    overrides: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name, value in args.set:
        overrides[name] = value
        sources[name] = f"--set {name}"
    # The dedicated flags are more specific than --set, so they win.
    for dest, flag in _SETTING_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            overrides[dest] = value
            sources[dest] = flag
    return settings.load_settings(
        config_path=args.config,
        env=os.environ,
        overrides=overrides,
        override_sources=sources,
        warn=warn,
    )


def _fail(message: str) -> None:
    print(f"{PROG}: {' '.join(message.splitlines())}", file=sys.stderr)


def _cmd_migrate(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from outbox_notifier import migrations

    if args.status or args.dry_run:
        plan = migrations.plan(cfg.dsn)
        print(_migration_status(plan) if args.status else _migration_script(plan), end="")
        return EXIT_OK
    try:
        applied = migrations.migrate(cfg.dsn)
    except migrations.MigrationError as exc:
        _fail(str(exc))
        return EXIT_FAILURE
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("schema is up to date")
    return EXIT_OK


def _migration_status(plan: migrations.Plan) -> str:
    from outbox_notifier import sqlfiles

    own = {m.version for m in sqlfiles.migrations()}
    rows = [
        (
            f"{m.version:04d}",
            m.name,
            m.kind or "unknown",
            f"applied {m.applied_at:%Y-%m-%d %H:%M:%S%z}" if m.applied_at else "applied",
            "" if m.version in own else "newer than this release",
        )
        for m in plan.applied
    ] + [(f"{m.version:04d}", m.name, m.kind, "pending", "") for m in plan.pending]
    table = [("VERSION", "NAME", "KIND", "STATE", ""), *sorted(rows)]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, [*widths, 0], strict=True)).rstrip()
             for row in table]  # fmt: skip
    verdict = plan.verdict
    lines.append(f"this release {'can' if verdict.ok else 'cannot'} run on it: {verdict.reason}")
    return "\n".join(lines) + "\n"


def _migration_script(plan: migrations.Plan) -> str:
    if not plan.pending:
        return "-- schema is up to date: nothing would run\n"
    parts = [
        f"-- would apply {m.name} ({m.kind}), in its own transaction\n{m.sql.rstrip()}\n"
        for m in plan.pending
    ]
    return "\n".join(parts)


def _format_value(value: object) -> str:
    # JSON scalars and arrays are also TOML, so a line can be pasted into the config file.
    return msgspec.json.encode(value).decode()


def _cmd_check_config(args: argparse.Namespace, cfg: settings.Settings) -> int:
    shown = settings.masked(cfg)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(shown).decode(), indent=2))
    else:
        for name, value in shown.items():
            print(f"{name} = {_format_value(value)}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, cfg: settings.Settings) -> int:
    """Runs the daemon until SIGTERM/SIGINT; exits 0 after a clean drain."""
    from outbox_notifier import eventloop
    from outbox_notifier.daemon import (
        Daemon,
        DatabaseUnavailable,
        HttpListenError,
        SchemaNotCurrent,
    )

    try:
        eventloop.run(Daemon(cfg).run(), cfg.event_loop)
    except DatabaseUnavailable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (SchemaNotCurrent, HttpListenError) as exc:
        # exit 2, like a bad setting: restarting cannot help until the schema, the image or
        # the configuration changes
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _cmd_status(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from outbox_notifier import operator

    return operator.status(cfg, as_json=args.json)


def _dead_letter_filters(args: argparse.Namespace) -> operator.DeadLetterFilters:
    return operator.DeadLetterFilters(
        channel=args.channel, error_code=args.error_code, since=args.since, until=args.until
    )


def _cmd_requeue(args: argparse.Namespace, cfg: settings.Settings) -> int:
    return operator.requeue(
        cfg, _dead_letter_filters(args), record_id=args.id, dry_run=args.dry_run
    )


def _replay_selection(args: argparse.Namespace) -> operator.ReplaySelection:
    return operator.ReplaySelection(
        since=args.since,
        until=args.until,
        user_id=args.user,
        provider=args.provider,
        target_url=args.target,
        error_code=args.error_code,
        limit=args.limit,
    )


def _cmd_replay(args: argparse.Namespace, cfg: settings.Settings) -> int:
    return operator.replay(
        cfg,
        _replay_selection(args),
        reason=args.reason,
        rate_per_s=args.rate,
        dry_run=args.dry_run,
        as_json=args.json,
    )


def _pause_scope(args: argparse.Namespace) -> Any:
    from outbox_notifier import pauses

    return pauses.Scope(
        target_url=args.target, user_id=args.user, channel=args.channel, provider=args.provider
    )


def _cmd_pause(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from outbox_notifier import pauses

    until = args.until
    if args.for_ is not None:
        until = dt.datetime.now(dt.UTC) + args.for_
    return pauses.pause(cfg, _pause_scope(args), reason=args.reason, until=until)


def _cmd_resume(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from outbox_notifier import pauses

    return pauses.resume(cfg, _pause_scope(args))


def _cmd_demo(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from outbox_notifier import demo

    return demo.main(cfg)


Handler = Callable[[argparse.Namespace, settings.Settings], int]

# command -> (handler, needs a DSN). check-config needs one because every command but the
# demo (which starts its own database) does: a configuration without it would not run.
_HANDLERS: dict[str, tuple[Handler, bool]] = {
    "migrate": (_cmd_migrate, True),
    "run": (_cmd_run, True),
    "status": (_cmd_status, True),
    "requeue": (_cmd_requeue, True),
    "replay": (_cmd_replay, True),
    "pause": (_cmd_pause, True),
    "resume": (_cmd_resume, True),
    "demo": (_cmd_demo, False),
    "check-config": (_cmd_check_config, True),
}


def _requeue_selection_problem(args: argparse.Namespace) -> str | None:
    filtered = _dead_letter_filters(args).given
    if args.id is not None and filtered:
        return "--id cannot be combined with --channel, --error-code, --since or --until"
    if args.id is None and not filtered:
        return "pass --id N, or at least one of --channel, --error-code, --since, --until"
    return None


def _replay_problem(args: argparse.Namespace) -> str | None:
    if args.since is None or args.until is None:
        return "a time range is required: pass --since and --until"
    if args.reason is None:
        return "--reason is required: it goes into the attempt log"
    if args.provider is not None and args.provider not in names.PROVIDER_NAMES:
        return f"unknown provider {args.provider!r}: one of {', '.join(names.PROVIDER_NAMES)}"
    return operator.replay_problem(
        _replay_selection(args), reason=args.reason, rate_per_s=args.rate
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``outbox-notifier``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with usage on bad arguments
    _merged_globals(args)

    if args.command == "requeue":
        problem = _requeue_selection_problem(args)
        if problem:
            _fail(f"requeue: {problem}")
            return EXIT_USAGE
    if args.command == "replay":
        problem = _replay_problem(args)
        if problem:
            _fail(f"replay: {problem}")
            return EXIT_USAGE
    if args.command in ("pause", "resume") and args.channel and args.user is None:
        _fail(f"{args.command}: --channel goes with --user")
        return EXIT_USAGE

    # The settings' warnings wait for the log format the settings choose.
    warnings: list[str] = []
    try:
        cfg = _load(args, warnings.append)
    except settings.SettingsError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    logs.configure_logging(cfg.log_format, cfg.log_level)
    for line in warnings:
        settings.logger.warning("%s", line)

    handler, needs_database = _HANDLERS[args.command]
    if needs_database and not cfg.dsn:
        _fail(NO_DATABASE)
        return EXIT_USAGE
    try:
        return handler(args, cfg)
    except settings.SettingsError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _fail(f"cannot connect to the database: {first}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
