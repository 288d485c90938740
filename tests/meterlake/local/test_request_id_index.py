"""The request-id index rebuilt from a large table within its memory limit (it is a cache of the table: a lost or
damaged index must never keep a stream from opening)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.schema import Schema
from pyiceberg.types import NestedField, StringType

from meterlake.local.stream import RequestIdIndex
from meterlake.schema import METER_EVENT_KEY_COLUMNS

#: The service benchmark's 10M-event meter_events table ran the index's former NOT IN (a mark join, which does not
#: spill) out of its 32 MB. Scaled down to keep the suite quick: 4M keys in files of a million rows, as that table has,
#: against half the memory; NOT IN runs out of it here too (checked), the anti join does not.
FILES = 4
ROWS_PER_FILE = 1_000_000
MEMORY_LIMIT_MB = 16


def test_the_index_of_a_large_table_is_rebuilt_within_its_memory_limit(tmp_path: Path) -> None:
    """A stream whose index is lost or damaged rebuilds it from the table on open; for a 10M-event meter_events
    table that ran out of memory, twice (the rebuild too), so the metering service could not start. An anti join
    spills instead (4M keys against 16 MB here)."""
    columns = list(METER_EVENT_KEY_COLUMNS)
    catalog = SqlCatalog("t", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=tmp_path.as_uri())
    catalog.create_namespace("db")
    table = catalog.create_table(
        ("db", "events"), Schema(*(NestedField(i, name, StringType()) for i, name in enumerate(columns, start=1)))
    )
    files = [tmp_path / f"part-{n}.parquet" for n in range(FILES)]
    with duckdb.connect() as db:  # ~0.5 s a file written by DuckDB, several times that through pyiceberg's writer
        for path in files:
            db.execute(
                f"COPY (SELECT 'bench-tokens' AS {columns[0]}, gen_random_uuid()::VARCHAR AS {columns[1]} "
                f"FROM range({ROWS_PER_FILE})) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE {ROWS_PER_FILE})"
            )
        first = db.execute(f"SELECT {columns[1]} FROM '{files[0]}' LIMIT 2").fetchall()
    table.add_files([str(path) for path in files])
    index = RequestIdIndex(tmp_path / "request-ids.duckdb", key_columns=columns, memory_limit_mb=MEMORY_LIMIT_MB)
    try:
        assert index.catch_up("db.events", table) == FILES
        keys = pa.table({columns[0]: ["bench-tokens"] * 3, columns[1]: ["not-indexed", first[0][0], first[1][0]]})
        assert index.stage_unseen("db.events", keys).to_pylist() == [0]  # only the new event is unseen
    finally:
        index.close()
