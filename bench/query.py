"""Benchmark: ``usage_per_tenant_day`` through the local runner vs DuckDB reading the same Parquet files directly.

The dataset (10M metering events, 1M with ``quick``) is real Iceberg data written by pyiceberg in 1M-row appends, like
a compacted table, and is cached under bench/data/ keyed by size. Both sides run interleaved in one process.
"""

from __future__ import annotations

import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from bench.events import events_connection, generate_events, reuse_cached_table
from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.lake.query import load_query, run_local_query

DATA_ROOT = Path(__file__).parent / "data"
FULL_EVENTS = 10_000_000
QUICK_EVENTS = 1_000_000
CHUNK_EVENTS = 1_000_000
SPAN_HOURS = 36
SPAN_START = datetime(2026, 11, 1, tzinfo=UTC)
TARGET_QUERY_S = 1.0
TARGET_RATIO = 1.5
WINDOW_START = "2026-11-01T00:00:00Z"
WINDOW_END = "2026-11-03T00:00:00Z"

#: The hand-written DuckDB equivalent of sql/usage_per_tenant_day.sql (the baseline), written the fast way a DuckDB
#: user would: timestamps as naive UTC (no ICU per row) and the exact nearest-rank quantile.
_DIRECT_QUERY = """
SELECT
    tenant_id,
    CAST(request_time AS DATE) AS usage_date,
    count(*) AS requests,
    count_if(status < 500 AND tenant_id IS NOT NULL) AS billable_requests,
    coalesce(sum(response_length), 0) AS bytes_out,
    count_if(status >= 400 AND status < 500) AS errors_4xx,
    count_if(status >= 500) AS errors_5xx,
    quantile_disc(response_latency_ms, 0.95) AS p95_latency_ms
FROM (
    SELECT * REPLACE (make_timestamp(epoch_us(request_time)) AS request_time)
    FROM read_parquet($files, hive_partitioning = false)
)
WHERE request_time >= CAST(CAST($start AS TIMESTAMPTZ) AS TIMESTAMP)
    AND request_time < CAST(CAST($end AS TIMESTAMPTZ) AS TIMESTAMP)
GROUP BY tenant_id, CAST(request_time AS DATE)
ORDER BY usage_date, tenant_id
"""


def _dataset(events: int) -> DataDir:
    """The cached Iceberg table with ``events`` events, generated on first use."""
    data = DataDir(DATA_ROOT / f"query-{events}")
    config = Config()
    if reuse_cached_table(data, lambda cached: ensure_metering_table(open_catalog(cached), config), events):
        return data
    started = time.perf_counter()
    table = ensure_metering_table(open_catalog(data), config)
    arrow_schema = table.schema().as_arrow()
    con = events_connection()
    step_us = SPAN_HOURS * 3_600_000_000 // events
    for first in range(0, events, CHUNK_EVENTS):
        count = min(CHUNK_EVENTS, events - first)
        table.append(
            generate_events(
                con, first=first, count=count, start=SPAN_START, step_us=step_us, origin=0, schema=arrow_schema
            )
        )
    con.close()
    print(f"  generated {events:,} events in {time.perf_counter() - started:.1f} s under {data.root}")
    return data


def _data_files(data: DataDir) -> list[str]:
    """The Parquet files of the table's current snapshot (what the direct query reads)."""
    table = ensure_metering_table(open_catalog(data), Config())
    return [task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()]


def run(quick: bool = False) -> dict[str, object]:
    """Time the runner and the direct DuckDB query, interleaved; print best/median and PASS/FAIL against targets."""
    events = QUICK_EVENTS if quick else FULL_EVENTS
    repetitions = 3 if quick else 7
    data = _dataset(events)
    config = Config()
    files = _data_files(data)
    params = {"start": WINDOW_START, "end": WINDOW_END}
    direct_con = duckdb.connect(config={"threads": os.cpu_count() or 1})
    direct_con.execute("SET TimeZone='UTC'")
    direct_params: dict[str, object] = {"files": files, **params}

    runner_times: list[float] = []
    direct_times: list[float] = []
    for _ in range(repetitions):
        started = time.perf_counter()
        result = run_local_query(load_query("usage_per_tenant_day"), params, config=config, data_dir=data)
        runner_times.append(time.perf_counter() - started)

        started = time.perf_counter()
        direct_rows = direct_con.sql(_DIRECT_QUERY, params=direct_params).fetchall()
        direct_times.append(time.perf_counter() - started)
    direct_con.close()
    if result.rows != direct_rows:
        raise RuntimeError("the runner and the direct query disagree; the comparison would be meaningless")
    runner_rows = len(result.rows)

    runner_best, direct_best = min(runner_times), min(direct_times)
    ratio = statistics.median(runner_times) / statistics.median(direct_times)
    print(
        f"  files: {len(files)}, threads: {os.cpu_count()}, repetitions: {repetitions}, result rows: {runner_rows}\n"
        f"  query usage_per_tenant_day ({events:,} events): best {runner_best:.3f} s, "
        f"median {statistics.median(runner_times):.3f} s  target best < {TARGET_QUERY_S} s  "
        f"{'PASS' if runner_best < TARGET_QUERY_S else 'FAIL'}\n"
        f"  duckdb direct: best {direct_best:.3f} s, median {statistics.median(direct_times):.3f} s\n"
        f"  runner / direct (medians): {ratio:.2f}x  target <= {TARGET_RATIO}x  "
        f"{'PASS' if ratio <= TARGET_RATIO else 'FAIL'}"
    )
    return {
        "query_day_usage_10m_s": round(runner_best, 4),
        "duckdb_direct_10m_s": round(direct_best, 4),
        "query_vs_direct_ratio": round(ratio, 3),
        "query_events": events,
    }


if __name__ == "__main__":
    run()
