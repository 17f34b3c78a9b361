"""Wires the loops together: relay, delivery, lease rescue, the LISTEN connection; signals.

One asyncio process, one connection pool (autocommit connections: each batch statement is its
own short transaction) plus one dedicated connection for LISTEN, which cannot go through a
transaction-mode pooler and so may use ``listen_dsn``. NOTIFY only shortens waits: every loop
also polls, so a lost notification or a listener that is reconnecting delays work by at most
``poll_interval_s`` and never loses it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CollectorRegistry, gc_collector, platform_collector, process_collector

from outbox_notifier import connections, eventloop, httpclient, migrations, sdnotify, tracing
from outbox_notifier.backoff import RetryPolicy
from outbox_notifier.completer import ResultCompleter
from outbox_notifier.dbhealth import DatabaseHealth, bounded, describe
from outbox_notifier.delivery import Deliverer
from outbox_notifier.horizon import HorizonWatch
from outbox_notifier.http import HealthServer, HeartbeatMonitor, readiness
from outbox_notifier.listener import Listener
from outbox_notifier.loops import LoopContext
from outbox_notifier.maintenance import Maintenance
from outbox_notifier.maintenance_store import MaintenanceStore
from outbox_notifier.metrics import Metrics
from outbox_notifier.providers import REGISTRY, default_providers
from outbox_notifier.providers.model import Provider
from outbox_notifier.relay import Relay
from outbox_notifier.rescue import Rescuer
from outbox_notifier.retention import RetentionPolicy
from outbox_notifier.settings import Settings, parse_host_port
from outbox_notifier.store import (
    Breaker,
    ClaimPolicy,
    Digests,
    OperationalError,
    Pacing,
    RecordStore,
)

logger = logging.getLogger(__name__)


class SchemaNotCurrent(RuntimeError):
    """The database schema is older than this daemon, or newer through a breaking migration."""


class HttpListenError(RuntimeError):
    """``http_listen`` cannot be bound (the port is busy, the address is not local...)."""


class DatabaseUnavailable(RuntimeError):
    """The database did not answer within ``startup_timeout_s`` at start."""


#: Start-up retries wait 0.5 s, 1 s, 2 s ... up to this long between tries.
STARTUP_RETRY_MAX_S = 15.0
#: At exit, the spans still buffered get this long to be exported (tracing on).
TRACE_FLUSH_S = 5.0


def http_transport(settings: Settings) -> httpclient.EgressTransport:
    """The one HTTP transport every provider shares (``outbox_notifier.httpclient``): httpx's
    types over aiohttp's pool, sized to the delivery concurrency, with the egress guard, the
    proxy settings and one trust store (the system's plus ``ca_bundle``). Call it inside the
    loop."""
    return httpclient.build_transport(httpclient.EgressConfig.from_settings(settings))


def claim_policy(settings: Settings) -> ClaimPolicy:
    """The claims' lease; per-target pacing by provider name (each provider's
    ``<prefix>_max_per_s`` and ``<prefix>_max_per_min``, as ``providers.REGISTRY`` names
    them) with the 429 throttle (``throttle_*``); the breaker (``breaker_*``); digests for
    the chat bots whose ``<prefix>_digest`` is on, of at most ``digest_max_records``."""
    own = {spec.name: spec.settings(settings) for spec in REGISTRY}
    digesting = tuple(spec.name for spec in REGISTRY if spec.digest_options(settings).get("digest"))
    return ClaimPolicy(
        lease_s=settings.lease_s,
        pacing=Pacing(
            per_s={name: s.max_per_s for name, s in own.items()},
            per_min={name: s.max_per_min for name, s in own.items()},
            margin_s=settings.pacing_margin_s,
            slowdown_s=settings.throttle_slowdown_s,
            slow_per_s=settings.throttle_max_per_s,
            retry_after_max_s=settings.retry_after_max_s,
        ),
        breaker=Breaker(
            min_failures=settings.breaker_failures,
            cooloff_s=settings.breaker_cooloff_s,
            window_s=settings.breaker_window_s,
            min_calls=settings.breaker_min_calls,
            failure_ratio=settings.breaker_failure_ratio,
        ),
        digests=Digests(providers=digesting, max_records=settings.digest_max_records),
        durable=settings.durable_claims,
    )


async def _flush_traces() -> None:
    """Exports the spans still buffered, in a thread (the exporter blocks), for at most
    ``TRACE_FLUSH_S``: an absent collector must not hold the exit."""
    try:
        await asyncio.wait_for(asyncio.to_thread(tracing.shutdown), TRACE_FLUSH_S)
    except TimeoutError:
        logger.warning("spans not exported within %ss at exit; dropped", TRACE_FLUSH_S)


class Daemon:
    """The long-running process. ``await run()`` until ``stop()`` (or SIGTERM/SIGINT)."""

    def __init__(
        self,
        settings: Settings,
        *,
        providers: Mapping[str, Provider] | None = None,
        registry: CollectorRegistry | None = None,
        notifier: sdnotify.SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.notifier = notifier or sdnotify.SystemdNotifier()
        self._providers = providers
        self._stop = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._delivery_wake = asyncio.Event()
        self.listener = Listener(settings)
        if registry is None:
            registry = CollectorRegistry()
            process_collector.ProcessCollector(registry=registry)
            platform_collector.PlatformCollector(registry=registry)
            gc_collector.GCCollector(registry=registry)
        self.registry = registry
        self.metrics = Metrics(registry)
        self.monitor = HeartbeatMonitor()
        self.db_health = DatabaseHealth(on_change=self.metrics.database_failing_changed)
        self.horizon = HorizonWatch(warn_s=settings.horizon_warn_s)
        self.loops = LoopContext(
            self._stop, self.monitor, self.db_health, self.metrics,
            db_deadline_s=settings.db_deadline_s,
        )  # fmt: skip
        self.http_port: int | None = None
        self.policy = RetryPolicy(
            max_attempts=settings.max_attempts,
            base_s=settings.retry_base_s,
            max_s=settings.retry_max_s,
            retry_after_max_s=settings.retry_after_max_s,
        )

    def stop(self) -> None:
        self._stop.set()

    @property
    def listener_up(self) -> bool:
        return self.listener.up

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        settings = self.settings
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        # Tracing: OpenTelemetry when the setting is on, else a no-op that imports nothing.
        tracing.install(settings)
        session = connections.session_timeouts(settings)
        pool = connections.new_pool(settings, session)
        store = RecordStore(
            pool, timeouts=connections.statement_timeouts(settings), session=session
        )
        host, port = parse_host_port(settings.http_listen)
        server = HealthServer(
            host,
            port,
            self.registry,
            health=lambda: self.monitor.report(settings.health_stale_s),
            ready=lambda: readiness(
                store,
                lambda: self.listener_up,
                migrations.latest_version(),
                loop_problems=self.db_health.problems,
                notes=self.horizon.readiness_detail,
            ),
        )
        try:
            await server.start()
        except OSError as exc:
            raise HttpListenError(
                f"invalid setting http_listen: cannot listen on {settings.http_listen!r}: "
                f"{exc.strerror or exc}"
            ) from None
        self.http_port = server.port
        try:
            # Connections are made in the background; _wait_for_database waits for the first.
            await pool.open(wait=False)
            if not await self._wait_for_database():
                return  # stopped while waiting
            await self._check_schema(store)
            async with http_transport(settings) as transport:
                providers = self._providers or default_providers(settings, transport)
                await self._run_loops(store, providers)
        finally:
            self.listener.up = False
            await server.close()
            await pool.close()
            self.notifier.close()
            await _flush_traces()

    async def _wait_for_database(self) -> bool:
        """Retries a probe with capped backoff until the database answers; False if stopped.

        Meanwhile /healthz is 200 (the process is fine), /readyz 503 naming the database, and
        systemd reads "waiting for database". Raises DatabaseUnavailable after
        ``startup_timeout_s`` (0: never), which the CLI turns into exit 1.
        """
        settings = self.settings
        started = time.monotonic()
        delay_s, attempt = 0.5, 0
        while not self._stop.is_set():
            attempt += 1
            self.monitor.beat("startup")
            try:
                await bounded(connections.ping(settings), settings.db_deadline_s)
            except OperationalError as exc:
                reason = describe(exc)
                self.db_health.failed("startup", exc)
            else:
                self.db_health.ok("startup")
                self.monitor.forget("startup")
                if attempt > 1:
                    logger.info("database available after %d tries", attempt)
                return True
            waited_s = time.monotonic() - started
            if settings.startup_timeout_s and waited_s >= settings.startup_timeout_s:
                raise DatabaseUnavailable(
                    f"database not available after {waited_s:.0f}s "
                    f"(startup_timeout_s = {settings.startup_timeout_s:g}): {reason}"
                )
            logger.warning(
                "waiting for database (try %d, next in %.1fs): %s", attempt, delay_s, reason
            )
            # systemd: more start time for each try (the wait, the next try's deadline and a
            # margin), so TimeoutStartSec bounds a wedged start-up but not a database outage.
            self.notifier.extend_timeout(
                delay_s + settings.db_deadline_s + 30.0,
                status=f"waiting for database (try {attempt}): {reason}",
            )
            await self.loops.sleep("startup", delay_s)
            delay_s = min(delay_s * 2, STARTUP_RETRY_MAX_S)
        self.monitor.forget("startup")
        return False

    async def _check_schema(self, store: RecordStore) -> None:
        # Its own schema version or a newer one reached by additive migrations only
        # (migrations.compatibility); anything else is refused before any loop starts.
        verdict = await store.schema_compatibility()
        if not verdict.ok:
            raise SchemaNotCurrent(verdict.reason)
        logger.info("%s", verdict.reason)

    async def _run_loops(self, store: RecordStore, providers: Mapping[str, Provider]) -> None:
        """Starts every stage's loop (each owns its loop, see outbox_notifier.loops), then on
        stop cancels all but delivery, which drains within ``shutdown_deadline_s``."""
        settings, ctx = self.settings, self.loops
        relay = Relay.from_settings(settings, store)
        rescuer = Rescuer(store, self.policy, interval_s=settings.retry_interval_s)
        maintenance = Maintenance(
            MaintenanceStore(store.pool, timeouts=store.timeouts, session=store.session),
            interval_s=settings.maintenance_interval_s,
            retention=RetentionPolicy.from_settings(settings),
            horizon=self.horizon,
        )
        claims = claim_policy(settings)
        self.deliverer = Deliverer(
            store,
            providers,
            self.policy,
            claims,
            ResultCompleter(store, claims, released=self._delivery_wake),
            batch_size=settings.delivery_batch_size,
            concurrency=settings.delivery_concurrency,
        )
        self.metrics.track(
            listener_up=lambda: self.listener.up, in_flight=lambda: self.deliverer.in_flight
        )
        poll_s, outbox_wake, delivery_wake = (
            settings.poll_interval_s, self._outbox_wake, self._delivery_wake
        )  # fmt: skip
        background = [
            self._start("relay", lambda: relay.run(ctx, outbox_wake, delivery_wake, poll_s)),
            self._start("listener", lambda: self.listener.run(ctx, outbox_wake)),
            self._start("rescue", lambda: rescuer.run(ctx, delivery_wake)),
            self._start("maintenance", lambda: maintenance.run(ctx)),
        ]
        delivery = self._start("delivery", lambda: self.deliverer.run(ctx, delivery_wake, poll_s))
        logger.info("outbox-notifier running on %s", eventloop.name(asyncio.get_running_loop()))
        # Ready only now: HTTP is up, the schema is checked and every loop has started.
        self.notifier.ready(status="running")
        # The watchdog is fed only while every loop makes progress (the /healthz check), so
        # systemd restarts a wedged daemon.
        background.append(
            asyncio.create_task(
                sdnotify.run_watchdog(
                    self.notifier, lambda: self.monitor.healthy(settings.health_stale_s)[0]
                )
            )
        )
        await self._stop.wait()
        self.notifier.stopping(
            status=f"draining in-flight calls (up to {settings.shutdown_deadline_s:g}s)"
        )
        logger.info("stopping: no new claims; waiting up to %ss for in-flight calls",
                    settings.shutdown_deadline_s)  # fmt: skip
        for task in background:
            task.cancel()
        done, _ = await asyncio.wait({delivery}, timeout=settings.shutdown_deadline_s)
        if not done:
            # Counted before cancelling: cancellation empties the in-flight set.
            abandoned = self.deliverer.in_flight
            delivery.cancel()
            await asyncio.gather(delivery, return_exceptions=True)
            logger.warning(
                "shutdown deadline passed with %d calls in flight; their leases will expire",
                abandoned,
            )
        await asyncio.gather(*background, return_exceptions=True)
        logger.info("stopped")

    def _start(self, name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Runs a loop in a task; if it crashes on a bug, logs it and starts it again after a
        pause."""

        async def guarded() -> None:
            while not self._stop.is_set():
                try:
                    await body()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("%s loop crashed; restarting it", name)
                    await asyncio.sleep(1.0)

        return asyncio.create_task(guarded())
