"""The compatibility verdict and the migration kinds, without a database."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox_notifier import migrations, sqlfiles
from outbox_notifier.migrations import Applied


def _applied(*rows: tuple[int, str | None]) -> list[Applied]:
    return [Applied(version=v, name=f"{v:04d}_m", kind=k) for v, k in rows]


def test_own_version_is_compatible() -> None:
    verdict = migrations.assess(_applied((1, "breaking"), (2, "additive")), 2)
    assert verdict.ok
    assert verdict.database_version == 2
    assert verdict.daemon_version == 2


def test_older_schema_is_refused_naming_both_versions() -> None:
    verdict = migrations.assess(_applied((1, "breaking"), (2, "additive")), 3)
    assert not verdict.ok
    assert verdict.reason == (
        "database schema is at version 2, older than this daemon's 3: run `outbox-notifier migrate`"
    )


def test_newer_additive_schema_is_compatible() -> None:
    verdict = migrations.assess(_applied((1, "breaking"), (2, "additive"), (3, "additive")), 1)
    assert verdict.ok
    assert "version 3, newer than this daemon's 1" in verdict.reason


@pytest.mark.parametrize("kind", ["breaking", None])
def test_newer_schema_with_a_breaking_or_unknown_migration_is_refused(kind: str | None) -> None:
    rows = _applied((1, "breaking"), (2, "additive"), (3, kind), (4, "additive"))
    verdict = migrations.assess(rows, 2)
    assert not verdict.ok
    assert verdict.database_version == 4
    assert "at version 4, newer than this daemon's 2" in verdict.reason
    assert "migration 0003_m is " + (kind or "of unknown kind") in verdict.reason
    assert "built for version 3 or later" in verdict.reason


def test_newer_schema_without_the_daemons_own_migration_is_refused() -> None:
    verdict = migrations.assess(_applied((1, "breaking"), (3, "additive")), 2)
    assert not verdict.ok
    assert verdict.reason == (
        "database schema is at version 3 but lacks this daemon's migration 2: "
        "run this release's `outbox-notifier migrate`"
    )


def test_breaking_migrations_up_to_the_daemons_own_do_not_matter() -> None:
    verdict = migrations.assess(_applied((1, "breaking"), (2, "breaking"), (3, "additive")), 2)
    assert verdict.ok


def test_missing_schema_is_refused() -> None:
    nothing: list[list[Applied] | None] = [None, []]
    for applied in nothing:
        verdict = migrations.assess(applied, 4)
        assert not verdict.ok
        assert verdict.database_version is None
        assert "missing, this daemon needs version 4" in verdict.reason


def test_every_migration_has_a_kind_and_new_ones_declare_it_in_the_file() -> None:
    for migration in sqlfiles.migrations():
        assert migration.kind in sqlfiles.KINDS
        if migration.version not in sqlfiles.RELEASED_KINDS:
            assert migration.sql.startswith(f"-- kind: {migration.kind}\n"), migration.name


@pytest.mark.parametrize("first_line", ["-- 0009: no kind", "-- kind: additiv", ""])
def test_a_new_migration_without_a_valid_kind_line_is_refused(first_line: str) -> None:
    with pytest.raises(RuntimeError, match="must start with '-- kind: additive'"):
        sqlfiles._kind(Path("0009_x.sql"), 9, f"{first_line}\nSELECT 1;\n")


def test_pending_lists_what_is_not_applied() -> None:
    available = sqlfiles.migrations()
    applied = _applied(*((m.version, m.kind) for m in available[:2]))
    assert migrations.pending(applied, available) == list(available[2:])
    assert migrations.pending(None, available) == list(available)
