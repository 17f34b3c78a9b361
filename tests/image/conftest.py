"""The image test's base image is begun as soon as the session has collected an image test, so
that debootstrap runs while the tests collected before it do (tests/image/engine.py)."""

from __future__ import annotations

import pytest

from tests.image import engine


def pytest_collection_finish(session: pytest.Session) -> None:
    option = session.config.option
    if option.collectonly or option.setupplan or option.setuponly:
        return
    if engine.missing_tools():
        return  # the test skips, or fails, saying so
    if any(item.get_closest_marker("image") for item in session.items):
        engine.BASE.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    engine.BASE.stop()
