"""The release check itself: a change of the public surface without a new version fails it."""

from __future__ import annotations

import msgspec

from outbox_notifier import settings
from tests import release_surface
from tests.release_surface import Surface

RELEASED = release_surface.releases()[-1]
BUMPED = "\n## [9.9.9]\n"


def _changed(**changes: object) -> Surface:
    return msgspec.structs.replace(RELEASED, commit="", **changes)


def test_an_unchanged_surface_needs_no_release() -> None:
    assert release_surface.problems(RELEASED, _changed(), changelog="") == []


def test_a_setting_added_without_a_bump_is_refused() -> None:
    now = _changed(settings={**RELEASED.settings, "new_thing_s": 1.0})
    assert release_surface.changes(RELEASED, now) == ["settings: added new_thing_s"]
    found = release_surface.problems(RELEASED, now, changelog="## [Unreleased]\n")
    assert len(found) == 2
    assert "bump outbox_notifier.__version__" in found[0]
    assert "settings: added new_thing_s" in found[0]
    assert f"no '## {RELEASED.version}' section" in found[1]


def test_a_new_migration_needs_a_higher_version_and_its_changelog_section() -> None:
    later = _changed(schema_version=RELEASED.schema_version + 1, version="9.9.9")
    assert release_surface.problems(RELEASED, later, changelog=BUMPED) == []
    assert release_surface.problems(RELEASED, later, changelog="\n## 9.9.9\n") == []
    [missing] = release_surface.problems(RELEASED, later, changelog="\n## [9.9.90]\n")
    assert "CHANGELOG.md" in missing
    lower = _changed(schema_version=RELEASED.schema_version + 1, version="0.0.9")
    [older] = release_surface.problems(RELEASED, lower, changelog="\n## [0.0.9]\n")
    assert f"schema version {RELEASED.schema_version} -> " in older


def test_a_removed_name_counts_as_a_change() -> None:
    now = _changed(commands=RELEASED.commands[1:])
    assert release_surface.changes(RELEASED, now) == [f"commands: removed {RELEASED.commands[0]}"]


def test_a_released_setting_must_stay_accepted() -> None:
    [dropped, *_] = RELEASED.settings
    kept = {k: v for k, v in RELEASED.settings.items() if k != dropped}
    now = _changed(settings=kept)
    assert release_surface.unaccepted_removed_settings(RELEASED, now, {}) == [dropped]
    assert release_surface.unaccepted_removed_settings(RELEASED, now, {dropped: "why"}) == []


def test_the_recorded_release_is_0_1_0_on_schema_3() -> None:
    first = release_surface.releases()[0]
    assert (first.version, first.schema_version) == ("0.1.0", 3)
    assert "http_transport" in first.settings
    assert "http_transport" in settings.REMOVED
