"""Schema evolution: a field added to the record evolves an existing table that holds rows, and nothing is lost.

The table is created as an older meterlake created it (the record without ``integration_latency_ms``), holds rows,
and is then opened by today's code: the column is added, new lines fill it, and the SQL runner reads both (the old
rows as null), whichever order it reads the files in.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import IntegerType, LongType, NestedField, StringType

from meterlake.amberflo.api import parse_usage_query
from meterlake.amberflo.reconcile import Window, lake_usage
from meterlake.config import Config
from meterlake.lake.catalog import (
    IncompatibleSchemaError,
    added_fields,
    ensure_meter_events_table,
    ensure_metering_table,
    evolve_table,
    open_catalog,
)
from meterlake.lake.files import read_data_file
from meterlake.lake.home import DataDir
from meterlake.lake.query import load_query, run_local_query
from meterlake.local.stream import DeliveryStream, ingest_lines
from meterlake.meters import DEFAULT_METERS, Meter
from meterlake.records import render_access_log_line
from meterlake.schema import (
    METER_EVENT_PARTITION_SPEC,
    METER_EVENT_SCHEMA,
    METER_EVENTS_TABLE,
    METERING_EVENT_PARTITION_SPEC,
    METERING_EVENT_SCHEMA,
    TABLE_PROPERTIES,
)
from meterlake.service.registry import MeterRegistry
from meterlake.service.store import ServiceStore
from meterlake.service.usage import UsageEngine

CONFIG = Config()
#: The field the older record lacked.
ADDED = "integration_latency_ms"
#: 2026-11-29T00:00:00Z in epoch milliseconds.
DAY_MS = 1_795_910_400_000


def _without(schema: Schema, name: str) -> Schema:
    return Schema(*(f for f in schema.fields if f.name != name), identifier_field_ids=schema.identifier_field_ids)


def _older_table(data: DataDir, schema: Schema) -> Table:
    catalog = open_catalog(data)
    catalog.create_namespace(CONFIG.database_name)
    return catalog.create_table(
        (CONFIG.database_name, CONFIG.table_name),
        schema=schema,
        partition_spec=METERING_EVENT_PARTITION_SPEC,
        properties=dict(TABLE_PROPERTIES),
    )


def _line(request_id: str, offset_ms: int, *, latency: int | None) -> bytes:
    return render_access_log_line(
        {
            "request_id": request_id,
            "tenant_id": "acme",
            "request_time": DAY_MS + offset_ms,
            "http_method": "GET",
            "resource_path": "/random/strings",
            "status": 200,
            "response_latency_ms": 12,
            ADDED: latency,
        }
    )


def _ingest(data: DataDir, lines: list[bytes]) -> int:
    with DeliveryStream(config=CONFIG, data_dir=data) as stream:
        ingest_lines(stream, lines)
        return stream.flush().ok_written


def _query(tmp_path: Path, data: DataDir) -> list[tuple[object, ...]]:
    path = tmp_path / "added_column.sql"
    path.write_text(
        f"-- Every request and the added column.\nSELECT request_id, {ADDED} FROM metering_events ORDER BY request_id\n"
    )
    return run_local_query(load_query(str(path)), {}, config=CONFIG, data_dir=data, prune=False).rows


def test_an_added_field_evolves_a_table_that_holds_rows_and_both_generations_are_queried(tmp_path: Path) -> None:
    data = DataDir.resolve(tmp_path / "data")
    older = _older_table(data, _without(METERING_EVENT_SCHEMA, ADDED))
    # Rows written before the field existed, as the older table had them.
    day = datetime.fromtimestamp(DAY_MS / 1000, UTC)
    old_rows = [
        {"request_id": f"old-{i}", "request_time": day, "ingested_at": day, "http_method": "GET", "status": 200}
        for i in range(3)
    ]
    older.append(pa.Table.from_pylist(old_rows, schema=older.schema().as_arrow()))
    snapshot = older.current_snapshot()
    assert snapshot is not None

    evolved = ensure_metering_table(open_catalog(data), CONFIG)
    field = evolved.schema().find_field(ADDED)
    assert (field.field_type, field.required) == (IntegerType(), False)
    assert evolved.schema().column_names == [*older.schema().column_names, ADDED]
    # Evolution rewrote nothing: the same snapshot, the same files.
    assert evolved.current_snapshot() == snapshot
    again = ensure_metering_table(open_catalog(data), CONFIG)
    assert again.metadata_location == evolved.metadata_location  # nothing left to add: no new metadata

    # The pipeline fills the new column from the access-log line.
    assert _ingest(data, [_line("new-0", 1000, latency=7), _line("new-1", 2000, latency=None)]) == 2

    rows = _query(tmp_path, data)
    assert rows == [("new-0", 7), ("new-1", None), ("old-0", None), ("old-1", None), ("old-2", None)]
    # Newer files first: a reader that takes the columns from the first file by name would fail on the older ones.
    assert _ingest(data, [_line("new-2", 3000, latency=9)]) == 1
    assert _query(tmp_path, data)[:3] == [("new-0", 7), ("new-1", None), ("new-2", 9)]
    assert len(_query(tmp_path, data)) == 6


def test_the_meter_events_table_evolves_too(tmp_path: Path) -> None:
    data = DataDir.resolve(tmp_path / "data")
    catalog = open_catalog(data)
    catalog.create_namespace(CONFIG.database_name)
    catalog.create_table(
        (CONFIG.database_name, METER_EVENTS_TABLE),
        schema=_without(METER_EVENT_SCHEMA, "dimensions"),
        partition_spec=METER_EVENT_PARTITION_SPEC,
        properties=dict(TABLE_PROPERTIES),
    )
    table = ensure_meter_events_table(catalog, CONFIG)
    assert str(table.schema().find_field("dimensions").field_type) == "map<string, string>"
    assert table.schema().column_names[-1] == "dimensions"


@pytest.mark.parametrize(
    ("table_field", "code_field", "problem"),
    [
        (
            NestedField(20, "extra", LongType()),
            NestedField(20, "extra", StringType()),
            "the table has long, the code string",
        ),
        (
            NestedField(20, "extra", LongType(), required=True),
            NestedField(20, "extra", LongType()),
            "the table has it required, the code optional",
        ),
        (None, NestedField(20, "extra", LongType(), required=True), "a column added to a table that holds rows must"),
    ],
)
def test_anything_but_an_added_optional_column_is_refused_with_the_column_named(
    tmp_path: Path, table_field: NestedField | None, code_field: NestedField, problem: str
) -> None:
    base = list(METERING_EVENT_SCHEMA.fields)
    ids = METERING_EVENT_SCHEMA.identifier_field_ids
    table_schema = Schema(*base, *([table_field] if table_field else []), identifier_field_ids=ids)
    code_schema = Schema(*base, code_field, identifier_field_ids=ids)
    with pytest.raises(IncompatibleSchemaError, match=problem):
        added_fields(table_schema, code_schema)
    table = _older_table(DataDir.resolve(tmp_path / "data"), table_schema)
    with pytest.raises(IncompatibleSchemaError, match=rf"table {CONFIG.database_name}\.{CONFIG.table_name}: .*extra"):
        evolve_table(table, code_schema)
    assert table.schema() == open_catalog(DataDir.resolve(tmp_path / "data")).load_table(table.name()).schema()


def test_other_identifier_fields_are_refused() -> None:
    other = Schema(
        *METERING_EVENT_SCHEMA.fields, identifier_field_ids=[METERING_EVENT_SCHEMA.find_field("request_id").field_id]
    )
    with pytest.raises(IncompatibleSchemaError, match="identifier fields"):
        added_fields(other, METERING_EVENT_SCHEMA)


def test_a_column_only_the_table_has_is_kept() -> None:
    """A newer meterlake may have added it; an older one opening the table leaves it alone."""
    newer = Schema(
        *METERING_EVENT_SCHEMA.fields,
        NestedField(99, "added_later", StringType()),
        identifier_field_ids=METERING_EVENT_SCHEMA.identifier_field_ids,
    )
    assert added_fields(newer, METERING_EVENT_SCHEMA) == []


def test_data_files_written_before_an_added_column_read_it_as_null(tmp_path: Path) -> None:
    """What the forwarding outbox and reconcile --repair read files with: every file in the table's columns."""
    data = DataDir.resolve(tmp_path / "data")
    older = _older_table(data, _without(METERING_EVENT_SCHEMA, ADDED))
    day = datetime.fromtimestamp(DAY_MS / 1000, UTC)
    row = {"request_id": "old-0", "request_time": day, "ingested_at": day, "http_method": "GET", "status": 200}
    older.append(pa.Table.from_pylist([row], schema=older.schema().as_arrow()))
    evolved = ensure_metering_table(open_catalog(data), CONFIG)
    evolved.append(pa.Table.from_pylist([row | {"request_id": "new-0", ADDED: 5}], schema=evolved.schema().as_arrow()))
    target = evolved.schema().as_arrow()
    pieces = [
        read_data_file(task.file.file_path.removeprefix("file://"), target) for task in evolved.scan().plan_files()
    ]
    events = pa.concat_tables(pieces).sort_by("request_id")
    assert events.schema == target
    assert events.select(["request_id", ADDED]).to_pylist() == [
        {"request_id": "new-0", ADDED: 5},
        {"request_id": "old-0", ADDED: None},
    ]


