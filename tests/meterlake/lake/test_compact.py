"""Compaction and snapshot expiry: fewer files, the same rows and usage numbers, nothing forwarded twice.

The table is committed the way the delivery stream commits it (one small append per flush, with the stream's
snapshot properties), over three UTC days plus today, so two closed days get compacted and today's stays open.
"""

from __future__ import annotations

import errno
import itertools
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import _dataframe_to_data_files as write_data_files
from pyiceberg.manifest import DataFile, ManifestEntry, ManifestFile
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation

from meterlake.amberflo.outbox import Outbox
from meterlake.config import Config
from meterlake.lake import compact as compact_module
from meterlake.lake.compact import (
    CompactionConflictError,
    CompactionMismatchError,
    MaintenanceBusyError,
    MaintenanceCancelledError,
    MaintenanceWorker,
    Retention,
    compact,
    expire_snapshots,
    maintain,
    maintenance_lock,
)
from meterlake.lake.home import DataDir
from meterlake.lake.query import list_queries, run_local_query
from meterlake.meters import DEFAULT_METERS, meter_records
from tests.meterlake.amberflo.lake import (
    commit_events,
    make_events,
    make_meter_events,
    meter_events_table,
    metering_table,
)

CONFIG = Config()
DAY_MS = 86_400_000
#: Today, as the tests' clock says: the last of the four days the table holds.
FIRST_DAY = datetime(2025, 11, 24, tzinfo=UTC)
NOW = FIRST_DAY + timedelta(days=3, hours=12)
FLUSHES_PER_DAY = 6
EVENTS_PER_FLUSH = 40
KEEP_NOTHING = Retention(snapshots=timedelta(0), min_snapshots=1, orphan_files=timedelta(days=3))


def _events(day: int, flush: int) -> pa.Table:
    """The events of day ``day``'s flush number ``flush``: EVENTS_PER_FLUSH, numbered uniquely, at that day's times."""
    first = (day * FLUSHES_PER_DAY + flush) * EVENTS_PER_FLUSH
    events = make_events(first, EVENTS_PER_FLUSH)
    shift_us = ((FIRST_DAY - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)) + day * DAY_MS * 1000
    base_us = pc.min(events.column("request_time").cast(pa.int64())).as_py()
    for name in ("request_time", "ingested_at"):
        column = events.column(name)
        moved = pc.add(pc.subtract(column.cast(pa.int64()), base_us), shift_us + flush * 3_600_000_000)
        events = events.set_column(
            events.schema.get_field_index(name), events.schema.field(name), moved.cast(column.type)
        )
    return events


def _flush(table: Table, day: int, flush: int, *, offset: int) -> None:
    """One small commit, as the stream makes it."""
    commit_events(table, _events(day, flush), offset=offset)


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    data = DataDir.resolve(tmp_path / "home")
    table = metering_table(data.root)
    offset = 0
    for day in range(4):
        for flush in range(FLUSHES_PER_DAY):
            offset += 1
            _flush(table, day, flush, offset=offset)
    return data


def _table(data: DataDir) -> Table:
    return metering_table(data.root)


def _live_files(table: Table) -> list[str]:
    table.refresh()
    return [task.file.file_path for task in table.scan().plan_files()]


def _usage(data: DataDir) -> dict[str, list[tuple[object, ...]]]:
    return {q.name: run_local_query(q, {}, config=CONFIG, data_dir=data).rows for q in list_queries()}


def _rows(table: Table) -> list[tuple[object, ...]]:
    table.refresh()
    arrow = table.scan().to_arrow().sort_by("request_id")
    return list(zip(*(column.to_pylist() for column in arrow.columns), strict=True))


