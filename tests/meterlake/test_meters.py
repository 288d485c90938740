"""Meters: definitions validated against the event schema, records computed column-wise, the SQL twin agrees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterlake.amberflo.reconcile import aggregate_lake
from meterlake.meters import (
    DEFAULT_METERS,
    UNIQUE_ID_MAX,
    Condition,
    Meter,
    MeterError,
    expected_usage,
    lake_usage_query,
    meter_records,
    parse_meters,
    unique_id,
)
from meterlake.schema import metering_event_arrow_schema
from tests.meterlake.amberflo.lake import make_events

HOUR_MS = 3_600_000
T0 = 1_764_000_000_000  # 2025-11-24T16:00:00Z


def events_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Metering events from dicts (absent columns null; times in epoch ms), typed as the table's Arrow schema."""
    schema = metering_event_arrow_schema()
    arrays = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if pa.types.is_timestamp(field.type):
            arrays.append(pa.array([None if v is None else v * 1000 for v in values], pa.int64()).cast(field.type))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def test_default_meters_are_valid_and_round_trip_through_config() -> None:
    raw = msgspec.to_builtins(DEFAULT_METERS)
    assert parse_meters(raw) == DEFAULT_METERS
    assert [m.meter_api_name for m in DEFAULT_METERS] == ["api-calls", "egress-bytes"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"filter": [{"column": "colour", "op": "=", "value": "x"}]}, "meter 'm1': filter[0].column 'colour'"),
        ({"filter": [{"column": "http_method", "op": "<", "value": "GET"}]}, "meter 'm1': filter[0].op '<'"),
        ({"filter": [{"column": "request_time", "op": ">", "value": 1}]}, "meter 'm1': filter[0].op '>'"),
        ({"filter": [{"column": "status", "op": "=", "value": "200"}]}, "meter 'm1': filter[0].value '200'"),
        ({"filter": [{"column": "status", "op": "in", "value": []}]}, "meter 'm1': filter[0].value must be a non"),
        ({"filter": [{"column": "status", "op": "in", "value": 200}]}, "meter 'm1': filter[0].value must be a non"),
        ({"filter": [{"column": "status", "op": "<", "value": [1]}]}, "meter 'm1': filter[0].value must be one"),
        ({"filter": [{"column": "status", "op": "is_null", "value": 1}]}, "meter 'm1': filter[0].value must be abs"),
        ({"filter": [{"column": "status", "op": "like", "value": 1}]}, "`$.filter[0].op`"),
        ({"value": "http_method"}, "meter 'm1': value 'http_method' is a string column"),
        ({"value": "bytes"}, "meter 'm1': value 'bytes' is not a metering-event column"),
        ({"dimensions": ["resource_path", "nope"]}, "meter 'm1': dimensions[1] 'nope'"),
        ({"dimensions": ["stage", "stage"]}, "meter 'm1': dimensions ['stage', 'stage'] name a column twice"),
        ({"meter_api_name": "a" * 51}, "`$.meter_api_name`"),
        ({"meter_api_name": "has:colon"}, "`$.meter_api_name`"),
        ({"meter_type": "sum"}, "`$.meter_type`"),
        ({"colour": "red"}, "unknown field `colour`"),
    ],
)
def test_invalid_meter_is_refused_naming_meter_and_key(changes: dict[str, Any], expected: str) -> None:
    raw = {"meter_api_name": "m1", "label": "M1", **changes}
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert(raw, type=Meter)
    assert expected in str(caught.value)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(MeterError, match="meter 'x:y': meter_api_name"):
        Meter(meter_api_name="x:y", label="X")
    with pytest.raises(MeterError, match=r"meter 'm': filter\[0\]\.column 'nope'"):
        Meter(meter_api_name="m", label="M", filter=(Condition(column="nope", op="is_null"),))


def test_duplicate_meter_names_are_refused() -> None:
    raw = [{"meter_api_name": "m", "label": "A"}, {"meter_api_name": "m", "label": "B"}]
    with pytest.raises(MeterError, match="meter 'm': meter_api_name is defined twice"):
        parse_meters(raw)


def event(
    rid: str, tenant: str | None, ms: int, method: str, path: str | None, status: int, length: int | None
) -> dict[str, Any]:
    """One event row for :func:`events_table`."""
    return {
        "request_id": rid,
        "tenant_id": tenant,
        "request_time": ms,
        "http_method": method,
        "resource_path": path,
        "status": status,
        "response_length": length,
    }


