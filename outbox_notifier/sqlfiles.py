"""Loads the SQL that ships in ``sql/``: numbered migrations and the named queries.

Every non-migration file of ``sql/`` holds statements as blocks headed by a line
``-- name: <query_name>`` followed by a comment that says what the query is for (and why it
is written so), one file per caller: ``queries.sql`` for the pipeline (``store``; the timeouts
and probe of ``timeouts`` and ``connections``; the schema check of ``migrations``),
``maintenance.sql`` for the maintenance loop
(``maintenance_store``), ``operator.sql`` for the operator commands. A reviewer (or an operator
at 3 a.m.) finds all the SQL of one part in one place. `query` looks a name up across all of
them, so a name is unique across the files (loading fails otherwise).

Every migration has a kind. ``additive``: a daemon built for an older schema keeps working on it
(new tables, nullable or defaulted columns, new functions, new ``_vN`` versions of a function
beside the old ones, grants). ``breaking``: older daemons must not run on it (a dropped or
renamed object, a changed function signature or meaning). A new migration file declares its
kind on its first line, ``-- kind: additive`` or ``-- kind: breaking``; the kinds of the files
released before that convention are in `RELEASED_KINDS`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import LiteralString, cast

import msgspec

SQL_DIR = Path(__file__).resolve().parent / "sql"

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_QUERY_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_KIND_HEADER = re.compile(r"^-- kind: (\S+)\s*$")

KINDS = ("additive", "breaking")

# Migrations released before files declared their kind: their text cannot change (the checksum
# recorded at migrate time would no longer match), so their kinds are declared here. 0001 creates
# the schema, so nothing older can run on it; 0002 and 0003 only added tables, functions and a
# defaulted column. (Daemons of release 0.1.0 still demand their exact version.)
RELEASED_KINDS: dict[int, str] = {1: "breaking", 2: "additive", 3: "additive"}


class Migration(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    name: str
    sql: str
    kind: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """Every migration file, in version order."""
    found = []
    for path in sorted(SQL_DIR.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            version, text = int(match.group(1)), path.read_text()
            kind = _kind(path, version, text)
            found.append(Migration(version=version, name=path.stem, sql=text, kind=kind))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a version: {versions}")
    return tuple(found)


def _kind(path: Path, version: int, text: str) -> str:
    if version in RELEASED_KINDS:
        return RELEASED_KINDS[version]
    match = _KIND_HEADER.match(text.partition("\n")[0])
    if match is None or match.group(1) not in KINDS:
        raise RuntimeError(
            f"migration {path.name} must start with '-- kind: additive' or '-- kind: breaking'"
        )
    return match.group(1)


@functools.cache
def queries() -> dict[str, LiteralString]:
    """The named queries of every non-migration SQL file."""
    named: dict[str, LiteralString] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        if _MIGRATION_NAME.match(path.name):
            continue
        parts = _QUERY_HEADER.split(path.read_text())
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in named:
                raise RuntimeError(f"query {name!r} is defined twice (again in {path.name})")
            # The files ship with the package and are never built from input: static SQL.
            named[name] = cast(LiteralString, body.strip().rstrip(";"))
    return named


def query(name: str) -> LiteralString:
    return queries()[name]