def test_a_request_meter_on_the_added_field_counts_both_generations(tmp_path: Path) -> None:
    """The usage engine reads a table's files by field id too: a meter on the added column sums the new rows and
    reads the older files' as null, whichever generation DuckDB opens first."""
    config = Config(meters=(*DEFAULT_METERS, Meter(meter_api_name="integration-ms", label="ms", value=ADDED)))
    data = DataDir.resolve(tmp_path / "data")
    older = _older_table(data, _without(METERING_EVENT_SCHEMA, ADDED))
    day = datetime.fromtimestamp(DAY_MS / 1000, UTC)
    old = [{"request_id": f"old-{i}", "tenant_id": "acme", "request_time": day, "ingested_at": day, "status": 200,
            "http_method": "GET"}
           for i in range(3)]  # fmt: skip
    older.append(pa.Table.from_pylist(old, schema=older.schema().as_arrow()))
    assert _ingest(data, [_line("new-0", 1000, latency=7), _line("new-1", 2000, latency=9)]) == 2
    with ServiceStore.in_data_dir(data) as store:
        engine = UsageEngine(config=config, data_dir=data, registry=MeterRegistry(store, config.meters), rules=None)
        window = {"startTimeInSeconds": DAY_MS // 1000, "endTimeInSeconds": DAY_MS // 1000 + 86400}
        document = {"meterApiName": "integration-ms", "aggregation": "SUM", "timeGroupingInterval": "DAY",
                    "timeRange": window}  # fmt: skip
        usage = parse_usage_query(document, now_s=DAY_MS // 1000 + 86400)
        report = engine.report(usage, zero_fill=False)
    assert [meter["groupValue"] for meter in report["clientMeters"]] == [16.0]
    # Reconciliation's side of the lake reads the files the same way.
    lake = lake_usage(config, data, Window.covering(day, day + timedelta(days=1)))
    assert {key: value for key, value in lake.items() if key[1] == "integration-ms"} == {
        ("acme", "integration-ms", DAY_MS // 1000): 16.0
    }
