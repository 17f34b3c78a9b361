"""The notification's own fields, as a record keeps them from its event: one list for every
struct that carries them (``store.NewRecord``, ``store.ClaimedRecord``,
``providers.model.Delivery``). A module of its own, below the store and the providers alike
(the providers must not import the store).

``target_type``, ``target_id`` and ``target_url`` are the event contract's fields about the
business object the notification is about, not the delivery target (see ``names``).
"""

from __future__ import annotations

from typing import Any

import msgspec


class RecordFields(msgspec.Struct, frozen=True):
    """The fields a record takes from its event unchanged, in this order (a subclass built
    from a row by position, ``store.ClaimedRecord``, selects them first)."""

    user_id: int
    trigger_id: str
    preview_id: str
    trigger_type: str
    target_type: str
    target_id: int
    dedupe_key: str
    target_url: str
    trace_id: str


def record_fields(source: object) -> dict[str, Any]:
    """The ``RecordFields`` of ``source`` (an event, a claimed record) by name: what a struct
    that carries them takes unchanged from one that has them."""
    return {name: getattr(source, name) for name in RecordFields.__struct_fields__}
