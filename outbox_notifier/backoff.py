"""Retry timing and the dead-or-retry decision. Pure functions, no I/O, no clock reads.

Durations are float seconds; the caller adds them to its own ``now``.
"""

from __future__ import annotations

import math
from typing import Final

DEFAULT_MAX_ATTEMPTS: Final = 5
DEFAULT_RETRY_BASE_S: Final = 300.0
DEFAULT_RETRY_MAX_S: Final = 1800.0


def retry_delay_s(attempt_count: int, base_s: float, max_s: float) -> float:
    """Delay before the next try after ``attempt_count`` attempts: ``min(base * 2**(n-1), max)``.

    The seed's ``calcNextRetryAt``: an ``attempt_count <= 0`` counts as 1. With the defaults
    (300 s, 1800 s) attempts 1, 2, 3, 4, 5 wait 300, 600, 1200, 1800, 1800 seconds.
    """
    if base_s <= 0 or max_s <= 0:
        return max(0.0, min(base_s, max_s))
    delay = float(base_s)
    # Doubling stops as soon as the cap is reached, so a huge attempt_count costs at most a few
    # thousand iterations (a positive float overflows to inf within ~2100 doublings) and never
    # builds 2**attempt_count.
    for _ in range(max(attempt_count, 1) - 1):
        delay *= 2
        if delay >= max_s:
            return float(max_s)
    return min(delay, float(max_s))


def next_delay_s(
    attempt_count: int,
    base_s: float,
    max_s: float,
    retry_after_s: float | None,
    retry_after_max_s: float,
) -> float:
    """Delay before the next try after a temporary failure.

    When the provider sent ``Retry-After`` it wins over the backoff, in both directions: a provider
    that says "come back in 7 s" is believed (retrying sooner than our backoff is fine because it
    asked), and one that says "in 2 h" is believed up to ``retry_after_max_s`` so a hostile or
    broken header cannot park a record for days. At least 1 s, so a ``Retry-After: 0`` cannot spin.
    Without the header: :func:`retry_delay_s`.
    """
    if retry_after_s is None or math.isnan(retry_after_s):
        return retry_delay_s(attempt_count, base_s, max_s)
    return min(max(retry_after_s, 1.0), retry_after_max_s)


def after_temporary_failure(
    attempt_count: int, max_attempts: int, default_max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> bool:
    """Whether a record that just failed temporarily is now dead (else it is ``failed``, retried).

    ``attempt_count`` already includes the attempt that failed, so with a limit of 5 the fifth
    temporary failure is final. ``max_attempts <= 0`` means ``default_max_attempts`` (the seed's
    ``effectiveMaxAttempts``).
    """
    return attempt_count >= (max_attempts if max_attempts > 0 else default_max_attempts)
