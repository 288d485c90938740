"""Test helpers: a real local Iceberg metering table and synthetic events appended the way the stream commits them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
from pyiceberg.table import Table

from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.stream import SPOOL_OFFSET_PROPERTY, STREAM_PROPERTY
from meterlake.schema import meter_event_arrow_schema, metering_event_arrow_schema

#: 2025-11-24T16:00:00Z in epoch milliseconds.
BASE_TIME_MS = 1_764_000_000_000
STATUSES = (200, 201, 204, 400, 404, 429, 500, 502, 503)


def metering_table(home: Path) -> Table:
    """The metering-events table of a data dir (created on first use)."""
    return ensure_metering_table(open_catalog(DataDir(home)), Config())


def make_events(start: int, count: int) -> pa.Table:
    """``count`` events numbered from ``start``: request ids are UUIDs of the number; every 10th has no tenant,
    statuses cycle through 2xx/4xx/5xx, every 7th has no response length, times step 997 ms."""
    numbers = range(start, start + count)
    columns: dict[str, list[object]] = {
        "request_id": [str(uuid.UUID(int=n + 1)) for n in numbers],
        "api_id": ["api123"] * count,
        "stage": ["prod"] * count,
        "tenant_id": [None if n % 10 == 0 else f"tenant-{n % 4}" for n in numbers],
        "request_time": [(BASE_TIME_MS + n * 997) * 1000 for n in numbers],
        "http_method": ["POST" if n % 3 == 0 else "GET" for n in numbers],
        "resource_path": [None if n % 11 == 0 else f"/r{n % 2}" for n in numbers],
        "status": [STATUSES[n % len(STATUSES)] for n in numbers],
        "response_length": [None if n % 7 == 0 else 100 + n % 1000 for n in numbers],
        "ingested_at": [(BASE_TIME_MS + n * 997 + 5000) * 1000 for n in numbers],
    }
    schema = metering_event_arrow_schema()
    arrays = []
    for field in schema:
        values = columns.get(field.name, [None] * count)
        if pa.types.is_timestamp(field.type):
            arrays.append(pa.array(values, pa.int64()).cast(field.type))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def commit_events(table: Table, events: pa.Table, *, offset: int) -> int:
    """Append ``events`` in one snapshot with the stream's summary properties; returns the snapshot id."""
    table.append(events, snapshot_properties={SPOOL_OFFSET_PROPERTY: str(offset), STREAM_PROPERTY: "test-stream"})
    snapshot = table.current_snapshot()
    assert snapshot is not None
    return int(snapshot.snapshot_id)


def meter_events_table(home: Path) -> Table:
    """The meter-events table of a data dir (created on first use)."""
    return ensure_meter_events_table(open_catalog(DataDir(home)), Config())


def make_meter_events(prefix: str, count: int, *, first_ms: int = BASE_TIME_MS) -> pa.Table:
    """``count`` llm-tokens events of acme with uniqueIds ``<prefix><i>``, one a minute from ``first_ms``, in
    falling time order (so a rewrite sorted by meter_time is seen to sort)."""
    times = [(first_ms + (count - 1 - i) * 60_000) * 1000 for i in range(count)]
    rows = {
        "unique_id": [f"{prefix}{i}" for i in range(count)],
        "meter_api_name": ["llm-tokens"] * count,
        "customer_id": ["acme"] * count,
        "meter_value": [float(i) for i in range(count)],
        "meter_time": times,
        "dimensions": [[("model", "m1")]] * count,
        "ingested_at": times,
        "source": ["ingest"] * count,
    }
    return pa.table(rows, schema=meter_event_arrow_schema())
