"""A provider that raises must not lose its records: `call_provider` and `call_digest` turn
the exception into a retryable result, and let a cancellation through."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from outbox_notifier.delivery import call_digest, call_provider
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers.model import Delivery, DigestResult, Recipient, SendResult
from tests import provider_support

TO = Recipient(
    enabled=True, webhook_url="https://hooks.example/x", auth_kind="none", auth_secret=None
)


class Raising:
    """A provider whose every call raises ``error``."""

    digests = True

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def send(self, delivery: Delivery) -> SendResult:
        raise self.error

    async def send_digest(self, deliveries: Sequence[Delivery]) -> DigestResult:
        raise self.error


def _deliveries(count: int) -> list[Delivery]:
    return [
        provider_support.make_delivery(TO, record_id=i, dedupe_key=f"dk-{i}")
        for i in range(1, count + 1)
    ]


async def test_a_raising_provider_gives_a_temporary_failure() -> None:
    sent = await call_provider({"p": Raising(RuntimeError("boom"))}, "p", _deliveries(1)[0])
    assert sent.outcome is Outcome.TEMPORARY_FAIL
    assert sent.error_code is ErrorCode.NETWORK_ERROR
    assert sent.error_message == "RuntimeError: boom"


async def test_a_raising_digest_gives_the_first_record_a_temporary_failure() -> None:
    digest = await call_digest(Raising(ValueError("bad")), "p", _deliveries(3))
    assert digest.included == 1
    assert digest.result.outcome is Outcome.TEMPORARY_FAIL
    assert digest.result.error_message == "ValueError: bad"


async def test_cancellation_propagates() -> None:
    with pytest.raises(asyncio.CancelledError):
        await call_provider({"p": Raising(asyncio.CancelledError())}, "p", _deliveries(1)[0])
    with pytest.raises(asyncio.CancelledError):
        await call_digest(Raising(asyncio.CancelledError()), "p", _deliveries(2))
