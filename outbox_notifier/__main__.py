"""``python -m outbox_notifier`` and the ``outbox-notifier`` command.

This module imports almost nothing before it installs the early signal handlers, so a
``run`` that is told to stop while it is still importing and starting up exits 0, as a
stopped daemon does, instead of dying by the signal (exit -15 under a supervisor).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _stop_before_start(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    if "run" in sys.argv[1:]:
        # Replaced by the daemon's own handlers once its event loop runs.
        signal.signal(signal.SIGTERM, _stop_before_start)
        signal.signal(signal.SIGINT, _stop_before_start)
    from outbox_notifier.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
