"""Compaction: a simulated month of one-minute flushes, compacted, against the same events written fresh.

The month is 30 UTC days of 1,440 small files each (the stream's one-minute interval: 43,200 files; 60 a day with
``quick``), ~50,000 events a day. The small files are written by pyarrow and added in one commit per day (the same
file count as 43,200 flushes, without building their 43,200 snapshots), then :func:`meterlake.lake.compact.compact`
rewrites them and :func:`expire_snapshots` drops the history. The fresh table holds the same events, one pyiceberg
append per day (cached under bench/data/). Targets: at least 100x fewer data files, the one-day usage query within
1.2x of the fresh table's (medians, interleaved), and every usage number unchanged.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa

from bench.events import add_flushed_days, events_connection, generate_events, reuse_cached_table
from bench.query import DATA_ROOT
from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.compact import Retention, compact, expire_snapshots
from meterlake.lake.home import DataDir
from meterlake.lake.query import QueryResult, load_query, run_local_query

DAYS = 30
EVENTS_PER_DAY = 50_400
FULL_FLUSHES_PER_DAY = 1440
QUICK_FLUSHES_PER_DAY = 60
FIRST_DAY = datetime(2026, 9, 1, tzinfo=UTC)
QUERY_DAY = FIRST_DAY + timedelta(days=17)
TARGET_FILE_REDUCTION = 100.0
TARGET_QUERY_RATIO = 1.2
_DAY_US = 86_400_000_000


def _day_events(con: duckdb.DuckDBPyConnection, day: int, schema: pa.Schema) -> pa.Table:
    """One UTC day of the month's synthetic events."""
    return generate_events(
        con,
        first=day * EVENTS_PER_DAY,
        count=EVENTS_PER_DAY,
        start=FIRST_DAY + timedelta(days=day),
        step_us=_DAY_US // EVENTS_PER_DAY,
        schema=schema,
    )


def fresh_table() -> DataDir:
    """The month's events, one append per day (cached)."""
    data = DataDir(DATA_ROOT / f"compaction-fresh-{DAYS}x{EVENTS_PER_DAY}")
    config = Config()
    events = DAYS * EVENTS_PER_DAY
    if reuse_cached_table(data, lambda cached: ensure_metering_table(open_catalog(cached), config), events):
        return data
    table = ensure_metering_table(open_catalog(data), config)
    schema = table.schema().as_arrow()
    con = events_connection()
    for day in range(DAYS):
        table.append(_day_events(con, day, schema))
    con.close()
    return data


def small_files_table(root: Path, flushes_per_day: int) -> DataDir:
    """The month as the stream leaves it: ``flushes_per_day`` small files a day, added one commit per day."""
    data = DataDir(root)
    table = ensure_metering_table(open_catalog(data), Config())
    add_flushed_days(
        table,
        first_day=FIRST_DAY,
        days=DAYS,
        events_per_day=EVENTS_PER_DAY,
        files_per_day=flushes_per_day,
        staging=root / "flushes",
    )
    return data


def _files(data: DataDir) -> int:
    table = ensure_metering_table(open_catalog(data), Config())
    return len(list(table.scan().plan_files()))


def _query(data: DataDir, name: str, params: dict[str, str], *, prune: bool = True) -> tuple[QueryResult, float]:
    started = time.perf_counter()
    result = run_local_query(load_query(name), params, config=Config(), data_dir=data, prune=prune)
    return result, time.perf_counter() - started


