"""KeepAliveTransport against real sockets: the local Feishu look-alike and tiny raw servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from outbox_notifier.providers.base import read_body_capped
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from outbox_notifier.transport import KeepAliveTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

OK_BODY = b'{"code":0,"msg":"success","data":{}}'


@pytest.fixture
async def srv() -> AsyncIterator[FeishuServer]:
    async with FeishuServer() as server:
        yield server


def make_client(transport: KeepAliveTransport, timeout_s: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport, timeout=timeout_s, follow_redirects=False, trust_env=False
    )


async def post(
    client: httpx.AsyncClient, url: str, content: bytes = b'{"a":1}', cap: int = 65536
) -> tuple[int, bytes, bool]:
    """What providers do: send streamed, read up to ``cap``, close."""
    request = client.build_request(
        "POST", url, content=content, headers={"Content-Type": "application/json"}
    )
    response = await client.send(request, stream=True)
    try:
        body, truncated = await read_body_capped(response, cap)
    finally:
        await response.aclose()
    return response.status_code, body, truncated


class RawServer:
    """A tiny asyncio server running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.connections = 0
        self.requests = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head + Content-Length body); b"" at end of stream."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        self.requests += 1
        return head


@contextlib.asynccontextmanager
async def raw_server(
    handler: Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[RawServer]:
    holder: list[RawServer] = []

    async def bound(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handler(holder[0], reader, writer)

    raw = RawServer(bound)
    holder.append(raw)
    server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
    raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield raw
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes() -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


async def wait_until(cond: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------- keep-alive and limits


async def test_sequential_requests_reuse_one_connection(srv: FeishuServer) -> None:
    transport = KeepAliveTransport(max_connections=5)
    async with make_client(transport) as client:
        for _ in range(10):
            assert await post(client, srv.flow_url("t")) == (200, OK_BODY, False)
        assert srv.connections_total == 1
        assert transport.idle_connections == 1
    assert transport.idle_connections == 0
    rec = srv.requests[0]
    assert rec.headers["host"] == f"127.0.0.1:{srv.port}"
    assert rec.headers["content-length"] == "7"
    assert rec.body == b'{"a":1}'


async def test_concurrency_limit_is_respected(srv: FeishuServer) -> None:
    srv.script("/", [], then=Reply(delay_s=0.05))
    limit = 3
    peak = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, srv.connections_open)
            await asyncio.sleep(0.002)

    transport = KeepAliveTransport(max_connections=limit)
    async with make_client(transport) as client:
        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*(post(client, srv.flow_url("t")) for _ in range(30)))
        stop.set()
        await watcher
    assert all(status == 200 for status, _, _ in results)
    assert 1 <= peak <= limit
    assert srv.connections_total <= limit


async def test_pool_timeout_when_all_slots_busy(srv: FeishuServer) -> None:
    srv.script("/", [Reply(delay_s=0.5)])
    transport = KeepAliveTransport(max_connections=1)
    async with make_client(transport) as client:
        first = asyncio.create_task(post(client, srv.flow_url("t")))
        await srv.wait_for_count(1)
        request = client.build_request("POST", srv.flow_url("t"), timeout=httpx.Timeout(0.1))
        with pytest.raises(httpx.PoolTimeout):
            await client.send(request, stream=True)
        assert (await first)[0] == 200


async def test_idle_connection_expires(srv: FeishuServer) -> None:
    transport = KeepAliveTransport(max_connections=5, keepalive_expiry_s=0.2)
    async with make_client(transport) as client:
        await post(client, srv.flow_url("t"))
        await post(client, srv.flow_url("t"))
        assert srv.connections_total == 1
        await asyncio.sleep(0.3)
        await post(client, srv.flow_url("t"))
        assert srv.connections_total == 2
        await wait_until(lambda: srv.connections_open == 1)  # the expired one was closed


async def test_max_idle_per_origin(srv: FeishuServer) -> None:
    srv.script("/", [], then=Reply(delay_s=0.05))
    transport = KeepAliveTransport(max_connections=6, max_idle_per_origin=2)
    async with make_client(transport) as client:
        await asyncio.gather(*(post(client, srv.flow_url("t")) for _ in range(6)))
        assert transport.idle_connections == 2
        await wait_until(lambda: srv.connections_open == 2)


# ---------------------------------------------------------------------- body framing


async def test_chunked_response_read_incrementally_and_reused() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while await raw.read_request(reader):
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: application/json\r\n\r\n"
                b"5;ext=1\r\nhello\r\n"
                b"1\r\n \r\n"
                b"5\r\nworld\r\n"
                b"0\r\nX-Trailer: yes\r\n\r\n"
            )
            await writer.drain()

    async with raw_server(handler) as raw:
        transport = KeepAliveTransport()
        async with make_client(transport) as client:
            assert await post(client, raw.url + "/a") == (200, b"hello world", False)
            assert await post(client, raw.url + "/b") == (200, b"hello world", False)
            # a capped read stops inside the body: that connection is not reused
            assert await post(client, raw.url + "/c", cap=3) == (200, b"hel", True)
            assert transport.idle_connections == 0
            assert await post(client, raw.url + "/d") == (200, b"hello world", False)
        assert raw.connections == 2
        assert raw.requests == 4


