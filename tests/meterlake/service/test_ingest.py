"""Ingest: every validation case, all-or-nothing batches, durability before the answer, dedup, toolkit events."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from meterlake.amberflo.api import IngestRecord, RequestError
from meterlake.service.events import (
    check_records,
    content_unique_id,
    decode_ingest_body,
    toolkit_records,
)

from .conftest import NOW_MS, Harness, record, tenant

DAY_MS = 86_400_000
_MISSING = object()


def without(key: str) -> dict[str, Any]:
    item = record()
    del item[key]
    return item


@pytest.mark.parametrize(
    ("item", "field", "reason"),
    [
        (record(meterApiName="nope"), "meterApiName", "is not a meter"),
        (record(meterApiName="api-calls"), "meterApiName", "is a request meter"),
        (record(meterValue="12"), "meterValue", "Expected float, got str"),
        (record(meterValue=True), "meterValue", "Expected float, got bool"),
        (record(meterValue=None), "meterValue", "Expected float, got null"),
        (without("meterValue"), "meterValue", "missing required field meterValue"),
        (without("customerId"), "customerId", "missing required field customerId"),
        (record(customerId=""), "customerId", "must name a customer"),
        (record(customerId="  - "), "customerId", "must name a customer"),
        (record(customerId="c" * 257), "customerId", "at most 256"),
        (record(customerId=7), "customerId", "Expected str, got int"),
        (record(meterTimeInMillis=NOW_MS - 36 * DAY_MS), "meterTimeInMillis", "outside the accepted window"),
        (record(meterTimeInMillis=NOW_MS + 3_600_000), "meterTimeInMillis", "outside the accepted window"),
        (record(meterTimeInMillis=1.5), "meterTimeInMillis", "Expected int, got float"),
        (record(uniqueId=""), "uniqueId", "must be 1-128 characters"),
        (record(uniqueId="u" * 129), "uniqueId", "must be 1-128 characters"),
        (record(dimensions={"model": 4}), "dimensions.model", "Expected str, got int"),
        (record(dimensions=["model"]), "dimensions", "Expected object | null, got array"),
        (record(dimensions={f"d{i}": "v" for i in range(33)}), "dimensions", "at most 32"),
        (record(dimensions={"": "v"}), "dimensions", "must be 1-128 characters"),
        (record(dimensions={"m" * 129: "v"}), "dimensions", "must be 1-128 characters"),
        (record(dimensions={"model": "v" * 1025}), "dimensions.model", "at most 1024"),
        (
            record(dimensions={"aflo.cancel_previous_resource_event": "true"}),
            "dimensions.aflo.cancel_previous_resource_event",
            "cancellation rule",
        ),
        (record(region="eu"), "region", "unknown field region"),
        ("not a record", "(record)", "Expected object, got str"),
    ],
)
def test_every_invalid_record_is_a_400_naming_index_and_field_and_stores_nothing(
    harness: Harness, item: object, field: str, reason: str
) -> None:
    before = harness.stream.stats().spooled_offset
    with pytest.raises(RequestError) as refused:
        harness.ingest([record(uniqueId="good-0"), item, record(uniqueId="good-2")])
    assert refused.value.status == 400
    errors: Any = refused.value.extra["errors"]
    [error] = errors
    assert (error["index"], error["field"]) == (1, field)
    assert reason in error["reason"]
    assert "none was stored" in refused.value.message
    assert harness.stream.stats().spooled_offset == before
    assert harness.committed_rows() == []


def test_a_deprecated_meter_takes_no_new_events(harness: Harness) -> None:
    meter = harness.registry.by_name("llm-tokens")
    assert meter is not None
    harness.registry.update(meter.id, {**meter.fields(), "lockingStatus": "deprecated"})
    with pytest.raises(RequestError, match="deprecated"):
        harness.ingest([record()])


def test_a_number_out_of_range_is_not_json_and_a_400() -> None:
    with pytest.raises(RequestError, match="Number out of range") as refused:
        decode_ingest_body(b'[{"customerId": "a", "meterApiName": "m", "meterValue": 1e400, "meterTimeInMillis": 1}]')
    assert refused.value.status == 400


def test_partial_stores_the_valid_records_and_lists_the_others(harness: Harness) -> None:
    outcome = harness.ingest(
        [record(uniqueId="a"), record(meterApiName="nope"), record(uniqueId="c"), record(meterValue="x")],
        partial=True,
    )
    assert outcome.ingested == 2
    assert [(e.index, e.field) for e in outcome.rejected] == [(1, "meterApiName"), (3, "meterValue")]
    assert [row["unique_id"] for row in harness.committed_rows()] == ["a", "c"]


def test_accepted_records_are_durable_when_ingest_returns(harness: Harness) -> None:
    before = harness.stream.stats()
    assert harness.ingest([record(uniqueId="u1"), record(uniqueId="u2")]).ingested == 2
    after = harness.stream.stats()
    assert after.spooled_offset > before.spooled_offset  # in the spool (fsync'd), not yet in the table
    assert after.committed_offset == before.committed_offset
    rows = harness.committed_rows()
    assert [row["unique_id"] for row in rows] == ["u1", "u2"]
    row = rows[0]
    assert row["meter_time"] == datetime.fromtimestamp(NOW_MS / 1000, UTC)
    assert (row["customer_id"], row["meter_api_name"], row["meter_value"], row["source"]) == (
        "acme",
        "llm-tokens",
        12.0,
        "ingest",
    )
    assert abs((row["ingested_at"] - datetime.now(UTC)).total_seconds()) < 60


def test_a_uniqueid_seen_twice_never_counts_twice(harness: Harness) -> None:
    harness.ingest([record(uniqueId="dup", meterValue=5), record(uniqueId="dup", meterValue=5)])
    harness.committed_rows()
    harness.ingest([record(uniqueId="dup", meterValue=5), record(uniqueId="other", meterValue=7)])
    rows = harness.committed_rows()
    assert [(row["unique_id"], row["meter_value"]) for row in rows] == [("dup", 5.0), ("other", 7.0)]


def test_records_without_uniqueid_get_one_from_their_content(harness: Harness) -> None:
    same = record(meterValue=3, dimensions={"model": "m1"})
    harness.ingest([same])
    harness.ingest([dict(same)])  # a retried request
    harness.ingest([record(meterValue=4, dimensions={"model": "m1"})])  # another event
    rows = harness.committed_rows()
    assert sorted(row["meter_value"] for row in rows) == [3.0, 4.0]
    typed = msgspec.convert(same, IngestRecord)
    assert content_unique_id(typed) in {row["unique_id"] for row in rows}
    assert content_unique_id(msgspec.convert({**same, "meterValue": 3.0}, IngestRecord)) == content_unique_id(typed)
    assert dict(next(row for row in rows if row["meter_value"] == 3.0)["dimensions"]) == {"model": "m1"}


def test_a_tenant_may_only_ingest_its_own_usage(harness: Harness) -> None:
    assert harness.ingest([record()], principal=tenant("acme")).ingested == 1
    with pytest.raises(RequestError) as refused:
        harness.ingest([record(uniqueId="x"), record(customerId="globex")], principal=tenant("acme"))
    assert refused.value.status == 403
    assert "globex" in refused.value.message
    assert len(harness.committed_rows()) == 1


def test_requests_without_records_or_with_too_many_are_refused(harness: Harness) -> None:
    with pytest.raises(RequestError, match="no records"):
        harness.ingest([])
    with pytest.raises(RequestError) as too_many:
        harness.ingest([record(uniqueId=str(i)) for i in range(10_001)])
    assert too_many.value.status == 413


def test_toolkit_events_as_eventbridge_delivers_them(harness: Harness) -> None:
    received = NOW_MS
    delivered = {
        "version": "0",
        "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        "detail-type": "ingestUsage",
        "source": "application-plane",
        "time": datetime.fromtimestamp((NOW_MS - 60_000) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "detail": {"tenantId": "acme", "meterApiName": "llm-tokens", "meterValue": 40, "model": "m1"},
    }
    put_events = {
        "Entries": [
            {
                "Source": "application-plane",
                "DetailType": "ingestUsage",
                "Detail": msgspec.json.encode(
                    {"tenantId": "globex", "meterApiName": "llm-tokens", "meterValue": 2}
                ).decode(),
            }
        ]
    }
    items = toolkit_records(delivered, received_ms=received) + toolkit_records(put_events, received_ms=received)
    harness.ingest(items, source="event")
    harness.ingest(toolkit_records(delivered, received_ms=received + 5000), source="event")  # redelivered
    rows = harness.committed_rows()
    assert [(r["customer_id"], r["meter_value"], r["source"]) for r in rows] == [
        ("acme", 40.0, "event"),
        ("globex", 2.0, "event"),
    ]
    acme, globex = rows
    assert acme["unique_id"] == "eventbridge:6a7e8feb-b491-4cf7-a9f1-bf3703467718"
    assert dict(acme["dimensions"]) == {"model": "m1"}
    assert acme["meter_time"].timestamp() == (NOW_MS - 60_000) // 1000  # the event's own time
    assert globex["meter_time"].timestamp() * 1000 == received  # no time: when the service received it
    assert globex["unique_id"].startswith("sha256:")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"detail-type": "somethingElse", "detail": {}}, "detail-type must be 'ingestUsage'"),
        ({"detail-type": "ingestUsage", "detail": []}, "detail must be an object"),
        (
            {"detail-type": "ingestUsage", "detail": {"tenantId": "a", "meterValue": 1}},
            "detail.meterApiName is required",
        ),
        (
            {
                "detail-type": "ingestUsage",
                "time": "yesterday",
                "detail": {"tenantId": "a", "meterApiName": "m", "meterValue": 1},
            },
            "time must be",
        ),
        ({"Entries": []}, "Entries must be a non-empty list"),
        ({"Entries": [{"DetailType": "ingestUsage", "Detail": "{"}]}, "Detail is not JSON"),
        ([], "no events"),
    ],
)
def test_malformed_toolkit_events_are_400_naming_the_member(body: object, message: str) -> None:
    with pytest.raises(RequestError, match=message) as refused:
        toolkit_records(body, received_ms=NOW_MS)
    assert refused.value.status == 400


def test_toolkit_detail_numbers_and_booleans_are_dimension_values_objects_and_arrays_are_refused(
    harness: Harness,
) -> None:
    detail = {"tenantId": "acme", "meterApiName": "llm-tokens", "meterValue": 5, "meterTimeInMillis": NOW_MS}
    event = {"id": "e-1", "detail-type": "ingestUsage", "detail": {**detail, "tier": 3, "ratio": 0.25, "beta": True,
             "legacy": False, "model": "m1"}}  # fmt: skip
    outcome = harness.ingest(toolkit_records(event, received_ms=NOW_MS), source="event")
    assert outcome.ingested == 1
    [row] = harness.committed_rows()
    assert dict(row["dimensions"]) == {"tier": "3", "ratio": "0.25", "beta": "true", "legacy": "false", "model": "m1"}
    for member, value in (("tags", ["a"]), ("meta", {"k": 1}), ("gone", None)):
        refused_event = {"detail-type": "ingestUsage", "detail": {**detail, member: value}}
        with pytest.raises(RequestError) as refused:
            harness.ingest(toolkit_records(refused_event, received_ms=NOW_MS), source="event")
        assert refused.value.status == 400
        errors = refused.value.extra["errors"]
        assert isinstance(errors, list)
        assert [error["field"] for error in errors] == [f"dimensions.{member}"]
    assert len(harness.committed_rows()) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"uniqueId": "u" * 129},
        {"uniqueId": ""},
        {"customerId": " - "},
        {"customerId": "\t"},
        {"customerId": "c" * 257},
        {"meterApiName": "nope"},
        {"meterApiName": "api-calls"},
        {"meterValue": float("nan")},
        {"meterValue": float("-inf")},
        {"meterTimeInMillis": NOW_MS - 36 * DAY_MS},
        {"meterTimeInMillis": NOW_MS + 3_600_000},
        {"dimensions": {f"d{i}": "v" for i in range(33)}},
        {"dimensions": {"": "v"}},
        {"dimensions": {"k" * 129: "v"}},
        {"dimensions": {"aflo.cancel_previous_resource_event": "true"}},
        {"dimensions": {"model": "v" * 1025}},
    ],
)
def test_a_batch_checked_column_by_column_refuses_exactly_what_the_record_checks_refuse(
    harness: Harness, bad: dict[str, Any]
) -> None:
    good = [record(uniqueId=f"u{i}", customerId=f"c{i % 3}", dimensions={"model": "m"}) for i in range(5)]
    items = [*good[:2], record(**{"uniqueId": "x", **bad}), *good[2:]]
    typed = [msgspec.convert(item, IngestRecord) for item in items]
    settings = harness.config.meterlake.service
    registry = harness.registry
    check = functools.partial(
        check_records,
        meters=registry.event_meters(),
        request_meters=registry.request_meter_names(),
        settings=settings,
        now_ms=NOW_MS,
    )
    by_columns, by_records = check(typed), check(items)  # raw objects go record by record
    assert by_columns.errors == by_records.errors
    assert [error.index for error in by_columns.errors] == [2]
    assert [index for index, _ in by_columns.accepted] == [0, 1, 3, 4, 5]
    assert check(typed[:2] + typed[3:]).errors == []
