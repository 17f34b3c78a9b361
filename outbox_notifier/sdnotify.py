"""systemd's notification protocol (``sd_notify``): readiness, watchdog pings and status.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET``, the address of an ``AF_UNIX``
datagram socket: a filesystem path, or a name in the abstract namespace when it starts with
``@``. A message is one datagram of ``KEY=VALUE`` lines. Without ``NOTIFY_SOCKET`` (a terminal,
a container, a test) every method is a no-op, so callers never need to ask.

With ``WatchdogSec=`` set, systemd also passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the
process it is meant for) and kills the service when no ``WATCHDOG=1`` arrives within that
time. The ping must prove the daemon works, not merely that its event loop turns, so
`run_watchdog` pings only while a health check passes. systemd stops watching once the service
stops (``STOPPING=1`` or its own SIGTERM): the drain after a stop needs no pings.

Usage::

    notifier = SystemdNotifier()
    ...  # schema checked, loops started
    notifier.ready()
    watchdog = asyncio.create_task(run_watchdog(notifier, lambda: monitor.healthy(60.0)[0]))
    ...  # stop requested
    notifier.stopping()
    watchdog.cancel()

Sending never raises: a lost notification must not take the daemon down. A failed send returns
False and is logged once per streak of failures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address for a ``NOTIFY_SOCKET`` value, or None when it is unusable.

    ``/path`` is a filesystem socket, ``@name`` the abstract name ``\\0name``. Anything else
    (empty, relative, or a newer transport such as ``vsock:``) is not supported here.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


class SystemdNotifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET``; does nothing when it is unset.

    ``env`` defaults to ``os.environ`` and ``pid`` to this process's; both are injectable so a
    test can point the notifier at a socket of its own.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get(NOTIFY_SOCKET_ENV, "")
        self._address = socket_address(raw)
        if raw and self._address is None:
            logger.warning("ignoring unsupported %s=%r", NOTIFY_SOCKET_ENV, raw)
        self._watchdog_s = _watchdog_interval(env, os.getpid() if pid is None else pid)
        self._socket: socket.socket | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (the process runs under ``Type=notify``)."""
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Startup is complete: the service becomes active and its watchdog is armed."""
        return self.notify("READY=1", *_status_line(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun; systemd stops the watchdog and waits for the exit."""
        return self.notify("STOPPING=1", *_status_line(status))

    def watchdog(self) -> bool:
        """One watchdog ping: the daemon is alive and making progress."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Asks for ``seconds`` more before systemd's start (or stop) timeout fires
        (``EXTEND_TIMEOUT_USEC``): sent at every try while start-up waits for the database,
        so a long outage neither fails the start nor, through restarts, hits the start limit,
        while a start-up that stops trying still times out."""
        usec = max(1, round(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}", *_status_line(status))

    def status(self, text: str) -> bool:
        """Free-form one-line status, shown by ``systemctl status``."""
        return self.notify(*_status_line(text))

    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of ``WatchdogSec=``; None when no watchdog is expected.

        None also when ``WATCHDOG_PID`` names another process (the variables were inherited).
        """
        return self._watchdog_s

    def notify(self, *assignments: str) -> bool:
        """Sends ``KEY=VALUE`` assignments as one datagram; True if it was sent."""
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never stall the event loop on a busy manager: a full queue drops the message.
                sock.setblocking(False)
                self._socket = sock
            # sendto per message, not connect once: the manager may re-create its socket
            # (daemon-reexec) while we run.
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._failing:
                logger.warning("cannot notify systemd (%s): %s", _first_word(message), exc)
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def run_watchdog(
    notifier: SystemdNotifier,
    healthy: Callable[[], bool],
    *,
    interval_s: float | None = None,
) -> None:
    """Pings the watchdog every ``interval_s`` while ``healthy()``; runs until cancelled.

    ``interval_s`` defaults to `SystemdNotifier.watchdog_interval_s`; without a watchdog this
    returns at once. A failing health check withholds the ping, so systemd restarts a daemon
    whose loops are wedged even though its event loop still turns; a blocked event loop sends
    nothing at all. A check that raises counts as unhealthy.
    """
    interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s()
    if interval_s is None or not notifier.enabled:
        return
    withheld = False
    while True:
        try:
            ok = healthy()
        except Exception:
            logger.exception("watchdog health check failed")
            ok = False
        if ok:
            if withheld:
                logger.info("loops are making progress again; resuming watchdog pings")
            notifier.watchdog()
        elif not withheld:
            logger.warning(
                "a loop has stopped making progress; withholding the watchdog ping "
                "(systemd restarts the service when its watchdog expires)"
            )
        withheld = not ok
        await asyncio.sleep(interval_s)


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    usec_text = env.get(WATCHDOG_USEC_ENV, "")
    if not usec_text.isdigit() or int(usec_text) == 0:
        return None
    pid_text = env.get(WATCHDOG_PID_ENV, "")
    if pid_text and (not pid_text.isdigit() or int(pid_text) != pid):
        return None
    return int(usec_text) / 1_000_000 / 2


def _status_line(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # One message is newline-separated assignments: a newline would end the status early.
    return ("STATUS=" + " ".join(text.split()),)


def _first_word(message: bytes) -> str:
    return message.split(b"\n", 1)[0].decode(errors="replace")
