"""Retry timing and the decision after a provider call. Pure: no I/O, no clock reads.

Durations are float seconds; the database adds them to its own ``now()``. The one source of
chance, the jitter, is a `random.Random` the caller hands in (tests seed it).

Usage::

    policy = RetryPolicy(max_attempts=5, base_s=300.0, max_s=1800.0)
    transition = decide(
        Outcome.TEMPORARY_FAIL, attempt_count=2, max_attempts=5, retry_after_s=None,
        policy=policy, rng=random.Random(),
    )
    # Retry(delay_s=547.3..., reason="backoff"): failed, due again in about 10 minutes
"""

from __future__ import annotations

import math
import random
from typing import ClassVar, Final, Literal

import msgspec

from outbox_notifier.names import ErrorCode, Outcome, RecordStatus

DEFAULT_MAX_ATTEMPTS: Final = 5
DEFAULT_RETRY_BASE_S: Final = 300.0
DEFAULT_RETRY_MAX_S: Final = 1800.0
#: Backoff delays are spread over +/- this fraction, so a burst that failed together does not
#: come due together.
DEFAULT_JITTER: Final = 0.2


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


def jittered_s(delay_s: float, jitter: float, rng: random.Random) -> float:
    """``delay_s * uniform(1 - jitter, 1 + jitter)``: never below ``(1 - jitter) * delay_s``
    (the floor, above zero for any positive delay, so a retry never falls due at once) and never
    above ``(1 + jitter) * delay_s``."""
    return delay_s * rng.uniform(1.0 - jitter, 1.0 + jitter)


def retry_after_delay_s(retry_after_s: float, retry_after_max_s: float) -> float:
    """A provider's ``Retry-After`` as the delay, in both directions: a provider that says "come
    back in 7 s" is believed (retrying sooner than our backoff is fine because it asked), and
    one that says "in 2 h" is believed up to ``retry_after_max_s`` so a hostile or broken header
    cannot park a record for days. At least 1 s, so a ``Retry-After: 0`` cannot spin. No jitter:
    the provider named the time."""
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


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """When to try again after a temporary failure (the seed's defaults, plus jitter).

    The delay after attempt n is ``min(base_s * 2**(n-1), max_s) * uniform(1 - jitter,
    1 + jitter)``. The cap applies before the jitter: capping after it would clamp the upper
    half of every capped delay back to exactly ``max_s``, and the records of a burst that
    reached the cap would come due together again. So the longest backoff is
    ``max_s * (1 + jitter)``. A provider's ``Retry-After`` is used as given (within
    ``[1 s, retry_after_max_s]``), without jitter.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_s: float = DEFAULT_RETRY_BASE_S
    max_s: float = DEFAULT_RETRY_MAX_S
    retry_after_max_s: float = 3600.0
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def delays_s(self, attempts: int) -> list[float]:
        """The backoff delay after attempt 1..attempts before jitter, for statements that
        schedule in SQL (they add the jitter there, per record)."""
        return [retry_delay_s(n, self.base_s, self.max_s) for n in range(1, attempts + 1)]


class Sent(msgspec.Struct, frozen=True, kw_only=True):
    """The call succeeded: ``sent``."""

    status: ClassVar[RecordStatus] = "sent"


class Skipped(msgspec.Struct, frozen=True, kw_only=True):
    """The provider skipped the delivery (no recipient, or a disabled one): ``skipped``."""

    status: ClassVar[RecordStatus] = "skipped"


class Dead(msgspec.Struct, frozen=True, kw_only=True):
    """No more tries: the failure was permanent, or it was the last attempt: ``dead``."""

    status: ClassVar[RecordStatus] = "dead"
    reason: Literal["permanent_failure", "attempts_spent"]


class Retry(msgspec.Struct, frozen=True, kw_only=True):
    """A temporary failure with attempts left: ``failed``, due again after ``delay_s``, which
    came from the backoff or from the provider's ``Retry-After``."""

    status: ClassVar[RecordStatus] = "failed"
    delay_s: float
    reason: Literal["backoff", "retry_after"]


class RetryAlone(msgspec.Struct, frozen=True, kw_only=True):
    """The record went out in a digest that the platform refused for its payload: the message
    was at fault, maybe for another record's sake. ``failed``, due at once, and its next call
    carries it alone, whose answer alone can make it dead. Given even on the record's last
    attempt, so one bad record cannot end its neighbours: such a record takes one attempt
    beyond ``max_attempts``."""

    status: ClassVar[RecordStatus] = "failed"
    delay_s: ClassVar[float] = 0.0


Transition = Sent | Skipped | Dead | Retry | RetryAlone
"""Where a record goes after a provider call; ``.status`` is its new status."""


def decide(
    outcome: Outcome,
    *,
    attempt_count: int,
    max_attempts: int,
    retry_after_s: float | None,
    policy: RetryPolicy,
    rng: random.Random,
    error_code: ErrorCode | None = None,
    records_in_call: int = 1,
) -> Transition:
    """The record's transition after a call that ended in ``outcome`` (seed semantics).

    ``attempt_count`` includes the call just made; ``max_attempts`` is the record's own limit
    (``<= 0``: the policy's). ``rng`` is drawn from only for a backoff delay. A call that
    carried several records (a digest, ``records_in_call``) and was refused for its payload
    (``error_code`` ``payload_invalid``) is `RetryAlone` for each; any other outcome of a
    digest is decided for each record as for a call of its own.
    """
    if (
        records_in_call > 1
        and outcome is Outcome.PERMANENT_FAIL
        and error_code is ErrorCode.PAYLOAD_INVALID
    ):
        return RetryAlone()
    if outcome is Outcome.SUCCESS:
        return Sent()
    if outcome is Outcome.SKIPPED:
        return Skipped()
    if outcome is Outcome.PERMANENT_FAIL:
        return Dead(reason="permanent_failure")
    if after_temporary_failure(attempt_count, max_attempts, policy.max_attempts):
        return Dead(reason="attempts_spent")
    if retry_after_s is not None and not math.isnan(retry_after_s):  # NaN: plain backoff
        return Retry(
            delay_s=retry_after_delay_s(retry_after_s, policy.retry_after_max_s),
            reason="retry_after",
        )
    delay_s = retry_delay_s(attempt_count, policy.base_s, policy.max_s)
    return Retry(delay_s=jittered_s(delay_s, policy.jitter, rng), reason="backoff")