async def test_large_chunked_body_arrives_in_pieces() -> None:
    piece = b"x" * 100_000

    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with raw_server(handler) as raw, make_client(KeepAliveTransport()) as client:
        request = client.build_request("GET", raw.url + "/")
        response = await client.send(request, stream=True)
        sizes = [len(chunk) async for chunk in response.aiter_raw()]
        await response.aclose()
    assert sum(sizes) == 500_000
    assert max(sizes) <= 64 * 1024


async def test_body_read_until_close() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno length here")
        await writer.drain()
        writer.write(b", then more")
        await writer.drain()

    async with raw_server(handler) as raw:
        transport = KeepAliveTransport()
        async with make_client(transport) as client:
            assert await post(client, raw.url) == (200, b"no length here, then more", False)
            assert transport.idle_connections == 0
            assert await post(client, raw.url) == (200, b"no length here, then more", False)
        assert raw.connections == 2


async def test_head_204_304_have_no_body() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        replies = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",  # to a HEAD: no body follows
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ]
        for reply in replies:
            if not await raw.read_request(reader):
                return
            writer.write(reply)
            await writer.drain()

    async with raw_server(handler) as raw:
        async with make_client(KeepAliveTransport()) as client:
            response = await client.head(raw.url)
            assert (response.status_code, response.content) == (200, b"")
            assert response.headers["content-length"] == "1000"
            response = await client.post(raw.url, content=b"x")
            assert (response.status_code, response.content) == (204, b"")
            response = await client.get(raw.url)
            assert (response.status_code, response.content) == (304, b"")
            assert await post(client, raw.url) == (200, b"ok", False)
        assert raw.connections == 1


async def test_reason_phrase_and_headers(srv: FeishuServer) -> None:
    srv.script("/", [Reply.rate_limited(7)])
    async with make_client(KeepAliveTransport()) as client:
        response = await client.post(srv.bot_url("t"), json={})
    assert response.status_code == 429
    assert response.reason_phrase == "Too Many Requests"
    assert response.http_version == "HTTP/1.1"
    assert response.headers["retry-after"] == "7"
    assert response.json()["code"] == 11232


# ---------------------------------------------------------------------- failures


async def test_dropped_connection_raises_and_is_not_reused(srv: FeishuServer) -> None:
    srv.script("/", [Reply(drop=True)])
    transport = KeepAliveTransport()
    async with make_client(transport) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await post(client, srv.flow_url("t"))
        assert transport.idle_connections == 0
        assert await post(client, srv.flow_url("t")) == (200, OK_BODY, False)
        assert srv.connections_total == 2


async def test_drop_on_reused_connection_is_retried_only_once(srv: FeishuServer) -> None:
    transport = KeepAliveTransport()
    async with make_client(transport) as client:
        await post(client, srv.flow_url("t"))
        srv.script("/", [Reply(drop=True), Reply(drop=True)])
        with pytest.raises(httpx.RemoteProtocolError):
            await post(client, srv.flow_url("t"))
    # the first request, the try on the pooled connection and one retry on a fresh one
    assert srv.count() == 3
    assert srv.connections_total == 2


async def test_server_closing_idle_connection_is_retried_transparently() -> None:
    """The server answers one request per connection with keep-alive, then closes the
    connection when the next request arrives, answering nothing: the race of an idle close."""

    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
        await writer.drain()
        await raw.read_request(reader)  # and close, answering nothing

    async with raw_server(handler) as raw:
        transport = KeepAliveTransport()
        async with make_client(transport) as client:
            assert await post(client, raw.url) == (200, b"ok", False)
            assert await post(client, raw.url) == (200, b"ok", False)
        assert raw.connections == 2
        assert raw.requests == 3


async def test_idle_connection_closed_by_server_is_not_used() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)  # then closes while the client holds it idle

    async with raw_server(handler) as raw:
        async with make_client(KeepAliveTransport()) as client:
            assert await post(client, raw.url) == (200, b"ok", False)
            await asyncio.sleep(0.2)
            assert await post(client, raw.url) == (200, b"ok", False)
        assert raw.connections == 2
        assert raw.requests == 2  # seen closed before use: no request was sent into it


async def test_partial_reply_on_reused_connection_is_not_retried() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()

    async with raw_server(handler) as raw:
        async with make_client(KeepAliveTransport()) as client:
            await post(client, raw.url)
            with pytest.raises(httpx.RemoteProtocolError):
                await post(client, raw.url)
        assert raw.requests == 2


