"""Pruning: a one-day usage query over a 30-day table, with the query's window pushed into the Iceberg scan and without.

The table (30 UTC days, ~1M events a day, 3k a day with ``quick``) is written by pyiceberg one append per day and
cached under bench/data/ keyed by its size. Both sides run ``usage_per_tenant_day`` through the local runner, pruned
(the default) and over the snapshot's every data file, interleaved in one process; their rows must be identical.
Targets: the pruned query reads at most 1/20 of the table's bytes and answers at least 10x faster (medians).
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta

from bench.events import events_connection, generate_events, reuse_cached_table
from bench.query import DATA_ROOT
from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.lake.query import QueryResult, load_query, run_local_query

DAYS = 30
FULL_EVENTS_PER_DAY = 1_000_000
QUICK_EVENTS_PER_DAY = 30_000
FIRST_DAY = datetime(2026, 10, 1, tzinfo=UTC)
#: The day asked about: one in the middle of the month.
QUERY_DAY = FIRST_DAY + timedelta(days=17)
TARGET_BYTES_SHARE = 1 / 20
TARGET_SPEEDUP = 10.0
_DAY_US = 86_400_000_000


def month_table(events_per_day: int) -> DataDir:
    """The cached 30-day table of ``events_per_day`` events a day, generated on first use (one append per day)."""
    data = DataDir(DATA_ROOT / f"pruning-{DAYS}x{events_per_day}")
    config = Config()
    total = DAYS * events_per_day
    if reuse_cached_table(data, lambda cached: ensure_metering_table(open_catalog(cached), config), total):
        return data
    started = time.perf_counter()
    table = ensure_metering_table(open_catalog(data), config)
    schema = table.schema().as_arrow()
    con = events_connection()
    step_us = _DAY_US // events_per_day
    for day in range(DAYS):
        first = day * events_per_day
        events = generate_events(
            con,
            first=first,
            count=events_per_day,
            start=FIRST_DAY + timedelta(days=day),
            step_us=step_us,
            schema=schema,
        )
        table.append(events)
    con.close()
    print(f"  generated {total:,} events over {DAYS} days in {time.perf_counter() - started:.1f} s under {data.root}")
    return data


def _day_query(data: DataDir, *, prune: bool) -> tuple[QueryResult, float]:
    params = {"start": QUERY_DAY.isoformat(), "end": (QUERY_DAY + timedelta(days=1)).isoformat()}
    started = time.perf_counter()
    result = run_local_query(load_query("usage_per_tenant_day"), params, config=Config(), data_dir=data, prune=prune)
    return result, time.perf_counter() - started


def run(quick: bool = False) -> dict[str, object]:
    """Time the day query pruned and unpruned, interleaved; print bytes read, medians and PASS/FAIL."""
    events_per_day = QUICK_EVENTS_PER_DAY if quick else FULL_EVENTS_PER_DAY
    repetitions = 3 if quick else 7
    data = month_table(events_per_day)
    pruned_times: list[float] = []
    full_times: list[float] = []
    for _ in range(repetitions):
        pruned, seconds = _day_query(data, prune=True)
        pruned_times.append(seconds)
        full, seconds = _day_query(data, prune=False)
        full_times.append(seconds)
    if pruned.rows != full.rows or not pruned.rows:
        raise RuntimeError("the pruned and the full scan disagree (or found nothing); the comparison is meaningless")
    assert pruned.bytes_read is not None
    assert full.bytes_read is not None
    share = pruned.bytes_read / full.bytes_read
    speedup = statistics.median(full_times) / statistics.median(pruned_times)
    met = share <= TARGET_BYTES_SHARE and speedup >= TARGET_SPEEDUP
    print(
        f"  table: {DAYS} days x {events_per_day:,} events, {full.files_read} data files, "
        f"{full.bytes_read / 1e6:,.0f} MB; day query rows: {len(pruned.rows)}\n"
        f"  pruned: {pruned.files_read} file(s), {pruned.bytes_read / 1e6:,.1f} MB ({share:.3f} of the table, "
        f"target <= {TARGET_BYTES_SHARE:.3f}); median {statistics.median(pruned_times):.3f} s, "
        f"best {min(pruned_times):.3f} s\n"
        f"  every file: median {statistics.median(full_times):.3f} s, best {min(full_times):.3f} s\n"
        f"  speedup (medians): {speedup:.1f}x, target >= {TARGET_SPEEDUP:.0f}x: {'PASS' if met else 'FAIL'}"
    )
    return {
        "pruning_events": DAYS * events_per_day,
        "pruning_files": full.files_read,
        "pruning_files_read": pruned.files_read,
        "pruning_bytes_share": round(share, 4),
        "pruning_day_query_s": round(statistics.median(pruned_times), 4),
        "pruning_full_scan_s": round(statistics.median(full_times), 4),
        "pruning_speedup": round(speedup, 1),
        "pruning_met": met,
    }


if __name__ == "__main__":
    run()
