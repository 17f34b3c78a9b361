"""Event-loop choice for the bench's own processes: uvloop when installed, else asyncio.

``auto`` picks uvloop when it imports, so the yardstick runs on the fastest loop at hand and the
bench names the loop it used beside every figure.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LOOPS = ("auto", "asyncio", "uvloop")


def resolve(choice: str) -> str:
    """The loop ``choice`` means here: ``auto`` becomes uvloop when installed."""
    if choice not in LOOPS:
        raise ValueError(f"unknown loop {choice!r}; expected one of {LOOPS}")
    if choice == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return choice


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if resolve(choice) == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_name() -> str:
    """``uvloop`` or ``asyncio``: the loop this coroutine runs on."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
