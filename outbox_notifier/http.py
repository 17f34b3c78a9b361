"""``/metrics``, ``/healthz`` and ``/readyz`` on a tiny HTTP/1.1 server over asyncio streams.

- ``/metrics``: the registry in the Prometheus text format.
- ``/healthz``: liveness. 200 while every loop has beaten recently (`HeartbeatMonitor`), else
  503; restarting the process is the cure for a stale loop.
- ``/readyz``: readiness. 200 while the database answers within a second, its schema is the
  one this daemon needs and the LISTEN connection is up (`readiness`), else 503.

Both health answers are JSON: ``{"status": "ok" | "unavailable", ...details}``. Anything else
is 404; a method other than GET or HEAD is 405. Each connection serves one request and is
closed (``Connection: close``), which every scraper and probe handles; a client gets
``request_timeout_s`` to send its request, so a stalled one cannot hold the server.

Usage::

    monitor = HeartbeatMonitor()
    server = HealthServer(
        "127.0.0.1", 9464, registry,
        health=lambda: monitor.report(max_age_s=30.0),
        ready=lambda: readiness(pool, lambda: listener_up, migrations.latest_version()),
    )
    await server.start()
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import psycopg
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from outbox_notifier.sqlfiles import query

logger = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
ReadinessCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

READINESS_TIMEOUT_S: Final = 1.0
_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"
_MAX_HEADER_LINES: Final = 100
_LINE_LIMIT: Final = 8192
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HeartbeatMonitor:
    """When each loop last showed it is alive, on a monotonic clock.

    A loop calls ``beat(name)`` on every turn; ``watch(name, read)`` instead reads a
    last-progress time the loop already keeps. ``names`` given at construction are expected
    from the start: each counts as having beaten then, which gives a loop ``max_age_s`` to
    start. The clock is injectable for tests.
    """

    def __init__(
        self, names: tuple[str, ...] = (), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        now = clock()
        self._beats: dict[str, float] = dict.fromkeys(names, now)
        self._watched: dict[str, Callable[[], float]] = {}

    def beat(self, name: str) -> None:
        self._beats[name] = self._clock()

    def watch(self, name: str, last_progress: Callable[[], float]) -> None:
        """Takes ``name``'s last beat from ``last_progress()`` (same clock) at each check."""
        self._watched[name] = last_progress

    def forget(self, name: str) -> None:
        """Stops expecting ``name`` (a loop that ended on purpose)."""
        self._beats.pop(name, None)
        self._watched.pop(name, None)

    def ages(self) -> dict[str, float]:
        """Seconds since each loop's last beat."""
        now = self._clock()
        last = dict(self._beats)
        for name, read in self._watched.items():
            last[name] = read()
        return {name: max(0.0, now - at) for name, at in sorted(last.items())}

    def healthy(self, max_age_s: float) -> tuple[bool, dict[str, float]]:
        """Whether every loop beat within ``max_age_s``, and each loop's age in seconds."""
        ages = self.ages()
        return all(age <= max_age_s for age in ages.values()), ages

    def report(self, max_age_s: float) -> tuple[bool, dict[str, Any]]:
        """`healthy` as the details of a ``/healthz`` answer."""
        ok, ages = self.healthy(max_age_s)
        loops = {
            name: {"ok": age <= max_age_s, "age_s": round(age, 3)} for name, age in ages.items()
        }
        return ok, {"max_age_s": max_age_s, "loops": loops}


async def readiness(
    pool: AsyncConnectionPool[AsyncConnection],
    listener_up: Callable[[], bool],
    expected_version: int,
    *,
    loop_problems: Callable[[], dict[str, str]] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Database reachable within a second, schema at ``expected_version``, listener up, and
    no loop whose last database call failed (``loop_problems``: a lock or a timeout that a
    bare round trip would not notice).

    Every check is reported, failed or not, so one answer shows everything that is wrong.
    """
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_S), pool.connection() as conn:
            cur = await conn.execute(query("readiness_check"))
            row = await cur.fetchone()
    except TimeoutError:
        checks["database"] = f"no answer within {READINESS_TIMEOUT_S:g}s"
        checks["schema"] = "unknown"
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        checks["database"] = "ok"
        checks["schema"] = "missing: run `outbox-notifier migrate`"
    except psycopg.Error as exc:
        checks["database"] = f"{type(exc).__name__}: {_first_line(exc)}"
        checks["schema"] = "unknown"
    else:
        checks["database"] = "ok"
        version = None if row is None else row[0]
        if version == expected_version:
            checks["schema"] = "ok"
        else:
            checks["schema"] = f"at version {version}, expected {expected_version}"
    problems = loop_problems() if loop_problems is not None else {}
    if problems and checks["database"] == "ok":
        checks["database"] = "; ".join(f"{loop}: {why}" for loop, why in problems.items())
    checks["listener"] = "ok" if listener_up() else "down"
    return all(value == "ok" for value in checks.values()), checks


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: HealthCheck,
        ready: ReadinessCheck,
        *,
        request_timeout_s: float = 5.0,
        ready_timeout_s: float = 5.0,
    ) -> None:
        self.host = host
        self._port = port
        self.registry = registry
        self.health = health
        self.ready = ready
        self.request_timeout_s = request_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0); only after `start`."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, limit=_LINE_LIMIT
        )
        logger.info("serving /metrics, /healthz and /readyz on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._closing = True
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        self._closing = False

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._respond(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or stalled; nothing to answer
        except asyncio.CancelledError:
            # Cancelled by close(): end quietly, since a connection task that ends cancelled
            # makes asyncio's stream machinery log a spurious error on Python 3.11.
            if not self._closing:
                raise
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                method, path = await _read_request(reader)
        except ValueError as exc:  # malformed, or a line over the limit
            await _write(writer, 400, _TEXT, f"bad request: {exc}\n".encode())
            return
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await _write(writer, 405, _TEXT, b"method not allowed\n", {"Allow": "GET, HEAD"})
            return
        try:
            status, content_type, body = await self._route(path)
        except Exception:
            logger.exception("%s %s failed", method, path)
            status, content_type, body = 500, _TEXT, b"internal error\n"
        await _write(writer, status, content_type, body, head=head)

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            ok, details = self.health()
            return _health_answer(ok, details)
        if path == "/readyz":
            try:
                async with asyncio.timeout(self.ready_timeout_s):
                    ok, details = await self.ready()
            except TimeoutError:
                ok, details = False, {"error": f"no answer within {self.ready_timeout_s:g}s"}
            return _health_answer(ok, details)
        return 404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n"


def _health_answer(ok: bool, details: dict[str, Any]) -> tuple[int, str, bytes]:
    body = msgspec.json.encode({"status": "ok" if ok else "unavailable", **details})
    return (200 if ok else 503), _JSON, body + b"\n"


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and path of a request; its headers are read and ignored (no body is taken)."""
    line = await reader.readline()
    if not line:
        raise asyncio.IncompleteReadError(b"", None)
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("expected 'METHOD /path HTTP/1.x'")
    method, target, _ = parts
    for _ in range(_MAX_HEADER_LINES):
        header = await reader.readline()
        if header in (b"\r\n", b"\n"):
            break
        if not header:
            raise asyncio.IncompleteReadError(b"", None)
    else:
        raise ValueError("too many header lines")
    # origin-form (/path?query) or absolute-form (http://host/path)
    return method, urllib.parse.urlsplit(target).path or "/"


async def _write(
    writer: asyncio.StreamWriter,
    status: int,
    content_type: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    head: bool = False,
) -> None:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(body)
    await writer.drain()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
