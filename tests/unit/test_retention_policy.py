"""The maintenance loop hands its RetentionPolicy to `retention.purge_once` field by field,
as keywords: every field must be one of its keywords, and the settings must all reach it."""

from __future__ import annotations

import inspect

from outbox_notifier import retention
from outbox_notifier.settings import Settings


def test_every_field_is_a_keyword_of_purge_once() -> None:
    keywords = inspect.signature(retention.purge_once).parameters
    for name in retention.RetentionPolicy.__struct_fields__:
        assert keywords[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_the_policy_comes_from_the_retention_settings() -> None:
    settings = Settings(
        dsn="dbname=x",
        outbox_retention_s=60.0,
        records_retention_s=120.0,
        retention_batch_size=7,
        retention_pause_factor=0.5,
    )
    assert retention.RetentionPolicy.from_settings(settings) == retention.RetentionPolicy(
        outbox_max_age_s=60.0, records_max_age_s=120.0, batch_size=7, pause_factor=0.5
    )