def test_closed_days_become_one_sorted_file_each_in_one_replace_commit(data_dir: DataDir) -> None:
    table = _table(data_dir)
    usage, rows, snapshots = _usage(data_dir), _rows(table), len(table.snapshots())
    assert len(_live_files(table)) == 4 * FLUSHES_PER_DAY

    report = compact(table, now=NOW)

    # Days 0..2 are closed (day 2 ended 12 h before NOW); today's flushes stay as they are.
    assert (report.partitions, report.files_replaced, report.files_written) == (3, 18, 3)
    assert report.rows == 3 * FLUSHES_PER_DAY * EVENTS_PER_FLUSH
    assert len(_live_files(table)) == 3 + FLUSHES_PER_DAY
    assert len(table.snapshots()) == snapshots + 1
    current = table.current_snapshot()
    assert current is not None
    assert current.summary is not None
    assert current.summary.operation == Operation.REPLACE
    assert current.summary["total-records"] == str(4 * FLUSHES_PER_DAY * EVENTS_PER_FLUSH)
    assert _rows(table) == rows
    assert _usage(data_dir) == usage
    for task in table.scan().plan_files():
        if task.file.record_count > EVENTS_PER_FLUSH:  # a compacted file
            times = pa.parquet.read_table(task.file.file_path.removeprefix("file://")).column("request_time")
            assert pc.all(pc.greater_equal(times[1:], times[:-1].combine_chunks())).as_py()

    assert compact(table, now=NOW).snapshot_id is None  # nothing left to compact: no new snapshot
    assert len(table.snapshots()) == snapshots + 1


