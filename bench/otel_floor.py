"""What the OpenTelemetry SDK alone spends on the spans of one delivered record.

The daemon makes two spans per delivery attempt: the record's ``process`` span (CONSUMER) and
the provider call's ``POST`` span (CLIENT). This measures the SDK and the OTLP exporter's
encoder on exactly that pair with nothing of the daemon around them and only the attributes the
semantic conventions require (four on the messaging span, five on the HTTP client span), so it
is a floor: no tracing of the daemon's spans can cost less with this SDK. Both run here, in the
bench process, on one thread:

* ``create_us``: starting and ending both spans with a ``TracerProvider`` whose only
  processor hands each ended span to a list, as the ``BatchSpanProcessor`` queues it;
* ``encode_us``: the OTLP/HTTP exporter's own encoder turning them into the protobuf body it
  posts, in the processor's batches of 512 (``encode_spans(...).SerializeToString()``).

Posting the body, the batch processor's thread and its lock come on top in the daemon.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

_BATCH = 512  # the BatchSpanProcessor's default export batch (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)


@dataclass(frozen=True)
class Floor:
    create_us: float  # per record: both spans started and ended
    encode_us: float  # per record: both spans encoded for OTLP

    @property
    def total_us(self) -> float:
        return self.create_us + self.encode_us


class _Kept(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def measure(records: int = 20_000) -> Floor:
    """The SDK's cost per record over ``records`` span pairs (after as many to warm up)."""
    kept = _Kept()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("bench")
    process = {
        "messaging.system": "outbox_notifier",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "feishu",
    }
    call = {
        "http.request.method": "POST",
        "server.address": "open.feishu.cn",
        "server.port": 443,
        "url.full": "https://open.feishu.cn/open-apis/bot/v2/hook/REDACTED",
    }

    def create() -> float:
        kept.spans.clear()
        started = time.perf_counter()
        for _ in range(records):
            span = tracer.start_span("process feishu", kind=SpanKind.CONSUMER, attributes=process)
            child = tracer.start_span("POST", kind=SpanKind.CLIENT, attributes=call)
            child.set_attribute("http.response.status_code", 200)
            child.end()
            span.end()
        return time.perf_counter() - started

    def encode() -> float:
        started = time.perf_counter()
        for first in range(0, len(kept.spans), _BATCH):
            encode_spans(kept.spans[first : first + _BATCH]).SerializeToString()
        return time.perf_counter() - started

    create()
    encode()  # warm
    created = create()
    encoded = encode()
    provider.shutdown()
    return Floor(created / records * 1e6, encoded / records * 1e6)