def test_meter_records_on_hand_built_events() -> None:
    events = events_table(
        [
            event("r1", "t1", T0 + 1, "GET", "/a", 200, 10),
            event("r2", None, T0 + 2, "GET", "/a", 200, 20),  # no tenant: never a record, counted apart
            event("r3", "t1", T0 + 3, "GET", "/a", 503, 30),  # a server error is not billable
            # No length: counts as a call, not for bytes; a null dimension is left out.
            event("r4", "t2", T0 + HOUR_MS, "POST", None, 404, None),
        ]
    )
    batch = meter_records(events, DEFAULT_METERS)
    assert batch.untenanted == 1
    assert list(batch.records()) == [
        {
            "customerId": "t1",
            "meterApiName": "api-calls",
            "meterValue": 1,
            "meterTimeInMillis": T0 + 1,
            "uniqueId": "api-calls:r1",
            "dimensions": {"resource_path": "/a", "http_method": "GET"},
        },
        {
            "customerId": "t2",
            "meterApiName": "api-calls",
            "meterValue": 1,
            "meterTimeInMillis": T0 + HOUR_MS,
            "uniqueId": "api-calls:r4",
            "dimensions": {"http_method": "POST"},
        },
        {
            "customerId": "t1",
            "meterApiName": "egress-bytes",
            "meterValue": 10,
            "meterTimeInMillis": T0 + 1,
            "uniqueId": "egress-bytes:r1",
            "dimensions": {"resource_path": "/a"},
        },
    ]
    assert len(batch) == 3


def test_an_empty_blank_or_sentinel_tenant_is_no_tenant_for_records_and_sql_alike() -> None:
    """Amberflo refuses customerId "": such a record would be dead-lettered, and with it its whole batch."""
    no_tenant: list[str | None] = [None, "", "-", " ", "\t", " - "]
    tenants: list[str | None] = ["t1", "a-b", "--", "-t", "t-"]
    events = events_table(
        [event(f"r{i}", tenant, T0 + i, "GET", "/a", 200, 10) for i, tenant in enumerate(no_tenant + tenants)]
    )
    batch = meter_records(events, DEFAULT_METERS)
    assert batch.untenanted == len(no_tenant)
    assert {record["customerId"] for record in batch.records()} == set(tenants)
    assert len(batch) == 2 * len(tenants)
    usage = expected_usage(events, DEFAULT_METERS)
    assert {customer for customer, _, _ in usage} == set(tenants)
    assert aggregate_lake(events, DEFAULT_METERS) == usage


def test_filters_cover_every_operator_with_sql_null_semantics() -> None:
    rows = [
        event(f"r{i}", "t", T0, method, path, status, length)
        for i, (method, status, path, length) in enumerate(
            [("GET", 200, "/a", 5), ("POST", 201, None, None), ("PUT", 404, "/o'b", 7), ("GET", 500, "/a", 9)]
        )
    ]
    events = events_table(rows)

    def matching(*conditions: Condition) -> list[str]:
        meter = Meter(meter_api_name="m", label="M", filter=conditions, value=1)
        return [r["uniqueId"].split(":")[1] for r in meter_records(events, [meter]).records()]

    assert matching(Condition(column="status", op="=", value=200)) == ["r0"]
    assert matching(Condition(column="status", op="!=", value=200)) == ["r1", "r2", "r3"]
    assert matching(Condition(column="status", op="<=", value=201)) == ["r0", "r1"]
    assert matching(Condition(column="status", op=">", value=404)) == ["r3"]
    assert matching(Condition(column="status", op=">=", value=404)) == ["r2", "r3"]
    assert matching(Condition(column="http_method", op="in", value=("GET", "PUT"))) == ["r0", "r2", "r3"]
    # A null never passes a comparison, not even not_in or != (SQL's WHERE).
    assert matching(Condition(column="resource_path", op="not_in", value=("/a",))) == ["r2"]
    assert matching(Condition(column="resource_path", op="!=", value="/a")) == ["r2"]
    assert matching(Condition(column="resource_path", op="=", value="/o'b")) == ["r2"]
    assert matching(Condition(column="resource_path", op="is_null")) == ["r1"]
    assert matching(Condition(column="response_length", op="is_not_null")) == ["r0", "r2", "r3"]


