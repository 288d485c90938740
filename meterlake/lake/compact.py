"""Table maintenance, as Glue's optimizers do it on AWS: compaction and snapshot expiry.

The delivery stream commits one or more small files per flush (a month at the one-minute interval is over 43,000),
and every query plan and forwarding pass pays for each. :func:`compact` rewrites the small files of each closed
partition (a UTC day that ended at least :data:`CLOSE_AFTER` ago, so no flush still writes there) into large files
sorted by the partition's time column, in row groups of at most :data:`ROW_GROUP_ROWS`, and commits all partitions'
swaps in ONE Iceberg ``replace`` snapshot. It reads and writes through pyiceberg and checks, by reading the files it
wrote back, that they hold exactly the rows it read (as a multiset, see :func:`_fingerprint`), so no usage number
changes. Both local tables are maintained alike: the access-log table and the metering service's ``meter_events``.

Why ``replace``: that operation says "the same rows, in other files". The forwarding outbox
(``meterlake.amberflo.outbox.committed_since``) stages what ``append`` and ``overwrite`` snapshots added and skips
every other operation, so a compaction is never forwarded, and the request-id index finds only keys it already holds.
pyiceberg 0.12 has no public rewrite (Java's ``RewriteFiles``), so :class:`_ReplaceFiles` is its overwrite producer
with the ``replace`` operation and a rewrite's conflict rules.

Never blocking ingest: compaction reads committed files and writes new ones without any lock the stream takes. When
the stream commits meanwhile, pyiceberg retries the replace on the new head; a rewrite conflicts only with a commit
that removed one of the files it replaces (Iceberg's rule for ``replace``), never with an append. The stream's own
append retries the same way if compaction commits first.

:func:`expire_snapshots` then drops snapshots older than the retention (``meterlake.aws.snapshot_retention_days``,
keeping at least ``snapshots_to_retain``: the settings of Glue's retention optimizer) and deletes the files only
expired snapshots referenced (Glue's ``clean_expired_files``); files nothing references at all (data files, manifests
and manifest lists, and metadata files past the table's metadata log) are deleted once older than
``orphan_file_retention_days`` (Glue's orphan-file optimizer). An incremental reader's checkpoint (the
forwarding outbox's) protects it and every snapshot after it: a snapshot it has not staged is never expired.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan, PyArrowFileIO, _dataframe_to_data_files
from pyiceberg.manifest import DataFile, ManifestEntryStatus, ManifestFile
from pyiceberg.table import FileScanTask, Table, TableProperties
from pyiceberg.table.snapshots import Operation, Snapshot, Summary
from pyiceberg.table.update.snapshot import _OverwriteFiles
from pyiceberg.table.update.validate import _validate_data_files_exist, _validate_no_new_deletes_for_data_files
from pyiceberg.transforms import DayTransform
from pyiceberg.typedef import EMPTY_DICT
from pyiceberg.utils.properties import property_as_bool, property_as_int

from meterlake.config import Config
from meterlake.lake.home import DataDir
from meterlake.lake.query import printable

logger = logging.getLogger(__name__)

#: A UTC day's partition is closed this long after the day ended: past the stream's longest buffering interval
#: (900 s) and its retries, so no flush still commits into it.
CLOSE_AFTER: Final = timedelta(hours=1)
#: A file under this share of the table's target file size (``write.target-file-size-bytes``) is small, as Glue's
#: binpack compaction counts it.
SMALL_FILE_SHARE: Final = 0.75
#: Rows per row group of a compacted file (at most): pyiceberg's default (1,048,576) leaves a day of a million
#: events in one group, which DuckDB reads on one thread and cannot skip any of. In groups of 262,144 (measured on
#: such a day, 2 cores): the day query ~1.7x faster, an hour of it ~2x, the file ~10% larger.
ROW_GROUP_ROWS: Final = 262_144
#: How often the running local stack maintains the table.
MAINTENANCE_INTERVAL_S: Final = 900.0
#: Attempts at committing an expiry the stream's commits keep racing.
_EXPIRE_ATTEMPTS: Final = 5
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_LOCK_FILE: Final = "maintenance-{table}.lock"


class MaintenanceError(Exception):
    """Base of the failures of table maintenance; the message is one line naming the problem."""


class MaintenanceBusyError(MaintenanceError):
    """Another process (the running stack's schedule, under ``meterlake up`` or ``serve``, or ``meterlake compact``)
    is maintaining the table."""

    def __init__(self, lock: Path) -> None:
        super().__init__(f"another process is compacting this table (it holds {lock}); try again when it is done")
        self.lock = lock


class MaintenanceCancelledError(MaintenanceError):
    """The run was asked to stop (its process is stopping); what it had written was deleted, nothing committed."""


class CompactionConflictError(MaintenanceError):
    """A concurrent commit removed files the compaction was replacing; nothing was changed, the next run retries."""


class CompactionMismatchError(MaintenanceError):
    """The rewritten files would not hold exactly the rows of the files they replace; nothing was committed."""


@dataclass(frozen=True, slots=True)
class CompactionReport:
    """What :func:`compact` did: partitions rewritten, files and bytes replaced and written, rows moved."""

    partitions: int = 0
    files_replaced: int = 0
    files_written: int = 0
    bytes_replaced: int = 0
    bytes_written: int = 0
    rows: int = 0
    #: The replace snapshot, or None when nothing needed compacting.
    snapshot_id: int | None = None
    #: Closed days left as they are because a file of theirs cannot be read: "<day>: <file> cannot be read (<why>)".
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExpiryReport:
    """What :func:`expire_snapshots` did: snapshots expired and kept, files deleted (expired ones and orphans)."""

    expired_snapshots: int = 0
    retained_snapshots: int = 0
    deleted_files: int = 0
    deleted_bytes: int = 0


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    """One maintenance run: the compaction, then the expiry."""

    compaction: CompactionReport
    expiry: ExpiryReport


@dataclass(frozen=True, slots=True)
class Retention:
    """How long snapshots and unreferenced files are kept (the settings of Glue's retention and orphan optimizers).

    Args:
        snapshots: snapshots younger than this are kept.
        min_snapshots: the newest this many snapshots are kept, whatever their age.
        orphan_files: a file no snapshot references is deleted once older than this (it may belong to a commit in
            flight until then).
    """

    snapshots: timedelta
    min_snapshots: int = 1
    orphan_files: timedelta = timedelta(days=3)

    @classmethod
    def from_config(cls, config: Config) -> Retention:
        """The retention the config gives Glue's optimizers on AWS (``meterlake.aws``), so both behave alike."""
        aws = config.meterlake.aws
        return cls(
            snapshots=timedelta(days=aws.snapshot_retention_days),
            min_snapshots=aws.snapshots_to_retain,
            orphan_files=timedelta(days=aws.orphan_file_retention_days),
        )


def maintain(
    data_dir: DataDir,
    table: Table,
    *,
    retention: Retention,
    readers: Callable[[], Sequence[int | None]] = tuple,
    now: datetime | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> MaintenanceReport:
    """Compact the table's closed partitions, then expire its old snapshots, holding the table's maintenance lock.

    Args:
        data_dir: where the lock that serialises the table's maintenance between processes is.
        table: the table to maintain.
        retention: what to keep.
        readers: the checkpoints of the table's incremental readers (each the last snapshot it consumed; None: it has
            consumed nothing yet), read after compacting; every snapshot after a checkpoint is kept.
        now: the time the run takes as now (default: the clock).
        cancelled: asked between days and before each commit; True stops the run (see :func:`compact`).

    Raises:
        MaintenanceBusyError: another process holds the lock.
        MaintenanceCancelledError: ``cancelled`` said stop.
        CompactionConflictError: a concurrent commit removed files being compacted.
        CompactionMismatchError: the rewrite would change the rows (nothing committed).
    """
    moment = now or datetime.now(UTC)
    with maintenance_lock(data_dir, table.name()):
        compaction = compact(table, now=moment, cancelled=cancelled)
        if cancelled():
            raise MaintenanceCancelledError("maintenance stopped before expiring snapshots")
        table.refresh()
        expiry = expire_snapshots(table, retention=retention, readers=readers(), now=moment)
    return MaintenanceReport(compaction=compaction, expiry=expiry)


@contextlib.contextmanager
def maintenance_lock(data_dir: DataDir, identifier: tuple[str, ...]) -> Iterator[None]:
    """Hold the maintenance lock of table ``identifier`` (an advisory file lock in the data dir, released if the
    process dies): one per table, so the two tables' schedules (``meterlake up`` and its metering service's delivery
    process) never skip each other's runs.

    Raises:
        MaintenanceBusyError: another process holds it.
    """
    path = data_dir.root / _LOCK_FILE.format(table=".".join(identifier))
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MaintenanceBusyError(path) from None
        yield
    finally:
        os.close(descriptor)


def compact(
    table: Table,
    *,
    now: datetime | None = None,
    close_after: timedelta = CLOSE_AFTER,
    cancelled: Callable[[], bool] = lambda: False,
) -> CompactionReport:
    """Rewrite the small files of every closed day partition into large files sorted by the partition's time column,
    in one ``replace`` commit.

    A partition's small files (see :data:`SMALL_FILE_SHARE`) are rewritten when at least two of them are worth it
    (see :func:`_worth_rewriting`: not a day's anchor file, which late arrivals would otherwise have rewritten whole
    every run) and it holds no delete files; its large files are left as they are. Files are rewritten partition by
    partition (one day in memory at a time), each day's new files read back and checked against the rows read, and
    swapped in one commit. If the commit cannot land, the files it wrote are deleted. A table not partitioned by one
    day transform has nothing this compacts.

    ``cancelled`` is asked before each day and before the commit: True deletes what was written and raises
    :class:`MaintenanceCancelledError` (a stopping process does not wait for a whole run).

    Raises:
        MaintenanceCancelledError: ``cancelled`` said stop; nothing was committed.
        CompactionConflictError: a concurrent commit removed files being compacted.
        CompactionMismatchError: the files written would not hold exactly the rows read.
    """
    moment = now or datetime.now(UTC)
    sort_column = _day_partition_source(table)
    if sort_column is None:
        return CompactionReport()
    target = property_as_int(
        table.metadata.properties,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT,
    )
    assert target is not None  # the default is not None
    small = SMALL_FILE_SHARE * target
    closed_before = _partition_day(moment - close_after)
    by_partition: dict[int, list[DataFile]] = defaultdict(list)
    tainted: set[int] = set()
    for task in table.scan().plan_files():
        day = _day_of(task.file)
        if day is None or day >= closed_before:
            continue
        if task.delete_files:
            tainted.add(day)
        elif task.file.file_size_in_bytes < small:
            by_partition[day].append(task.file)
    rewrite = {day: _worth_rewriting(files) for day, files in by_partition.items() if day not in tainted}
    days = sorted(day for day, files in rewrite.items() if files)
    if not days:
        return CompactionReport()

    replaced: list[DataFile] = []
    written: list[DataFile] = []
    unreadable: list[str] = []
    rows = 0
    write_uuid, counter = uuid.uuid4(), itertools.count()
    scan = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue())
    # The table's own row-group limit, unless it leaves a compacted day in one group (pyiceberg's default does).
    limit = property_as_int(
        table.metadata.properties,
        TableProperties.PARQUET_ROW_GROUP_LIMIT,
        TableProperties.PARQUET_ROW_GROUP_LIMIT_DEFAULT,
    )
    assert limit is not None  # the default is not None
    properties = {**table.metadata.properties, TableProperties.PARQUET_ROW_GROUP_LIMIT: str(min(limit, ROW_GROUP_ROWS))}
    writing = table.metadata.model_copy(update={"properties": properties})
    try:
        for day in days:
            if cancelled():
                raise MaintenanceCancelledError("compaction stopped; nothing was committed")
            files = rewrite[day]
            try:
                events = scan.to_table(tasks=[FileScanTask(data_file) for data_file in files])
            except (OSError, pa.ArrowException) as exc:
                # A damaged file must not stop every other day's compaction, run after run: this day waits.
                unreadable.append(f"{_day_text(day)}: {_unreadable_file(scan, files, exc)}")
                logger.warning("compaction left a day as it is, day %s", unreadable[-1])
                continue
            expected = sum(f.record_count for f in files)
            if events.num_rows != expected:
                raise CompactionMismatchError(f"day {_day_text(day)}: read {events.num_rows} rows of {expected}")
            columns = events.column_names
            read_fingerprint = _fingerprint(events)
            sorted_events = events.sort_by([(sort_column, "ascending")])
            del events
            new_files: list[DataFile] = []
            for data_file in _dataframe_to_data_files(
                table_metadata=writing, df=sorted_events, io=table.io, write_uuid=write_uuid, counter=counter
            ):
                # Kept as each lands, so a failure writing the next (a full disk) still deletes this one.
                written.append(data_file)
                new_files.append(data_file)
            del sorted_events
            # What landed on disk, read back a file at a time (one file's rows in memory, not the day's twice).
            written_fingerprint = (0, 0)
            for data_file in new_files:
                with table.io.new_input(data_file.file_path).open() as handle:
                    count, digest = _fingerprint(pq.read_table(handle, columns=columns))
                written_fingerprint = (written_fingerprint[0] + count, written_fingerprint[1] + digest)
            if written_fingerprint != read_fingerprint:
                raise CompactionMismatchError(
                    f"day {_day_text(day)}: the files written do not hold the rows read "
                    f"({written_fingerprint[0]} rows written, {read_fingerprint[0]} read)"
                )
            replaced.extend(files)
            rows += expected
        if cancelled():
            raise MaintenanceCancelledError("compaction stopped; nothing was committed")
        if not replaced:
            return CompactionReport(unreadable=tuple(unreadable))
        with table.transaction() as transaction:
            swap = _ReplaceFiles(operation=Operation.OVERWRITE, transaction=transaction, io=table.io)
            for data_file in replaced:
                swap.delete_data_file(data_file)
            for data_file in written:
                swap.append_data_file(data_file)
            swap.commit()
    except BaseException as exc:
        for data_file in written:
            with contextlib.suppress(OSError):
                table.io.delete(data_file.file_path)
        if isinstance(exc, ValidationException | CommitFailedException):
            raise CompactionConflictError(f"compaction not committed: {exc}") from exc
        raise
    snapshot = table.current_snapshot()
    report = CompactionReport(
        partitions=len(days) - len(unreadable),
        files_replaced=len(replaced),
        files_written=len(written),
        bytes_replaced=sum(f.file_size_in_bytes for f in replaced),
        bytes_written=sum(f.file_size_in_bytes for f in written),
        rows=rows,
        snapshot_id=None if snapshot is None else snapshot.snapshot_id,
        unreadable=tuple(unreadable),
    )
    logger.info(
        "compacted %d day(s): %d files -> %d, %d rows (replace snapshot %s)",
        report.partitions,
        report.files_replaced,
        report.files_written,
        report.rows,
        report.snapshot_id,
    )
    return report


def expire_snapshots(
    table: Table, *, retention: Retention, readers: Sequence[int | None] = (), now: datetime | None = None
) -> ExpiryReport:
    """Expire the snapshots the retention no longer keeps and delete the files nothing retained references.

    Kept: the current snapshot and its newest ``retention.min_snapshots`` ancestors, every snapshot younger than
    ``retention.snapshots``, and each reader's checkpoint with every ancestor after it (all of them if a checkpoint
    is None or not an ancestor: that reader's next read must find them). Kept snapshots are always the newest
    stretch of the history, so a walk from the current snapshot back to any of them finds every one in between.

    Files: each expired snapshot's manifest list, and the manifests and data files only expired snapshots
    referenced, are deleted at once; any other file under the table's location that no kept snapshot references
    (what a failed commit left) is deleted once older than ``retention.orphan_files``.
    """
    moment = now or datetime.now(UTC)
    for attempt in range(_EXPIRE_ATTEMPTS):
        current = table.current_snapshot()
        if current is None:
            return ExpiryReport()
        chain = _ancestors(table, current)
        kept = _kept_depth(chain, retention=retention, readers=readers, now=moment)
        kept_ids = {snapshot.snapshot_id for snapshot in chain[:kept]}
        chain_ids = {snapshot.snapshot_id for snapshot in chain}
        off_chain = [snapshot for snapshot in table.metadata.snapshots if snapshot.snapshot_id not in chain_ids]
        expired = chain[kept:] + off_chain  # newest first, then those a rollback left off the history
        if not expired:
            deleted, deleted_bytes = _delete_orphan_metadata(table, orphans_before=moment - retention.orphan_files)
            return ExpiryReport(retained_snapshots=len(kept_ids), deleted_files=deleted, deleted_bytes=deleted_bytes)
        try:
            table.maintenance.expire_snapshots().by_ids([snapshot.snapshot_id for snapshot in expired]).commit()
        except CommitFailedException:
            if attempt == _EXPIRE_ATTEMPTS - 1:
                raise
            table.refresh()
            continue
        break
    deleted, deleted_bytes = _delete_unreferenced(
        table,
        retained=chain[:kept],
        expired=chain[kept:],
        off_chain=off_chain,
        orphans_before=moment - retention.orphan_files,
    )
    metadata_deleted, metadata_bytes = _delete_orphan_metadata(table, orphans_before=moment - retention.orphan_files)
    deleted, deleted_bytes = deleted + metadata_deleted, deleted_bytes + metadata_bytes
    logger.info(
        "expired %d snapshot(s), kept %d; deleted %d unreferenced file(s)", len(expired), len(kept_ids), deleted
    )
    return ExpiryReport(
        expired_snapshots=len(expired),
        retained_snapshots=len(kept_ids),
        deleted_files=deleted,
        deleted_bytes=deleted_bytes,
    )


class MaintenanceWorker:
    """Maintains a table every ``interval_s`` in its own thread (the running local stack's schedule).

    A failed run is logged and retried at the next interval; compaction never holds up the stream's commits.
    """

    def __init__(
        self,
        data_dir: DataDir,
        *,
        load_table: Callable[[], Table],
        retention: Retention,
        readers: Callable[[], Sequence[int | None]] = tuple,
        interval_s: float = MAINTENANCE_INTERVAL_S,
    ) -> None:
        self.data_dir = data_dir
        self._load_table = load_table
        self._retention = retention
        self._readers = readers
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meterlake-maintenance", daemon=True)
        #: The last run's report, or the error it ended with.
        self.last: MaintenanceReport | Exception | None = None

    def start(self) -> None:
        """Start the schedule (the first run comes after one interval)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the schedule; a run in progress stops at its next day (deleting what it wrote) or after its commit."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.last = maintain(
                    self.data_dir,
                    self._load_table(),
                    retention=self._retention,
                    readers=self._readers,
                    cancelled=self._stopping.is_set,
                )
            except MaintenanceCancelledError as exc:
                self.last = exc
            except MaintenanceError as exc:
                logger.warning("table maintenance skipped: %s", exc)
                self.last = exc
            except Exception as exc:  # the schedule outlives a failed run; the next one retries
                logger.exception("table maintenance failed; retrying at the next interval")
                self.last = exc


# -- the rewrite ----------------------------------------------------------------------------------------------------


class _ReplaceFiles(_OverwriteFiles):
    """pyiceberg's overwrite producer, committing a ``replace`` snapshot with the conflict rules of a rewrite.

    Its summary is the overwrite's (pyiceberg computes totals only for append, overwrite and delete) under the
    ``replace`` operation. A concurrent append does not conflict with a rewrite (the appended rows are kept, as
    existing files); only a commit that removed a replaced file, or added deletes against one, does.
    """

    def _summary(self, snapshot_properties: dict[str, str] = EMPTY_DICT) -> Summary:
        overwrite = super()._summary(snapshot_properties)
        return Summary(Operation.REPLACE, **overwrite.additional_properties)

    def _build_manifest_evaluator(self, spec_id: int) -> Callable[[ManifestFile], bool]:
        """One manifest evaluator per thread: pyiceberg's keeps the manifest it is judging on itself, and the delete
        planning shares one across its worker threads, so a manifest judged concurrently could be judged on another's
        partition bounds, skipped, and its files reported missing ("Missing required files to delete")."""
        build = super()._build_manifest_evaluator
        local = threading.local()

        def evaluate(manifest: ManifestFile) -> bool:
            evaluator: Callable[[ManifestFile], bool] | None = getattr(local, "evaluator", None)
            if evaluator is None:
                evaluator = local.evaluator = build(spec_id)
            return evaluator(manifest)

        return evaluate

    def _validate_concurrency(self) -> None:
        window = self._commit_window
        if window is None or window.is_empty() or window.head is None:
            return
        table = self._transaction._table
        _validate_data_files_exist(table, window.head, self._deleted_data_files, window.base)
        _validate_no_new_deletes_for_data_files(table, window.head, None, self._deleted_data_files, window.base)


def _unreadable_file(scan: ArrowScan, files: Sequence[DataFile], error: Exception) -> str:
    """Which of ``files`` cannot be read, and why (each read alone; the error of reading them together names none)."""
    for data_file in files:
        try:
            scan.to_table(tasks=[FileScanTask(data_file)])
        except (OSError, pa.ArrowException) as exc:
            return f"{_local_path(data_file.file_path)} cannot be read ({_one_line(exc)})"
    return f"its files cannot be read together ({_one_line(error)})"


def _one_line(error: Exception) -> str:
    """An error's message on one line of printable text, cut to 300 characters (a damaged page can be quoted)."""
    return printable(" ".join(str(error).split())[:300], escape_backslash=False)


def _worth_rewriting(files: Sequence[DataFile]) -> list[DataFile]:
    """The small files of a closed day to rewrite together: none unless two or more, and never the day's anchor.

    The anchor is the file holding most of the day's rows (more than all its other small files together): what an
    earlier compaction wrote. Rows that arrive late (meter events may be up to
    ``meterlake.service.late_arrival_window_s`` old) then only merge with each other, so a day is never rewritten
    whole for each late file, and keeps at most two files after a run: its anchor and its late rows.
    """
    ranked = sorted(files, key=lambda data_file: data_file.record_count, reverse=True)
    if len(ranked) >= 2 and ranked[0].record_count > sum(data_file.record_count for data_file in ranked[1:]):
        ranked = ranked[1:]
    return ranked if len(ranked) >= 2 else []


def _day_partition_source(table: Table) -> str | None:
    """The column the table's partition spec takes the day of (``request_time``, ``meter_time``), or None when the
    spec is anything but that one day field."""
    fields = table.spec().fields
    if len(fields) != 1 or not isinstance(fields[0].transform, DayTransform):
        return None
    return table.schema().find_column_name(fields[0].source_id)


def _fingerprint(rows: pa.Table) -> tuple[int, int]:
    """(row count, sum of every row's hash over all columns): equal for two tables holding the same rows in any
    order, and a changed, lost or repeated row changes it (barring a 64-bit hash collision)."""
    columns = ", ".join('"' + name.replace('"', '""') + '"' for name in rows.column_names)
    with duckdb.connect() as con:
        con.register("compacted_rows", rows)
        count, digest = con.execute(
            f"SELECT count(*), coalesce(sum(hash({columns})::HUGEINT), 0) FROM compacted_rows"  # noqa: S608
        ).fetchone() or (0, 0)
    return int(count), int(digest)


def _partition_day(moment: datetime) -> int:
    """The day partition value (days since the epoch, UTC) holding ``moment``."""
    return (moment.astimezone(UTC) - _EPOCH) // timedelta(days=1)


def _day_of(data_file: DataFile) -> int | None:
    """The day partition of a data file of the table's day-partitioned spec, or None for another layout."""
    partition = data_file.partition
    if len(partition) != 1 or type(partition[0]) is not int:
        return None
    return int(partition[0])


def _day_text(day: int) -> str:
    return (_EPOCH + timedelta(days=day)).date().isoformat()


# -- expiry ---------------------------------------------------------------------------------------------------------


def _ancestors(table: Table, current: Snapshot) -> list[Snapshot]:
    """The current snapshot and its retained ancestors, newest first."""
    chain = [current]
    while chain[-1].parent_snapshot_id is not None:
        parent = table.snapshot_by_id(chain[-1].parent_snapshot_id)
        if parent is None:
            break
        chain.append(parent)
    return chain


def _kept_depth(
    chain: Sequence[Snapshot], *, retention: Retention, readers: Sequence[int | None], now: datetime
) -> int:
    """How many of ``chain`` (newest first) are kept: the newest stretch covering every reason to keep one."""
    kept = max(1, retention.min_snapshots)
    cutoff_ms = (now - retention.snapshots - _EPOCH) // timedelta(milliseconds=1)
    for depth, snapshot in enumerate(chain, start=1):
        if snapshot.timestamp_ms >= cutoff_ms:
            kept = max(kept, depth)
    # A reader finds where it stopped by its checkpoint's id as the next snapshot's parent, and expiring a snapshot
    # clears the parent id of its child in pyiceberg's metadata: so the checkpoint itself is kept too.
    depths = {snapshot.snapshot_id: depth for depth, snapshot in enumerate(chain, start=1)}
    for checkpoint in readers:
        kept = max(kept, depths.get(checkpoint, len(chain)) if checkpoint is not None else len(chain))
    return min(kept, len(chain))


def _delete_unreferenced(
    table: Table,
    *,
    retained: Sequence[Snapshot],
    expired: Sequence[Snapshot],
    off_chain: Sequence[Snapshot],
    orphans_before: datetime,
) -> tuple[int, int]:
    """Delete the files only expired snapshots referenced, and old orphans; returns (files, bytes) deleted.

    ``retained`` and ``expired`` are the history's kept and expired stretches (newest first), ``off_chain`` expired
    snapshots outside it. A data file no kept snapshot holds was removed by a ``replace``, ``overwrite`` or
    ``delete`` snapshot no later than the oldest kept one, whose own manifests list it as deleted.
    """
    kept_manifests = _manifests(table, retained)
    keep = {_local_path(path) for path in kept_manifests}
    keep.update(_local_path(snapshot.manifest_list) for snapshot in retained)
    keep.update(
        _local_path(entry.data_file.file_path)
        for manifest in kept_manifests.values()
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
    )
    gone = [*expired, *off_chain]
    doomed = {_local_path(snapshot.manifest_list) for snapshot in gone}
    doomed.update(_local_path(path) for path in _manifests(table, expired))
    for snapshot in off_chain:
        doomed.update(_local_path(path) for path in _manifests(table, [snapshot]))
    for snapshot in [*gone, retained[-1]]:
        doomed.update(_local_path(path) for path in _removed_data_files(table, snapshot))
    doomed -= keep
    orphan_cutoff = orphans_before.timestamp()
    root = Path(_local_path(table.location()))
    old_orphans = [
        path
        for path in [*(root / "data").rglob("*.parquet"), *(root / "metadata").glob("*.avro")]
        if str(path) not in keep and str(path) not in doomed and _modified_before(path, orphan_cutoff)
    ]
    return _delete_files([*map(Path, sorted(doomed)), *old_orphans])


def _delete_orphan_metadata(table: Table, *, orphans_before: datetime) -> tuple[int, int]:
    """Delete the table's metadata files (``*.metadata.json``) older than ``orphans_before`` that neither the catalog
    (the current one) nor the metadata log (the newest ``write.metadata.previous-versions-max``) names: each commit
    writes one, and nothing else removes them. Cheap (no manifest is read), so it runs whether or not a snapshot
    expired. Returns (files, bytes) deleted."""
    keep = {_local_path(table.metadata_location)}
    keep.update(_local_path(entry.metadata_file) for entry in table.metadata.metadata_log)
    cutoff = orphans_before.timestamp()
    metadata = Path(_local_path(table.metadata_location)).parent.glob("*.metadata.json")
    return _delete_files(path for path in metadata if str(path) not in keep and _modified_before(path, cutoff))


def _delete_files(paths: Iterable[Path]) -> tuple[int, int]:
    """Delete ``paths`` (one already gone is skipped); returns (files, bytes) deleted."""
    deleted = deleted_bytes = 0
    for path in paths:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        deleted += 1
        deleted_bytes += size
    return deleted, deleted_bytes


def _modified_before(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _manifests(table: Table, stretch: Sequence[Snapshot]) -> dict[str, ManifestFile]:
    """Every manifest a stretch of one linear history (newest first) references, by path.

    A fast append's manifest list is its parent's plus one new manifest, so not every list is read: those of the
    stretch's newest and oldest snapshots, of every snapshot of another operation and of its parent hold them all
    (a merged append rewrites manifests, so with manifest merging on every list is read).
    """
    if not stretch:
        return {}
    merging = property_as_bool(
        table.metadata.properties,
        TableProperties.MANIFEST_MERGE_ENABLED,
        TableProperties.MANIFEST_MERGE_ENABLED_DEFAULT,
    )
    by_id = {snapshot.snapshot_id: snapshot for snapshot in stretch}
    read = {stretch[0].snapshot_id, stretch[-1].snapshot_id}
    for snapshot in stretch:
        if merging or _operation(snapshot) != Operation.APPEND:
            read.add(snapshot.snapshot_id)
            if snapshot.parent_snapshot_id in by_id:
                read.add(snapshot.parent_snapshot_id)
    return {
        manifest.manifest_path: manifest for snapshot_id in read for manifest in by_id[snapshot_id].manifests(table.io)
    }


def _removed_data_files(table: Table, snapshot: Snapshot) -> list[str]:
    """The data files ``snapshot`` itself removed (none for an append)."""
    if _operation(snapshot) == Operation.APPEND:
        return []
    return [
        entry.data_file.file_path
        for manifest in snapshot.manifests(table.io)
        if manifest.added_snapshot_id == snapshot.snapshot_id
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False)
        if entry.status == ManifestEntryStatus.DELETED
    ]


def _operation(snapshot: Snapshot) -> Operation:
    return snapshot.summary.operation if snapshot.summary is not None else Operation.APPEND


def _local_path(location: str) -> str:
    scheme, _, path = PyArrowFileIO.parse_location(location)
    if scheme != "file":
        raise MaintenanceError(f"{location}: not a local file; local maintenance works on file:// tables")
    return str(Path(path))
