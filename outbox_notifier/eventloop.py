"""Which event loop the daemon runs on: uvloop where it is installed, else asyncio's own.

uvloop's loop runs the same asyncio code with its scheduling, timers and socket I/O in C
(libuv); under the daemon's load (tens of HTTP calls and database round trips in flight) that
is the loop's whole cost. ``event_loop = "auto"`` falls back to asyncio where uvloop has no
build (Windows, PyPy); ``"asyncio"`` forces the standard loop, ``"uvloop"`` requires uvloop.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: The ``event_loop`` choices (settings) and the bench's ``--loop`` choices.
CHOICES = ("auto", "uvloop", "asyncio")


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``choice`` (None: asyncio's default loop)."""
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return None
    import uvloop  # "uvloop" without it installed is refused by the settings

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop`` or ``asyncio``: the loop given, else the running one (start-up log line,
    the bench's ready lines)."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
