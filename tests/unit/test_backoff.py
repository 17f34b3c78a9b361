from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from outbox_notifier.backoff import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BASE_S,
    DEFAULT_RETRY_MAX_S,
    after_temporary_failure,
    next_delay_s,
    retry_delay_s,
)

NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)


def test_defaults_match_the_seed() -> None:
    assert (DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_BASE_S, DEFAULT_RETRY_MAX_S) == (5, 300.0, 1800.0)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (-3, 300.0),
        (0, 300.0),
        (1, 300.0),
        (2, 600.0),
        (3, 1200.0),
        (4, 1800.0),
        (5, 1800.0),
        (6, 1800.0),
        (10_000, 1800.0),
        (10**18, 1800.0),
    ],
)
def test_retry_delay_defaults(attempt: int, expected: float) -> None:
    assert retry_delay_s(attempt, DEFAULT_RETRY_BASE_S, DEFAULT_RETRY_MAX_S) == expected


@pytest.mark.parametrize(
    ("attempt", "base_s", "max_s", "expected"),
    [
        (1, 1.0, 100.0, 1.0),
        (4, 1.0, 100.0, 8.0),
        (7, 1.0, 100.0, 64.0),
        (8, 1.0, 100.0, 100.0),
        (1, 50.0, 10.0, 10.0),  # max below base: the cap still wins
        (3, 0.0, 10.0, 0.0),
        (10**18, 1e-300, 5.0, 5.0),
    ],
    ids=["first", "doubling", "below-cap", "capped", "max-below-base", "zero-base", "tiny-base"],
)
def test_retry_delay_custom(attempt: int, base_s: float, max_s: float, expected: float) -> None:
    assert retry_delay_s(attempt, base_s, max_s) == expected


@pytest.mark.parametrize(
    ("attempt", "retry_after_s", "expected"),
    [
        (1, None, 300.0),
        (3, None, 1200.0),
        (9, None, 1800.0),
        (1, 7.0, 7.0),  # sooner than the backoff: believed
        (4, 7.0, 7.0),
        (1, 0.0, 1.0),  # at least a second
        (1, 0.2, 1.0),
        (1, 900.0, 900.0),
        (1, 7200.0, 3600.0),  # capped by retry_after_max_s
        (1, math.inf, 3600.0),
        (2, math.nan, 600.0),  # unusable: plain backoff
    ],
)
def test_next_delay(attempt: int, retry_after_s: float | None, expected: float) -> None:
    assert next_delay_s(attempt, 300.0, 1800.0, retry_after_s, 3600.0) == expected


@pytest.mark.parametrize(
    ("attempt_count", "max_attempts", "dead"),
    [
        (1, 5, False),
        (4, 5, False),
        (5, 5, True),
        (6, 5, True),
        (1, 1, True),
        (4, 0, False),  # 0: use the default (5)
        (5, 0, True),
        (5, -1, True),
        (2, 3, False),
        (3, 3, True),
    ],
)
def test_after_temporary_failure(attempt_count: int, max_attempts: int, dead: bool) -> None:
    assert after_temporary_failure(attempt_count, max_attempts) is dead


def test_after_temporary_failure_custom_default() -> None:
    assert after_temporary_failure(2, 0, default_max_attempts=2) is True
    assert after_temporary_failure(1, 0, default_max_attempts=2) is False
    assert after_temporary_failure(6, 0, default_max_attempts=7) is False
    assert after_temporary_failure(3, 3, default_max_attempts=7) is True


def test_dead_at_fifth_temporary_failure_with_defaults() -> None:
    delays = []
    attempt = 0
    while True:
        attempt += 1
        if after_temporary_failure(attempt, DEFAULT_MAX_ATTEMPTS):
            break
        delays.append(retry_delay_s(attempt, DEFAULT_RETRY_BASE_S, DEFAULT_RETRY_MAX_S))
    assert attempt == 5
    assert delays == [300.0, 600.0, 1200.0, 1800.0]  # 5, 10, 20, 30 minutes
