from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest

from outbox_notifier.backoff import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BASE_S,
    DEFAULT_RETRY_MAX_S,
    Dead,
    Retry,
    RetryAlone,
    RetryPolicy,
    Sent,
    Skipped,
    Transition,
    after_temporary_failure,
    decide,
    jittered_s,
    retry_delay_s,
)
from outbox_notifier.names import ErrorCode, Outcome

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


NO_JITTER = RetryPolicy(jitter=0.0)


def temporary_failure(
    attempt: int,
    retry_after_s: float | None = None,
    *,
    policy: RetryPolicy = NO_JITTER,
    rng: random.Random | None = None,
) -> Transition:
    return decide(
        Outcome.TEMPORARY_FAIL, attempt_count=attempt, max_attempts=5,
        retry_after_s=retry_after_s, policy=policy, rng=rng or random.Random(0),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("attempt", "retry_after_s", "expected"),
    [
        (1, None, Retry(delay_s=300.0, reason="backoff")),
        (3, None, Retry(delay_s=1200.0, reason="backoff")),
        (4, None, Retry(delay_s=1800.0, reason="backoff")),
        (1, 7.0, Retry(delay_s=7.0, reason="retry_after")),  # sooner than the backoff: believed
        (4, 7.0, Retry(delay_s=7.0, reason="retry_after")),
        (1, 0.0, Retry(delay_s=1.0, reason="retry_after")),  # at least a second
        (1, 0.2, Retry(delay_s=1.0, reason="retry_after")),
        (1, 900.0, Retry(delay_s=900.0, reason="retry_after")),
        (1, 7200.0, Retry(delay_s=3600.0, reason="retry_after")),  # capped by retry_after_max_s
        (1, math.inf, Retry(delay_s=3600.0, reason="retry_after")),
        (2, math.nan, Retry(delay_s=600.0, reason="backoff")),  # unusable: plain backoff
        (5, None, Dead(reason="attempts_spent")),
        (5, 7.0, Dead(reason="attempts_spent")),  # a Retry-After does not buy an attempt
    ],
)
def test_a_temporary_failure_is_retried_or_dead(
    attempt: int, retry_after_s: float | None, expected: Transition
) -> None:
    assert temporary_failure(attempt, retry_after_s) == expected


@pytest.mark.parametrize(
    ("outcome", "expected", "status"),
    [
        (Outcome.SUCCESS, Sent(), "sent"),
        (Outcome.SKIPPED, Skipped(), "skipped"),
        (Outcome.PERMANENT_FAIL, Dead(reason="permanent_failure"), "dead"),
        (Outcome.TEMPORARY_FAIL, Retry(delay_s=300.0, reason="backoff"), "failed"),
    ],
)
def test_each_outcome_has_its_transition_and_status(
    outcome: Outcome, expected: Transition, status: str
) -> None:
    # attempt 1 of 5, and a Retry-After that only a temporary failure may use
    transition = decide(
        outcome, attempt_count=1, max_attempts=5, retry_after_s=None, policy=NO_JITTER,
        rng=random.Random(0),
    )  # fmt: skip
    assert transition == expected
    assert transition.status == status


def test_the_records_own_limit_wins_over_the_policy() -> None:
    def after(attempt: int, max_attempts: int) -> Transition:
        return decide(
            Outcome.TEMPORARY_FAIL, attempt_count=attempt, max_attempts=max_attempts,
            retry_after_s=None, policy=RetryPolicy(max_attempts=3, jitter=0.0),
            rng=random.Random(0),
        )  # fmt: skip

    assert after(2, 2) == Dead(reason="attempts_spent")
    assert isinstance(after(2, 5), Retry)
    assert after(3, 0) == Dead(reason="attempts_spent")  # 0: the policy's limit
    assert isinstance(after(2, 0), Retry)


def digest_answered(
    outcome: Outcome, code: ErrorCode | None, records: int, attempt: int = 1
) -> Transition:
    return decide(
        outcome, attempt_count=attempt, max_attempts=5, retry_after_s=None, policy=NO_JITTER,
        rng=random.Random(0), error_code=code, records_in_call=records,
    )  # fmt: skip


