"""Scenario 5: bad input of every kind.

* Property-based: arbitrary JSON, wrong types, huge strings, NUL and invalid escapes, deep
  nesting and arbitrary event types go through ``enqueue`` and the in-process relay. Postgres
  refuses what jsonb cannot hold (NUL, lone surrogates) at ``enqueue`` with a clear error and
  nothing written; every row it accepts ends ``relayed`` (exactly as the contract decodes it)
  or ``rejected`` with a reason, and the relay never raises.
* Hostile provider responses against a running daemon: enormous bodies, invalid JSON, wrong
  content types, binary and NUL bytes, Feishu error codes, trickled answers longer than the
  timeout. Records settle, memory stays bounded and the daemon stays healthy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from outbox_notifier import events
from outbox_notifier.store import RecordStore
from outbox_notifier.testing.feishu_server import FeishuServer, Recorded, Reply
from tests.faults import harness
from tests.support import relay_for

pytestmark = pytest.mark.faults

# -- property-based: enqueue and the relay ------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = list(harness.event_payload("k", 1, 1))
_HUGE = st.sampled_from([257, 513, 2049, 10_001]).map(lambda n: "x" * n)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> str:
    """A valid payload with a few fields replaced, removed, or made huge / hostile."""
    n = draw(st.integers(min_value=0, max_value=10**6))
    body: dict[str, Any] = harness.event_payload(
        f"prop-{n}-{draw(st.text(max_size=6))}", 1 + n % 5, n
    )
    for field in draw(st.lists(st.sampled_from(_FIELDS), max_size=3, unique=True)):
        action = draw(st.sampled_from(["replace", "remove", "huge", "text"]))
        if action == "remove":
            body.pop(field)
        elif action == "huge":
            body[field] = draw(_HUGE)
        elif action == "text":
            body[field] = draw(st.text(max_size=20))
        else:
            body[field] = draw(json_values)
    return msgspec.json.encode(body).decode()


_clean_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40
)


@st.composite
def valid_payloads(draw: st.DrawFn) -> str:
    """Payloads the contract accepts, with arbitrary Unicode in the free-text fields."""
    n = draw(st.integers(min_value=1, max_value=10**6))
    body = harness.event_payload(f"v-{n}-{draw(_clean_text)}", draw(st.integers(1, 2**63 - 1)), n)
    for name in ("summary_text", "fallback_text", "trace_id", "trigger_id", "target_type"):
        body[name] = draw(_clean_text)
    body["target_url"] = "/" + draw(_clean_text).replace("://", "")
    return msgspec.json.encode(body).decode()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


raw_payloads = st.sampled_from(
    [
        '"\\u0000"',  # NUL: jsonb cannot hold it
        '{"dedupe_key": "a\\u0000b"}',
        '"\\ud800"',  # a lone surrogate escape
        '{"summary_text": "\\udc00 tail"}',
        "[]",
        "null",
        "12345678901234567890123456789012345678901234567890",
        '"just a string"',
        "{}",
        '{"user_id": 1e400}',
        '{"user_id": "1", "dedupe_key": 5}',
    ]
)


def _deep_payload(depth: int, key: str | None = None) -> str:
    body = msgspec.json.encode(harness.event_payload(key or f"deep-{depth}", 1, depth)).decode()
    return body.replace('"fallback_text":""', f'"fallback_text":"","extra":{_nested(depth)}')


# Nesting the relay decodes (64, 500) and nesting Postgres refuses at enqueue (20000); the
# depths in between get a test of their own below.
deep_payloads = st.sampled_from([64, 500, 20000]).map(_deep_payload)
rows = st.tuples(
    st.one_of(*[st.just(events.EVENT_TYPE)] * 4, st.text(max_size=40)),
    st.one_of(*[st.just("1")] * 4, st.sampled_from(["2", "", "1.0"]), st.text(max_size=5)),
    st.one_of(
        valid_payloads(),
        valid_payloads(),
        mutated_payloads(),
        json_values.map(lambda v: msgspec.json.encode(v).decode()),
        raw_payloads,
        deep_payloads,
    ),
)


class RelayHarness:
    """The in-process relay over its own event loop and pool, driven from sync test code."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
        )
        self.loop.run_until_complete(self.pool.open())
        self.relay = relay_for(RecordStore(self.pool), relay_batch_size=50)
        self.passes = 0

    def drain(self) -> None:
        while True:
            passed = self.loop.run_until_complete(self.relay.relay_once())  # never raises
            self.passes += 1
            if passed.claimed == 0:
                return

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()


