"""``/metrics``, ``/healthz`` and ``/readyz`` on aiohttp's web server.

- ``/metrics``: the registry through prometheus_client's own exposition: the Prometheus text
  format, or OpenMetrics when the scraper's ``Accept`` asks for it; gzip when accepted.
- ``/healthz``: liveness. 200 while every loop has beaten recently (`HeartbeatMonitor`), else
  503; restarting the process is the cure for a stale loop.
- ``/readyz``: readiness. 200 while the database answers within a second, its schema is one
  this daemon can run on and the LISTEN connection is up (`readiness`), else 503. A held
  database horizon is named in the answer but never makes it 503.

Both health answers are JSON: ``{"status": "ok" | "unavailable", ...details}``. Anything else
is 404; a method other than GET or HEAD is 405. Connections are capped (``max_connections``)
and an idle one is closed after ``request_timeout_s``, so a flood of idle or stalled clients
cannot hold the server or starve the probes; resource exhaustion is logged at most once a
minute.

Usage::

    monitor = HeartbeatMonitor()
    server = HealthServer(
        "127.0.0.1", 9464, registry,
        health=lambda: monitor.report(max_age_s=30.0),
        ready=lambda: readiness(store, lambda: listener_up, migrations.latest_version()),
    )
    await server.start()
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import logging
import math
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from outbox_notifier.dbhealth import DeadlineExceeded, bounded, first_line
from outbox_notifier.store import DatabaseError, RecordStore, SchemaMissing

logger = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
ReadinessCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

READINESS_TIMEOUT_S: Final = 1.0


class HeartbeatMonitor:
    """When each loop last showed it is alive, on a monotonic clock.

    A loop calls ``beat(name)`` on every turn, and ``sleeping(name, seconds)`` before a wait
    on purpose (a wait is not a wedge). ``names`` given at construction are expected
    from the start: each counts as having beaten then, which gives a loop ``max_age_s`` to
    start. The clock is injectable for tests.
    """

    def __init__(
        self, names: tuple[str, ...] = (), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        now = clock()
        self._beats: dict[str, float] = dict.fromkeys(names, now)

    def beat(self, name: str) -> None:
        self._beats[name] = self._clock()

    def sleeping(self, name: str, seconds: float) -> None:
        """``name`` waits on purpose for ``seconds``: it counts as beating until it is due back."""
        self._beats[name] = self._clock() + seconds

    def forget(self, name: str) -> None:
        """Stops expecting ``name`` (a loop that ended on purpose)."""
        self._beats.pop(name, None)

    def ages(self) -> dict[str, float]:
        """Seconds since each loop's last beat."""
        now = self._clock()
        return {name: max(0.0, now - at) for name, at in sorted(self._beats.items())}

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
    store: RecordStore,
    listener_up: Callable[[], bool],
    expected_version: int,
    *,
    loop_problems: Callable[[], dict[str, str]] | None = None,
    notes: Callable[[], dict[str, Any]] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Database reachable within a second, schema compatible with a daemon whose latest
    migration is ``expected_version`` (`migrations.compatibility`), listener up, and no loop
    whose last database call failed (``loop_problems``: a lock or a timeout that a bare round
    trip would not notice).

    Every check is reported, failed or not, so one answer shows everything that is wrong.
    ``notes`` adds details that never decide readiness (a held database horizon, see
    outbox_notifier.horizon).
    """
    checks: dict[str, str] = {}

    try:
        # Abandoned, not awaited, past the deadline: in a network black hole psycopg's own
        # cancellation takes up to 10 s, and a probe must answer in time.
        verdict = await bounded(store.schema_compatibility(expected_version), READINESS_TIMEOUT_S)
    except DeadlineExceeded:
        checks["database"] = f"no answer within {READINESS_TIMEOUT_S:g}s"
        checks["schema"] = "unknown"
    except SchemaMissing:
        checks["database"] = "ok"
        checks["schema"] = "missing: run `outbox-notifier migrate`"
    except DatabaseError as exc:
        checks["database"] = f"{type(exc).__name__}: {first_line(exc)}"
        checks["schema"] = "unknown"
    else:
        checks["database"] = "ok"
        checks["schema"] = "ok" if verdict.ok else verdict.reason
    problems = loop_problems() if loop_problems is not None else {}
    if problems:
        seen = "; ".join(f"{loop}: {why}" for loop, why in problems.items())
        database = checks["database"]
        checks["database"] = seen if database == "ok" else f"{database}; {seen}"
    checks["listener"] = "ok" if listener_up() else "down"
    ready = all(value == "ok" for value in checks.values())
    return ready, {**checks, **(notes() if notes is not None else {})}


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` (see the module docstring).

    ``max_connections`` caps open connections: a new connection past it closes the oldest
    one, so a flood of idle clients can neither exhaust the process's file descriptors nor
    lock the probes out (refusing the newcomer would do the second); the cap in force is
    also at most a quarter of ``RLIMIT_NOFILE``. ``request_timeout_s``
    closes a connection that sends nothing (before or between requests); ``ready_timeout_s``
    bounds a ``/readyz`` answer.
    """

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
        max_connections: int = 64,
    ) -> None:
        self.host = host
        self._port = port
        self.registry = registry
        self.health = health
        self.ready = ready
        self.request_timeout_s = request_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.max_connections = max_connections
        self.evicted = 0  # oldest connections closed to make room for a new one
        self._evicted: set[web.RequestHandler] = set()  # closing, not yet gone
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._previous_handler: Any = None

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0); only after `start`."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # keepalive_timeout runs from the moment a connection opens, so it is also the idle
        # timeout for a client that connects and never sends a request.
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=self.request_timeout_s,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        assert runner.server is not None
        web_server = runner.server

        # asyncio accepts up to `backlog` sockets in one go before any protocol is made (and
        # so before an eviction can free a descriptor): past the descriptor limit it stops
        # accepting for a second, probes included. Open connections plus one accept batch
        # therefore stay within half of RLIMIT_NOFILE, leaving the rest to the database pool.
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = max(4, min(self.max_connections, soft_limit // 4))

        def protocol() -> asyncio.BaseProtocol:
            connections = web_server.connections  # oldest first
            self._evicted.intersection_update(connections)
            if len(connections) >= cap:
                victim = next((c for c in connections if c not in self._evicted), None)
                if victim is not None:
                    self._evicted.add(victim)
                    victim.force_close()
                    self.evicted += 1
            return web_server()

        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                protocol, self.host, self._port, reuse_address=True, backlog=cap
            )
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        # Out of file descriptors, asyncio reports every failed accept() with a traceback:
        # thousands of lines a minute. One line per interval says the same.
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(_RateLimitedLoopErrors(self._previous_handler))
        logger.info("serving /metrics, /healthz and /readyz on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()  # closes open connections, then waits for them
        await self._server.wait_closed()
        self._server = None
        self._runner = None
        loop = asyncio.get_running_loop()
        if isinstance(loop.get_exception_handler(), _RateLimitedLoopErrors):
            loop.set_exception_handler(self._previous_handler)

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        # prometheus_client's own negotiation: OpenMetrics when the scraper asks for it.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.registry)
        headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        ok, details = self.health()
        return _health_answer(ok, details)

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        try:
            async with asyncio.timeout(self.ready_timeout_s):
                ok, details = await self.ready()
        except TimeoutError:
            ok, details = False, {"error": f"no answer within {self.ready_timeout_s:g}s"}
        return _health_answer(ok, details)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        return web.Response(status=404, text="not found: try /metrics, /healthz or /readyz\n")


class _RateLimitedLoopErrors:
    """An event-loop exception handler that lets through one report of resource exhaustion
    (failed ``accept()``, ``EMFILE``) per ``interval_s``, as one line without a traceback, and
    passes every other report to the previous handler."""

    def __init__(self, previous: Any, interval_s: float = 60.0) -> None:
        self.previous = previous
        self.interval_s = interval_s
        self.suppressed = 0
        self._last = -math.inf

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        exhausted = isinstance(exc, OSError) and exc.errno in (
            errno.EMFILE,
            errno.ENFILE,
            errno.ENOBUFS,
            errno.ENOMEM,
        )
        if not exhausted:
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return
        logger.error(
            "out of resources: %s (%s); %d similar reports suppressed in the last %gs",
            context.get("message", "error"), exc, self.suppressed, self.interval_s,
        )  # fmt: skip
        self._last = now
        self.suppressed = 0


def _health_answer(ok: bool, details: dict[str, Any]) -> web.Response:
    body = msgspec.json.encode({"status": "ok" if ok else "unavailable", **details})
    return web.Response(
        status=200 if ok else 503,
        body=body + b"\n",
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