def test_a_digest_refused_for_its_payload_is_tried_again_record_by_record() -> None:
    refused = digest_answered(Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID, records=3)
    assert refused == RetryAlone()
    assert (refused.status, refused.delay_s) == ("failed", 0.0)  # due at once
    # even on the last attempt: the message was refused, maybe for a neighbour's sake
    last = digest_answered(Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID, 3, attempt=5)
    assert last == RetryAlone()
    # alone, the platform's answer is the record's own: dead
    alone = digest_answered(Outcome.PERMANENT_FAIL, ErrorCode.PAYLOAD_INVALID, records=1)
    assert alone == Dead(reason="permanent_failure")


@pytest.mark.parametrize(
    ("outcome", "code", "expected"),
    [
        # auth failures and gone endpoints end every record, as a call of one would
        (Outcome.PERMANENT_FAIL, ErrorCode.PROVIDER_AUTH_FAILED, Dead(reason="permanent_failure")),
        (Outcome.PERMANENT_FAIL, ErrorCode.ENDPOINT_GONE, Dead(reason="permanent_failure")),
        (Outcome.TEMPORARY_FAIL, ErrorCode.PROVIDER_5XX, Retry(delay_s=300.0, reason="backoff")),
        (Outcome.SUCCESS, None, Sent()),
    ],
)
def test_any_other_answer_to_a_digest_is_each_records_as_if_alone(
    outcome: Outcome, code: ErrorCode | None, expected: Transition
) -> None:
    assert digest_answered(outcome, code, records=20) == expected
    assert digest_answered(outcome, code, records=1) == expected


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])  # 4: capped
def test_jitter_stays_within_20_percent_of_the_backoff(attempt: int) -> None:
    rng = random.Random(1234)
    nominal = retry_delay_s(attempt, 300.0, 1800.0)
    delays = [temporary_failure(attempt, policy=RetryPolicy(), rng=rng) for _ in range(2000)]
    spread = [d.delay_s for d in delays if isinstance(d, Retry)]
    assert len(spread) == 2000
    assert all(d.reason == "backoff" for d in delays if isinstance(d, Retry))
    assert min(spread) >= 0.8 * nominal
    assert max(spread) <= 1.2 * nominal
    # the whole band is used, not a corner of it
    assert min(spread) < 0.82 * nominal
    assert max(spread) > 1.18 * nominal


def test_the_cap_applies_before_the_jitter() -> None:
    # A capped delay is spread around the cap, not clamped back to it: above it half the time.
    rng = random.Random(7)
    spread = [jittered_s(retry_delay_s(9, 300.0, 1800.0), 0.2, rng) for _ in range(1000)]
    assert sum(1 for d in spread if d > 1800.0) > 400
    assert max(spread) <= 1800.0 * 1.2


def test_a_burst_of_identical_failures_does_not_retry_together() -> None:
    rng = random.Random(42)
    burst = [temporary_failure(2, policy=RetryPolicy(), rng=rng) for _ in range(100)]
    delays = [t.delay_s for t in burst if isinstance(t, Retry)]
    assert len(delays) == 100
    assert len(set(delays)) == 100
    # spread over most of the +/-20% band (120 s wide at 600 s): not bunched together
    assert max(delays) - min(delays) > 100.0


def test_a_seeded_random_source_gives_the_same_delays() -> None:
    def delays(seed: int) -> list[Transition]:
        rng = random.Random(seed)
        return [temporary_failure(n, policy=RetryPolicy(), rng=rng) for n in (1, 2, 3)]

    assert delays(5) == delays(5)
    assert delays(5) != delays(6)


def test_retry_after_is_exact_and_draws_no_jitter() -> None:
    rng = random.Random(3)
    state = rng.getstate()
    for _ in range(50):
        assert temporary_failure(1, 7.0, policy=RetryPolicy(), rng=rng) == Retry(
            delay_s=7.0, reason="retry_after"
        )
    assert rng.getstate() == state  # the random source was not touched


def test_the_policy_refuses_a_jitter_that_could_reach_zero() -> None:
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=-0.1)


def test_sql_delays_are_the_backoff_before_jitter() -> None:
    assert RetryPolicy().delays_s(5) == [300.0, 600.0, 1200.0, 1800.0, 1800.0]


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
