"""A minimal HTTP/1.1 transport for httpx, for comparison only (plain http, keep-alive).

It shows what the HTTP layer costs when it does little: one pool of idle keep-alive connections
per origin, a semaphore as the connection limit, Content-Length or chunked replies read whole.
No TLS, proxies, HTTP/2 or redirects: it is a yardstick, not a production transport.
"""

from __future__ import annotations

import asyncio

import httpx

_MAX_HEAD_BYTES = 64 * 1024


class _Dropped(Exception):
    """A reused keep-alive connection was closed by the server before it answered."""


class MinimalTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 50) -> None:
        self._limit = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
        self._idle = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"minimal transport speaks http only, not {url.scheme}")
        origin = (url.host, url.port or 80)
        body = request.read()
        head = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for key, value in request.headers.raw:
            head += (key, b": ", value, b"\r\n")
        head.append(b"\r\n")
        data = b"".join(head) + body
        async with self._limit:
            idle = self._idle.setdefault(origin, [])
            while idle:
                conn = idle.pop()
                try:
                    return await self._exchange(request, origin, conn, data, reused=True)
                except _Dropped:
                    continue
            try:
                conn = await asyncio.open_connection(*origin, limit=_MAX_HEAD_BYTES)
            except OSError as exc:
                raise httpx.ConnectError(str(exc), request=request) from exc
            try:
                return await self._exchange(request, origin, conn, data, reused=False)
            except _Dropped as exc:
                raise httpx.RemoteProtocolError(
                    "server closed the connection", request=request
                ) from exc

    async def _exchange(
        self,
        request: httpx.Request,
        origin: tuple[str, int],
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        data: bytes,
        *,
        reused: bool,
    ) -> httpx.Response:
        reader, writer = conn
        try:
            writer.write(data)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if reused and not exc.partial:
                    raise _Dropped from exc
                raise
            lines = head[:-4].split(b"\r\n")
            _, status_text, *reason = lines[0].split(b" ", 2)
            pairs = [line.split(b":", 1) for line in lines[1:]]
            headers = [(k.strip(), v.strip()) for k, v in pairs]
            fields = {k.lower(): v for k, v in headers}
            if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
                content = await _read_chunked(reader)
            else:
                content = await reader.readexactly(int(fields.get(b"content-length", b"0")))
        except (_Dropped, asyncio.CancelledError):
            writer.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            writer.close()
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
        if fields.get(b"connection", b"").lower() == b"close":
            writer.close()
        else:
            self._idle[origin].append(conn)
        return httpx.Response(
            int(status_text),
            headers=headers,
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": b" ".join(reason)},
        )

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
        self._idle.clear()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