@pytest.fixture
def relay_harness(db: str) -> Iterator[RelayHarness]:
    relay = RelayHarness(db)
    try:
        yield relay
    finally:
        relay.close()


TOTALS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _property_figures(
    record_testsuite_property: Callable[[str, object], None],
) -> Iterator[None]:
    """Reports what the property run covered once this module is done, whatever the order in
    which its tests ran (a report, not a test: it cannot fail)."""
    yield
    if TOTALS:
        line = "[faults:bad_input_property] " + " ".join(
            f"{k}={v}" for k, v in sorted(TOTALS.items())
        )
        print("\n" + line)
        record_testsuite_property("faults_bad_input_property", line)


def _count(name: str, n: int = 1) -> None:
    TOTALS[name] = TOTALS.get(name, 0) + n


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)  # fmt: skip
@given(batch=st.lists(rows, min_size=1, max_size=6))
def test_every_enqueued_row_is_relayed_or_rejected_with_a_reason(
    db: str, relay_harness: RelayHarness, batch: list[tuple[str, str, str]]
) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        written: list[tuple[int, str, str, str]] = []
        for event_type, version, payload in batch:
            before = conn.execute("SELECT count(*) FROM outbox_notifier.outbox").fetchone()
            try:
                with conn.transaction():
                    row = conn.execute(
                        "SELECT outbox_notifier.enqueue(%s, %s::jsonb, %s)",
                        (event_type, payload, version),
                    ).fetchone()
            except psycopg.DataError as exc:
                # Refused at the door: a clear reason, nothing written.
                text = str(exc)
                assert any(
                    hint in text
                    for hint in ("NUL", "Unicode", "unicode", "invalid input syntax for type json")
                ), text
                after = conn.execute("SELECT count(*) FROM outbox_notifier.outbox").fetchone()
                assert after == before
                _count("refused_at_enqueue")
                continue
            except (psycopg.errors.StatementTooComplex, psycopg.errors.ProgramLimitExceeded) as exc:
                # nesting beyond what the server parses: refused, nothing written
                assert "depth" in str(exc), str(exc)
                after = conn.execute("SELECT count(*) FROM outbox_notifier.outbox").fetchone()
                assert after == before
                _count("refused_at_enqueue")
                continue
            assert row is not None
            written.append((int(row[0]), event_type, version, payload))
        relay_harness.drain()
        for oid, event_type, version, _payload in written:
            status, error, stored = conn.execute(
                "SELECT status, error, payload::text FROM outbox_notifier.outbox WHERE id = %s",
                (oid,),
            ).fetchone() or (None, None, None)
            try:
                event = events.decode_event(event_type, version, stored.encode())
            except events.EventRejected:
                event = None
            if status == "rejected":
                assert error, f"outbox {oid} rejected without a reason"
                assert len(error) < 5000, "a reason must stay one readable line"
                assert "\n" not in error
                _count("rejected")
                continue
            assert status == "relayed", (oid, status)
            assert event is not None, f"outbox {oid} relayed although the contract rejects it"
            record = conn.execute(
                "SELECT user_id, preview_id, target_url, trace_id, outbox_id"
                " FROM outbox_notifier.notification_records"
                " WHERE channel = 'feishu' AND dedupe_key = %s",
                (event.dedupe_key,),
            ).fetchone()
            assert record is not None
            if record[4] == oid:  # created from this row (not a dedupe hit): fields as decoded
                assert record[:4] == (
                    event.user_id,
                    event.preview_id,
                    event.target_url,
                    event.trace_id,
                )
            _count("relayed")


@pytest.mark.parametrize("depth", [1000, 5000])
def test_a_deeply_nested_payload_is_rejected_and_does_not_block_the_relay(
    db: str, relay_harness: RelayHarness, depth: int
) -> None:
    good = msgspec.json.encode(harness.event_payload("before-deep", 1, 1)).decode()
    later = msgspec.json.encode(harness.event_payload("after-deep", 1, 2)).decode()
    with psycopg.connect(db, autocommit=True) as conn:
        ids = [
            conn.execute(
                "SELECT outbox_notifier.enqueue(%s, %s::jsonb)", (events.EVENT_TYPE, payload)
            ).fetchone()[0]  # type: ignore[index]
            for payload in (good, _deep_payload(depth), later)
        ]
        errors = []
        for _ in range(2):  # the relay must get past the row, not retry it forever
            try:
                relay_harness.drain()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        statuses = conn.execute(
            "SELECT id, status, error FROM outbox_notifier.outbox WHERE id = ANY(%s) ORDER BY id",
            (ids,),
        ).fetchall()
    assert not errors, (
        f"relay_once raised on a payload nested {depth} deep ({errors[0]}); the batch rolls"
        f" back, so the row stays pending and blocks every row after it: {statuses}"
    )
    (_, s1, _), (_, s2, reason), (_, s3, _) = statuses
    assert (s1, s2, s3) == ("relayed", "rejected", "relayed"), statuses
    assert reason


