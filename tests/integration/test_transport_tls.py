"""KeepAliveTransport over TLS: a self-signed certificate made at test time, verification on."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from outbox_notifier.transport import KeepAliveTransport


def make_cert(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "1",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-subj", "/CN=outbox-notifier test", "-addext", f"subjectAltName={san}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Path]]]:
    directory = tmp_path_factory.mktemp("tls")
    yield {
        "good": make_cert(directory, "good", "DNS:localhost,IP:127.0.0.1"),
        "other_host": make_cert(directory, "other", "DNS:other.example"),
    }


class TlsServer:
    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests += 1
                reply = b'{"echo":' + str(len(body)).encode() + b"}"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(reply) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def start(cert: Path, key: Path) -> tuple[asyncio.Server, TlsServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls = TlsServer()
    server = await asyncio.start_server(tls.serve, "127.0.0.1", 0, ssl=context)
    tls.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    return server, tls


@pytest.fixture
async def good_server(certs: dict[str, tuple[Path, Path]]) -> AsyncIterator[TlsServer]:
    server, tls = await start(*certs["good"])
    yield tls
    server.close()


async def test_request_succeeds_with_a_context_trusting_the_cert(
    good_server: TlsServer, certs: dict[str, tuple[Path, Path]]
) -> None:
    context = ssl.create_default_context(cafile=str(certs["good"][0]))
    transport = KeepAliveTransport(ssl_context=context)
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        for size in (3, 100_000):
            response = await client.post(good_server.url + "/hook", content=b"x" * size)
            assert response.status_code == 200
            assert response.json() == {"echo": size}
        assert transport.idle_connections == 1
    assert good_server.connections == 1  # kept alive over TLS
    assert good_server.requests == 2


async def test_default_context_rejects_a_self_signed_cert(good_server: TlsServer) -> None:
    async with httpx.AsyncClient(transport=KeepAliveTransport(), timeout=5) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.post(good_server.url + "/hook", content=b"{}")
    assert good_server.requests == 0


async def test_host_name_is_checked(certs: dict[str, tuple[Path, Path]]) -> None:
    server, tls = await start(*certs["other_host"])
    try:
        context = ssl.create_default_context(cafile=str(certs["other_host"][0]))
        async with httpx.AsyncClient(
            transport=KeepAliveTransport(ssl_context=context), timeout=5
        ) as client:
            with pytest.raises(httpx.ConnectError):
                await client.post(tls.url + "/hook", content=b"{}")
        assert tls.requests == 0
    finally:
        server.close()


def test_a_context_that_does_not_verify_is_refused() -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verify"):
        KeepAliveTransport(ssl_context=context)