def test_value_column_and_null_values() -> None:
    events = events_table(
        [
            {"request_id": "a", "tenant_id": "t", "request_time": T0, "status": 200, "response_latency_ms": 12},
            {"request_id": "b", "tenant_id": "t", "request_time": T0, "status": 200, "response_latency_ms": None},
        ]
    )
    meter = Meter(meter_api_name="latency", label="Latency", meter_type="max_usage", value="response_latency_ms")
    assert [(r["uniqueId"], r["meterValue"]) for r in meter_records(events, [meter]).records()] == [("latency:a", 12)]
    assert "dimensions" not in meter_records(events, [meter]).records()[0]


def test_unique_ids_are_stable_distinct_across_meters_and_bounded() -> None:
    long_id = "x" * 200
    events = events_table(
        [
            {"request_id": "r1", "tenant_id": "t", "request_time": T0, "status": 200, "response_length": 1},
            {"request_id": long_id, "tenant_id": "t", "request_time": T0, "status": 200, "response_length": 1},
        ]
    )
    first = meter_records(events, DEFAULT_METERS).unique_ids()
    assert first == meter_records(events, DEFAULT_METERS).unique_ids()
    assert len(set(first)) == 4
    assert all(len(uid) <= UNIQUE_ID_MAX for uid in first)
    assert unique_id("api-calls", long_id) in first
    assert unique_id("api-calls", long_id).startswith("api-calls#")
    assert unique_id("api-calls", long_id) != unique_id("egress-bytes", long_id)


@settings(max_examples=60, deadline=None)
@given(
    request_ids=st.lists(st.text(min_size=1, max_size=120), min_size=1, max_size=30, unique=True),
    names=st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,50}", fullmatch=True), min_size=1, max_size=4, unique=True),
)
def test_unique_ids_are_unique_per_request_and_meter_and_deterministic(
    request_ids: list[str], names: list[str]
) -> None:
    events = events_table([{"request_id": rid, "tenant_id": "t", "request_time": T0} for rid in request_ids])
    meters = [Meter(meter_api_name=name, label=name) for name in names]
    ids = meter_records(events, meters).unique_ids()
    assert ids == [unique_id(name, rid) for name in names for rid in request_ids]
    assert len(set(ids)) == len(names) * len(request_ids)
    assert all(len(uid.encode()) <= UNIQUE_ID_MAX for uid in ids)
    assert ids == meter_records(events, meters).unique_ids()


def test_lake_sql_agrees_with_the_records() -> None:
    events = make_events(0, 5000)
    meters = (
        *DEFAULT_METERS,
        Meter(
            meter_api_name="peak-latency",
            label="Peak",
            meter_type="max_usage",
            filter=(
                Condition(column="http_method", op="not_in", value=("POST",)),
                Condition(column="resource_path", op="!=", value="/o'b"),
            ),
            value="response_length",
        ),
    )
    usage = expected_usage(events, meters)
    assert usage == aggregate_lake(events, meters)
    assert {meter for _, meter, _ in usage} == {"api-calls", "egress-bytes", "peak-latency"}
    assert all(hour % 3600 == 0 for _, _, hour in usage)
    sql = lake_usage_query(meters, "metering_events").sql(dialect="duckdb")
    assert "'/o''b'" in sql  # a literal rendered by sqlglot, quoted


def test_aggregate_lake_reads_parquet_files(tmp_path: Path) -> None:
    events = make_events(0, 1000)
    path = tmp_path / "events.parquet"
    pq.write_table(events, path)
    assert aggregate_lake([str(path)], DEFAULT_METERS) == expected_usage(events, DEFAULT_METERS)
    assert aggregate_lake([], DEFAULT_METERS) == {}


#: Meters applied in a fresh interpreter where importing DuckDB or sqlglot raises ImportError.
_WITHOUT_SQL_ENGINES = """
import sys
sys.modules["duckdb"] = sys.modules["sqlglot"] = None
import pyarrow as pa
from meterlake.meters import DEFAULT_METERS, meter_records, parse_meters
from meterlake.schema import metering_event_arrow_schema
meters = DEFAULT_METERS + parse_meters([{"meter_api_name": "calls", "label": "Calls"}])
row = {"request_id": "r1", "tenant_id": "t1", "request_time": 1_764_000_000_000_000, "status": 200}
events = pa.Table.from_pylist([{**row, "response_length": 5}], schema=metering_event_arrow_schema())
print(len(meter_records(events, meters)))
"""


def test_applying_meters_needs_neither_duckdb_nor_sqlglot() -> None:
    """The stager Lambda's asset leaves DuckDB and sqlglot out: only the SQL twin (reconciliation's) imports them."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_SQL_ENGINES], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "3"
