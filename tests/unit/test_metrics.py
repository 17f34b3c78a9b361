"""Metrics fed with the pipeline's own objects, each test on a fresh registry."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from outbox_notifier.http import HeartbeatMonitor
from outbox_notifier.metrics import Metrics
from outbox_notifier.names import PROVIDER_NAMES, RecordStatus
from outbox_notifier.providers import default_providers
from outbox_notifier.relay import RelayReport
from outbox_notifier.settings import Settings
from outbox_notifier.store import AppliedRecord, AttemptResult, RescuedRecord

P = "outbox_notifier_"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(P + name, labels)


def result(
    record_id: int,
    outcome: Any,  # any string: the metrics bound unknown values themselves
    status: RecordStatus,
    error_code: Any = None,
    *,
    duration_ms: float = 120.0,
    called: bool = True,
) -> AttemptResult:
    return AttemptResult(
        record_id=record_id,
        lease_token=record_id * 10,
        attempt=1,
        provider="feishu_flow",
        status=status,
        outcome=outcome,
        error_code=error_code,
        error=None if error_code is None else "boom",
        delay_s=300.0 if status == "failed" else None,
        provider_message_id=None,
        request_json=msgspec.Raw(b'{"user_id": 42}') if called else None,
        response_json=None,
        http_status=200 if called else None,
        started_at=datetime(2026, 11, 29, tzinfo=UTC),
        duration_ms=duration_ms,
    )


def test_known_series_exist_at_zero_from_the_start(registry: CollectorRegistry) -> None:
    Metrics(registry)
    for outcome in ("success", "temporary_fail", "permanent_fail", "skipped"):
        assert (
            value(
                registry,
                "delivery_attempts_total",
                channel="feishu",
                provider="feishu_flow",
                outcome=outcome,
            )
            == 0
        )
    for code in (
        "provider_timeout",
        "recipient_missing",
        "sending_lease_expired",
        "destination_forbidden",
    ):
        assert (
            value(
                registry,
                "provider_errors_total",
                channel="feishu",
                provider="feishu_flow",
                error_code=code,
            )
            == 0
        )
    for reason_class in ("unknown_type", "unsupported_version", "malformed", "invalid"):
        assert value(registry, "outbox_rejected_total", reason_class=reason_class) == 0
    for status in ("pending", "sending", "failed"):
        assert value(registry, "records", channel="feishu", status=status) == 0
    assert value(registry, "records_dead_total", channel="feishu") == 0
    assert value(registry, "leases_expired_total", channel="feishu") == 0
    assert value(registry, "database_errors_total", loop="relay") == 0
    assert (
        value(
            registry, "end_to_end_latency_seconds_count", channel="feishu", provider="feishu_flow"
        )
        == 0
    )
    assert value(registry, "claim_duration_seconds_count", loop="delivery") == 0
    assert value(registry, "late_results_total") == 0
    assert value(registry, "listener_reconnects_total") == 0
    assert value(registry, "outbox_pending") == 0
    assert value(registry, "paused_targets") == 0


def test_build_info_names_the_version(registry: CollectorRegistry) -> None:
    Metrics(registry)
    [family] = [m for m in registry.collect() if m.name == P + "build"]
    [sample] = family.samples
    assert sample.name == P + "build_info"
    assert sample.value == 1
    assert set(sample.labels) == {"version", "python"}


def test_observe_relay(metrics: Metrics, registry: CollectorRegistry) -> None:
    report = RelayReport(
        claimed=10,
        created=5,
        deduplicated=2,
        fallback_used=3,
        rejected={"malformed": 2, "unknown_type": 1},
    )
    metrics.observe_relay(report)
    metrics.observe_relay(RelayReport(1, 1, 0, 0, {"surprise": 4}))

    assert value(registry, "outbox_relayed_total") == 8
    assert value(registry, "dedupe_hits_total") == 2
    assert value(registry, "fallback_used_total") == 3
    assert value(registry, "outbox_rejected_total", reason_class="malformed") == 2
    assert value(registry, "outbox_rejected_total", reason_class="unknown_type") == 1
    assert value(registry, "outbox_rejected_total", reason_class="invalid") == 0
    assert value(registry, "outbox_rejected_total", reason_class="other") == 4


def test_observe_results(metrics: Metrics, registry: CollectorRegistry) -> None:
    results = [
        result(1, "success", "sent", duration_ms=40.0),
        result(2, "success", "sent", duration_ms=80.0),
        result(3, "temporary_fail", "failed", "provider_5xx", duration_ms=2000.0),
        result(4, "temporary_fail", "dead", "provider_timeout", duration_ms=5000.0),
        result(5, "permanent_fail", "dead", "invalid_url", duration_ms=0.0, called=False),
        result(6, "skipped", "skipped", "recipient_missing", duration_ms=0.0, called=False),
        result(7, "success", "sent", duration_ms=30.0),  # late: its lease was taken over
    ]
    applied = [
        AppliedRecord(id=1, channel="feishu", status="sent", latency_s=0.5),
        AppliedRecord(id=2, channel="feishu", status="sent", latency_s=7200.0),
        AppliedRecord(id=3, channel="feishu", status="failed"),
        AppliedRecord(id=4, channel="feishu", status="dead"),
        AppliedRecord(id=5, channel="feishu", status="dead"),
        AppliedRecord(id=6, channel="feishu", status="skipped"),
        AppliedRecord(id=7, channel="feishu", status=None),  # late: logged, not applied
    ]
    metrics.observe_results(results, applied)

    def attempts(outcome: str) -> float | None:
        return value(
            registry,
            "delivery_attempts_total",
            channel="feishu",
            provider="feishu_flow",
            outcome=outcome,
        )

    def errors(code: str) -> float | None:
        return value(
            registry,
            "provider_errors_total",
            channel="feishu",
            provider="feishu_flow",
            error_code=code,
        )

    assert attempts("success") == 3  # the late result was a call too
    assert attempts("temporary_fail") == 2
    assert attempts("permanent_fail") == 1
    assert attempts("skipped") == 1
    assert errors("provider_5xx") == 1
    assert errors("provider_timeout") == 1
    assert errors("invalid_url") == 1
    assert errors("recipient_missing") == 1
    assert errors("network_error") == 0
    assert value(registry, "records_dead_total", channel="feishu") == 2
    assert value(registry, "late_results_total") == 1

    # End-to-end latency: only records that were sent (and applied).
    e2e = "end_to_end_latency_seconds"
    assert value(registry, e2e + "_count", channel="feishu", provider="feishu_flow") == 2
    assert value(registry, e2e + "_sum", channel="feishu", provider="feishu_flow") == 7200.5
    assert value(registry, e2e + "_bucket", channel="feishu", provider="feishu_flow", le="0.5") == 1
    assert (
        value(registry, e2e + "_bucket", channel="feishu", provider="feishu_flow", le="3600.0") == 1
    )
    assert (
        value(registry, e2e + "_bucket", channel="feishu", provider="feishu_flow", le="7200.0") == 2
    )
    assert (
        value(registry, e2e + "_bucket", channel="feishu", provider="feishu_flow", le="0.005") == 0
    )

    # Provider durations: every call that reached a provider, late or not; none for 5 and 6.
    duration = "provider_call_duration_seconds"
    assert value(registry, duration + "_count", channel="feishu", provider="feishu_flow") == 5
    assert value(
        registry, duration + "_sum", channel="feishu", provider="feishu_flow"
    ) == pytest.approx(7.15)
    assert (
        value(registry, duration + "_bucket", channel="feishu", provider="feishu_flow", le="0.05")
        == 2
    )
    assert (
        value(registry, duration + "_bucket", channel="feishu", provider="feishu_flow", le="0.1")
        == 3
    )


def test_unknown_outcomes_and_codes_are_bounded(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_results(
        [result(1, "exploded", "failed", "weird_code_12345")],
        [AppliedRecord(id=1, channel="feishu", status="failed")],
    )
    assert (
        value(
            registry,
            "delivery_attempts_total",
            channel="feishu",
            provider="feishu_flow",
            outcome="other",
        )
        == 1
    )
    assert (
        value(
            registry,
            "provider_errors_total",
            channel="feishu",
            provider="feishu_flow",
            error_code="other",
        )
        == 1
    )


def test_observe_rescued(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_rescued(
        [
            RescuedRecord(1, "feishu", "failed"),
            RescuedRecord(2, "feishu", "dead"),
            RescuedRecord(3, "bot", "failed"),
        ]
    )
    assert value(registry, "leases_expired_total", channel="feishu") == 2
    assert value(registry, "leases_expired_total", channel="bot") == 1
    assert value(registry, "records_dead_total", channel="feishu") == 1


def test_loop_counters_and_claim_durations(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_claim("delivery", 0.003)
    with metrics.claim_timer("relay"):
        pass
    with pytest.raises(RuntimeError), metrics.claim_timer("relay"):
        raise RuntimeError("not timed")
    metrics.database_error("relay")
    metrics.database_error("relay")
    metrics.listener_reconnected()

    assert value(registry, "claim_duration_seconds_count", loop="delivery") == 1
    assert value(registry, "claim_duration_seconds_bucket", loop="delivery", le="0.005") == 1
    assert value(registry, "claim_duration_seconds_count", loop="relay") == 1
    assert value(registry, "database_errors_total", loop="relay") == 2
    assert value(registry, "listener_reconnects_total") == 1


def test_track_reads_process_state_at_scrape_time(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    state: dict[str, Any] = {"up": False, "in_flight": 3}

    def broken() -> int:
        raise AttributeError("not built yet")

    metrics.track(
        listener_up=lambda: state["up"], in_flight=lambda: state["in_flight"], paused_targets=broken
    )
    assert value(registry, "listener_up") == 0
    assert value(registry, "in_flight") == 3
    state.update(up=True, in_flight=7)
    assert value(registry, "listener_up") == 1
    assert value(registry, "in_flight") == 7
    paused = value(registry, "paused_targets")
    assert paused is not None
    assert math.isnan(paused)


def test_apply_snapshot_sets_and_resets_gauges(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.apply_snapshot(
        [
            ("records", "feishu", "pending", 4, 12.5),
            ("records", "feishu", "failed", 2, 30.0),
            ("records", "bot", "sending", 3, None),
            ("outbox", None, None, 9, 61.0),
        ]
    )
    assert value(registry, "records", channel="feishu", status="pending") == 4
    assert value(registry, "records", channel="feishu", status="failed") == 2
    assert value(registry, "records", channel="feishu", status="sending") == 0
    assert value(registry, "records", channel="bot", status="sending") == 3
    assert value(registry, "oldest_due_record_age_seconds", channel="feishu") == 30.0
    assert value(registry, "oldest_due_record_age_seconds", channel="bot") == 0
    assert value(registry, "outbox_pending") == 9
    assert value(registry, "outbox_oldest_pending_age_seconds") == 61.0
    stamp = value(registry, "snapshot_timestamp_seconds")
    assert stamp is not None
    assert stamp > 0

    # The backlog drained: every series goes back to zero rather than keeping stale values.
    metrics.apply_snapshot([("outbox", None, None, 0, None)])
    assert value(registry, "records", channel="feishu", status="pending") == 0
    assert value(registry, "records", channel="bot", status="sending") == 0
    assert value(registry, "oldest_due_record_age_seconds", channel="feishu") == 0
    assert value(registry, "outbox_pending") == 0
    assert value(registry, "outbox_oldest_pending_age_seconds") == 0


def test_labels_never_carry_user_data(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_relay(RelayReport(3, 2, 1, 1, {"invalid": 1}))
    metrics.observe_results(
        [result(1, "success", "sent"), result(2, "temporary_fail", "failed", "network_error")],
        [
            AppliedRecord(id=1, channel="feishu", status="sent", latency_s=1.0),
            AppliedRecord(id=2, channel="feishu", status=None),
        ],
    )
    metrics.observe_rescued([RescuedRecord(3, "feishu", "dead")])
    allowed = {
        "channel", "provider", "outcome", "error_code", "reason_class", "status", "loop", "le",
        "table",  # the tables of the daemon's own schema
        "scope",  # an operator pause's scope: target, recipient, provider
        "kind",  # a message's kind: single or digest
    }  # fmt: skip
    for family in registry.collect():
        assert family.name.startswith(P)
        for sample in family.samples:
            if family.name == P + "build":
                continue
            assert set(sample.labels) <= allowed, sample
            for label_value in sample.labels.values():
                assert "/" not in label_value
                assert "42" not in label_value  # the user id in the request body


def test_counter_and_duration_names_follow_the_conventions(metrics: Metrics) -> None:
    for family in metrics.registry.collect():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            # durations, and the one count: records per message
            assert family.name.endswith("_seconds") or family.name == P + "message_records", (
                family.name
            )


def test_heartbeat_monitor_with_a_clock_we_control() -> None:
    now = [100.0]
    monitor = HeartbeatMonitor(("relay", "delivery"), clock=lambda: now[0])
    assert monitor.healthy(10.0) == (True, {"delivery": 0.0, "relay": 0.0})

    now[0] = 103.0
    monitor.sleeping("delivery", 2.0)  # a wait on purpose, due back at 105
    now[0] = 108.0
    monitor.beat("relay")
    assert monitor.healthy(10.0) == (True, {"delivery": 3.0, "relay": 0.0})

    now[0] = 116.0
    ok, ages = monitor.healthy(10.0)
    assert not ok
    assert ages == {"delivery": 11.0, "relay": 8.0}
    ok, details = monitor.report(10.0)
    assert not ok
    assert details["loops"]["delivery"] == {"ok": False, "age_s": 11.0}
    assert details["loops"]["relay"] == {"ok": True, "age_s": 8.0}

    monitor.forget("delivery")
    assert monitor.healthy(10.0) == (True, {"relay": 8.0})


def test_provider_label_is_bounded_by_the_provider_names(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    bot = msgspec.structs.replace(result(1, "success", "sent"), provider="feishu_bot")
    stray = msgspec.structs.replace(result(2, "success", "sent"), provider="carrier_pigeon")
    metrics.observe_results(
        [bot, stray],
        [
            AppliedRecord(id=1, channel="feishu", status="sent", latency_s=0.2),
            AppliedRecord(id=2, channel="feishu", status="sent"),
        ],
    )
    attempts = "delivery_attempts_total"
    assert (
        value(registry, attempts, channel="feishu", provider="feishu_bot", outcome="success") == 1
    )
    assert value(registry, attempts, channel="feishu", provider="other", outcome="success") == 1
    for provider in PROVIDER_NAMES:  # every known provider's series exists from the start
        assert (
            value(registry, attempts, channel="feishu", provider=provider, outcome="skipped") == 0
        )
    e2e = "end_to_end_latency_seconds_count"
    assert value(registry, e2e, channel="feishu", provider="feishu_bot") == 1


def test_default_providers_are_the_provider_names() -> None:
    settings = Settings(dsn="dbname=x")
    transport = httpx.AsyncHTTPTransport()
    assert set(default_providers(settings, transport)) == set(PROVIDER_NAMES)


def test_operator_pauses_come_from_the_snapshot(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    for scope in ("target", "recipient", "provider"):
        assert value(registry, "operator_pauses", scope=scope) == 0
    metrics.apply_snapshot(
        [
            ("operator_pauses", "target", None, 2, 4000.0),
            ("operator_pauses", "provider", None, 1, 30.0),
            ("operator_pauses_ended", None, None, 1, None),
            ("operator_paused_records", None, None, 500, None),
        ]
    )
    assert value(registry, "operator_pauses", scope="target") == 2
    assert value(registry, "operator_pauses", scope="recipient") == 0
    assert value(registry, "operator_pause_oldest_age_seconds") == 4000.0
    assert value(registry, "operator_pauses_ended") == 1
    assert value(registry, "operator_paused_records") == 500
    metrics.apply_snapshot([])  # every pause resumed: back to zero, not left stale
    assert value(registry, "operator_pauses", scope="target") == 0
    assert value(registry, "operator_paused_records") == 0
