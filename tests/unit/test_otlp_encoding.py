"""The daemon's OTLP span encoder against the exporter's own: decoded with opentelemetry-proto's
classes, the two requests are the same message."""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from outbox_notifier import otlp_encoding


def finished_spans() -> list[ReadableSpan]:
    """Spans of every shape: kinds, remote and local parents, links, events, statuses, every
    attribute type (zero values too), two resources and scopes, trace state."""
    exporter = InMemorySpanExporter()
    spans: list[ReadableSpan] = []
    for service in ("a", "b"):
        provider = TracerProvider(
            resource=Resource.create({"service.name": service, "k8s.pod.uid": ""}),
            shutdown_on_exit=False,
        )
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        for scope in ("one", "two"):
            tracer = provider.get_tracer(scope, "1.0" if scope == "one" else None)
            remote = SpanContext(
                trace_id=0x0AF7651916CD43DD8448EB211C80319C,
                span_id=0xB7AD6B7169203331,
                is_remote=True,
                trace_flags=TraceFlags(1),
                trace_state=TraceState([("rojo", "00f067aa0ba902b7"), ("congo", "t61")]),
            )
            parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
            with tracer.start_as_current_span(
                "process feishu",
                context=parent,
                kind=SpanKind.CONSUMER,
                links=[Link(remote, {"why": "creation"})],
                attributes={
                    "s": "text", "empty": "", "i": 42, "zero": 0, "neg": -7, "f": 0.25,
                    "f0": 0.0, "t": True, "no": False, "strs": ["a", ""], "ints": [1, 0],
                    "big": 2**62,
                },
            ) as outer:  # fmt: skip
                outer.add_event("retry", {"attempt": 2}, timestamp=time.time_ns())
                with tracer.start_as_current_span("POST", kind=SpanKind.CLIENT) as inner:
                    inner.set_status(Status(StatusCode.ERROR, "500"))
                outer.set_status(Status(StatusCode.OK))
            tracer.start_span("plain").end()
    spans += exporter.get_finished_spans()
    return spans


def test_the_request_is_the_exporters_own() -> None:
    spans = finished_spans()
    ours = ExportTraceServiceRequest.FromString(otlp_encoding.encode_request(spans))
    assert ours == encode_spans(spans)
    assert len(ours.resource_spans) == 2
    assert [len(r.scope_spans) for r in ours.resource_spans] == [2, 2]


def test_no_spans_is_an_empty_request() -> None:
    assert otlp_encoding.encode_request([]) == b""
    assert ExportTraceServiceRequest.FromString(b"") == encode_spans([])
