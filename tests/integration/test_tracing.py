"""Tracing end to end: a producer's span, the daemon's spans exported over OTLP/HTTP to a real
receiver (tests/otlp_receiver.py decodes the protobuf), exemplars on /metrics, log lines.

One scenario runs the daemon once and several tests read what it produced: a producer with a
span open enqueues a notification to a Feishu bot (token in the path, signing secret) that
fails once; a producer without one enqueues a notification to a DingTalk robot (token in the
query, signing secret) that fails once. Both are retried and sent.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from outbox_notifier import tracing
from outbox_notifier.daemon import Daemon
from outbox_notifier.events import EVENT_TYPE
from outbox_notifier.logs import JsonFormatter
from outbox_notifier.testing.feishu_server import FeishuServer, Reply
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support import add_channel, eventually, payload, records, running, settings_for

pytestmark = pytest.mark.timeout(90)

BOT_TOKEN = "bot-tok-7f3a9c1e5b"
BOT_SECRET = "bot-signing-secret-41d8"
DINGTALK_TOKEN = "dt-tok-0c2e4a6b8d"
DINGTALK_SECRET = "SECdingtalk-signing-5e7f"
SECRETS = (BOT_TOKEN, BOT_SECRET, DINGTALK_TOKEN, DINGTALK_SECRET)
TRACESTATE = "vendor=opaque-value"


def enqueue_traced(
    conn: psycopg.Connection[Any], body: object, traceparent: str | None, tracestate: str | None
) -> int:
    row = conn.execute(
        "SELECT outbox_notifier.enqueue(%s, %s::jsonb, '1', %s, %s)",
        (EVENT_TYPE, msgspec.json.encode(body).decode(), traceparent, tracestate),
    ).fetchone()
    assert row is not None
    return int(row[0])


@dataclass
class Scenario:
    spans: list[ReceivedSpan]
    logs: list[dict[str, Any]]
    openmetrics: str
    producer_trace_id: str
    producer_span_id: str
    bot_record: dict[str, Any]
    dingtalk_record: dict[str, Any]
    server_port: int
    dbname: str

    def process_spans(self, record_id: int) -> list[ReceivedSpan]:
        found = [
            s for s in self.spans
            if s.kind == "CONSUMER" and s.attributes.get("messaging.message.id") == str(record_id)
        ]  # fmt: skip
        return sorted(found, key=lambda s: s.attributes["outbox_notifier.attempt"])

    def calls(self, span: ReceivedSpan) -> list[ReceivedSpan]:
        """The HTTP client spans under ``span``."""
        return [s for s in self.spans if s.parent_span_id == span.span_id and s.kind == "CLIENT"]


@pytest.fixture
async def scenario(
    db: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Scenario]:
    """Runs the scenario of the module docstring once; the checks below read what it left."""
    # The producer: an application traced with the OpenTelemetry SDK, its span open while it
    # enqueues (the README's example).
    producer = TracerProvider().get_tracer("checkout-service")
    carrier: dict[str, str] = {}
    with producer.start_as_current_span("POST /checkout") as span:
        TraceContextTextMapPropagator().inject(carrier)
        context = span.get_span_context()
    traceparent = carrier["traceparent"]

    log_text = io.StringIO()
    handler = logging.StreamHandler(log_text)
    handler.setFormatter(JsonFormatter())  # formats as it is emitted, as the daemon's does
    package_logger = logging.getLogger("outbox_notifier")
    package_logger.addHandler(handler)
    level = package_logger.level
    package_logger.setLevel(logging.DEBUG)
    try:
        async with OtlpReceiver() as receiver, FeishuServer() as srv:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
            monkeypatch.setenv("OTEL_SERVICE_NAME", "notifier-under-test")
            monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
            monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
            add_channel(conn, 1, srv.bot_url(BOT_TOKEN), provider="feishu_bot",
                        auth_kind="bot_secret", secret=BOT_SECRET)  # fmt: skip
            add_channel(conn, 2, srv.dingtalk_url(DINGTALK_TOKEN), provider="dingtalk_bot",
                        auth_kind="bot_secret", secret=DINGTALK_SECRET)  # fmt: skip
            srv.script(BOT_TOKEN, [Reply(status=500)])
            srv.script("/robot/send", [Reply(status=503)])
            enqueue_traced(conn, payload("traced-bot", user_id=1), traceparent, TRACESTATE)
            enqueue_traced(conn, payload("untraced-dingtalk", user_id=2), None, None)

            settings = settings_for(db, tracing=True, retry_base_s=0.2, retry_max_s=0.4)
            daemon = Daemon(settings, registry=CollectorRegistry())
            async with running(daemon):

                def sent() -> bool:
                    return [r["status"] for r in records(conn)] == ["sent", "sent"]

                await eventually(sent, timeout_s=30, what="both records sent")
                async with httpx.AsyncClient() as client:
                    scraped = await client.get(
                        f"http://127.0.0.1:{daemon.http_port}/metrics",
                        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
                    )
            # the daemon has stopped: its exit exported what was still buffered
            assert tracing.active.enabled is False
            bot, dingtalk = records(conn)
            yield Scenario(
                spans=list(receiver.spans),
                logs=[msgspec.json.decode(line) for line in log_text.getvalue().splitlines()],
                openmetrics=scraped.text,
                producer_trace_id=f"{context.trace_id:032x}",
                producer_span_id=f"{context.span_id:016x}",
                bot_record=bot,
                dingtalk_record=dingtalk,
                server_port=srv.port,
                dbname=str(conn.info.dbname),
            )
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)


def check_the_producers_span_is_parent_and_link_of_every_attempt(scenario: Scenario) -> None:
    first, second = scenario.process_spans(scenario.bot_record["id"])
    producer = (scenario.producer_trace_id, scenario.producer_span_id)
    for span in (first, second):
        assert span.name == "process feishu"
        assert (span.trace_id, span.parent_span_id) == producer
        assert span.links == [producer]
        assert span.attributes["messaging.system"] == "outbox_notifier"
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["messaging.destination.name"] == "feishu"
        assert span.attributes["outbox_notifier.record.id"] == scenario.bot_record["id"]
        assert span.attributes["outbox_notifier.provider"] == "feishu_bot"
    assert first.attributes["outbox_notifier.attempt"] == 1
    assert first.attributes["outbox_notifier.outcome"] == "temporary_fail"
    assert first.attributes["outbox_notifier.error_code"] == "provider_5xx"
    assert first.attributes["error.type"] == "provider_5xx"
    assert first.status == "ERROR"
    assert second.attributes["outbox_notifier.attempt"] == 2
    assert second.attributes["outbox_notifier.outcome"] == "success"
    assert "error.type" not in second.attributes
    # the record kept the producer's context, tracestate included
    assert scenario.bot_record["traceparent"].split("-")[1:3] == list(producer)
    assert scenario.bot_record["tracestate"] == TRACESTATE
    assert first.resource["service.name"] == "notifier-under-test"
    assert first.resource["deployment.environment.name"] == "test"


def check_one_http_client_span_per_attempt_with_the_conventional_attributes(
    scenario: Scenario,
) -> None:
    calls = []
    for process in scenario.process_spans(scenario.bot_record["id"]):
        [call] = scenario.calls(process)
        calls.append(call)
        assert call.trace_id == process.trace_id
        assert (call.name, call.kind) == ("POST", "CLIENT")
        assert call.attributes["http.request.method"] == "POST"
        assert call.attributes["server.address"] == "127.0.0.1"
        assert call.attributes["server.port"] == scenario.server_port
        assert call.attributes["url.full"] == (
            f"http://127.0.0.1:{scenario.server_port}/open-apis/bot/v2/hook/REDACTED"
        )
    failed, ok = calls
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes["error.type"] == "500"
    assert failed.status == "ERROR"
    assert ok.attributes["http.response.status_code"] == 200
    assert "error.type" not in ok.attributes


def check_a_retried_records_attempts_are_one_trace_without_a_producer_context(
    scenario: Scenario,
) -> None:
    first, second = scenario.process_spans(scenario.dingtalk_record["id"])
    # no producer context: the first attempt is the root, and the retry its child and link
    assert first.parent_span_id == "" and first.links == []
    assert second.trace_id == first.trace_id
    assert second.parent_span_id == first.span_id
    assert second.links == [(first.trace_id, first.span_id)]
    kept, flags = scenario.dingtalk_record["traceparent"].rsplit("-", 1)
    assert kept == f"00-{first.trace_id}-{first.span_id}"
    assert int(flags, 16) & 1  # sampled
    [call] = scenario.calls(first)
    # the query's values (the robot's token, the signature) are redacted, their names kept
    assert call.attributes["url.full"] == (
        f"http://127.0.0.1:{scenario.server_port}/robot/send"
        "?access_token=REDACTED&timestamp=REDACTED&sign=REDACTED"
    )
    assert call.attributes["error.type"] == "503"


def check_database_batches_have_spans_with_the_database_attributes(
    scenario: Scenario,
) -> None:
    by_name: dict[str, list[ReceivedSpan]] = {}
    for span in scenario.spans:
        if "db.system.name" in span.attributes:
            by_name.setdefault(span.name, []).append(span)
    assert {"relay_outbox", "claim_records", "apply_results"} <= set(by_name)
    for name, spans in by_name.items():
        for span in spans:
            assert span.kind == "CLIENT"
            assert span.parent_span_id == ""  # a batch serves many records: its own trace
            assert span.attributes["db.system.name"] == "postgresql"
            assert span.attributes["db.operation.name"] == name
            assert span.attributes["db.query.summary"] == name
            assert span.attributes["db.namespace"] == scenario.dbname
    [relay] = by_name["relay_outbox"]
    assert relay.attributes["db.operation.batch.size"] == 2


def check_no_secret_token_or_robot_url_in_any_attribute_or_log_line(
    scenario: Scenario,
) -> None:
    assert scenario.spans and scenario.logs
    robot_urls = re.compile(r"/hook/bot-|access_token=dt-|SEC\w")
    texts = [text for span in scenario.spans for text in span.strings()]
    texts += [msgspec.json.encode(line).decode() for line in scenario.logs]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
        assert not robot_urls.search(text), text


def check_log_lines_carry_the_trace_and_span_of_the_attempt(scenario: Scenario) -> None:
    spans = {(s.trace_id, s.span_id) for s in scenario.spans}
    # the lines about each attempt's result ("record failed: provider_5xx", "record sent: ok")
    applied = [line for line in scenario.logs if line["msg"].startswith("record ")]
    assert applied
    for line in applied:
        assert (line["trace_id"], line["span_id"]) in spans, line
    bot_lines = [line for line in applied if line["record_id"] == scenario.bot_record["id"]]
    assert {line["trace_id"] for line in bot_lines} == {scenario.producer_trace_id}
    # the payload's own trace id is kept beside the span's
    assert {line["payload_trace_id"] for line in bot_lines} == {"trace-traced-bot"}


def check_exemplars_on_openmetrics_reference_exported_traces(scenario: Scenario) -> None:
    exemplars = re.findall(
        r"^outbox_notifier_provider_call_duration_seconds_bucket\{.*\} \S+ # "
        r'\{span_id="([0-9a-f]{16})",trace_id="([0-9a-f]{32})"\}',
        scenario.openmetrics,
        re.MULTILINE,
    )
    assert exemplars, scenario.openmetrics
    exported = {(s.trace_id, s.span_id) for s in scenario.spans}
    for span_id, trace_id in exemplars:
        assert (trace_id, span_id) in exported
    assert scenario.producer_trace_id in {trace_id for _, trace_id in exemplars}


async def test_one_traced_run_of_the_daemon(scenario: Scenario) -> None:
    # One daemon run, read by every check (each names what it shows).
    check_the_producers_span_is_parent_and_link_of_every_attempt(scenario)
    check_one_http_client_span_per_attempt_with_the_conventional_attributes(scenario)
    check_a_retried_records_attempts_are_one_trace_without_a_producer_context(scenario)
    check_database_batches_have_spans_with_the_database_attributes(scenario)
    check_no_secret_token_or_robot_url_in_any_attribute_or_log_line(scenario)
    check_log_lines_carry_the_trace_and_span_of_the_attempt(scenario)
    check_exemplars_on_openmetrics_reference_exported_traces(scenario)
