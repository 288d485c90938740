"""The meter-events table: created once from its one schema, beside the metering table."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.schema import (
    METER_EVENT_KEY_COLUMNS,
    METER_EVENT_PARTITION_SPEC,
    METER_EVENT_SCHEMA,
    METER_EVENTS_TABLE,
    METER_TIME_COLUMN,
    meter_event_arrow_schema,
)


def test_the_table_is_made_from_the_schema_and_opened_again(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    config = Config()
    catalog = open_catalog(data)
    table = ensure_meter_events_table(catalog, config)
    assert table.name() == (config.database_name, METER_EVENTS_TABLE)
    assert table.schema() == METER_EVENT_SCHEMA
    assert table.spec() == METER_EVENT_PARTITION_SPEC
    again = ensure_meter_events_table(open_catalog(data), config)
    assert again.metadata_location == table.metadata_location
    assert ensure_metering_table(catalog, config).name() == (config.database_name, config.table_name)


def test_the_key_includes_the_partition_source_and_the_dedup_columns() -> None:
    identifiers = {METER_EVENT_SCHEMA.find_field(i).name for i in METER_EVENT_SCHEMA.identifier_field_ids}
    assert identifiers == {*METER_EVENT_KEY_COLUMNS, METER_TIME_COLUMN}
    arrow = meter_event_arrow_schema()
    assert pa.types.is_map(arrow.field("dimensions").type)
    assert arrow.field(METER_TIME_COLUMN).type == pa.timestamp("us", "UTC")
    assert arrow.field("meter_value").type == pa.float64()
