"""Deliveries through a real HTTP proxy: Debian's ``tinyproxy`` on loopback, in the foreground.

The target is an HTTPS look-alike signed by a local CA, so the call tunnels through
``CONNECT``; tinyproxy's log shows each ``CONNECT`` it received. The egress guard checks
the target before the ``CONNECT`` is sent: a refused target never reaches the proxy.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from outbox_notifier.httpclient import EgressConfig
from outbox_notifier.names import ErrorCode
from outbox_notifier.providers.model import HttpReply, SendResult
from tests.tls_support import post_once, tls_server

LOOPBACK = ("127.0.0.0/8",)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Tinyproxy:
    def __init__(self, directory: Path, port: int, connect_ports: list[int]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = directory / "tinyproxy.log"
        self.config = directory / "tinyproxy.conf"
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Timeout 10",
            "LogLevel Info",
            f'LogFile "{self.log}"',
            "MaxClients 20",
            "Allow 127.0.0.1",
            # CONNECT is refused to every port not listed: allow the look-alikes'.
            *(f"ConnectPort {p}" for p in connect_ports),
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def connects(self) -> list[str]:
        """The CONNECT request lines tinyproxy logged."""
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if "): CONNECT " in line]


@pytest.fixture
def ports() -> list[int]:
    return [free_port(), free_port()]


@pytest.fixture
def proxy(tmp_path: Path, ports: list[int]) -> Iterator[Tinyproxy]:
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    tp = Tinyproxy(tmp_path, free_port(), ports)
    process = subprocess.Popen(
        [binary, "-d", "-c", str(tp.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", tp.port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tinyproxy did not start: {tp.log.read_text()}") from None
                time.sleep(0.05)
        yield tp
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, str]:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, str(path)


async def deliver(config: EgressConfig, url: str, env: dict[str, str]) -> HttpReply | SendResult:
    return await post_once(config, url + "/hooks/x", env)


async def test_delivery_goes_through_the_configured_proxy(
    proxy: Tinyproxy, ca: tuple[trustme.CA, str], ports: list[int]
) -> None:
    authority, bundle = ca
    config = EgressConfig(allow_cidrs=LOOPBACK, ca_bundle=bundle, http_proxy=proxy.url)
    async with tls_server(authority, port=ports[0]) as target:
        reply = await deliver(config, target, env={})
    assert isinstance(reply, HttpReply), reply
    assert reply.status == 200
    assert any(f"CONNECT 127.0.0.1:{ports[0]}" in line for line in proxy.connects()), (
        proxy.log.read_text()
    )


async def test_guard_refuses_the_target_before_the_connect(
    proxy: Tinyproxy, ca: tuple[trustme.CA, str], ports: list[int]
) -> None:
    authority, bundle = ca
    # The proxy itself sits on loopback and is trusted; the loopback target is not allowed.
    config = EgressConfig(ca_bundle=bundle, http_proxy=proxy.url)
    async with tls_server(authority, port=ports[0]) as target:
        result = await deliver(config, target, env={})
    assert isinstance(result, SendResult)
    assert result.error_code == ErrorCode.DESTINATION_FORBIDDEN
    assert proxy.connects() == []


async def test_environment_proxy_is_opt_in_and_no_proxy_is_honoured(
    proxy: Tinyproxy, ca: tuple[trustme.CA, str], ports: list[int]
) -> None:
    authority, bundle = ca
    env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "localhost"}
    async with tls_server(authority, port=ports[0]) as target:
        ignored = EgressConfig(allow_cidrs=LOOPBACK, ca_bundle=bundle)
        assert isinstance(await deliver(ignored, target, env=env), HttpReply)
        assert proxy.connects() == []  # the environment is ignored unless opted in

        honoured = EgressConfig(allow_cidrs=LOOPBACK, ca_bundle=bundle, proxy_from_env=True)
        assert isinstance(await deliver(honoured, target, env=env), HttpReply)
        assert len(proxy.connects()) == 1

        bypassed = target.replace("127.0.0.1", "localhost")
        assert isinstance(await deliver(honoured, bypassed, env=env), HttpReply)
        assert len(proxy.connects()) == 1  # NO_PROXY: straight to the target


async def test_the_proxy_address_is_trusted_only_as_the_proxy(proxy: Tinyproxy) -> None:
    # A webhook URL pointing at the proxy's own address, sent direct (NO_PROXY), is judged
    # like any other target: the exemption covers the connection to the proxy alone.
    env = {"HTTPS_PROXY": proxy.url, "HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1"}
    result = await deliver(EgressConfig(proxy_from_env=True), proxy.url, env=env)
    assert isinstance(result, SendResult)
    assert result.error_code == ErrorCode.DESTINATION_FORBIDDEN
    assert "Request (file descriptor" not in proxy.log.read_text()  # nothing reached it
