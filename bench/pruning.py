"""Pruning: a one-day usage query over a 30-day table, with the query's window pushed into the Iceberg scan and without.

The table (30 UTC days, ~1M events a day, 30k with ``quick``) is laid out as a delivery stream leaves it before
compaction: on AWS, Firehose at its longest buffering interval (900 s) commits at least 96 files a day, so the table
holds 96 files a day (2,880), added one commit per day and cached under bench/data/ keyed by its size. Both sides run
``usage_per_tenant_day`` through the local runner, pruned (the default) and over the snapshot's every data file,
interleaved in one process; their rows must be identical. Targets: the pruned query reads at most 1/20 of the table's
bytes and answers at least 10x faster (medians). For information, the same comparison on the compacted layout (one
file a day, as `meterlake compact` leaves closed days): there DuckDB's own Parquet statistics already skip most of
what the pruning skips, so the gap is small.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta

from pyiceberg.expressions import AlwaysTrue

from bench.events import add_flushed_days, reuse_cached_table
from bench.query import DATA_ROOT
from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.compact import ROW_GROUP_ROWS
from meterlake.lake.home import DataDir
from meterlake.lake.query import (
    QueryResult,
    bind_params,
    load_query,
    plan_data_files,
    run_local_query,
    scan_filter,
)

DAYS = 30
FULL_EVENTS_PER_DAY = 1_000_000
QUICK_EVENTS_PER_DAY = 30_000
FIRST_DAY = datetime(2026, 10, 1, tzinfo=UTC)
#: The day asked about: one in the middle of the month.
QUERY_DAY = FIRST_DAY + timedelta(days=17)
#: Firehose's longest buffering interval (900 s) commits at least this many files a day.
FILES_PER_DAY = 96
TARGET_BYTES_SHARE = 1 / 20
TARGET_SPEEDUP = 10.0


def month_table(events_per_day: int, files_per_day: int) -> DataDir:
    """The cached 30-day table of ``events_per_day`` events in ``files_per_day`` files a day, generated on first use."""
    # Keyed by the row-group limit too: tables cached before it applied hold a day in one row group.
    data = DataDir(DATA_ROOT / f"pruning-{DAYS}x{events_per_day}-{files_per_day}-rg{ROW_GROUP_ROWS}")
    config = Config()
    total = DAYS * events_per_day
    if reuse_cached_table(data, lambda cached: ensure_metering_table(open_catalog(cached), config), total):
        return data
    started = time.perf_counter()
    add_flushed_days(
        ensure_metering_table(open_catalog(data.ensure()), config),
        first_day=FIRST_DAY,
        days=DAYS,
        events_per_day=events_per_day,
        files_per_day=files_per_day,
        staging=data.root / "flushes",
    )
    print(
        f"  generated {total:,} events over {DAYS} days, {files_per_day} files a day, in "
        f"{time.perf_counter() - started:.1f} s under {data.root}"
    )
    return data


def _day_params() -> dict[str, str]:
    return {"start": QUERY_DAY.isoformat(), "end": (QUERY_DAY + timedelta(days=1)).isoformat()}


def _day_query(data: DataDir, *, prune: bool) -> tuple[QueryResult, float]:
    started = time.perf_counter()
    result = run_local_query(
        load_query("usage_per_tenant_day"), _day_params(), config=Config(), data_dir=data, prune=prune
    )
    return result, time.perf_counter() - started


def _planning_s(data: DataDir, repetitions: int) -> tuple[float, float]:
    """Median seconds planning the day query's files with its window and without (part of each side's time above),
    for the reading of the ratio: what the unpruned side spends before DuckDB reads anything."""
    query, config = load_query("usage_per_tenant_day"), Config()
    table = open_catalog(data).load_table((config.database_name, config.table_name))
    window = scan_filter(query.sql, bind_params(query, _day_params()))
    pruned: list[float] = []
    full: list[float] = []
    for _ in range(repetitions):
        for row_filter, times in ((window, pruned), (AlwaysTrue(), full)):
            started = time.perf_counter()
            plan_data_files(table, row_filter)
            times.append(time.perf_counter() - started)
    return statistics.median(pruned), statistics.median(full)


def _compare(data: DataDir, repetitions: int) -> tuple[QueryResult, QueryResult, list[float], list[float]]:
    """The day query pruned and over every file, interleaved, after one untimed run of each (the process's first
    query prepares the statement and each file set opens its sandboxed database: costs a user pays once, not per
    question); the rows must be identical."""
    _day_query(data, prune=True)
    _day_query(data, prune=False)
    pruned_times: list[float] = []
    full_times: list[float] = []
    for _ in range(repetitions):
        pruned, seconds = _day_query(data, prune=True)
        pruned_times.append(seconds)
        full, seconds = _day_query(data, prune=False)
        full_times.append(seconds)
    if pruned.rows != full.rows or not pruned.rows:
        raise RuntimeError("the pruned and the full scan disagree (or found nothing); the comparison is meaningless")
    return pruned, full, pruned_times, full_times


def run(quick: bool = False) -> dict[str, object]:
    """Time the day query pruned and unpruned, interleaved; print bytes read, medians and PASS/FAIL."""
    events_per_day = QUICK_EVENTS_PER_DAY if quick else FULL_EVENTS_PER_DAY
    repetitions = 3 if quick else 11
    table = month_table(events_per_day, FILES_PER_DAY)
    pruned, full, pruned_times, full_times = _compare(table, repetitions)
    assert pruned.bytes_read is not None
    assert full.bytes_read is not None
    share = pruned.bytes_read / full.bytes_read
    speedup = statistics.median(full_times) / statistics.median(pruned_times)
    met = share <= TARGET_BYTES_SHARE and speedup >= TARGET_SPEEDUP
    plan_pruned, plan_full = _planning_s(table, repetitions)
    print(
        f"  table: {DAYS} days x {events_per_day:,} events, {full.files_read} data files, "
        f"{full.bytes_read / 1e6:,.0f} MB; day query rows: {len(pruned.rows)}\n"
        f"  pruned: {pruned.files_read} file(s), {pruned.bytes_read / 1e6:,.1f} MB ({share:.3f} of the table, "
        f"target <= {TARGET_BYTES_SHARE:.3f}); median {statistics.median(pruned_times):.3f} s, "
        f"best {min(pruned_times):.3f} s\n"
        f"  every file: median {statistics.median(full_times):.3f} s, best {min(full_times):.3f} s\n"
        f"  speedup (medians): {speedup:.1f}x, target >= {TARGET_SPEEDUP:.0f}x: {'PASS' if met else 'FAIL'}\n"
        f"  of which planning the files (pyiceberg, medians): pruned {plan_pruned * 1000:.0f} ms, every file "
        f"{plan_full * 1000:.0f} ms"
    )
    _, _, compacted_pruned, compacted_full = _compare(month_table(events_per_day, 1), repetitions)
    compacted_speedup = statistics.median(compacted_full) / statistics.median(compacted_pruned)
    print(
        f"  compacted layout (1 file a day), for information: pruned median "
        f"{statistics.median(compacted_pruned):.3f} s, every file {statistics.median(compacted_full):.3f} s "
        f"({compacted_speedup:.1f}x)"
    )
    return {
        "pruning_events": DAYS * events_per_day,
        "pruning_files": full.files_read,
        "pruning_files_read": pruned.files_read,
        "pruning_bytes_share": round(share, 4),
        "pruning_day_query_s": round(statistics.median(pruned_times), 4),
        "pruning_full_scan_s": round(statistics.median(full_times), 4),
        "pruning_speedup": round(speedup, 1),
        "pruning_day_query_planning_s": round(plan_pruned, 4),
        "pruning_full_scan_planning_s": round(plan_full, 4),
        "pruning_met": met,
        "pruning_compacted_day_query_s": round(statistics.median(compacted_pruned), 4),
        "pruning_compacted_full_scan_s": round(statistics.median(compacted_full), 4),
        "pruning_compacted_speedup": round(compacted_speedup, 1),
    }


if __name__ == "__main__":
    run()
