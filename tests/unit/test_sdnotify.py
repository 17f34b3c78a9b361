"""sd_notify against a real AF_UNIX datagram socket: a filesystem path and an abstract name."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox_notifier.sdnotify import SystemdNotifier, run_watchdog, socket_address


class Manager:
    """The receiving end systemd would hold: a bound datagram socket and its NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket
        self.notifiers: list[SystemdNotifier] = []

    def receive(self, timeout_s: float = 2.0) -> str:
        self.sock.settimeout(timeout_s)
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def notifier(self, **env: str) -> SystemdNotifier:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": self.notify_socket, **env})
        self.notifiers.append(notifier)
        return notifier

    def close(self) -> None:
        """Closes every notifier a test made (close is idempotent): no socket is left to the GC."""
        for notifier in self.notifiers:
            notifier.close()


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify")
        sock.bind(path)
        notify_socket = path
    else:
        name = f"outbox-notifier-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        notify_socket = "@" + name
    with sock:
        manager = Manager(sock, notify_socket)
        try:
            yield manager
        finally:
            manager.close()


def test_ready_stopping_watchdog_and_status_arrive_as_datagrams(manager: Manager) -> None:
    notifier = manager.notifier()
    assert notifier.enabled

    assert notifier.ready()
    assert manager.receive() == "READY=1"
    assert notifier.watchdog()
    assert manager.receive() == "WATCHDOG=1"
    assert notifier.status("relaying: 3 pending")
    assert manager.receive() == "STATUS=relaying: 3 pending"
    assert notifier.stopping(status="draining in-flight calls")
    assert manager.receive() == "STOPPING=1\nSTATUS=draining in-flight calls"
    notifier.close()


def test_extend_timeout_sends_microseconds_with_the_status(manager: Manager) -> None:
    notifier = manager.notifier()
    assert notifier.extend_timeout(32.5, status="waiting for database (try 2)")
    assert manager.receive() == (
        "EXTEND_TIMEOUT_USEC=32500000\nSTATUS=waiting for database (try 2)"
    )
    notifier.close()


def test_a_status_with_newlines_stays_one_assignment(manager: Manager) -> None:
    notifier = manager.notifier()
    assert notifier.status("line one\nREADY=1\n")
    assert manager.receive() == "STATUS=line one READY=1"


def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert notifier.watchdog_interval_s() is None
    notifier.close()


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_unusable_socket_values_disable_the_notifier(value: str) -> None:
    assert socket_address(value) is None
    assert not SystemdNotifier({"NOTIFY_SOCKET": value}).ready()


def test_a_vanished_socket_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1  # once per streak of failures, not once per ping
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    env: dict[str, str], expected: float | None
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notifier.watchdog_interval_s() == expected


async def test_run_watchdog_pings_only_while_healthy(manager: Manager) -> None:
    notifier = manager.notifier(WATCHDOG_USEC="40000")  # pings every 20 ms
    healthy = True
    task = asyncio.create_task(run_watchdog(notifier, lambda: healthy))
    await asyncio.sleep(0.15)
    assert manager.pending().count("WATCHDOG=1") >= 3

    healthy = False  # a wedged loop: the pings stop, and systemd would restart us
    await asyncio.sleep(0.05)
    manager.pending()
    await asyncio.sleep(0.15)
    assert manager.pending() == []

    healthy = True
    await asyncio.sleep(0.1)
    assert "WATCHDOG=1" in manager.pending()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    notifier.close()


async def test_run_watchdog_treats_a_raising_check_as_unhealthy(manager: Manager) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    notifier = manager.notifier(WATCHDOG_USEC="40000")
    task = asyncio.create_task(run_watchdog(notifier, broken))
    await asyncio.sleep(0.1)
    assert manager.pending() == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_watchdog_returns_at_once_without_a_watchdog(manager: Manager) -> None:
    await asyncio.wait_for(run_watchdog(manager.notifier(), lambda: True), timeout=1.0)
    await asyncio.wait_for(run_watchdog(SystemdNotifier({}), lambda: True, interval_s=0.01), 1.0)
