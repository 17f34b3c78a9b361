"""OpenTelemetry behind the ``tracing`` facade: imported only when the ``tracing`` setting is on.

Configured the OpenTelemetry way, by the standard variables the SDK reads:
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (and their headers,
timeout, certificate and compression), ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``
(default ``parentbased_always_on``), ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
(default ``service.name=outbox-notifier``), ``OTEL_BSP_*`` for the batch processor;
``OTEL_TRACES_EXPORTER`` may say ``otlp`` (the default: OTLP over HTTP, protobuf), ``console``
or ``none``; ``OTEL_SDK_DISABLED=true`` keeps every span a no-op. The provider is the daemon's
own, not the global one: nothing else in the process is traced by it.

The spans, after the semantic conventions (messaging, HTTP client and database spans):

``process {channel}`` (CONSUMER), one per delivery attempt of a record
    ``messaging.system`` = ``outbox_notifier``, ``messaging.operation.type`` = ``process``,
    ``messaging.operation.name`` = ``process``, ``messaging.destination.name`` = the channel,
    ``messaging.message.id`` = the record id; the pipeline's own ``outbox_notifier.record.id``,
    ``.attempt``, ``.provider``, ``.outcome``, ``.error_code``, ``.record.status``;
    ``error.type`` = the error code when the attempt failed. For asynchronous processing of a
    single message, the conventions make the message's creation context a link of the process
    span and allow it as its parent: it is both here. The record's context is the producer's
    (handed to ``enqueue``), else its first traced attempt's (kept by ``apply_results``), so
    every attempt of one record lands in one trace, the retries beside or under the first.
``POST`` (CLIENT), the provider call inside it
    ``http.request.method``, ``server.address``, ``server.port``, ``url.full`` redacted
    (scheme, host, port and the provider's public path prefix; the rest of the path, where a
    robot's token lives, is ``REDACTED``, and every query value too: DingTalk's
    ``access_token``, WeCom's ``key``, a signature), ``http.response.status_code``,
    ``error.type`` (the status code from 400 up, else the pipeline's error code).
``relay_outbox``, ``claim_records``, ``apply_results`` (CLIENT), one per database batch
    ``db.system.name`` = ``postgresql``, ``db.operation.name`` and ``db.query.summary`` = the
    named statement (sql/queries.sql), ``db.operation.batch.size``, ``db.namespace``,
    ``server.address``, ``server.port`` from the DSN (never its password).

No attribute holds a message, a URL's secret part, a user id or a dedupe key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Final, Self

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.semconv.attributes import (
    db_attributes,
    error_attributes,
    http_attributes,
    server_attributes,
    service_attributes,
    url_attributes,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from outbox_notifier import __version__, tracing
from outbox_notifier.settings import Settings, database_target

logger = logging.getLogger(__name__)

# The messaging conventions are still in development: their constants live in the semantic
# conventions package's _incubating modules, which are not a stable import; the names are.
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"

SYSTEM: Final = "outbox_notifier"
SERVICE_NAME: Final = "outbox-notifier"
REDACTED: Final = "REDACTED"
#: The pipeline's own attributes, under its own namespace.
RECORD_ID: Final = "outbox_notifier.record.id"
ATTEMPT: Final = "outbox_notifier.attempt"
PROVIDER: Final = "outbox_notifier.provider"
OUTCOME: Final = "outbox_notifier.outcome"
ERROR_CODE: Final = "outbox_notifier.error_code"
RECORD_STATUS: Final = "outbox_notifier.record.status"

_FAILED_OUTCOMES: Final = frozenset({"temporary_fail", "permanent_fail"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def redacted_url(url: httpx.URL, path_prefix: str) -> str:
    """``url`` fit for an attribute: scheme, host and port as they are, the path kept up to
    ``path_prefix`` (the provider's public part: ``/open-apis/bot/v2/hook/``) and the rest
    ``REDACTED``, every query value ``REDACTED``; never user info or a fragment."""
    path = url.raw_path.decode("ascii", "replace").partition("?")[0]
    prefix = path_prefix if path_prefix.startswith("/") else "/"
    if path.startswith(prefix):
        shown = prefix + (REDACTED if len(path) > len(prefix) else "")
    else:
        shown = "/" + REDACTED
    port = f":{url.port}" if url.port is not None else ""
    text = f"{url.scheme}://{url.host}{port}{shown}"
    if url.query:
        # A parameter's name is kept (access_token, key, sign), never its value; a part without
        # a name (``?<token>``) is all value.
        parts = []
        for part in url.query.split(b"&"):
            key, equals, _ = part.decode("ascii", "replace").partition("=")
            parts.append(f"{key}={REDACTED}" if equals and key else REDACTED)
        text += "?" + "&".join(parts)
    return text


@functools.lru_cache(maxsize=4096)
def _shown_url(url: httpx.URL, path_prefix: str) -> str:
    """`redacted_url`, once per robot: a recipient's URL comes back with each of its records."""
    return redacted_url(url, path_prefix)


class _HashedResource(Resource):
    """A resource hashed once. The OTLP encoder groups every span by its resource, and the
    SDK's hash writes the attributes out as JSON each time: an eighth of the encoding's CPU.
    A resource is immutable, so its hash never changes."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


class _Span(tracing.Span):
    """An SDK span behind the facade's `tracing.Span`; current while its block runs."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token: object = None

    def __enter__(self) -> Self:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def end(self, exc: BaseException | None) -> None:
        try:
            if exc is not None:
                # Cancellation is the shutdown's, not a fault of the call: named, not recorded.
                if isinstance(exc, asyncio.CancelledError):
                    self._span.set_attribute(error_attributes.ERROR_TYPE, "cancelled")
                else:
                    self._span.set_attribute(error_attributes.ERROR_TYPE, type(exc).__qualname__)
                    self._span.record_exception(exc)
                self._span.set_status(Status(StatusCode.ERROR))
        finally:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._span.end()

    def traceparent(self) -> str | None:
        context = self._span.get_span_context()
        if not context.is_valid:
            return None
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    def finished(self, outcome: str, error_code: str | None, status: str) -> None:
        attributes = {OUTCOME: outcome, RECORD_STATUS: status}  # one call: one lock, one check
        if error_code:
            attributes[ERROR_CODE] = error_code
        if outcome in _FAILED_OUTCOMES:
            attributes[error_attributes.ERROR_TYPE] = error_code or outcome
            self._span.set_status(Status(StatusCode.ERROR))
        self._span.set_attributes(attributes)

    def replied(self, http_status: int) -> None:
        if http_status < 400:
            self._span.set_attribute(http_attributes.HTTP_RESPONSE_STATUS_CODE, http_status)
            return
        self._span.set_attributes(
            {
                http_attributes.HTTP_RESPONSE_STATUS_CODE: http_status,
                error_attributes.ERROR_TYPE: str(http_status),
            }
        )
        self._span.set_status(Status(StatusCode.ERROR))

    def failed(self, error_type: str) -> None:
        self._span.set_attribute(error_attributes.ERROR_TYPE, error_type)
        self._span.set_status(Status(StatusCode.ERROR))


class _DatabaseBatch(tracing.Span):
    """A database batch, made a span only once it has handled rows or failed: the loops poll,
    and an idle daemon's empty claims every few seconds would be noise, not traces. The span
    is made after the fact with the batch's own start and end times; it has no children."""

    __slots__ = ("_attributes", "_name", "_root", "_rows", "_started_ns", "_tracer")

    def __init__(
        self,
        tracer: trace.Tracer,
        name: str,
        attributes: dict[str, str | int],
        root: otel_context.Context,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._attributes = attributes
        self._root = root
        self._rows = 0
        self._started_ns = 0

    def __enter__(self) -> Self:
        self._started_ns = time.time_ns()
        return self

    def end(self, exc: BaseException | None) -> None:
        if not self._rows and exc is None:
            return
        span = self._tracer.start_span(
            self._name,
            context=self._root,  # its own trace: a batch serves many records
            kind=SpanKind.CLIENT,
            attributes={
                **self._attributes,
                db_attributes.DB_OPERATION_NAME: self._name,
                db_attributes.DB_QUERY_SUMMARY: self._name,
            },
            start_time=self._started_ns,
        )
        if self._rows > 1:  # the conventions: a batch size only for more than one row
            span.set_attribute(db_attributes.DB_OPERATION_BATCH_SIZE, self._rows)
        if exc is not None:
            span.set_attribute(error_attributes.ERROR_TYPE, type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def rows(self, count: int) -> None:
        self._rows = count


class OtelTracing(tracing.Tracing):
    """Spans through an OpenTelemetry SDK ``provider`` (see the module docstring)."""

    enabled = True

    def __init__(
        self, provider: TracerProvider, *, database: tuple[str | None, str | None, int | None]
    ) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("outbox_notifier", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._root = otel_context.Context()
        name, host, port = database
        self._db_attributes: dict[str, str | int] = {
            db_attributes.DB_SYSTEM_NAME: db_attributes.DbSystemNameValues.POSTGRESQL.value
        }
        if name:
            self._db_attributes[db_attributes.DB_NAMESPACE] = name
        if host and not host.startswith("/"):  # a Unix socket's directory is no address
            self._db_attributes[server_attributes.SERVER_ADDRESS] = host
            self._db_attributes[server_attributes.SERVER_PORT] = port or 5432

    @classmethod
    def from_settings(cls, settings: Settings) -> OtelTracing:
        """The SDK as the ``OTEL_*`` variables configure it, for the daemon of ``settings``."""
        # service.name defaults to the daemon's name; OTEL_SERVICE_NAME and
        # OTEL_RESOURCE_ATTRIBUTES, read by the detector, win over it.
        resource = Resource.create(
            {
                service_attributes.SERVICE_NAME: SERVICE_NAME,
                service_attributes.SERVICE_VERSION: __version__,
            }
        ).merge(OTELResourceDetector().detect())
        provider = TracerProvider(resource=_HashedResource(resource), shutdown_on_exit=False)
        exporter = _exporter(os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower())
        if exporter is not None:
            # Spans are exported off the event loop, in batches, by the processor's thread: a
            # slow or absent collector costs the pipeline nothing but the spans it drops when
            # its queue (OTEL_BSP_MAX_QUEUE_SIZE) is full.
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, database=database_target(settings.dsn))

    def process(self, record: tracing.Attempt) -> tracing.Span:
        record_id, channel, traceparent = record.id, record.channel, record.traceparent
        parent = self._root
        links: list[trace.Link] = []
        if traceparent:
            carrier = {"traceparent": traceparent}
            if record.tracestate:
                carrier["tracestate"] = record.tracestate
            extracted = self._propagator.extract(carrier)
            created = trace.get_current_span(extracted).get_span_context()
            if created.is_valid:
                parent = extracted
                links.append(trace.Link(created))
            else:
                logger.warning(
                    "record's trace context ignored: not a W3C traceparent",
                    extra={"record_id": record_id},
                )
        # The conventions' sampling-relevant attributes go to the sampler at the start; the
        # rest are set once, and only on a span that records (a start attribute is checked
        # twice by the SDK: for the sampler and for the span).
        span = self._tracer.start_span(
            f"process {channel}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                MESSAGING_SYSTEM: SYSTEM,
                MESSAGING_OPERATION_TYPE: "process",
                MESSAGING_OPERATION_NAME: "process",
                MESSAGING_DESTINATION_NAME: channel,
            },
        )
        if span.is_recording():
            span.set_attributes(
                {
                    MESSAGING_MESSAGE_ID: str(record_id),
                    RECORD_ID: record_id,
                    ATTEMPT: record.attempt_count,
                    PROVIDER: record.provider,
                }
            )
        return _Span(span)

    def http_call(self, url: httpx.URL, path_prefix: str) -> tracing.Span:
        port = url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme)
        attributes: dict[str, str | int] = {
            http_attributes.HTTP_REQUEST_METHOD: "POST",
            server_attributes.SERVER_ADDRESS: url.host,
            url_attributes.URL_FULL: _shown_url(url, path_prefix),
        }
        if port is not None:
            attributes[server_attributes.SERVER_PORT] = port
        # A child of the current span: the attempt's process span (the call runs in its task).
        span = self._tracer.start_span("POST", kind=SpanKind.CLIENT, attributes=attributes)
        return _Span(span)

    def database(self, query_name: str) -> tracing.Span:
        return _DatabaseBatch(self._tracer, query_name, self._db_attributes, self._root)

    def log_ids(self) -> tuple[str, str] | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"

    def shutdown(self) -> None:
        self.provider.shutdown()


def _exporter(name: str) -> SpanExporter | None:
    """The exporter ``OTEL_TRACES_EXPORTER`` names (the settings checked the name)."""
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    return OTLPSpanExporter()
