"""The daemon's event loop: uvloop when installed (it is a dependency), asyncio on request."""

from __future__ import annotations

import asyncio

import pytest

from outbox_notifier import eventloop
from outbox_notifier.settings import SettingsError, load_settings


async def _loop_name() -> str:
    await asyncio.sleep(0)
    return eventloop.name(asyncio.get_running_loop())


def test_auto_runs_on_uvloop_where_it_is_installed() -> None:
    assert eventloop.uvloop_available()  # a dependency on this platform
    assert eventloop.run(_loop_name(), "auto") == "uvloop"
    assert eventloop.run(_loop_name(), "uvloop") == "uvloop"


def test_asyncio_forces_the_standard_loop() -> None:
    assert eventloop.loop_factory("asyncio") is None
    assert eventloop.run(_loop_name(), "asyncio") == "asyncio"


def _loop_setting(env: dict[str, str]) -> str:
    return load_settings(config_path=None, env=env, overrides={}).event_loop


def test_event_loop_setting_is_checked() -> None:
    assert _loop_setting({}) == "auto"
    assert _loop_setting({"OUTBOX_NOTIFIER_EVENT_LOOP": "asyncio"}) == "asyncio"
    with pytest.raises(SettingsError, match="event_loop"):
        _loop_setting({"OUTBOX_NOTIFIER_EVENT_LOOP": "trio"})
