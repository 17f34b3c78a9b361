"""The operator commands ``pause`` and ``resume``: hold a target, a user's channel or a provider
without spending attempts, and let it go again.

Both call the schema's functions (``outbox_notifier.pause_v1`` / ``resume_v1``, migration
0013), which the ``outbox_notifier_operator`` role may execute, so the command works with an
operator's DSN. A target is named by its webhook URL; what is printed names it by its host and
the first characters of its key, never by the URL, which carries the bot's token. Exit codes:
0 done; 1 the database refused (a bad selector, an end in the past), is unreachable, or, for
``resume``, no such pause is active.

An operator's pause is not the breaker's: the breaker (``targets.paused_until``) is the
daemon's own, lifts itself after its cool-off, and shows in ``target_health``; an operator's
pause holds until resumed or its end, and shows in the ``paused`` view and ``status``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import psycopg

from outbox_notifier import operator
from outbox_notifier.dbhealth import first_line
from outbox_notifier.settings import Settings
from outbox_notifier.sqlfiles import query


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """What to pause or resume: exactly one of a target URL, a user (with an optional
    channel: none means every channel of the user) or a provider."""

    target_url: str | None = None
    user_id: int | None = None
    channel: str | None = None
    provider: str | None = None

    def params(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)

    def describe(self) -> str:
        """The scope for a person: never the URL."""
        if self.target_url is not None:
            return "the target"
        if self.user_id is not None:
            channel = f" channel {self.channel}" if self.channel else ""
            return f"user {self.user_id}{channel}"
        return f"provider {self.provider}"


def pause(settings: Settings, scope: Scope, *, reason: str, until: datetime | None) -> int:
    """Pauses ``scope`` until resumed or ``until``; prints what is now paused."""
    params = {**scope.params(), "reason": reason, "until": until}
    try:
        with operator.connect(settings) as conn:
            pause_id = _run(conn, "pause", params)
            row = conn.execute(query("active_pause"), {"id": pause_id}).fetchone()
    except operator.OperatorError as exc:
        return operator.fail(str(exc))
    assert row is not None  # just paused, in force
    paused, reason_now, paused_by, since, ends, waiting = row
    end = f"until {operator.timestamp(ends)}" if ends else "until resumed"
    print(
        f"paused {paused} (pause {pause_id}) {end}, by {paused_by} since "
        f"{operator.timestamp(since)}: {reason_now}; {waiting} records waiting"
    )
    return operator.EXIT_OK


def resume(settings: Settings, scope: Scope) -> int:
    """Resumes ``scope``'s active pause; its records are due at once."""
    try:
        with operator.connect(settings) as conn:
            released = _run(conn, "resume", scope.params())
    except operator.OperatorError as exc:
        return operator.fail(str(exc))
    if released is None:
        print(f"no active pause for {scope.describe()}")
        return operator.EXIT_FAILURE
    print(f"resumed {scope.describe()}: {released} records due now")
    return operator.EXIT_OK


def _run(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> Any:
    try:
        row = conn.execute(query(name), params).fetchone()
    except psycopg.errors.InvalidParameterValue as exc:
        raise operator.OperatorError(first_line(exc)) from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise operator.OperatorError(
            f"{first_line(exc)}: {name} needs the outbox_notifier_operator role"
        ) from exc
    assert row is not None
    return row[0]