def run(quick: bool = False) -> dict[str, object]:
    """Build both tables, compact and expire the small-files one, and compare file counts, usage and query times."""
    flushes = QUICK_FLUSHES_PER_DAY if quick else FULL_FLUSHES_PER_DAY
    repetitions = 3 if quick else 7
    day = {"start": QUERY_DAY.isoformat(), "end": (QUERY_DAY + timedelta(days=1)).isoformat()}
    month = {"start": FIRST_DAY.isoformat(), "end": (FIRST_DAY + timedelta(days=DAYS)).isoformat()}
    fresh = fresh_table()
    with tempfile.TemporaryDirectory(prefix="meterlake-compaction-", dir=DATA_ROOT) as scratch:
        started = time.perf_counter()
        small = small_files_table(Path(scratch), flushes)
        built_s = time.perf_counter() - started
        files_before = _files(small)
        usage_before = _query(small, "usage_per_tenant_day", month)[0].rows
        small_day, small_day_s = _query(small, "usage_per_tenant_day", day)
        small_day_full_s = _query(small, "usage_per_tenant_day", day, prune=False)[1]

        table = ensure_metering_table(open_catalog(small), Config())
        started = time.perf_counter()
        report = compact(table, now=FIRST_DAY + timedelta(days=DAYS + 1))
        compact_s = time.perf_counter() - started
        table.refresh()
        started = time.perf_counter()
        expiry = expire_snapshots(table, retention=Retention(snapshots=timedelta(0)), now=datetime.now(UTC))
        expire_s = time.perf_counter() - started
        files_after = _files(small)
        usage_after = _query(small, "usage_per_tenant_day", month)[0].rows
        usage_fresh = _query(fresh, "usage_per_tenant_day", month)[0].rows

        compacted_times: list[float] = []
        fresh_times: list[float] = []
        for _ in range(repetitions):
            compacted, seconds = _query(small, "usage_per_tenant_day", day)
            compacted_times.append(seconds)
            fresh_day, seconds = _query(fresh, "usage_per_tenant_day", day)
            fresh_times.append(seconds)
    unchanged = usage_before == usage_after == usage_fresh and compacted.rows == fresh_day.rows == small_day.rows
    if not unchanged:
        raise RuntimeError("compaction changed a usage number")
    reduction = files_before / files_after
    ratio = statistics.median(compacted_times) / statistics.median(fresh_times)
    met = reduction >= TARGET_FILE_REDUCTION and ratio <= TARGET_QUERY_RATIO
    print(
        f"  month: {DAYS} days x {flushes} flushes = {files_before:,} files, {DAYS * EVENTS_PER_DAY:,} events "
        f"(built in {built_s:.0f} s)\n"
        f"  before compaction, day query: {small_day_s:.3f} s pruned, {small_day_full_s:.3f} s over every file\n"
        f"  compact: {report.partitions} days, {report.files_replaced:,} files -> {report.files_written} in "
        f"{compact_s:.1f} s (one replace commit); expiry: {expiry.expired_snapshots} snapshots, "
        f"{expiry.deleted_files:,} files deleted in {expire_s:.1f} s\n"
        f"  data files {files_before:,} -> {files_after}: {reduction:.0f}x fewer, target >= "
        f"{TARGET_FILE_REDUCTION:.0f}x; usage numbers unchanged (month and day, vs the fresh table)\n"
        f"  day query: compacted median {statistics.median(compacted_times):.3f} s, fresh "
        f"{statistics.median(fresh_times):.3f} s: {ratio:.2f}x, target <= {TARGET_QUERY_RATIO}x: "
        f"{'PASS' if met else 'FAIL'}"
    )
    return {
        "compaction_files_before": files_before,
        "compaction_files_after": files_after,
        "compaction_file_reduction": round(reduction, 1),
        "compaction_s": round(compact_s, 1),
        "compaction_expired_snapshots": expiry.expired_snapshots,
        "compaction_deleted_files": expiry.deleted_files,
        "compaction_day_query_s": round(statistics.median(compacted_times), 4),
        "compaction_fresh_day_query_s": round(statistics.median(fresh_times), 4),
        "compaction_query_ratio": round(ratio, 3),
        "compaction_uncompacted_day_query_s": round(small_day_s, 4),
        "compaction_uncompacted_day_query_every_file_s": round(small_day_full_s, 4),
        "compaction_usage_unchanged": unchanged,
        "compaction_met": met,
    }


if __name__ == "__main__":
    run()
