"""Real daemon processes: several replicas, SIGKILL mid-call, SIGTERM drain."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.support import add_channel, enqueue, payload, scalar


def start_daemon(dsn: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, "-m", "outbox_notifier", "run", "--dsn", dsn,
        "--set", "flow_allowed_schemes=http", "--set", "flow_allowed_hosts=127.0.0.1",
        "--set", "http_listen=127.0.0.1:0", "--set", "poll_interval_s=0.5",
        "--set", "egress_allow_cidrs=127.0.0.0/8",
        "--set", "retry_interval_s=0.2", "--set", "pool_min_size=1",
        *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str], timeout_s: float = 30) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out


@pytest.fixture
def server() -> Iterator[FeishuServer]:
    with FeishuServer.in_thread() as srv:
        yield srv


def _count(conn: psycopg.Connection[Any], where: str) -> int:
    return int(scalar(conn, f"SELECT count(*) FROM outbox_notifier.notification_records {where}"))


@pytest.mark.timeout(180)
def test_three_replicas_deliver_each_of_500_keys_exactly_once(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    for user_id in range(1, 6):
        add_channel(conn, user_id, server.flow_url(f"user-{user_id}"))
    with psycopg.connect(db) as producer:
        for i in range(2000):
            key = f"key-{i % 500}"
            enqueue(producer, payload(key, user_id=1 + (i % 500) % 5))
        producer.commit()
    daemons = [start_daemon(db) for _ in range(3)]
    try:
        wait_until(lambda: _count(conn, "WHERE status = 'sent'") == 500, 120, "500 sent")
        time.sleep(0.5)
    finally:
        outputs = [stop(d) for d in daemons]
    assert [code for code, _ in outputs] == [0, 0, 0], outputs
    assert _count(conn, "") == 500
    assert _count(conn, "WHERE status IN ('pending', 'sending')") == 0
    assert (
        scalar(conn, "SELECT count(*) FROM outbox_notifier.outbox WHERE status <> 'relayed'") == 0
    )
    per_record = collections.Counter(r.json["notification_id"] for r in server.requests)  # type: ignore[index]
    assert len(per_record) == 500
    assert max(per_record.values()) == 1
    assert scalar(conn, "SELECT count(*) FROM outbox_notifier.delivery_attempts") == 500


@pytest.mark.timeout(120)
def test_killed_worker_records_are_finished_by_another_after_the_lease(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url("held"))
    for i in range(5):
        enqueue(conn, payload(f"k-{i}"))
    server.hold_all()
    # A lease of 2 s (its calls bounded at 1.5 s, below it): the rescuer, started once the
    # victim is dead, finds the leases expired about when it is up, instead of waiting for them.
    victim = start_daemon(db, "--set", "lease_s=2", "--set", "http_timeout_s=1.5")
    try:
        server.wait_for_count_sync(5, timeout_s=30)
        assert _count(conn, "WHERE status = 'sending'") == 5
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=10)  # reaps it and closes its output pipe
    server.release_all()  # the killed worker never hears the answers
    rescuer = start_daemon(db, "--set", "retry_base_s=0.5", "--set", "retry_max_s=1")
    try:
        wait_until(lambda: _count(conn, "WHERE status = 'sent'") == 5, 60, "rescued and sent")
    finally:
        code, out = stop(rescuer)
    assert code == 0, out
    rows = conn.execute(
        "SELECT attempt_count, (SELECT array_agg(error_code ORDER BY id) FROM"
        " outbox_notifier.delivery_attempts a WHERE a.record_id = r.id)"
        " FROM outbox_notifier.notification_records r"
    ).fetchall()
    assert {(attempt, tuple(codes)) for attempt, codes in rows} == {
        (2, ("sending_lease_expired", None))
    }


@pytest.mark.timeout(60)
def test_sigterm_drains_in_flight_calls_and_exits_0(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url("slow"))
    server.script("slow", [], then=Reply(delay_s=1.5))
    for i in range(3):
        enqueue(conn, payload(f"k-{i}"))
    daemon = start_daemon(db, "--set", "shutdown_deadline_s=10")
    server.wait_for_count_sync(3, timeout_s=30)
    started = time.monotonic()
    code, out = stop(daemon)
    elapsed = time.monotonic() - started
    assert code == 0, out
    assert elapsed < 10
    # The calls in flight at SIGTERM finished and their results landed.
    assert _count(conn, "WHERE status = 'sent'") == 3


@pytest.mark.timeout(60)
def test_sigterm_past_the_deadline_still_exits_0_and_leaves_leases(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    add_channel(conn, 1, server.flow_url("stuck"))
    server.hold_all()
    enqueue(conn, payload("k-stuck"))
    daemon = start_daemon(db, "--set", "shutdown_deadline_s=1")
    try:
        try:
            server.wait_for_count_sync(1, timeout_s=30)
        except TimeoutError:
            raise AssertionError(stop(daemon)) from None
        started = time.monotonic()
        code, out = stop(daemon)
        elapsed = time.monotonic() - started
    finally:
        server.release_all()
    assert code == 0, out
    assert elapsed < 5
    assert _count(conn, "WHERE status = 'sending' AND lease_expires_at > now()") == 1
    # The warning counts the abandoned call (it used to count after cancelling: 0).
    assert "shutdown deadline passed with 1 calls in flight" in out


def test_run_refuses_an_unmigrated_database(empty_db: str) -> None:
    proc = start_daemon(empty_db)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "run `outbox-notifier migrate`" in out
    assert "Traceback" not in out


@pytest.mark.timeout(60)
def test_systemd_notifications_from_a_real_daemon(db: str, tmp_path: Any) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
        daemon = start_daemon(db, env=env)
        messages: list[str] = []
        try:
            while not any("WATCHDOG=1" in m for m in messages):
                messages.append(sock.recv(4096).decode())
            code, out = stop(daemon)
            sock.settimeout(5)
            with contextlib.suppress(TimeoutError):
                while not any("STOPPING=1" in m for m in messages):
                    messages.append(sock.recv(4096).decode())
        finally:
            if daemon.poll() is None:
                daemon.kill()
    assert code == 0, out
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    watchdog = next(i for i, m in enumerate(messages) if "WATCHDOG=1" in m)
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert ready < watchdog < stopping, messages


PACED = 25  # bot deliveries in the pacing test


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_two_replicas_pace_one_bot_to_five_requests_per_second(
    db: str, conn: psycopg.Connection[Any], server: FeishuServer
) -> None:
    # 25 deliveries at 5/s take 5 s: five windows to show the cap holds across replicas (and
    # that the pacing, not an idle wait, spaces them), without a minute of waiting. One call
    # per record: digests off (with them the 25 go in two calls; test_digest_delivery).
    add_channel(conn, 1, server.bot_url("paced"), provider="feishu_bot")
    with psycopg.connect(db) as producer:
        for i in range(PACED):
            enqueue(producer, payload(f"paced-{i}"))
        producer.commit()
    bot = ("--set", "bot_allowed_schemes=http", "--set", "bot_allowed_hosts=127.0.0.1",
           "--set", "bot_max_per_s=5", "--set", "bot_max_per_min=0",
           "--set", "bot_digest=false")  # fmt: skip
    daemons = [start_daemon(db, *bot) for _ in range(2)]
    try:
        wait_until(lambda: _count(conn, "WHERE status = 'sent'") == PACED, 45, f"{PACED} sent")
    finally:
        outputs = [stop(d) for d in daemons]
    assert [code for code, _ in outputs] == [0, 0], outputs
    hook = "/open-apis/bot/v2/hook/"
    peak = server.max_per_window(1.0, path_prefix=hook)
    times = sorted(r.received_at for r in server.requests_to(hook))
    spread_s = times[-1] - times[0]
    print(f"{PACED} bot deliveries from 2 replicas: peak {peak} requests in any 1 s window,"
          f" spread over {spread_s:.1f} s")  # fmt: skip
    assert peak <= 5
    # at 5/s, PACED calls cannot fit in less than (PACED - 5) / 5 s
    assert spread_s >= (PACED - 5) / 5 - 0.2
    assert server.count(hook) == PACED
    assert _count(conn, "WHERE attempt_count <> 1") == 0


def test_busy_http_listen_port_is_one_line_naming_the_setting_and_exit_2(db: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_daemon(db, "--set", f"http_listen=127.0.0.1:{port}")
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    [line] = [text for text in out.splitlines() if "http_listen" in text]
    assert f"127.0.0.1:{port}" in line
    assert "in use" in line


@pytest.mark.parametrize("delay_s", [0.3, 0.6, 1.0])
def test_sigterm_in_the_first_moments_of_start_up_exits_0(db: str, delay_s: float) -> None:
    proc = start_daemon(db)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


@pytest.mark.timeout(60)
def test_waiting_for_an_absent_database_then_sigterm_exits_0() -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = start_daemon(f"postgresql://postgres@127.0.0.1:{port}/none", "--set", "log_level=INFO")
    assert proc.stdout is not None
    lines: list[str] = []
    while not any("waiting for database (try 2" in line for line in lines):
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    assert proc.poll() is None  # still waiting, not exited
    started = time.monotonic()
    code, out = stop(proc)
    assert code == 0, "".join(lines) + out
    assert time.monotonic() - started < 5
    assert "Connection refused" in "".join(lines)
    assert "Traceback" not in "".join(lines) + out