def test_queries_skip_the_manifest_listing_only_the_files_a_compaction_replaced(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replace snapshot keeps a manifest of the files it removed; planning a query must not read it (it costs
    as much as the small files did), as Java's scans skip such manifests."""
    table = _table(data_dir)
    usage = _usage(data_dir)
    compact(table, now=NOW)
    current = table.current_snapshot()
    assert current is not None
    removed_only = [
        m.manifest_path for m in current.manifests(table.io) if not (m.has_added_files() or m.has_existing_files())
    ]
    assert len(removed_only) == 1
    read: list[str] = []
    fetch = ManifestFile.fetch_manifest_entry

    def recording(self: ManifestFile, io: FileIO, discard_deleted: bool = True) -> list[ManifestEntry]:
        read.append(self.manifest_path)
        return fetch(self, io, discard_deleted)

    monkeypatch.setattr(ManifestFile, "fetch_manifest_entry", recording)
    assert _usage(data_dir) == usage
    assert read
    assert removed_only[0] not in read


def test_the_forwarding_outbox_never_stages_a_compaction(data_dir: DataDir, tmp_path: Path) -> None:
    """Staged before compaction, nothing is staged again; staged only after it (checkpoint behind the replace), every
    event is staged exactly once, from the appends that committed it."""
    table = _table(data_dir)
    expected = Counter(meter_records(table.scan().to_arrow(), DEFAULT_METERS).unique_ids())
    assert set(expected.values()) == {1}
    with Outbox(tmp_path / "before.db") as before, Outbox(tmp_path / "after.db") as after:
        before.stage_committed(table)
        compact(table, now=NOW)
        table.refresh()
        assert before.stage_committed(table) == 0
        assert after.stage_committed(table) == sum(expected.values())
        for outbox in (before, after):
            assert Counter(record["uniqueId"] for record in outbox.staged_records()) == expected
        assert before.status().checkpoint_snapshot_id == table.current_snapshot().snapshot_id  # type: ignore[union-attr]


def test_an_append_during_compaction_is_kept_and_neither_waits(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream commits while compaction writes: the replace lands on the new head, the appended rows stay."""
    table, stream_table = _table(data_dir), _table(data_dir)
    write = write_data_files
    appended: list[int] = []

    def write_then_append(**kwargs: object) -> object:
        if not appended:
            _flush(stream_table, 3, FLUSHES_PER_DAY, offset=1000)  # today's next flush, on its own Table object
            appended.append(1)
        return write(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(compact_module, "_dataframe_to_data_files", write_then_append)
    report = compact(table, now=NOW)
    assert report.partitions == 3
    assert len(_live_files(table)) == 3 + FLUSHES_PER_DAY + 1
    assert len(_rows(table)) == (4 * FLUSHES_PER_DAY + 1) * EVENTS_PER_FLUSH
    _flush(stream_table, 3, FLUSHES_PER_DAY + 1, offset=1001)  # the stream's stale Table object still commits
    assert len(_rows(table)) == (4 * FLUSHES_PER_DAY + 2) * EVENTS_PER_FLUSH


def test_a_compaction_racing_another_one_commits_nothing_and_leaves_no_files(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    table, other = _table(data_dir), _table(data_dir)
    write = write_data_files
    written: list[str] = []

    def write_after_the_other_compacted(**kwargs: object) -> object:
        if not written:
            monkeypatch.setattr(compact_module, "_dataframe_to_data_files", write)
            compact(other, now=NOW)
        files = list(write(**kwargs))  # type: ignore[arg-type]
        written.extend(f.file_path.removeprefix("file://") for f in files)
        return files

    monkeypatch.setattr(compact_module, "_dataframe_to_data_files", write_after_the_other_compacted)
    rows = _rows(table)
    with pytest.raises(CompactionConflictError, match="concurrently deleted"):
        compact(table, now=NOW)
    assert written
    assert not any(Path(path).exists() for path in written)
    assert _rows(table) == rows


def test_delete_planning_judges_each_manifest_on_its_own_bounds_on_any_thread(data_dir: DataDir) -> None:
    # pyiceberg plans a rewrite's deletes on a thread pool; its manifest evaluator keeps the manifest being judged on
    # itself, so a shared one judged a manifest on another's partition bounds and the compaction failed with "Missing
    # required files to delete" (seen once in a full run). Switching threads every microsecond makes the race likely.
    table = _table(data_dir)
    files = [task.file for task in table.scan().plan_files()]
    days = sorted({data_file.partition[0] for data_file in files})
    snapshot = table.current_snapshot()
    assert snapshot is not None
    manifests = snapshot.manifests(table.io)
    swap = compact_module._ReplaceFiles(operation=Operation.OVERWRITE, transaction=table.transaction(), io=table.io)
    for data_file in files:
        if data_file.partition[0] in (days[0], days[2]):
            swap.delete_data_file(data_file)
    swap._build_delete_files_partition_predicate()
    evaluate = swap._build_manifest_evaluator(table.spec().spec_id)
    expected = [evaluate(manifest) for manifest in manifests]
    assert 0 < sum(expected) < len(manifests)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(8) as pool:
            wrong = sum(list(pool.map(evaluate, manifests)) != expected for _ in range(50))
    finally:
        sys.setswitchinterval(interval)
    assert wrong == 0


def test_expiry_keeps_what_readers_need_and_deletes_what_nothing_references(data_dir: DataDir) -> None:
    table = _table(data_dir)
    closed_days_files = {path for path in _live_files(table) if "2025-11-27" not in path}
    with Outbox(data_dir.root / "outbox.db") as outbox:
        outbox.stage_committed(table)
        checkpoint = outbox.status().checkpoint_snapshot_id
    _flush(table, 3, FLUSHES_PER_DAY, offset=1000)  # committed after the outbox's checkpoint
    compact(table, now=NOW)
    table.refresh()
    usage = _usage(data_dir)
    later = datetime.now(UTC) + timedelta(days=1)

    # A reader that has staged nothing keeps every snapshot.
    assert expire_snapshots(table, retention=KEEP_NOTHING, readers=[None], now=later).expired_snapshots == 0
    # The outbox's checkpoint keeps itself and the snapshots after it: the append it has not staged, the replace.
    report = expire_snapshots(table, retention=KEEP_NOTHING, readers=[checkpoint], now=later)
    assert (report.retained_snapshots, report.expired_snapshots) == (3, 4 * FLUSHES_PER_DAY - 1)
    with Outbox(data_dir.root / "outbox.db") as outbox:
        staged = outbox.stage_committed(table)
    assert staged == len(meter_records(_events(3, FLUSHES_PER_DAY), DEFAULT_METERS))
    # The compacted files are still live in the kept append: nothing of them is deleted yet.
    assert all(Path(path.removeprefix("file://")).exists() for path in closed_days_files)
    assert _usage(data_dir) == usage

    report = expire_snapshots(table, retention=KEEP_NOTHING, now=later)
    assert (report.retained_snapshots, report.expired_snapshots) == (1, 2)
    assert not any(Path(path.removeprefix("file://")).exists() for path in closed_days_files)
    assert _usage(data_dir) == usage
    current = table.current_snapshot()
    assert current is not None
    metadata = {path.name for path in Path(table.location().removeprefix("file://"), "metadata").glob("*.avro")}
    assert metadata == {Path(current.manifest_list).name} | {
        Path(manifest.manifest_path).name for manifest in current.manifests(table.io)
    }
    data = {path.name for path in Path(table.location().removeprefix("file://"), "data").rglob("*.parquet")}
    assert data == {Path(path).name for path in _live_files(table)}


def test_retention_keeps_young_snapshots_and_the_newest_few(data_dir: DataDir) -> None:
    table = _table(data_dir)
    snapshots = len(table.snapshots())
    young = Retention(snapshots=timedelta(days=1))
    assert expire_snapshots(table, retention=young, now=datetime.now(UTC)).expired_snapshots == 0
    few = Retention(snapshots=timedelta(0), min_snapshots=5)
    report = expire_snapshots(table, retention=few, now=datetime.now(UTC) + timedelta(days=1))
    assert (report.retained_snapshots, report.expired_snapshots) == (5, snapshots - 5)
    assert len(_rows(table)) == 4 * FLUSHES_PER_DAY * EVENTS_PER_FLUSH


def test_one_maintenance_of_a_table_at_a_time(data_dir: DataDir) -> None:
    table = _table(data_dir)
    with (
        maintenance_lock(data_dir, table.name()),
        pytest.raises(MaintenanceBusyError, match="another process is compacting"),
    ):
        maintain(data_dir, table, retention=KEEP_NOTHING, now=NOW)
    # Another table's maintenance (the meter-events table's, in the service's process) does not hold this one up.
    with maintenance_lock(data_dir, (CONFIG.database_name, "meter_events")):
        report = maintain(data_dir, table, retention=KEEP_NOTHING, now=NOW)
    assert report.compaction.partitions == 3


def test_files_that_would_not_hold_exactly_the_rows_read_are_never_committed(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewrite is checked by content, not by count: a writer that changed one value (same row count) is caught,
    nothing is committed and the files it wrote are deleted."""
    table = _table(data_dir)
    files, snapshots, rows = set(_live_files(table)), len(table.snapshots()), _rows(table)
    write = write_data_files
    written: list[str] = []

    def one_status_changed(**kwargs: Any) -> Iterator[DataFile]:
        df = kwargs.pop("df")
        status = df.column("status").to_pylist()
        status[0] = 299 if status[0] != 299 else 298
        df = df.set_column(df.schema.get_field_index("status"), "status", pa.array(status, pa.int32()))
        for data_file in write(df=df, **kwargs):
            written.append(data_file.file_path)
            yield data_file

    monkeypatch.setattr(compact_module, "_dataframe_to_data_files", one_status_changed)
    with pytest.raises(CompactionMismatchError, match="do not hold the rows read"):
        compact(table, now=NOW)
    table.refresh()
    assert set(_live_files(table)) == files
    assert len(table.snapshots()) == snapshots
    assert _rows(table) == rows
    assert written
    assert not any(Path(path.removeprefix("file://")).exists() for path in written)


def test_late_rows_merge_with_each_other_and_never_rewrite_the_compacted_day(data_dir: DataDir) -> None:
    """Meter events may arrive weeks late, into a day compacted long ago: its compacted file (the anchor, far under
    the table's target file size) is left alone, and only the late files are merged, once there are two."""
    table = _table(data_dir)
    compact(table, now=NOW)
    anchor = {task.file.file_path for task in table.scan().plan_files() if "2025-11-25" in task.file.file_path}
    assert len(anchor) == 1
    usage = _usage(data_dir)

    _flush(table, 1, 0, offset=2000)  # a late flush into day 1 (its own new rows)
    assert compact(table, now=NOW).snapshot_id is None  # one late file: nothing worth rewriting

    _flush(table, 1, 1, offset=2001)
    report = compact(table, now=NOW)
    assert (report.partitions, report.files_replaced, report.files_written) == (1, 2, 1)
    day_files = {task.file.file_path for task in table.scan().plan_files() if "2025-11-25" in task.file.file_path}
    assert anchor < day_files
    assert len(day_files) == 2  # the anchor and the late rows

    _flush(table, 1, 2, offset=2002)
    report = compact(table, now=NOW)
    assert (report.files_replaced, report.files_written) == (2, 1)  # the late rows' file and the new one
    day_files = {task.file.file_path for task in table.scan().plan_files() if "2025-11-25" in task.file.file_path}
    assert anchor < day_files
    assert len(day_files) == 2
    assert _usage(data_dir) != usage  # the late rows count
    assert len(_rows(table)) == (4 * FLUSHES_PER_DAY + 3) * EVENTS_PER_FLUSH


def _damage(path: str) -> None:
    """Flip a run of bytes in the middle of a data file (its pages, past the magic and before the footer)."""
    local = Path(path.removeprefix("file://"))
    data = bytearray(local.read_bytes())
    for i in range(200, 260):
        data[i] ^= 0xFF
    local.write_bytes(bytes(data))


def test_a_damaged_file_leaves_its_day_as_it_is_and_every_other_day_is_compacted(data_dir: DataDir) -> None:
    table = _table(data_dir)
    first_day = sorted(path for path in _live_files(table) if "2025-11-24" in path)
    _damage(first_day[2])

    report = compact(table, now=NOW)

    assert (report.partitions, report.files_replaced, report.files_written) == (2, 12, 2)
    (unreadable,) = report.unreadable
    assert unreadable.startswith("2025-11-24: ")
    assert first_day[2].removeprefix("file://") in unreadable
    assert "cannot be read" in unreadable
    assert sorted(path for path in _live_files(table) if "2025-11-24" in path) == first_day


def test_a_full_disk_while_writing_commits_nothing_and_leaves_no_written_file(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills after the first file of a rewrite landed: the error reaches the caller, nothing is committed,
    and the file that did land is deleted (not left for the orphan sweep days later)."""
    table = _table(data_dir)
    files, snapshots = set(_live_files(table)), len(table.snapshots())
    data = Path(table.location().removeprefix("file://"), "data")
    on_disk = set(data.rglob("*.parquet"))

    def disk_full_after_one(**kwargs: Any) -> Iterator[DataFile]:
        yield from itertools.islice(write_data_files(**kwargs), 1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compact_module, "_dataframe_to_data_files", disk_full_after_one)
    with pytest.raises(OSError, match="No space left"):
        compact(table, now=NOW)
    table.refresh()
    assert set(_live_files(table)) == files
    assert len(table.snapshots()) == snapshots
    assert set(data.rglob("*.parquet")) == on_disk


def test_a_cancelled_compaction_commits_nothing_and_leaves_no_files(data_dir: DataDir) -> None:
    """A stopping process asks its run to stop: between days (here after the first) it deletes what it wrote."""
    table = _table(data_dir)
    files, snapshots = set(_live_files(table)), len(table.snapshots())
    data = Path(table.location().removeprefix("file://"), "data")
    on_disk = set(data.rglob("*.parquet"))
    asked = iter([False, True])
    with pytest.raises(MaintenanceCancelledError):
        compact(table, now=NOW, cancelled=lambda: next(asked, True))
    table.refresh()
    assert set(_live_files(table)) == files
    assert len(table.snapshots()) == snapshots
    assert set(data.rglob("*.parquet")) == on_disk


def test_metadata_files_past_the_log_are_deleted_as_orphans(data_dir: DataDir) -> None:
    """Each commit writes a metadata file; those the table's metadata log no longer names are orphans, deleted once
    older than the orphan retention (as Glue's orphan-file optimizer does), and the table still reads whole."""
    table = _table(data_dir)
    with table.transaction() as transaction:
        transaction.set_properties({"write.metadata.previous-versions-max": "3"})
    _flush(table, 3, FLUSHES_PER_DAY, offset=1000)
    table.refresh()
    metadata_dir = Path(table.location().removeprefix("file://"), "metadata")
    named = {Path(table.metadata_location).name} | {Path(e.metadata_file).name for e in table.metadata.metadata_log}
    assert len(named) == 4
    assert len(list(metadata_dir.glob("*.metadata.json"))) > 4 * FLUSHES_PER_DAY  # one a commit, never deleted

    # Younger than the orphan retention: kept (a commit in flight may have just written one).
    expire_snapshots(table, retention=Retention(snapshots=timedelta(days=30)), now=datetime.now(UTC))
    assert len(list(metadata_dir.glob("*.metadata.json"))) > 4 * FLUSHES_PER_DAY

    expire_snapshots(
        table, retention=Retention(snapshots=timedelta(days=30)), now=datetime.now(UTC) + timedelta(days=4)
    )
    table.refresh()
    assert {path.name for path in metadata_dir.glob("*.metadata.json")} == named
    assert len(_rows(_table(data_dir))) == (4 * FLUSHES_PER_DAY + 1) * EVENTS_PER_FLUSH


def test_the_meter_events_table_compacts_by_its_own_time_column(tmp_path: Path) -> None:
    """The meter-events table is partitioned by the day of meter_time: its closed days are rewritten sorted by it."""
    table = meter_events_table(tmp_path / "home")
    for flush in range(3):
        table.append(make_meter_events(f"u{flush}-", 5))
    report = compact(table, now=NOW)
    assert (report.partitions, report.files_replaced, report.files_written, report.rows) == (1, 3, 1, 15)
    (task,) = table.scan().plan_files()
    times = pa.parquet.read_table(task.file.file_path.removeprefix("file://")).column("meter_time")
    assert pc.all(pc.greater_equal(times[1:], times[:-1].combine_chunks())).as_py()
    assert sorted(table.scan().to_arrow().column("unique_id").to_pylist()) == sorted(
        f"u{flush}-{i}" for flush in range(3) for i in range(5)
    )


def test_the_schedule_maintains_the_table(data_dir: DataDir) -> None:
    worker = MaintenanceWorker(
        data_dir, load_table=lambda: _table(data_dir), retention=Retention(snapshots=timedelta(days=1)), interval_s=0.05
    )
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while worker.last is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert not isinstance(worker.last, Exception), worker.last
    assert worker.last is not None
    # The real clock: every one of the table's days (in 2025) is closed.
    assert worker.last.compaction.partitions == 4


def test_compacted_files_are_cut_into_row_groups_a_reader_can_split_and_skip(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compacted day is written in row groups of at most ROW_GROUP_ROWS (or the table's own smaller limit), so a
    reader splits a day across threads and skips the groups a time window excludes; the table is not changed."""
    table = _table(data_dir)
    monkeypatch.setattr(compact_module, "ROW_GROUP_ROWS", 100)
    compact(table, now=NOW)
    day_rows = FLUSHES_PER_DAY * EVENTS_PER_FLUSH
    compacted = [task.file for task in table.scan().plan_files() if task.file.record_count == day_rows]
    assert len(compacted) == 3
    for data_file in compacted:
        metadata = pa.parquet.ParquetFile(data_file.file_path.removeprefix("file://")).metadata
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert groups == [100, 100, day_rows - 200]
    assert "write.parquet.row-group-limit" not in table.properties
