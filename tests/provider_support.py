"""Helpers shared by the provider tests: deliveries and ``httpx.MockTransport`` handlers."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from outbox_notifier.providers.model import Delivery, Recipient

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def make_delivery(recipient: Recipient | None, **overrides: Any) -> Delivery:
    """A claimed delivery to ``recipient`` with the provider tests' usual fields.

    ``overrides`` replace any field; each test module passes its own ``record_id``,
    ``channel`` and whatever else its expectations are written against.
    """
    fields: dict[str, Any] = {
        "record_id": 1,
        "channel": "feishu",
        "user_id": 7,
        "trigger_id": "trg_1",
        "preview_id": "asp_1",
        "trigger_type": "important_urgent_task",
        "target_type": "task_pool",
        "target_id": 19,
        "target_url": "/assistant/preview/asp_1",
        "message_text": "Two tasks moved.",
        "fallback_used": False,
        "trace_id": "trace-abc",
        "attempt": 1,
        "dedupe_key": "dk-1",
        "recipient": recipient,
    }
    fields.update(overrides)
    return Delivery(**fields)


def mock_transport(handler: Handler) -> httpx.MockTransport:
    """A transport whose every request goes to ``handler``."""
    return httpx.MockTransport(handler)


def reply(status: int, content: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    """A handler answering every request with ``status``, ``content`` and ``headers``."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers=headers)

    return handler


def raising(exc: BaseException) -> Handler:
    """A handler raising ``exc`` for every request."""

    async def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def recording(status: int, **response: Any) -> tuple[list[httpx.Request], Handler]:
    """A handler that keeps every request in the returned list and answers ``status``.

    ``response`` goes to each ``httpx.Response`` (``json=``, ``headers=`` ...).
    """
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, **response)

    return seen, handler