# -- hostile provider responses against a running daemon ------------------------------------------

HOSTILE: dict[str, Reply] = {
    "huge": Reply(oversize_bytes=50_000_000),
    "badjson": Reply(body=b'{"code":0,,, "msg":'),
    "html": Reply(body=b"<html><body>oops</body></html>", headers={"Content-Type": "text/html"}),
    "binary": Reply(body=bytes(range(256)) * 4, headers={"Content-Type": "application/x-bin"}),
    "nul": Reply(status=500, body=b'{"code":1,"msg":"a\\u0000b \x00 \xff"}'),
    "codeerr": Reply.feishu_error(9499, "frequency limited... or so it says"),
    "trickle": Reply(trickle_s=3.0),
    "gateway": Reply(
        status=502, body=b"<html>bad gateway</html>", headers={"Content-Type": "text/html"}
    ),
}
# What each target's records end as (http_timeout_s=1, max_attempts=3).
EXPECTED = {
    "huge": ("sent", None),
    "badjson": ("sent", None),
    "html": ("sent", None),
    "binary": ("sent", None),
    "nul": ("dead", "provider_5xx"),
    "codeerr": ("dead", "payload_invalid"),
    "trickle": ("dead", "provider_timeout"),
    "gateway": ("dead", "provider_5xx"),
}
PER_TARGET = 4


def _not_a_delivery(req: Recorded) -> bool:
    """2xx replies that were no delivery: a Feishu error code, or an answer trickled out
    after the client gave up."""
    return req.path.rsplit("/", 1)[-1].startswith(("codeerr", "trickle"))


@pytest.mark.timeout(120)
def test_hostile_provider_responses_settle_and_the_daemon_stays_healthy(
    db: str, server: FeishuServer, record_property: Callable[[str, object], None]
) -> None:
    names = list(HOSTILE)
    users = {i + 1: name for i, name in enumerate(names)}
    harness.add_channels(db, {u: server.flow_url(f"{name}-{u}") for u, name in users.items()})
    for name, reply in HOSTILE.items():
        server.script(name, [], then=reply)
    started = time.monotonic()
    with (
        harness.Fleet(
            db, 1,
            "http_timeout_s=1", "lease_s=3", "max_attempts=3", "retry_base_s=0.2",
            "retry_max_s=0.5", "breaker_cooloff_s=0.5", "delivery_concurrency=8",
        ) as fleet,
        harness.LeaseWatch(db) as watch,
    ):  # fmt: skip
        fleet.wait_ready()
        daemon = fleet.replicas[0]
        rss_before = daemon.peak_rss_bytes()
        with psycopg.connect(db, autocommit=True) as conn:
            for u, name in users.items():
                for i in range(PER_TARGET):
                    body = harness.event_payload(f"{name}-{i}", u, u * 100 + i)
                    payload = msgspec.json.encode(body).decode()
                    conn.execute(
                        "SELECT outbox_notifier.enqueue(%s, %s::jsonb)",
                        (events.EVENT_TYPE, payload),
                    )
            # and malformed rows into the running daemon
            for event_type, payload in [
                (events.EVENT_TYPE, '"not an object"'),
                (events.EVENT_TYPE, '{"user_id": "NaN"}'),
                ("x" * 10_000, "{}"),
                (events.EVENT_TYPE, msgspec.json.encode({"deep": [[[[[[[[1]]]]]]]]}).decode()),
            ]:
                conn.execute("SELECT outbox_notifier.enqueue(%s, %s::jsonb)",
                             (event_type, payload))  # fmt: skip
        settle_s = harness.wait_settled(db, timeout_s=60)
        assert daemon.alive()
        health = daemon.get("/healthz")
        ready = daemon.get("/readyz")
        rss_after = daemon.peak_rss_bytes()
        codes = fleet.stop()
    assert codes == [0], fleet.logs()[-3000:]
    assert health[0] == 200 and ready[0] == 200, (health, ready)
    figures = harness.check_invariants(db, server.requests, failed_replies=_not_a_delivery,
                               lease_watch=watch)  # fmt: skip
    with psycopg.connect(db, autocommit=True) as conn:
        outcomes = conn.execute(
            "SELECT split_part(ch.webhook_url, '/', -1), r.status, r.last_error_code,"
            " octet_length(r.provider_response_json::text)"
            " FROM outbox_notifier.notification_records r"
            " JOIN outbox_notifier.notification_channels ch ON ch.user_id = r.user_id"
        ).fetchall()
    seen: dict[str, set[tuple[str, str | None]]] = {}
    biggest = 0
    for token, status, code, size in outcomes:
        seen.setdefault(token.rsplit("-", 1)[0], set()).add((status, code))
        biggest = max(biggest, size or 0)
    assert seen == {name: {expected} for name, expected in EXPECTED.items()}, seen
    growth_mb = (rss_after - rss_before) / 2**20
    figures.extra.update(
        targets=len(HOSTILE),
        events=len(HOSTILE) * PER_TARGET + 4,
        kills=0,
        oversize_bytes_sent=server.count("/flow/api/trigger-webhook/huge") * 50_000_000,
        largest_stored_response_bytes=biggest,
        peak_rss_mb=round(rss_after / 2**20, 1),
        rss_growth_mb=round(growth_mb, 1),
        settle_s=round(settle_s, 1),
        run_s=round(time.monotonic() - started, 1),
    )
    harness.report("hostile_provider", figures, record_property)
    assert figures.rejected == 4
    assert biggest <= 70_000 * 2  # the cap (65536 bytes), as JSON
    assert growth_mb < 40, f"peak RSS grew {growth_mb:.0f} MB"