async def test_body_cut_short_raises() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70_000)
        await writer.drain()

    async with raw_server(handler) as raw:
        transport = KeepAliveTransport()
        async with make_client(transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await post(client, raw.url, cap=1_000_000)
            assert transport.idle_connections == 0


async def test_oversize_body_read_only_up_to_the_cap(srv: FeishuServer) -> None:
    transport = KeepAliveTransport()
    async with make_client(transport) as client:
        await post(client, srv.flow_url("warm-up"))
        srv.script("/", [Reply(oversize_bytes=20_000_000)])
        before = rss_bytes()
        status, body, truncated = await post(client, srv.flow_url("t"), cap=64 * 1024)
        after = rss_bytes()
        assert (status, len(body), truncated) == (200, 64 * 1024, True)
        if before is not None and after is not None:
            assert after - before < 8 * 1024 * 1024
        assert transport.idle_connections == 0  # closed, not pooled
        await wait_until(lambda: srv.connections_open == 0)
        assert await post(client, srv.flow_url("t")) == (200, OK_BODY, False)
        assert srv.connections_total == 2


async def test_trickle_is_bounded_by_the_callers_timeout(srv: FeishuServer) -> None:
    srv.script("/", [Reply(trickle_s=3)])
    transport = KeepAliveTransport(max_connections=1)
    async with make_client(transport, timeout_s=30) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await post(client, srv.flow_url("t"))
        assert time.monotonic() - started < 1.5
        assert transport.idle_connections == 0
        # the only slot was given back
        async with asyncio.timeout(2):
            assert await post(client, srv.flow_url("t")) == (200, OK_BODY, False)


async def test_read_timeout_from_the_request(srv: FeishuServer) -> None:
    srv.script("/", [Reply(delay_s=1.0)])
    async with make_client(KeepAliveTransport(), timeout_s=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await post(client, srv.flow_url("t"))


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 101 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent",  # then the server closes
    ],
)
async def test_malformed_response_is_a_protocol_error(reply: bytes) -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with raw_server(handler) as raw:
        transport = KeepAliveTransport()
        async with make_client(transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await post(client, raw.url)
            assert transport.idle_connections == 0


async def test_connect_refused_is_a_connect_error() -> None:
    async with make_client(KeepAliveTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await post(client, f"http://127.0.0.1:{free_port()}/")


async def test_unsupported_scheme_and_header_injection() -> None:
    transport = KeepAliveTransport()
    with pytest.raises(httpx.UnsupportedProtocol):
        await transport.handle_async_request(httpx.Request("GET", "ftp://example.com/"))
    bad = httpx.Request("POST", "http://127.0.0.1:1/", headers={"X-A": "1\r\nX-Injected: 2"})
    with pytest.raises(httpx.LocalProtocolError):
        await transport.handle_async_request(bad)
    wrong_length = httpx.Request(
        "POST", "http://127.0.0.1:1/", content=b"abc", headers={"Content-Length": "5"}
    )
    with pytest.raises(httpx.LocalProtocolError):
        await transport.handle_async_request(wrong_length)
    with pytest.raises(ValueError):
        KeepAliveTransport(max_connections=0)


async def test_slots_are_released_after_failures(srv: FeishuServer) -> None:
    async def garbage(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"nonsense\r\n\r\n")
        await writer.drain()

    srv.script("drop", [], then=Reply(drop=True))
    srv.script("slow", [], then=Reply(delay_s=5))
    refused = f"http://127.0.0.1:{free_port()}/"
    transport = KeepAliveTransport(max_connections=5)
    async with raw_server(garbage) as raw, make_client(transport) as client:

        async def failing(i: int) -> None:
            kind = i % 4
            if kind == 0:
                await post(client, refused)
            elif kind == 1:
                await post(client, srv.flow_url("drop"))
            elif kind == 2:
                await post(client, raw.url)
            else:
                async with asyncio.timeout(0.05):
                    await post(client, srv.flow_url("slow"))

        results = await asyncio.gather(*(failing(i) for i in range(100)), return_exceptions=True)
        assert all(isinstance(r, httpx.TransportError | TimeoutError) for r in results), results
        # all five slots are free again: five requests can be in flight at once
        srv.hold_all()
        good = [asyncio.create_task(post(client, srv.flow_url("ok"))) for _ in range(5)]
        await wait_until(lambda: srv.held_count == 5)
        srv.release_all()
        async with asyncio.timeout(2):
            assert [r[0] for r in await asyncio.gather(*good)] == [200] * 5


async def test_response_closed_without_reading_frees_slot_and_connection(
    srv: FeishuServer,
) -> None:
    srv.script("/", [Reply(oversize_bytes=1_000_000)])
    transport = KeepAliveTransport(max_connections=1)
    async with make_client(transport) as client:
        request = client.build_request("POST", srv.flow_url("t"))
        response = await client.send(request, stream=True)
        await response.aclose()
        await response.aclose()  # idempotent
        assert transport.idle_connections == 0
        async with asyncio.timeout(2):
            assert await post(client, srv.flow_url("t")) == (200, OK_BODY, False)


async def test_closed_transport_refuses_requests(srv: FeishuServer) -> None:
    transport = KeepAliveTransport()
    async with make_client(transport) as client:
        await post(client, srv.flow_url("t"))
    await wait_until(lambda: srv.connections_open == 0)
    with pytest.raises(RuntimeError):
        await transport.handle_async_request(httpx.Request("GET", srv.url))
