"""The payload's fields are spelled out in several places (the event struct, the result's JSON
recordset, the claim query's columns; the relay's recordset is rendered from NewRecord).
Each list is checked against the one it must follow, so adding a field fails here until every
list has it: a recordset column that no struct field fills would silently be NULL, and a claim
column out of order would land in the wrong ``ClaimedRecord`` field."""

from __future__ import annotations

import re

import msgspec
import pytest

from outbox_notifier import sqlfiles
from outbox_notifier.events import FeishuNotificationRequested
from outbox_notifier.store import RELAY_OUTBOX, AttemptResult, ClaimedRecord, NewRecord
from outbox_notifier.store import recordset_columns as recordset_definition

EVENT_FIELDS = set(FeishuNotificationRequested.__struct_fields__)
# What a record adds to (and drops from) the event when the relay creates it.
RELAY_ADDS = {"outbox_id", "fallback_used", "outbox_created_at"}
RELAY_DROPS = {"notification_id"}  # the record's own id takes its place
# Not payload fields: the producer hands them to enqueue beside the payload (migration 0012).
TRACE_CONTEXT = ["traceparent", "tracestate"]


def recordset_columns(query_name: str, parameter: str, text: str | None = None) -> list[str]:
    """The columns of ``jsonb_to_recordset(%(<parameter>)s::jsonb) AS t(...)`` in a query (its
    text as shipped, or as rendered), or of ``jsonb_to_recordset(p_<parameter>)`` in a
    function's migration."""
    text = sqlfiles.query(query_name) if text is None else text.replace('"', "")
    match = re.search(
        r"jsonb_to_recordset\((?:%\(" + parameter + r"\)s::jsonb|p_" + parameter + r")\)"
        r" AS \w+\((.*?)\)\s*\)",
        text,
        re.DOTALL,
    )
    assert match, f"no recordset for {parameter} in {query_name}"
    return [column.split()[0] for column in match.group(1).split(",")]


def function_columns(function: str) -> list[str]:
    """The ``RETURNS TABLE (...)`` columns of a schema function, from its migration."""
    for migration in sqlfiles.migrations():
        match = re.search(
            r"CREATE FUNCTION outbox_notifier\."
            + function
            + r"\(.*?RETURNS TABLE \((.*?)\)\s*LANGUAGE",
            migration.sql,
            re.DOTALL,
        )
        if match:
            return [column.split()[0] for column in match.group(1).split(",")]
    raise AssertionError(f"{function} not found in the migrations")


def test_a_new_record_is_the_event_with_what_the_relay_adds() -> None:
    assert set(NewRecord.__struct_fields__) == (EVENT_FIELDS - RELAY_DROPS) | RELAY_ADDS


def test_the_relay_statement_reads_and_inserts_every_new_record_field() -> None:
    # rendered from NewRecord at import (store.RELAY_OUTBOX): check what is sent, not the source
    rendered = RELAY_OUTBOX.as_string(None)
    fields = list(NewRecord.__struct_fields__)
    assert recordset_columns("relay_outbox", "records", rendered) == fields
    inserted = re.search(
        r"notification_records \((.*?)\)\s*SELECT (.*?)\s*FROM input", rendered, re.DOTALL
    )
    assert inserted, rendered
    columns, values = (
        [c.strip().strip('"') for c in part.split(",")] for part in inserted.groups()
    )
    # the producer's trace context comes from the outbox row itself, never through the daemon
    assert columns == ["channel", "max_attempts", *fields, *TRACE_CONTEXT]
    assert values == ["%(channel)s", "%(max_attempts)s", *fields, "o.traceparent", "o.tracestate"]


def test_a_field_without_a_postgres_type_is_refused_when_the_statement_is_built() -> None:
    class Odd(msgspec.Struct):
        when: float

    with pytest.raises(TypeError, match=r"Odd\.when"):
        recordset_definition(Odd)


def test_the_result_recordset_reads_only_result_fields() -> None:
    # AttemptResult may carry more (the provider label is for the metrics), never less.
    # the statement hands the batch to apply_results_v2 (0020), whose recordset reads it
    assert "outbox_notifier.apply_results_v2(\n    %(results)s::jsonb" in sqlfiles.query(
        "apply_results"
    )
    function = next(m.sql for m in sqlfiles.migrations() if m.name == "0020_apply_request_as_json")
    columns = recordset_columns("apply_results", "results", function)
    assert set(columns) <= set(AttemptResult.__struct_fields__), set(columns) - set(
        AttemptResult.__struct_fields__
    )
    # and every field it carries that the statement does not read is on purpose
    assert set(AttemptResult.__struct_fields__) - set(columns) == {"provider"}


def claim_columns() -> list[str]:
    """The columns ``claim_records`` selects from the claim function, in order."""
    lines = sqlfiles.query("claim_records").splitlines()
    text = "\n".join(line for line in lines if not line.startswith("--"))
    match = re.search(r"SELECT (.*?)\s+FROM outbox_notifier\.claim_due_v\d+\(", text, re.DOTALL)
    assert match, "no column list in claim_records"
    return [column.strip().removeprefix("c.") for column in match.group(1).split(",")]


def test_claimed_records_follow_the_claim_queries_columns_in_order() -> None:
    # ClaimedRecord(*row): the order is the contract. One name differs on purpose.
    renamed = {"enabled": "recipient_enabled"}
    columns = claim_columns()
    # the traced claim appends the trace context (claim_records_traced); it has defaults
    assert [*(renamed.get(c, c) for c in columns), *TRACE_CONTEXT] == list(
        ClaimedRecord.__struct_fields__
    )
    # and the claim function returns each of them
    assert set(columns) <= set(function_columns("claim_due_v1"))
    assert function_columns("trace_contexts_v1") == ["id", *TRACE_CONTEXT]
    traced = sqlfiles.query("claim_records_traced")
    assert "SELECT claimed.*, t.traceparent, t.tracestate" in traced
    # the traced claim selects the same columns from the same function as claim_records
    assert ", ".join(f"c.{c}" for c in columns) in " ".join(traced.split())


def test_a_claimed_record_carries_every_event_field_a_delivery_needs() -> None:
    # the producer's requested_at stays on the record; a delivery does not need it, nor the
    # ordering key, which the claim alone reads
    needed = EVENT_FIELDS - RELAY_DROPS - {"requested_at", "ordering_key"}
    assert needed <= set(ClaimedRecord.__struct_fields__), needed - set(
        ClaimedRecord.__struct_fields__
    )


def test_the_structs_encode_their_fields_by_name() -> None:
    # the recordsets match JSON keys to columns by name: no rename on the structs
    for struct in (NewRecord, AttemptResult):
        assert msgspec.structs.fields(struct)
        assert all(f.encode_name == f.name for f in msgspec.structs.fields(struct))