# -- huge payloads: the relay is bounded by bytes -----------------------------------------------

HUGE_ROWS = 30
HUGE_PAYLOAD_CHARS = 8 * 1024 * 1024


@pytest.mark.timeout(60)
def test_thirty_payloads_of_8_mb_in_one_transaction_are_rejected_unread(
    db: str, server: FeishuServer, record_property: Callable[[str, object], None]
) -> None:
    """The issue's scenario: 30 rows of 8 MB between small ones, in one transaction. The
    daemon rejects the large ones by their size without reading them (its peak RSS stays under
    150 MiB; the relay claiming them whole took it from 57 to 553 MiB) and delivers the rest."""
    harness.add_channels(db, {1: server.flow_url("user-1")})
    small = [
        msgspec.json.encode(harness.event_payload(f"small-{i}", 1, i)).decode() for i in range(10)
    ]
    started = time.monotonic()
    with harness.Fleet(db, 1) as fleet:
        fleet.wait_ready()
        daemon = fleet.replicas[0]
        rss_ready = daemon.peak_rss_bytes()
        with psycopg.connect(db) as conn, conn.transaction():
            enqueue = "SELECT outbox_notifier.enqueue(%s, %s::jsonb)"
            for body in small[:5]:
                conn.execute(enqueue, (events.EVENT_TYPE, body))
            for i in range(HUGE_ROWS):  # built by the server: nothing that large crosses the wire
                body = msgspec.json.encode(harness.event_payload(f"huge-{i}", 1, 100 + i)).decode()
                conn.execute(
                    "SELECT outbox_notifier.enqueue(%s, jsonb_set(%s::jsonb, '{summary_text}',"
                    " to_jsonb(repeat('x', %s))))",
                    (events.EVENT_TYPE, body, HUGE_PAYLOAD_CHARS),
                )
            for body in small[5:]:
                conn.execute(enqueue, (events.EVENT_TYPE, body))
        settle_s = harness.wait_settled(db, timeout_s=40)
        peak_rss = daemon.peak_rss_bytes()
        codes = fleet.stop()
    assert codes == [0], fleet.logs()[-3000:]
    figures = harness.check_invariants(db, server.requests)
    with psycopg.connect(db, autocommit=True) as conn:
        rejected = conn.execute(
            "SELECT octet_length(payload::text), error FROM outbox_notifier.outbox"
            " WHERE status = 'rejected'"
        ).fetchall()
    figures.extra.update(
        peak_rss_mb=round(peak_rss / 2**20, 1),
        ready_rss_mb=round(rss_ready / 2**20, 1),
        settle_s=round(settle_s, 1),
        run_s=round(time.monotonic() - started, 1),
    )
    harness.report("huge_payloads", figures, record_property)
    assert len(rejected) == HUGE_ROWS
    for size, error in rejected:
        assert size > HUGE_PAYLOAD_CHARS
        assert error == f"payload is {size:,} bytes; max_payload_bytes is 1,048,576"
    assert (figures.relayed, figures.by_status) == (len(small), {"sent": len(small)})
    assert peak_rss < 150 * 2**20, f"peak RSS {peak_rss / 2**20:.0f} MiB"
