"""The shared HTTP transport (httpx over aiohttp) against the local look-alike and hostile servers.

What the removed hand-written transport got right is held here against the new stack: keep-
alive and the connection limit, capped bodies with bounded memory, no redirects, head limits,
no reuse of a connection after a timeout, a cap or an anomaly; and the two defects it had:
no silent resend of a POST, and no response bytes handed to the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from outbox_notifier.httpclient import EgressConfig, EgressTransport, build_transport
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers.model import HttpReply
from outbox_notifier.providers.sender import post_capped, read_body_capped
from outbox_notifier.testing.feishu_server import FeishuServer, Reply

OK_BODY = b'{"code":0,"msg":"success","data":{}}'
LOOPBACK = ("127.0.0.0/8",)


class Stack:
    """The daemon's transport and the per-request timeout a provider would give it."""

    def __init__(self, max_connections: int = 10, timeout_s: float = 5.0) -> None:
        self.transport: EgressTransport = build_transport(
            EgressConfig(max_connections=max_connections, allow_cidrs=LOOPBACK), env={}
        )
        self.timeout_s = timeout_s

    async def __aenter__(self) -> Stack:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.aclose()


def stack(max_connections: int = 10, timeout_s: float = 5.0) -> Stack:
    return Stack(max_connections, timeout_s)


async def post(
    c: Stack, url: str, content: bytes = b'{"a":1}', cap: int = 65536
) -> tuple[int, bytes, bool]:
    """What ``post_capped`` does, raising the transport's errors: send, read up to ``cap``,
    close."""
    request = httpx.Request(
        "POST",
        url,
        content=content,
        headers={"Content-Type": "application/json"},
        extensions={"timeout": httpx.Timeout(c.timeout_s).as_dict()},
    )
    response = await c.transport.handle_async_request(request)
    try:
        body, truncated = await read_body_capped(response, cap)
    finally:
        await response.aclose()
    return response.status_code, body, truncated


