"""What the CLI's subcommands do. The CLI parses; these run."""

from __future__ import annotations

import sys
from datetime import datetime

from outbox_notifier import eventloop, logs
from outbox_notifier.daemon import Daemon, DatabaseUnavailable, HttpListenError, SchemaNotCurrent
from outbox_notifier.settings import Settings


def run(settings: Settings) -> int:
    """Runs the daemon until SIGTERM/SIGINT; exits 0 after a clean drain."""
    logs.configure_logging(settings.log_format, settings.log_level)
    try:
        eventloop.run(Daemon(settings).run(), settings.event_loop)
    except DatabaseUnavailable as exc:
        print(f"outbox-notifier: {exc}", file=sys.stderr)
        return 1
    except (SchemaNotCurrent, HttpListenError) as exc:
        # exit 2, like a bad setting: restarting cannot help until the schema, the image or
        # the configuration changes
        print(f"outbox-notifier: {exc}", file=sys.stderr)
        return 2
    return 0


def demo(settings: Settings) -> int:
    from outbox_notifier import demo as demo_module

    return demo_module.main(settings)


def status(settings: Settings, as_json: bool) -> int:
    from outbox_notifier import operator

    return operator.status(settings, as_json=as_json)


def requeue(
    settings: Settings,
    *,
    record_id: int | None,
    channel: str | None,
    error_code: str | None,
    since: datetime | None,
    until: datetime | None,
    dry_run: bool,
) -> int:
    from outbox_notifier import operator

    return operator.requeue(
        settings, record_id=record_id, channel=channel, error_code=error_code,
        since=since, until=until, dry_run=dry_run,
    )  # fmt: skip
