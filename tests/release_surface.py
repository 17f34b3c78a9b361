"""The public surface of a release, and what a change of it demands.

A surface is what operators and producers build on: the schema version, the CLI's commands,
the settings (with their defaults), the metric families, the SQL functions and relations of
schema ``outbox_notifier``, and the event payload's fields. ``tests/releases.toml`` holds the
surface of each release as recorded at its release commit (by `current`, run on that tree);
the release test compares the tree with the last one (`changes`) and, when anything changed,
demands a new version with its CHANGELOG section (`problems`). Settings a release dropped
must stay accepted for a release (`outbox_notifier.settings.REMOVED`).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
RELEASES = ROOT / "tests" / "releases.toml"

# Functions and relations of the schema, by kind; a function with its argument types, since a
# changed signature breaks its callers as surely as a new name.
_SQL_OBJECTS = """
SELECT 'function ' || p.oid::regprocedure::text
  FROM pg_proc p WHERE p.pronamespace = 'outbox_notifier'::regnamespace
UNION ALL
SELECT CASE c.relkind WHEN 'v' THEN 'view ' ELSE 'table ' END || c.relname
  FROM pg_class c
 WHERE c.relnamespace = 'outbox_notifier'::regnamespace AND c.relkind IN ('r', 'p', 'v')
ORDER BY 1
"""


class Surface(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    commit: str = ""  # the release commit it was recorded at; empty for the tree under test
    schema_version: int
    commands: tuple[str, ...]
    settings: dict[str, Any]  # name -> default (lists for tuples, as TOML holds them)
    metrics: tuple[str, ...]
    sql_objects: tuple[str, ...]
    event_fields: tuple[str, ...]


def releases() -> list[Surface]:
    """Every recorded release, oldest first."""
    data = tomllib.loads(RELEASES.read_text())
    return [msgspec.convert(r, Surface) for r in data["release"]]


def current(conn: psycopg.Connection[Any]) -> Surface:
    """The surface of the tree being tested; ``conn`` is a database it migrated."""
    from outbox_notifier import __version__, cli, events, metrics, settings, sqlfiles

    parser = cli.build_parser()
    [subs] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    registry = CollectorRegistry()
    metrics.Metrics(registry)
    defaults = msgspec.to_builtins(settings.Settings())
    return Surface(
        version=__version__,
        schema_version=max(m.version for m in sqlfiles.migrations()),
        commands=tuple(sorted(subs.choices)),
        settings={name: defaults[name] for name in settings.setting_names()},
        metrics=tuple(sorted(family.name for family in registry.collect())),
        sql_objects=tuple(row[0] for row in conn.execute(_SQL_OBJECTS).fetchall()),
        event_fields=tuple(events.FeishuNotificationRequested.__struct_fields__),
    )


def changes(released: Surface, now: Surface) -> list[str]:
    """Each difference between two surfaces, one line each (empty when they match)."""
    out = []
    if released.schema_version != now.schema_version:
        out.append(f"schema version {released.schema_version} -> {now.schema_version}")
    for kind in ("commands", "settings", "metrics", "sql_objects", "event_fields"):
        before, after = set(getattr(released, kind)), set(getattr(now, kind))
        out += [f"{kind}: added {name}" for name in sorted(after - before)]
        out += [f"{kind}: removed {name}" for name in sorted(before - after)]
    return out


def _parts(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def problems(released: Surface, now: Surface, changelog: str) -> list[str]:
    """Why ``now`` cannot ship as it is, given the last release and the CHANGELOG's text."""
    found = changes(released, now)
    if not found:
        return []
    heading = re.compile(rf"^## \[?{re.escape(now.version)}\]?(\s|$)", re.M)
    out = []
    if _parts(now.version) <= _parts(released.version):
        out.append(
            f"the surface changed since {released.version} ({'; '.join(found)}) "
            f"but the version is {now.version}: bump outbox_notifier.__version__"
        )
    if not heading.search(changelog):
        out.append(f"CHANGELOG.md has no '## {now.version}' section for these changes")
    return out


def unaccepted_removed_settings(
    released: Surface, now: Surface, removed: Mapping[str, str]
) -> list[str]:
    """Settings of the last release that ``now`` neither has nor accepts as removed."""
    return sorted(set(released.settings) - set(now.settings) - set(removed))
