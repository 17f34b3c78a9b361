"""Tracing without a database: free when off, the span shapes when on, redaction, and a clear
refusal when the setting is on and the extra is not installed."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from outbox_notifier import metrics, otel_tracing, tracing
from outbox_notifier.settings import Settings, SettingsError

PRODUCER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def traced(
    sampler: ParentBased | None = None,
) -> tuple[otel_tracing.OtelTracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return otel_tracing.OtelTracing(provider, database=("app", "db.internal", None)), exporter


@dataclasses.dataclass(frozen=True)
class Attempt:
    id: int
    attempt_count: int
    channel: str
    provider: str
    traceparent: str | None
    tracestate: str | None = None


def process(tracer: tracing.Tracing, traceparent: str | None) -> tracing.Span:
    return tracer.process(Attempt(42, 3, "feishu", "feishu_bot", traceparent))


# -- off: free ------------------------------------------------------------------------------


def test_off_every_span_is_the_one_shared_no_op() -> None:
    off = tracing.Tracing()
    assert process(off, PRODUCER) is tracing.NOOP
    assert off.http_call(httpx.URL("https://x.example/h"), "/") is tracing.NOOP
    assert off.database("claim_records") is tracing.NOOP
    with tracing.NOOP as span:
        assert span.traceparent() is None
    assert off.log_ids() is None


def test_off_a_delivery_never_imports_opentelemetry() -> None:
    # The daemon's modules, then one attempt through the delivery loop, its provider over a
    # local transport, the metrics and a JSON log line: nothing of OpenTelemetry is loaded.
    code = textwrap.dedent(
        """
        import asyncio, logging, random, sys
        import httpx
        from prometheus_client import CollectorRegistry
        import outbox_notifier.daemon
        from outbox_notifier import tracing
        from outbox_notifier.backoff import RetryPolicy
        from outbox_notifier.completer import ResultCompleter
        from outbox_notifier.delivery import Deliverer
        from outbox_notifier.logs import JsonFormatter
        from outbox_notifier.metrics import Metrics
        from outbox_notifier.providers.feishu_flow import FeishuFlowProvider
        from outbox_notifier.settings import Settings
        from outbox_notifier.store import ClaimedRecord, ClaimPolicy

        tracing.install(Settings())
        async def ok(request):
            return httpx.Response(200, json={"code": 0})
        provider = FeishuFlowProvider(
            httpx.MockTransport(ok), allowed_schemes=("https",), allowed_hosts=("feishu.cn",))
        record = ClaimedRecord(
            user_id=1, trigger_id="t", preview_id="p", trigger_type="tt", target_type="tg",
            target_id=1, dedupe_key="dk", target_url="/x", trace_id="tr", id=7,
            channel="feishu", summary_text="hi", fallback_text="", fallback_used=False,
            attempt_count=1, max_attempts=5, lease_token=99, recipient_enabled=True,
            webhook_url="https://www.feishu.cn/flow/api/trigger-webhook/tok", auth_kind="none",
            auth_secret=None, provider="feishu_flow")
        policy = ClaimPolicy(lease_s=30)
        completer = ResultCompleter(None, policy)
        deliverer = Deliverer(None, {"feishu_flow": provider}, RetryPolicy(), policy,
                              completer, batch_size=1, concurrency=1, rng=random.Random(0))
        asyncio.run(deliverer._deliver(record))
        [result] = [completer._results.get_nowait()]
        assert result.outcome == "success", result
        Metrics(CollectorRegistry()).observe_results([result], [])
        line = logging.LogRecord("x", logging.INFO, "", 0, "m", (), None)
        JsonFormatter().format(line)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
        print(loaded or "none")
        """
    )
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "none"


# -- on: the spans --------------------------------------------------------------------------


def test_a_process_span_is_a_child_and_a_link_of_the_records_context() -> None:
    tracer, exporter = traced()
    with process(tracer, PRODUCER) as span:
        span.finished("temporary_fail", "provider_5xx", "failed")
        kept = span.traceparent()
    [done] = exporter.get_finished_spans()
    assert done.name == "process feishu"
    assert done.parent is not None and done.parent.span_id == 0xB7AD6B7169203331
    assert [link.context.trace_id for link in done.links] == [0x0AF7651916CD43DD8448EB211C80319C]
    assert dict(done.attributes or {}) == {
        "messaging.system": "outbox_notifier",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "feishu",
        "messaging.message.id": "42",
        "outbox_notifier.record.id": 42,
        "outbox_notifier.attempt": 3,
        "outbox_notifier.provider": "feishu_bot",
        "outbox_notifier.outcome": "temporary_fail",
        "outbox_notifier.record.status": "failed",
        "outbox_notifier.error_code": "provider_5xx",
        "error.type": "provider_5xx",
    }
    assert kept is not None and kept.startswith("00-0af7651916cd43dd8448eb211c80319c-")


def test_a_malformed_record_context_starts_a_new_trace_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracer, exporter = traced()
    with caplog.at_level(logging.WARNING), process(tracer, "00-not-a-traceparent-01"):
        pass
    [done] = exporter.get_finished_spans()
    assert done.parent is None and not done.links
    assert [r.getMessage() for r in caplog.records] == [
        "record's trace context ignored: not a W3C traceparent"
    ]


def test_a_producer_that_did_not_sample_is_followed_and_gives_no_exemplar() -> None:
    tracer, exporter = traced(ParentBased(TraceIdRatioBased(1.0)))
    with process(tracer, PRODUCER[:-2] + "00") as span:
        kept = span.traceparent()
    assert exporter.get_finished_spans() == ()
    assert kept is not None and kept.endswith("-00")
    assert metrics._exemplar(kept) is None
    assert metrics._exemplar(PRODUCER) == {
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
    }


def test_the_http_call_is_a_child_of_the_current_span_and_the_log_ids_follow_it() -> None:
    tracer, exporter = traced()
    url = httpx.URL("https://open.feishu.cn/open-apis/bot/v2/hook/tok-secret")
    with process(tracer, None) as attempt, tracer.http_call(url, "/open-apis/bot/v2/hook/") as call:
        call.replied(429)
        log_ids = tracer.log_ids()
    http, outer = exporter.get_finished_spans()
    assert http.parent is not None and http.parent.span_id == outer.context.span_id
    assert log_ids == (f"{http.context.trace_id:032x}", f"{http.context.span_id:016x}")
    assert dict(http.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": "open.feishu.cn",
        "server.port": 443,
        "url.full": "https://open.feishu.cn/open-apis/bot/v2/hook/REDACTED",
        "http.response.status_code": 429,
        "error.type": "429",
    }
    assert attempt.traceparent() is not None
    assert tracer.log_ids() is None  # outside every span again


def test_an_idle_database_batch_makes_no_span_and_a_busy_one_does() -> None:
    tracer, exporter = traced()
    with tracer.database("claim_records") as idle:
        idle.rows(0)
    with tracer.database("apply_results") as busy:
        busy.rows(3)
    with pytest.raises(TimeoutError), tracer.database("relay_outbox"):
        raise TimeoutError
    apply, relay = exporter.get_finished_spans()
    assert dict(apply.attributes or {}) == {
        "db.system.name": "postgresql",
        "db.namespace": "app",
        "server.address": "db.internal",
        "server.port": 5432,
        "db.operation.name": "apply_results",
        "db.query.summary": "apply_results",
        "db.operation.batch.size": 3,
    }
    assert relay.attributes is not None and relay.attributes["error.type"] == "TimeoutError"


@pytest.mark.parametrize(
    ("url", "prefix", "shown"),
    [
        ("https://www.feishu.cn/flow/api/trigger-webhook/abc", "/flow/api/trigger-webhook/",
         "https://www.feishu.cn/flow/api/trigger-webhook/REDACTED"),
        ("https://oapi.dingtalk.com/robot/send?access_token=tok&timestamp=1&sign=s%3D",
         "/robot/send",
         "https://oapi.dingtalk.com/robot/send?access_token=REDACTED&timestamp=REDACTED"
         "&sign=REDACTED"),
        ("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k", "/cgi-bin/webhook/send",
         "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=REDACTED"),
        ("https://hooks.slack.com/services/T0/B0/secret", "/services/",
         "https://hooks.slack.com/services/REDACTED"),
        ("http://user:pw@127.0.0.1:8080/hooks/x?tok#frag", "/",
         "http://127.0.0.1:8080/REDACTED?REDACTED"),
        ("https://elsewhere.example/other", "/flow/", "https://elsewhere.example/REDACTED"),
        ("https://hook.example/", "/", "https://hook.example/"),
    ],
)  # fmt: skip
def test_a_url_attribute_shows_the_host_and_the_public_prefix_only(
    url: str, prefix: str, shown: str
) -> None:
    assert otel_tracing.redacted_url(httpx.URL(url), prefix) == shown


def test_the_ids_of_a_traceparent() -> None:
    assert tracing.ids_of(PRODUCER) == (
        "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True,
    )  # fmt: skip
    assert tracing.ids_of(None) is None
    assert tracing.ids_of("00-short") is None


# -- configuration --------------------------------------------------------------------------


def test_otel_variables_the_daemon_cannot_honour_are_named() -> None:
    assert tracing.environment_problem({}) is None
    assert tracing.environment_problem({"OTEL_TRACES_EXPORTER": "console"}) is None
    assert tracing.environment_problem({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) is None
    assert "OTEL_TRACES_EXPORTER='zipkin'" in (
        tracing.environment_problem({"OTEL_TRACES_EXPORTER": "zipkin"}) or ""
    )
    assert "http/protobuf" in (
        tracing.environment_problem({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) or ""
    )


def test_tracing_with_an_unsupported_protocol_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(SettingsError, match=r"^invalid setting tracing: .*grpc"):
        Settings(tracing=True)
    Settings(tracing=False)  # the variables matter only when tracing is on


# A Python that cannot import OpenTelemetry, as one without the extra installed.
_WITHOUT_EXTRA = textwrap.dedent(
    """
    import importlib.abc, sys
    class NoOtel(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, NoOtel())
    from outbox_notifier.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_without_the_extra_tracing_on_refuses_to_start_with_one_line(command: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_NOTIFIER_")}
    env["OUTBOX_NOTIFIER_TRACING"] = "true"
    ran = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRA, command, "--dsn", "postgresql://db.invalid/x"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.splitlines() == [
        "outbox-notifier: invalid setting tracing (from OUTBOX_NOTIFIER_TRACING): true needs "
        "the otel extra, which is not installed: pip install 'outbox-notifier[otel]'"
    ]
