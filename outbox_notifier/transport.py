"""A small, fast HTTP/1.1 keep-alive transport for httpx, over asyncio streams.

httpx's default transport (httpcore's pool) spends about a millisecond of CPU per request on
pool bookkeeping at 50 concurrent connections. This transport keeps httpx's API (providers
still build an ``httpx.Request`` and ``send(request, stream=True)``) and does the least that is
correct::

    transport = KeepAliveTransport(max_connections=50, ssl_context=ssl.create_default_context())
    client = httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False)

What it does:

- HTTP/1.1 over ``asyncio.open_connection``, ``http`` and ``https`` only (TLS through the
  given ``ssl.SSLContext``, which must verify certificates and host names; the server name is
  the URL host). No proxies, no HTTP/2, no redirects: another scheme is
  ``httpx.UnsupportedProtocol``.
- One list of idle keep-alive connections per origin (scheme, host, port), newest first out.
  An idle connection older than ``keepalive_expiry_s``, or one the server has closed, is
  closed instead of reused; at most ``max_idle_per_origin`` are kept per origin.
- ``max_connections`` bounds requests in flight: a slot is held from sending the request
  until the response stream is finished (read to its end, failed, or closed), then released
  exactly once. Idle connections hold no slot.
- The request (head and body) goes out in one write, always with ``Host`` and a
  ``Content-Length``.
- The response body is read incrementally (``Content-Length``, chunked, or until the server
  closes), in pieces of at most 64 KiB, so a caller that stops at a cap never holds a huge
  body. A connection goes back to the pool only when its body was read to the end and
  neither side asked to close; otherwise it is closed.
- A reused connection the server had already closed (end of stream before any response
  byte, or the write failing) is retried once on a fresh connection. Nothing else is ever
  retried: a POST that may have been processed is not repeated.
- The ``timeout`` extension httpx puts on every request is honoured: ``connect`` (opening
  and TLS handshake), ``read`` (waiting for the response head, and for each body read),
  ``write`` (flushing a large request) and ``pool`` (waiting for a slot).

Errors: failing to connect (TLS errors included) is ``httpx.ConnectError``; the server
closing or sending garbage is ``httpx.RemoteProtocolError``; a socket error while reading is
``httpx.ReadError``; timeouts are the matching ``httpx.TimeoutException`` subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Final

import httpx

__all__ = ["KeepAliveTransport"]

#: Cap on a response head (status line and headers), also the stream reader's buffer limit.
MAX_HEAD_BYTES: Final = 64 * 1024
#: Cap on the number of response header lines (and of chunked trailer lines).
MAX_HEADERS: Final = 100
#: Largest piece of body handed to the caller at once.
READ_CHUNK_BYTES: Final = 64 * 1024
#: Interim (1xx) responses tolerated before the final one.
_MAX_INTERIM: Final = 8

_HEAD_END: Final = b"\r\n\r\n"
_CRLF: Final = b"\r\n"
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_LENGTH_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_EXTENSIONS_11: Final = b"HTTP/1.1"

# Body framing of a response.
_EMPTY: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_UNTIL_CLOSE: Final = 3
_READ: Final = 4  # small body already read along with the head

# Body stream states.
_OPEN: Final = 0
_COMPLETE: Final = 1
_CLOSED: Final = 2

_Origin = tuple[str, str, int]


class _Stale(Exception):
    """A reused keep-alive connection turned out to be closed before anything came back."""


class _Connection:
    __slots__ = ("idle_since", "origin", "reader", "writer")

    def __init__(
        self, origin: _Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self) -> bool:
        """Still open as far as we can tell without a system call."""
        return not (
            self.reader.at_eof() or self.writer.is_closing() or self.reader.exception() is not None
        )

    def close(self) -> None:
        """Orderly close (FIN, TLS close_notify): for connections at a message boundary."""
        with contextlib.suppress(Exception):
            self.writer.close()

    def abort(self) -> None:
        """Drop at once: for connections in an unknown state (half-read, failed, cancelled)."""
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport; see the module docstring.

    ``max_connections``: requests in flight at once (each holds one connection).
    ``max_idle_per_origin``: idle connections kept per origin (default ``max_connections``).
    ``keepalive_expiry_s``: an idle connection older than this is closed, not reused.
    ``ssl_context``: for ``https``; default ``ssl.create_default_context()``. It must verify
    (``CERT_REQUIRED`` and ``check_hostname``), else ``ValueError``.
    """

    def __init__(
        self,
        *,
        max_connections: int = 50,
        max_idle_per_origin: int | None = None,
        keepalive_expiry_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        if max_idle_per_origin is None:
            max_idle_per_origin = max_connections
        if max_idle_per_origin < 0:
            raise ValueError(f"max_idle_per_origin must be >= 0, got {max_idle_per_origin!r}")
        if not keepalive_expiry_s >= 0:
            raise ValueError(f"keepalive_expiry_s must be >= 0, got {keepalive_expiry_s!r}")
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
        elif ssl_context.verify_mode != ssl.CERT_REQUIRED or not ssl_context.check_hostname:
            raise ValueError("ssl_context must verify certificates and host names")
        self._ssl_context = ssl_context
        self._limit = asyncio.Semaphore(max_connections)
        self._max_idle = max_idle_per_origin
        self._expiry = keepalive_expiry_s
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._next_sweep = 0.0
        self._closed = False

    @property
    def idle_connections(self) -> int:
        """Number of idle keep-alive connections currently pooled (all origins)."""
        return sum(len(conns) for conns in self._idle.values())

    # ------------------------------------------------------------------ request

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.scheme
        if scheme == "http":
            context: ssl.SSLContext | None = None
            default_port = 80
        elif scheme == "https":
            context = self._ssl_context
            default_port = 443
        else:
            raise httpx.UnsupportedProtocol(
                f"unsupported URL scheme {scheme!r}: only http and https", request=request
            )
        host = url.raw_host.decode("ascii")
        if not host:
            raise httpx.LocalProtocolError("request URL has no host", request=request)
        origin = (scheme, host, url.port or default_port)
        data, request_close = _serialize(request, await request.aread())
        timeouts = request.extensions.get("timeout") or {}
        read_timeout: float | None = timeouts.get("read")

        limit = self._limit
        pool_timeout: float | None = timeouts.get("pool")
        if pool_timeout is not None and limit.locked():
            try:
                async with asyncio.timeout(pool_timeout):
                    await limit.acquire()
            except TimeoutError as exc:
                raise httpx.PoolTimeout("no free connection slot in time", request=request) from exc
        else:
            await limit.acquire()
        # From here the slot is ours until the body stream takes it over.
        try:
            conn, reply = await self._round_trip(request, origin, context, data, timeouts)
            status, reason, headers, mode, length, keep, body = reply
            stream = _BodyStream(
                self, request, conn, mode, length, keep and not request_close, read_timeout, body
            )
        except BaseException:
            limit.release()
            raise
        try:
            if mode in (_EMPTY, _READ):
                stream._finish(complete=True)
            return httpx.Response(
                status,
                headers=headers,
                stream=stream,
                request=request,
                extensions={"http_version": _EXTENSIONS_11, "reason_phrase": reason},
            )
        except BaseException:
            stream._finish(complete=False)
            raise

    async def _round_trip(
        self,
        request: httpx.Request,
        origin: _Origin,
        context: ssl.SSLContext | None,
        data: bytes,
        timeouts: dict[str, float | None],
    ) -> tuple[_Connection, _Reply]:
        read_timeout = timeouts.get("read")
        write_timeout = timeouts.get("write")
        conn = self._take_idle(origin)
        if conn is not None:
            try:
                head = await _exchange(request, conn, data, read_timeout, write_timeout, True)
            except _Stale:
                pass  # the server closed it while idle: once more, on a fresh connection
            else:
                return conn, head
        conn = await self._connect(request, origin, context, timeouts.get("connect"))
        return conn, await _exchange(request, conn, data, read_timeout, write_timeout, False)

    async def _connect(
        self,
        request: httpx.Request,
        origin: _Origin,
        context: ssl.SSLContext | None,
        timeout: float | None,
    ) -> _Connection:
        _, host, port = origin
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                    limit=MAX_HEAD_BYTES,
                )
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise httpx.ConnectTimeout(
                f"connecting to {host}:{port} timed out", request=request
            ) from exc
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise httpx.ConnectError(
                f"connecting to {host}:{port} failed: {type(exc).__name__}: {exc}",
                request=request,
            ) from exc
        return _Connection(origin, reader, writer)

    # ------------------------------------------------------------------ pool

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since >= self._expiry:
                # The newest is too old, so are the rest.
                conn.close()
                for old in idle:
                    old.close()
                idle.clear()
                return None
            if conn.usable():
                return conn
            conn.abort()
        return None

    def _put_idle(self, conn: _Connection) -> None:
        if self._closed or self._max_idle == 0 or not conn.usable():
            conn.close()
            return
        now = time.monotonic()
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = []
        elif len(idle) >= self._max_idle:
            idle.pop(0).close()  # the oldest goes
        conn.idle_since = now
        idle.append(conn)
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close expired idle connections of every origin; forget origins left empty."""
        self._next_sweep = now + max(self._expiry, 1.0)
        for origin, idle in list(self._idle.items()):
            expired = 0
            for conn in idle:  # oldest first
                if now - conn.idle_since < self._expiry:
                    break
                conn.close()
                expired += 1
            if expired:
                del idle[:expired]
            if not idle:
                del self._idle[origin]

    def _release(self) -> None:
        self._limit.release()

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their response does."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


# ---------------------------------------------------------------------- wire format

# status, reason, headers, body framing, content length, keep-alive
_Head = tuple[int, bytes, list[tuple[bytes, bytes]], int, int, bool]
# the same, and the body when it was small enough to read with the head
_Reply = tuple[int, bytes, list[tuple[bytes, bytes]], int, int, bool, bytes]


def _serialize(request: httpx.Request, body: bytes) -> tuple[bytes, bool]:
    """The request bytes (head and body) and whether the request asked to close."""
    url = request.url
    method = request.method
    parts = [method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
    lines = 2  # the request line and the empty line
    has_host = False
    length: bytes | None = None
    close = False
    for key, value in request.headers.raw:
        lower = key.lower()
        if lower == b"transfer-encoding":
            continue  # the body is sent whole, with a Content-Length
        if lower == b"host":
            has_host = True
        elif lower == b"content-length":
            length = value
        elif lower == b"connection":
            close = b"close" in value.lower()
        parts += (key, b": ", value, _CRLF)
        lines += 1
    if not has_host:
        parts[4:4] = (b"Host: ", url.netloc, _CRLF)
        lines += 1
    if length is None:
        if body or method in _LENGTH_METHODS:
            parts += (b"Content-Length: ", str(len(body)).encode("ascii"), _CRLF)
            lines += 1
    elif not length.isdigit() or int(length) != len(body):
        raise httpx.LocalProtocolError(
            f"Content-Length {length!r} does not match the {len(body)}-byte body",
            request=request,
        )
    parts.append(_CRLF)
    head = b"".join(parts)
    # A CR, LF or NUL inside the method, target, a header name or value would split the head.
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
        raise httpx.LocalProtocolError(
            "line break or NUL in the request method, target or headers", request=request
        )
    if b" " in parts[0]:
        raise httpx.LocalProtocolError("space in the request method", request=request)
    return head + body, close


def _parse_head(head: bytes, request: httpx.Request) -> _Head:
    """Parse a response head ending in CRLF CRLF; decide the body framing and keep-alive."""
    lines = head[:-4].split(_CRLF)
    if len(lines) > MAX_HEADERS + 1:
        raise httpx.RemoteProtocolError(
            f"response has more than {MAX_HEADERS} headers", request=request
        )
    # Every line break must be CRLF: a bare CR or LF could hide a header.
    if head.count(b"\n") != len(lines) + 1 or head.count(b"\r") != len(lines) + 1:
        raise httpx.RemoteProtocolError("bare CR or LF in the response head", request=request)
    status_line = lines[0]
    version = status_line[:9]
    if version == b"HTTP/1.1 ":
        close = False
    elif version == b"HTTP/1.0 ":
        close = True
    else:
        raise httpx.RemoteProtocolError(
            f"malformed status line {status_line[:40]!r}", request=request
        )
    code = status_line[9:12]
    if len(code) != 3 or not code.isdigit() or status_line[12:13] not in (b"", b" "):
        raise httpx.RemoteProtocolError(
            f"malformed status line {status_line[:40]!r}", request=request
        )
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    transfer_encoding: bytes | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1] in b" \t" or name[0] in b" \t":
            raise httpx.RemoteProtocolError(
                f"malformed response header line {line[:40]!r}", request=request
            )
        value = value.strip(b" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit() or len(value) > 18 or (length >= 0 and int(value) != length):
                raise httpx.RemoteProtocolError(
                    f"invalid Content-Length {value[:40]!r}", request=request
                )
            length = int(value)
        elif lower == b"transfer-encoding":
            transfer_encoding = value.lower()
        elif lower == b"connection":
            tokens = value.lower()
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens and version == b"HTTP/1.0 ":
                close = False
    status = int(code)
    if status < 200 or status in (204, 304) or request.method == "HEAD":
        mode = _EMPTY  # no body, whatever the framing headers say
    elif transfer_encoding is not None:
        if transfer_encoding.rsplit(b",", 1)[-1].strip(b" \t") == b"chunked":
            mode = _CHUNKED
            if length >= 0:  # both framings: trust chunked, never reuse the connection
                close = True
        else:
            mode = _UNTIL_CLOSE
    elif length >= 0:
        mode = _LENGTH if length else _EMPTY
    else:
        mode = _UNTIL_CLOSE
    if mode == _UNTIL_CLOSE:
        close = True
    return status, status_line[13:], headers, mode, length, not close


async def _exchange(
    request: httpx.Request,
    conn: _Connection,
    data: bytes,
    read_timeout: float | None,
    write_timeout: float | None,
    reused: bool,
) -> _Reply:
    """Send ``data`` and read the final response head, and a small Content-Length body with
    it (one timer, one wake-up for the usual short JSON reply). Aborts ``conn`` on failure.

    Raises ``_Stale`` when ``reused`` and the connection proves closed before any byte of
    the response came back (only then is a retry safe).
    """
    reader, writer = conn.reader, conn.writer
    received = False
    try:
        writer.write(data)
        if writer.transport.get_write_buffer_size():
            try:
                async with asyncio.timeout(write_timeout):
                    await writer.drain()
            except TimeoutError as exc:
                raise httpx.WriteTimeout("sending the request timed out", request=request) from exc
            except ConnectionError as exc:
                if reused:  # the peer was gone before it could read the request
                    raise _Stale from exc
                raise httpx.WriteError(f"{type(exc).__name__}: {exc}", request=request) from exc
        async with asyncio.timeout(read_timeout):
            head = _parse_head(await reader.readuntil(_HEAD_END), request)
            received = True
            interim = 0
            while head[0] < 200:
                interim += 1
                if head[0] == 101 or interim > _MAX_INTERIM:
                    raise httpx.RemoteProtocolError(
                        f"unexpected interim response {head[0]}", request=request
                    )
                head = _parse_head(await reader.readuntil(_HEAD_END), request)
            status, reason, headers, mode, length, keep = head
            if mode == _LENGTH and length <= READ_CHUNK_BYTES:
                return (
                    status,
                    reason,
                    headers,
                    _READ,
                    length,
                    keep,
                    await reader.readexactly(length),
                )
    except asyncio.IncompleteReadError as exc:
        conn.abort()
        if received or exc.partial:
            raise httpx.RemoteProtocolError(
                "server closed the connection before the response was complete",
                request=request,
            ) from exc
        if reused:
            raise _Stale from exc
        raise httpx.RemoteProtocolError(
            "Server disconnected without sending a response.", request=request
        ) from exc
    except asyncio.LimitOverrunError as exc:
        conn.abort()
        raise httpx.RemoteProtocolError(
            f"response head exceeds {MAX_HEAD_BYTES} bytes", request=request
        ) from exc
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        conn.abort()
        raise httpx.ReadTimeout("no response head in time", request=request) from exc
    except OSError as exc:
        conn.abort()
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
    except BaseException:
        conn.abort()
        raise
    return status, reason, headers, mode, length, keep, b""


# ---------------------------------------------------------------------- response body


class _BodyStream(httpx.AsyncByteStream):
    """A response body read from the connection piece by piece.

    It owns the transport's slot and the connection: ``_finish`` gives both back exactly
    once, pooling the connection only when the body was read to its end and keep-alive holds.
    """

    def __init__(
        self,
        transport: KeepAliveTransport,
        request: httpx.Request,
        conn: _Connection,
        mode: int,
        length: int,
        keep: bool,
        read_timeout: float | None,
        body: bytes,
    ) -> None:
        self._transport = transport
        self._request = request
        self._conn = conn
        self._mode = mode
        self._remaining = length if mode == _LENGTH else 0
        self._keep = keep
        self._read_timeout = read_timeout
        self._state = _OPEN
        self._pending = body

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self._state != _OPEN:
            if self._state == _COMPLETE:
                raise StopAsyncIteration
            raise httpx.StreamClosed()
        try:
            async with asyncio.timeout(self._read_timeout):
                data = await self._read()
        except BaseException as exc:
            self._finish(complete=False)
            mapped = _read_error(exc, self._request)
            if mapped is exc:
                raise
            raise mapped from exc
        if not data:
            raise StopAsyncIteration
        return data

    async def _read(self) -> bytes:
        """The next piece of body; b"" at its end (after marking the stream complete)."""
        reader = self._conn.reader
        mode = self._mode
        if mode == _LENGTH:
            remaining = self._remaining
            if remaining <= READ_CHUNK_BYTES:
                data = await reader.readexactly(remaining)
            else:
                data = await reader.read(READ_CHUNK_BYTES)
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
            self._remaining = remaining - len(data)
            if not self._remaining:
                self._finish(complete=True)
            return data
        if mode == _CHUNKED:
            while not self._remaining:
                size = _chunk_size(await reader.readuntil(_CRLF), self._request)
                if not size:
                    await self._read_trailers()
                    self._finish(complete=True)
                    return b""
                self._remaining = size
            data = await reader.read(min(self._remaining, READ_CHUNK_BYTES))
            if not data:
                raise asyncio.IncompleteReadError(b"", self._remaining)
            self._remaining -= len(data)
            if not self._remaining and await reader.readexactly(2) != _CRLF:
                raise httpx.RemoteProtocolError("malformed chunk ending", request=self._request)
            return data
        data = await reader.read(READ_CHUNK_BYTES)  # until the server closes
        if not data:
            self._finish(complete=True)
        return data

    async def _read_trailers(self) -> None:
        reader = self._conn.reader
        for _ in range(MAX_HEADERS + 1):
            if await reader.readuntil(_CRLF) == _CRLF:
                return
        raise httpx.RemoteProtocolError("too many chunked trailer lines", request=self._request)

    def _finish(self, *, complete: bool) -> None:
        if self._state != _OPEN:
            return
        self._state = _COMPLETE if complete else _CLOSED
        conn = self._conn
        if not complete:
            conn.abort()
        elif self._keep:
            self._transport._put_idle(conn)
        else:
            conn.close()
        self._transport._release()

    async def aclose(self) -> None:
        self._finish(complete=False)


def _chunk_size(line: bytes, request: httpx.Request) -> int:
    digits = line[:-2].split(b";", 1)[0].strip(b" \t")
    if not digits or len(digits) > 16 or digits.translate(None, _HEX_DIGITS):
        raise httpx.RemoteProtocolError(f"malformed chunk size {line[:40]!r}", request=request)
    return int(digits, 16)


def _read_error(exc: BaseException, request: httpx.Request) -> BaseException:
    """The httpx exception for a failure while reading a body (``exc`` itself if none)."""
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout("no response data in time", request=request)
    if isinstance(exc, asyncio.IncompleteReadError):
        return httpx.RemoteProtocolError(
            "server closed the connection before the response body was complete",
            request=request,
        )
    if isinstance(exc, asyncio.LimitOverrunError):
        return httpx.RemoteProtocolError("chunk size line too long", request=request)
    if isinstance(exc, OSError):
        return httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request)
    return exc
