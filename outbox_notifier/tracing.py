"""Tracing as the pipeline sees it: a facade with no OpenTelemetry in it.

The pipeline calls ``tracing.active`` at a few places (a delivery attempt, the provider call
inside it, the relay, claim and apply batches) and gets a `Span` back. With the ``tracing``
setting off, the default, ``active`` is a `Tracing` whose every span is one shared object whose
methods do nothing: no OpenTelemetry module is imported and nothing is allocated per record.
With it on, `install` imports ``outbox_notifier.otel_tracing`` (the ``otel`` extra), which
builds the OpenTelemetry SDK from the standard ``OTEL_*`` variables, and puts its tracing in
place; the span names and attributes, after the semantic conventions, are written there.

Usage::

    tracing.install(settings)               # Daemon.run; a no-op when settings.tracing is off
    with tracing.active.process(...) as span:    # one delivery attempt of one record
        with tracing.active.http_call(url, prefix) as call:
            ...
            call.replied(200)
        span.finished(outcome, error_code, status)
    tracing.shutdown()                      # exports what is buffered, back to no-op

The trace context travels as a W3C ``traceparent`` string (``00-<trace id>-<span id>-<flags>``),
so the store, the completer, the logs and the metrics handle it without OpenTelemetry: see
`ids_of`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Final, Protocol, Self

if TYPE_CHECKING:
    import httpx

    from outbox_notifier.settings import Settings

#: What to install when the setting is on and the extra is not.
EXTRA_HINT: Final = "pip install 'outbox-notifier[otel]'"
#: Modules of the extra that `install` imports.
EXTRA_MODULES: Final = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)
#: ``OTEL_TRACES_EXPORTER`` values the daemon honours (the first is the default).
EXPORTERS: Final = ("otlp", "console", "none")
#: The OTLP protocol of the exporter the extra brings.
OTLP_PROTOCOL: Final = "http/protobuf"


class Span:
    """A span of the pipeline, and the no-op one: every method does nothing.

    A context manager: entering makes it current (the provider call of an attempt becomes its
    child), leaving ends it. An exception leaving the block marks it failed.
    """

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.end(exc)

    def end(self, exc: BaseException | None) -> None:
        """Ends the span; ``exc`` is the exception leaving its block, if any."""

    def traceparent(self) -> str | None:
        """This span's context as a W3C traceparent (None: not tracing)."""
        return None

    def finished(self, outcome: str, error_code: str | None, status: str) -> None:
        """A delivery attempt's outcome, error code and the record's new status."""

    def replied(self, http_status: int) -> None:
        """A provider call's HTTP status."""

    def failed(self, error_type: str) -> None:
        """A provider call that got no reply (timeout, transport error, refused destination)."""

    def rows(self, count: int) -> None:
        """How many rows a database batch handled."""


NOOP: Final = Span()


class Attempt(Protocol):
    """What a ``process`` span reads of the record being attempted (``store.ClaimedRecord``)."""

    @property
    def id(self) -> int: ...
    @property
    def attempt_count(self) -> int: ...
    @property
    def channel(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def traceparent(self) -> str | None: ...
    @property
    def tracestate(self) -> str | None: ...


class Tracing:
    """Tracing off: every span is `NOOP`. ``otel_tracing.OtelTracing`` is the real one."""

    enabled: bool = False

    def process(self, record: Attempt) -> Span:
        """One delivery attempt of one record (a messaging ``process`` span), parented on and
        linked to the record's trace context when it has one."""
        return NOOP

    def http_call(self, url: httpx.URL, path_prefix: str) -> Span:
        """One provider call (an HTTP client span) to ``url``, which is shown redacted: only
        its scheme, host, port and ``path_prefix`` (the provider's public part of the path)."""
        return NOOP

    def database(self, query_name: str) -> Span:
        """One database batch: a relay pass, a claim, the application of results."""
        return NOOP

    def log_ids(self) -> tuple[str, str] | None:
        """The current span's (trace id, span id) in hex, for log lines; None when none."""
        return None

    def shutdown(self) -> None:
        """Exports what is buffered and stops."""


#: The tracing in force: off until `install` is called with the setting on.
active: Tracing = Tracing()


def install(settings: Settings) -> Tracing:
    """Puts the tracing ``settings`` ask for in force and returns it: OpenTelemetry when
    ``settings.tracing`` is on (the extra must be installed: the settings check that), else
    the no-op one, without importing anything."""
    global active
    if settings.tracing:
        from outbox_notifier import otel_tracing

        active = otel_tracing.OtelTracing.from_settings(settings)
    else:
        active = Tracing()
    return active


def shutdown() -> None:
    """Flushes and stops the tracing in force, and puts the no-op one back."""
    global active
    current, active = active, Tracing()
    current.shutdown()


def missing_extra() -> str | None:
    """Why tracing cannot be turned on in this environment (the extra is not installed), as
    the end of one line; None when it can. Looks the modules up without importing them."""
    for name in EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            return f"true needs the otel extra, which is not installed: {EXTRA_HINT}"
    return None


def environment_problem(environ: dict[str, str] | None = None) -> str | None:
    """An ``OTEL_*`` variable the daemon cannot honour, as the end of one line; None if none.

    The exporter is OTLP over HTTP (protobuf); ``OTEL_TRACES_EXPORTER`` may also say
    ``console`` or ``none``. Every other ``OTEL_*`` variable is the SDK's to read.
    """
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter and exporter not in EXPORTERS:
        return (
            f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: "
            f"expected one of {', '.join(EXPORTERS)}"
        )
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip().lower()
        if protocol and protocol != OTLP_PROTOCOL:
            return f"{name}={protocol!r} is not supported: the exporter speaks {OTLP_PROTOCOL}"
    return None


def ids_of(traceparent: str | None) -> tuple[str, str, bool] | None:
    """(trace id, span id, sampled) of a W3C traceparent as the daemon writes them, else None.

    Only the fixed positions of version 00 are read; the daemon validates a producer's value
    before it uses it (otel_tracing), so this is for the strings it made itself.
    """
    if traceparent is None or len(traceparent) < 55:
        return None
    try:
        sampled = bool(int(traceparent[53:55], 16) & 1)
    except ValueError:
        return None
    return traceparent[3:35], traceparent[36:52], sampled