class RawServer:
    """A tiny asyncio server running a handler per connection; counts connections/requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.url = ""

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head + Content-Length body); b"" at end of stream."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        self.requests += 1
        return head


RawHandler = Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[RawServer]:
    raw = RawServer()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw.connections += 1
        try:
            await handler(raw, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
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
    async with stack() as c:
        for _ in range(10):
            assert await post(c, srv.flow_url("t")) == (200, OK_BODY, False)
    assert srv.connections_total == 1
    rec = srv.requests[0]
    assert rec.headers["host"] == f"127.0.0.1:{srv.port}"
    assert rec.headers["content-length"] == "7"
    assert rec.body == b'{"a":1}'


async def test_connection_limit_is_respected(srv: FeishuServer) -> None:
    srv.script("/", [], then=Reply(delay_s=0.05))
    peak = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, srv.connections_open)
            await asyncio.sleep(0.002)

    async with stack(max_connections=3) as c:
        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*(post(c, srv.flow_url("t")) for _ in range(30)))
        stop.set()
        await watcher
    assert all(status == 200 for status, _, _ in results)
    assert 1 <= peak <= 3
    assert srv.connections_total <= 3


async def test_redirects_are_not_followed() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while await raw.read_request(reader):
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async with raw_server(handler) as raw, stack() as c:
        assert await post(c, raw.url + "/hook") == (302, b"", False)
    assert raw.requests == 1


# ---------------------------------------------------------------------- body framing and caps


async def test_chunked_body_is_read_and_a_capped_read_leaves_nothing_behind() -> None:
    """aiohttp pools a connection only once the whole response has been framed by its parser
    (here the small body arrived whole before the capped read stopped), so the leftover
    ``lo world`` of a capped read can never reach the next request."""

    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while await raw.read_request(reader):
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n"
            )
            await writer.drain()

    async with raw_server(handler) as raw, stack() as c:
        assert await post(c, raw.url + "/a") == (200, b"hello world", False)
        assert await post(c, raw.url + "/b") == (200, b"hello world", False)
        assert await post(c, raw.url + "/c", cap=3) == (200, b"hel", True)
        assert await post(c, raw.url + "/d") == (200, b"hello world", False)
    assert raw.requests == 4


async def test_body_read_until_close_is_not_reused() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno length here")
        await writer.drain()

    async with raw_server(handler) as raw, stack() as c:
        assert await post(c, raw.url) == (200, b"no length here", False)
        assert await post(c, raw.url) == (200, b"no length here", False)
    assert raw.connections == 2


async def test_oversize_body_is_read_only_up_to_the_cap_with_bounded_memory(
    srv: FeishuServer,
) -> None:
    async with stack() as c:
        await post(c, srv.flow_url("warm-up"))
        srv.script("/", [Reply(oversize_bytes=50_000_000)])
        before = rss_bytes()
        status, body, truncated = await post(c, srv.flow_url("t"), cap=64 * 1024)
        after = rss_bytes()
        assert (status, len(body), truncated) == (200, 64 * 1024, True)
        if before is not None and after is not None:
            assert after - before < 16 * 1024 * 1024
        await wait_until(lambda: srv.connections_open == 0)  # closed, not pooled
        assert await post(c, srv.flow_url("t")) == (200, OK_BODY, False)
    assert srv.connections_total == 2


async def test_endless_body_is_bounded_by_cap_and_deadline() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
        while True:  # never ends
            writer.write(piece)
            await writer.drain()

    async with raw_server(handler) as raw, stack() as c:
        before = rss_bytes()
        started = time.monotonic()
        status, body, truncated = await post(c, raw.url, cap=1_000_000)
        after = rss_bytes()
    assert (status, len(body), truncated) == (200, 1_000_000, True)
    assert time.monotonic() - started < 5
    if before is not None and after is not None:
        assert after - before < 16 * 1024 * 1024


# ---------------------------------------------------------------------- failures


async def test_no_silent_resend_when_a_reused_connection_is_dropped_after_the_post() -> None:
    """The server reads the POST on a reused connection and closes without answering: the
    attempt is a temporary failure, and the server saw that request exactly once."""

    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await raw.read_request(reader)  # the second POST: processed, then close unanswered

    async with raw_server(handler) as raw, stack() as c:
        assert await post(c, raw.url + "/first") == (200, b"ok", False)
        result = await post_capped(
            c.transport,
            httpx.URL(raw.url + "/second"),
            content=b"{}",
            headers={},
            timeout_s=5,
            response_body_max_bytes=1024,
            request_json=b"{}",
        )
    assert not isinstance(result, HttpReply)
    assert result.outcome is Outcome.TEMPORARY_FAIL
    assert result.error_code == ErrorCode.NETWORK_ERROR
    assert result.error_message is not None
    assert "server disconnected" in result.error_message
    assert raw.requests == 2  # the second POST arrived once, never resent
    assert raw.connections == 1


@pytest.mark.parametrize(
    "first_reply",
    [
        # a whole extra response after the first
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
        # bytes beyond the Content-Length
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEVIL",
    ],
    ids=["extra-response", "bytes-beyond-length"],
)
async def test_no_response_is_handed_to_the_next_request(first_reply: bytes) -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        n = 0
        while await raw.read_request(reader):
            n += 1
            tag = raw.requests
            writer.write(
                first_reply
                if n == 1
                else b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nreq-%02d" % tag
            )
            await writer.drain()

    seen: list[bytes] = []
    async with raw_server(handler) as raw, stack(max_connections=1) as c:
        for _ in range(4):
            with contextlib.suppress(httpx.TransportError):
                seen.append((await post(c, raw.url))[1])
            await asyncio.sleep(0.02)
    assert all(b"EVIL" not in body for body in seen), seen
    # every answer that came back belongs to a request this connection's server counted
    assert all(body in (b"ok",) or body.startswith(b"req-") for body in seen), seen


async def test_dropped_connection_is_a_protocol_error_and_not_reused(srv: FeishuServer) -> None:
    srv.script("/", [Reply(drop=True)])
    async with stack() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await post(c, srv.flow_url("t"))
        assert await post(c, srv.flow_url("t")) == (200, OK_BODY, False)
    assert srv.connections_total == 2


async def test_body_cut_short_raises() -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70_000)
        await writer.drain()

    async with raw_server(handler) as raw, stack() as c:
        with pytest.raises(httpx.TransportError):
            await post(c, raw.url, cap=1_000_000)


async def test_trickle_is_bounded_by_the_callers_timeout_and_the_slot_is_given_back(
    srv: FeishuServer,
) -> None:
    srv.script("/", [Reply(trickle_s=3)])
    async with stack(max_connections=1, timeout_s=30) as c:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await post(c, srv.flow_url("t"))
        assert time.monotonic() - started < 1.5
        async with asyncio.timeout(3):
            assert await post(c, srv.flow_url("t")) == (200, OK_BODY, False)
    assert srv.connections_total == 2  # the timed-out connection was not reused


async def test_read_timeout_is_a_timeout_and_the_connection_is_not_reused(
    srv: FeishuServer,
) -> None:
    srv.script("/", [Reply(delay_s=1.0)])
    async with stack(timeout_s=0.2) as c:
        with pytest.raises(httpx.TimeoutException):
            await post(c, srv.flow_url("t"))
        await asyncio.sleep(1.0)
        assert await post(c, srv.flow_url("t")) == (200, OK_BODY, False)
    assert srv.connections_total == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
        b"HTTP/1.1 200 OK\r\nContent",  # then the server closes
    ],
)
async def test_malformed_response_is_a_protocol_error(reply: bytes) -> None:
    async def handler(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while await raw.read_request(reader):
            if raw.requests == 1:
                writer.write(reply)
                await writer.drain()
                return  # and close: a cut-off head must fail, not wait
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async with raw_server(handler) as raw, stack() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await post(c, raw.url)
        assert (await post(c, raw.url))[0] == 200
    assert raw.connections == 2  # the broken connection was not reused


async def test_connect_refused_is_a_connect_error() -> None:
    async with stack() as c:
        with pytest.raises(httpx.ConnectError):
            await post(c, f"http://127.0.0.1:{free_port()}/")
