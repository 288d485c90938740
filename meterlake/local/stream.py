"""The local delivery stream: Amazon Data Firehose with an Apache Iceberg destination, on one machine.

``put_records`` makes lines durable in the spool (that return is the acknowledgement). A flush then does what
Firehose does with a buffer: it cuts the records into Lambda-sized events, calls the transform handler (retrying a
failed invocation ``number_of_retries`` times), writes rejected records to the error folder under the error output
prefix, and appends the Ok rows to the Iceberg table each names, with one commit per table.

The disk can refuse a put (full, or failing): ``put_records`` then raises :class:`StreamFullError` or
:class:`StreamWriteError` and the spool keeps no byte of the batch, so what was acknowledged stays readable and puts
succeed again once there is room. A damaged spool segment refuses the open (:class:`SpoolDamagedError`, naming the
file and byte); ``recover=True`` (``meterlake flush --recover``) moves it to the spool's quarantine and delivers
every readable record (see ``meterlake.local.spool``).

Exactly once, even across ``kill -9``: every commit carries the spool offset it covers in its snapshot summary
(``meterlake.spool-offset``), so the data and the offset land atomically; flushes that commit no rows advance a local
checkpoint written after the fact. On open the stream resumes from the larger of the two. Firehose is at-least-once,
so the same access-log line can be put twice: rows whose ``request_id`` was already committed are dropped before the
commit, using an on-disk index (DuckDB) that is a cache of the table and is brought up to date from it on open; a
damaged index is moved aside and rebuilt from the table.

One stream delivers one kind of record. The access-log stream is the default; :class:`StreamTarget` names another
(its own spool directory, transform, destination table and dedup key), e.g. the metering service's meter events:
each stream keeps its own spool, checkpoint and index, and is exactly once on its own.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import contextlib
import json
import logging
import operator
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
from pyiceberg.manifest import DataFileContent, ManifestEntryStatus
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from meterlake.config import LAMBDA_PAYLOAD_LIMIT_BYTES, LAMBDA_REQUEST_LIMIT_BYTES, Config, load_config
from meterlake.lake.catalog import ensure_metering_table, open_catalog, remove_orphan_metadata
from meterlake.lake.home import DataDir
from meterlake.local.invoker import (
    DELIVERY_FAILED,
    EVENT_JSON_OVERHEAD,
    PROCESSING_FAILED,
    RECORD_JSON_OVERHEAD,
    SUPPORTED_OPERATION,
    DirectDelivery,
    Handler,
    Invocation,
    Invoker,
    Transformed,
    TransformWorkers,
    WorkerPieceError,
    WorkerStoppedError,
)
from meterlake.local.rows import DecodedPiece, PieceRequest, decode_rows
from meterlake.local.spool import (
    HEADER_BYTES,
    QUARANTINE_DIR,
    Spool,
    SpoolBatch,
    SpoolClosedError,
    SpoolCorruptError,
    SpoolError,
    SpoolFullError,
    SpoolInUseError,
    SpoolRepair,
    SpoolWriteError,
)
from meterlake.local.spool import SpoolDamagedError as SegmentsDamagedError
from transform_lambda.handler import TransformSettings, make_encoded_handler

logger = logging.getLogger(__name__)


_MIB = 1024 * 1024
#: The largest record ``put_records`` accepts: one that still fits, base64-encoded, in a Lambda request. Records
#: above Firehose's 1,000 KiB limit are accepted and reach the transform, which rejects them with a reason, so one
#: oversized line lands in the error folder instead of blocking the gateway's writer.
MAX_PUT_RECORD_BYTES = (LAMBDA_REQUEST_LIMIT_BYTES - EVENT_JSON_OVERHEAD - RECORD_JSON_OVERHEAD) // 4 * 3

#: Snapshot-summary keys: the spool offset a commit covers, and which stream made it.
SPOOL_OFFSET_PROPERTY = "meterlake.spool-offset"
STREAM_PROPERTY = "meterlake.delivery-stream"
CHECKPOINT_FILE = "checkpoint.json"
REQUEST_ID_INDEX_FILE = "request-ids.duckdb"
REQUEST_ID_COLUMN = "request_id"

_FLUSHER_BACKOFF_SECONDS = 1.0
#: Spool pieces (one Lambda event's worth each) in the workers while the stream adds earlier ones to the buffer; and
#: how many of the next buffer's are sent before a buffer commits, to keep both workers busy through the commit: a 32 MB
#: buffer's deduplication, Parquet write and Iceberg commit measured ~0.46 s, two workers' 8 pieces ~0.6 s. Each
#: piece answered early holds ~2 MB of Arrow rows.
_PIECES_IN_FLIGHT = 4
_PIECES_READ_AHEAD = 8
#: How many events' bytes a piece a worker reads itself may span when a single put is larger than an event.
_PIECE_REACH = 4
_PUT_END = operator.itemgetter(0)
#: Worker processes of the access-log transform. Two: a worker reads, transforms and decodes its pieces itself, 2-3x the
#: handler's own CPU time a record (measured), so one worker would hold the stream to under half the handler's pace;
#: two keep both cores of a two-core machine busy beside the stream's puts, deduplication and commits (~65 MB each).
_WORKERS = 2
#: Backpressure: ``put_records`` waits while this many buffers (``size_in_mbs`` each) are spooled but not committed.
BACKLOG_BUFFERS = 2
#: How long a waiting put sleeps before it looks at the flusher again (commits wake it sooner).
_BACKPRESSURE_POLL_SECONDS = 1.0


class StreamError(Exception):
    """Base of the delivery stream's errors."""


class StreamInUseError(StreamError):
    """Another process holds the stream's spool."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"the delivery stream in {directory} is in use by {holder}")
        self.directory = directory
        self.pid = pid


class SpoolUnusableError(StreamError):
    """The spool cannot be opened or read (damaged, or it does not hold the offsets the table says are pending)."""

    def __init__(self, directory: Path, problem: str) -> None:
        super().__init__(f"the delivery stream's spool in {directory} cannot be used: {problem}")
        self.directory = directory


class SpoolDamagedError(SpoolUnusableError):
    """A spool segment is damaged; ``recover=True`` (``meterlake flush --recover``) quarantines it and delivers the
    rest."""

    def __init__(self, directory: Path, cause: SpoolCorruptError) -> None:
        super().__init__(
            directory,
            f"{cause}; `meterlake flush --recover` delivers every readable record and moves the damaged segment to "
            f"{directory / QUARANTINE_DIR}",
        )
        self.path = cause.path
        self.file_offset = cause.file_offset


class StreamWriteError(StreamError):
    """The disk refused a put (its write or its sync); nothing of the batch was kept, so nothing was acknowledged."""

    def __init__(self, name: str, records: int, cause: SpoolWriteError) -> None:
        super().__init__(f"the delivery stream {name} refused {records} records: {cause}")
        self.records = records
        self.path = cause.path
        self.errno = cause.errno


class StreamFullError(StreamWriteError):
    """No room on the disk for a put; nothing of the batch was kept, and puts succeed again once there is room."""


class RecordTooLargeError(StreamError):
    """A record cannot fit in a Lambda request even alone; the whole batch was refused."""

    def __init__(self, index: int, size: int) -> None:
        super().__init__(f"record {index} of the batch is {size} bytes; a record may be at most {MAX_PUT_RECORD_BYTES}")
        self.index = index
        self.size = size


class ErrorPrefixError(StreamError):
    """The error output prefix uses an expression the local stream cannot render."""

    def __init__(self, prefix: str, expression: str) -> None:
        super().__init__(f"error_output_prefix {prefix!r}: cannot render {expression!r}")
        self.prefix = prefix
        self.expression = expression


class StreamClosedError(StreamError):
    """``put_records`` or ``flush`` was called after ``close``."""


class DeliveryFailedError(StreamError):
    """The Iceberg commit of a flush failed; the records stay in the spool and the next flush retries them."""

    def __init__(self, table: str, cause: BaseException) -> None:
        super().__init__(f"committing to Iceberg table {table} failed: {cause}")
        self.table = table


@dataclass(frozen=True, slots=True)
class FlushReport:
    """What a flush did. Counts are records; ``snapshot_id`` is the last Iceberg snapshot it committed."""

    records_read: int = 0
    ok_written: int = 0
    dropped: int = 0
    failed: int = 0
    duplicates_skipped: int = 0
    invocations: int = 0
    commits: int = 0
    snapshot_id: int | None = None
    committed_offset: int = 0

    def __add__(self, later: FlushReport) -> FlushReport:
        """Sum the counts; snapshot and offset come from the later report."""
        counts = {
            f.name: getattr(self, f.name) + getattr(later, f.name)
            for f in fields(FlushReport)
            if f.name not in ("snapshot_id", "committed_offset")
        }
        snapshot = later.snapshot_id if later.snapshot_id is not None else self.snapshot_id
        offset = max(self.committed_offset, later.committed_offset)
        return FlushReport(**counts, snapshot_id=snapshot, committed_offset=offset)


@dataclass(frozen=True, slots=True)
class StreamStats:
    """A snapshot of the stream for status output: spool offsets, pending bytes and the oldest pending record's age."""

    spooled_offset: int
    committed_offset: int
    pending_bytes: int
    lag_seconds: float
    last_error: str | None


@dataclass(slots=True)
class _Rejected:
    """One record bound for the error folder."""

    offset: int
    arrival_ms: int
    raw: bytes
    error_code: str
    message: str
    attempts: int
    output_type: str

    @classmethod
    def of(cls, piece: SpoolBatch, i: int, code: str, message: str, attempts: int, output_type: str) -> _Rejected:
        """The reject for record ``i`` of ``piece``."""
        return cls(piece.offsets[i], piece.arrivals_ms[i], piece.records[i], code, message, attempts, output_type)


class _Sink:
    """One destination table of a buffer and the Arrow rows decoded for it so far."""

    def __init__(self, table: Table | None) -> None:
        self.table = table
        self.schema: pa.Schema = table.schema().as_arrow() if table is not None else pa.schema([])
        self.chunks: list[pa.Table] = []


@dataclass(slots=True)
class _Buffer:
    """What one flush buffer has read and decided so far; ``[start, end)`` is the spool range it covers."""

    start: int
    end: int
    first_arrival_ms: int = 0
    records_read: int = 0
    dropped: int = 0
    duplicates: int = 0
    invocations: int = 0
    rejected: list[_Rejected] = field(default_factory=list)
    destinations: dict[tuple[str, str], _Sink] = field(default_factory=dict)


@dataclass(slots=True)
class _Piece:
    """A piece of the spool sent to the transform: ``[start, end)`` of the log.

    Attributes:
        batch: its records, when this process read them; None when a worker reads the range itself.
        pending: the transform's outcome for ``batch``, or the worker's future for it; None for a piece of padding
            only, or one a worker reads itself.
        decoding: the worker's future for a piece it reads itself.
    """

    start: int
    end: int
    batch: SpoolBatch | None
    pending: Transformed | Future[Transformed] | None = None
    decoding: Future[DecodedPiece] | None = None


#: Spool pieces sent to the transform, oldest first.
_InFlight = collections.deque[_Piece]


@dataclass(frozen=True, slots=True)
class StreamTarget:
    """A delivery stream other than the access-log one: what it is called, where it spools, where it delivers.

    Attributes:
        name: the stream's name (snapshot summaries and error files carry it).
        spool_dir: its own spool directory (segments, checkpoint, dedup index).
        destination: the (database, table) Ok records go to unless their metadata routes them elsewhere.
        ensure_table: opens (creating on first use) the destination table.
        key_columns: the columns whose values identify a row: a row whose key was committed is dropped.
        size_in_mbs: flush once this much is buffered.
        interval_in_seconds: flush once the oldest buffered record is this old.
    """

    name: str
    spool_dir: Path
    destination: tuple[str, str]
    ensure_table: Callable[[Catalog], Table]
    key_columns: tuple[str, ...]
    size_in_mbs: int
    interval_in_seconds: int


# -- error output ---------------------------------------------------------------------------------------------------

_JAVA_DATE_TOKENS = {"yyyy": "%Y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M", "ss": "%S"}
_EXPRESSION = re.compile(r"!\{([^}]*)\}")
_DATE_TOKEN = re.compile("|".join(sorted(_JAVA_DATE_TOKENS, key=len, reverse=True)))


def render_error_prefix(prefix: str, *, when_ms: int, output_type: str) -> str:
    """Render Firehose's error output prefix (``!{timestamp:...}``, ``!{firehose:error-output-type}``) in UTC.

    Raises:
        ErrorPrefixError: an expression other than those two, or a date pattern with other letters.
    """
    moment = datetime.fromtimestamp(when_ms / 1000, tz=UTC)

    def render(match: re.Match[str]) -> str:
        kind, _, argument = match.group(1).partition(":")
        if kind == "firehose" and argument == "error-output-type":
            return output_type
        if kind == "timestamp" and argument:
            if re.sub(r"[^A-Za-z]", "", _DATE_TOKEN.sub("", argument)):
                raise ErrorPrefixError(prefix, match.group(0))
            return moment.strftime(_DATE_TOKEN.sub(lambda t: _JAVA_DATE_TOKENS[t.group(0)], argument))
        raise ErrorPrefixError(prefix, match.group(0))

    rendered = _EXPRESSION.sub(render, prefix).strip("/")
    if any(part in ("", ".", "..") for part in rendered.split("/")):
        raise ErrorPrefixError(prefix, rendered)
    return rendered


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# -- the request_id index -------------------------------------------------------------------------------------------


def _key_sql(columns: Sequence[str]) -> str:
    """The 16-byte key of a row, as DuckDB SQL over our own column names.

    One column (the access log's request_id): the value itself when it is a canonical (lower-case) UUID, else its
    MD5. Several columns: the MD5 of their values joined by the unit separator (U+001F), which the key's leading
    columns never hold (meter names are letters, digits, '_' and '-'), so the joined text names one key.
    """
    quoted = [f'"{column}"' for column in columns]
    if len(quoted) == 1:
        (column,) = quoted
        return (
            f"CASE WHEN regexp_full_match({column}, '[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-"
            f"[0-9a-f]{{12}}') THEN {column}::UUID ELSE md5({column})::UUID END"
        )
    return f"md5({' || chr(31) || '.join(quoted)})::UUID"


#: Rows of a data file indexed at a time when the index catches up with a table.
_INDEX_BATCH_ROWS = 131_072


def _wal(path: Path) -> Path:
    """DuckDB's write-ahead log beside a database file."""
    return path.with_name(path.name + ".wal")


class RequestIdIndex:
    """The keys (request_ids, unless ``key_columns`` names others) committed to each table, as 16-byte keys in a
    DuckDB file: a cache derivable from the table.

    Each table's entry records the last snapshot it covers; :meth:`catch_up` indexes newer snapshots' data files, so
    a crash between an Iceberg commit and the index update costs a re-read, never a missed duplicate. Hash joins of a
    flush's keys against the whole key set measured ~0.4 us/key at 5M keys, ~20x faster than a SQLite B-tree.

    DuckDB may use ``memory_limit_mb`` (32 by default) and spills beyond it: at 5M keys, 64 MB held 32 MB more of
    the stream's peak RSS (490 -> 458 MB with its workers' in ``python -m bench ingest``) for the same ingest time.
    """

    def __init__(
        self, path: Path, *, memory_limit_mb: int = 32, key_columns: Sequence[str] = (REQUEST_ID_COLUMN,)
    ) -> None:
        self.path = path
        self.key_columns = tuple(key_columns)
        self._key = _key_sql(self.key_columns)
        self._config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": f"{memory_limit_mb}MB",
            "threads": 2,
        }
        self._staged: dict[str, str] = {}
        try:
            self._db = self._connect()
            # Read every key once: DuckDB checks each block's checksum as it reads it, so damage anywhere in the file
            # shows here rather than in the middle of a flush (~50 ms at 5M keys).
            for (table_id,) in self._exec("SELECT id FROM tables"):
                self._exec(f"SELECT bit_xor(hash(k)) FROM seen_{int(table_id)}")  # noqa: S608 (our own integers)
        except duckdb.Error as exc:
            self.rebuild(exc)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        db = duckdb.connect(str(self.path), config=self._config)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS tables (name VARCHAR, id INTEGER, snapshot_id BIGINT)").fetchall()
        except BaseException:
            db.close()
            raise
        return db

    def rebuild(self, cause: BaseException) -> None:
        """Move the damaged index file aside (as ``<name>.damaged``, replacing an older one) and start an empty one.

        The index is only a cache of the table: a damaged file is a reason to rebuild (:meth:`catch_up` re-reads the
        table's data files), not to stop.
        """
        with contextlib.suppress(AttributeError, duckdb.Error):
            self._db.close()
        aside = self.path.with_name(self.path.name + ".damaged")
        logger.warning(
            "request_id index %s is damaged (%s); moved it to %s and rebuilding it from the table",
            self.path,
            cause,
            aside,
        )
        for current, kept in ((self.path, aside), (_wal(self.path), _wal(aside))):
            if current.exists():
                os.replace(current, kept)
            else:
                kept.unlink(missing_ok=True)
        self._staged.clear()
        self._db = self._connect()

    def _exec(self, sql: str, params: list[object] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement to completion (DuckDB refuses new work while a result is unread)."""
        rows: list[tuple[Any, ...]] = self._db.execute(sql, params).fetchall()
        return rows

    def close(self) -> None:
        """Close the DuckDB connection."""
        self._db.close()

    def _table_id(self, name: str) -> int:
        rows = self._exec("SELECT id FROM tables WHERE name = ?", [name])
        if rows:
            return int(rows[0][0])
        table_id = int(self._exec("SELECT count(*) FROM tables")[0][0])
        self._exec(f"CREATE TABLE IF NOT EXISTS seen_{table_id} (k UUID)")
        self._exec("INSERT INTO tables VALUES (?, ?, NULL)", [name, table_id])
        return table_id

    def table_names(self) -> list[str]:
        """The tables the index holds keys for ("database.table")."""
        return [str(name) for (name,) in self._exec("SELECT name FROM tables ORDER BY id")]

    def covered_snapshot(self, name: str) -> int | None:
        """The last snapshot of table ``name`` whose request_ids are indexed."""
        rows = self._exec("SELECT snapshot_id FROM tables WHERE name = ?", [name])
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def catch_up(self, name: str, table: Table) -> int:
        """Index the request_ids of ``table``'s snapshots newer than the covered one; returns data files read."""
        current = table.current_snapshot()
        covered = self.covered_snapshot(name)
        if current is None or current.snapshot_id == covered:
            return 0
        newer: list[Snapshot] = []
        paths: list[str] = []
        snapshot: Snapshot | None = current
        while snapshot is not None and snapshot.snapshot_id != covered:
            newer.append(snapshot)
            snapshot = table.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id else None
        table_id = self._table_id(name)
        if snapshot is None:
            # The covered snapshot is not an ancestor (table replaced or expired): rebuild from the live files.
            self._exec(f"DELETE FROM seen_{table_id}")  # noqa: S608 (table ids are our own integers)
            scan = table.scan(selected_fields=self.key_columns)
            paths = [str(task.file.file_path) for task in scan.plan_files()]
        else:
            for snap in newer:
                for manifest in snap.manifests(table.io):
                    if manifest.added_snapshot_id != snap.snapshot_id:
                        continue
                    paths.extend(
                        entry.data_file.file_path
                        for entry in manifest.fetch_manifest_entry(table.io)
                        if entry.status == ManifestEntryStatus.ADDED
                        and entry.snapshot_id == snap.snapshot_id
                        and entry.data_file.content == DataFileContent.DATA
                    )
        self._exec("BEGIN")
        for path in paths:
            with table.io.new_input(path).open() as handle:
                # A batch at a time: a whole large file's keys at once outgrow the index's memory limit.
                for batch in pq.ParquetFile(handle).iter_batches(_INDEX_BATCH_ROWS, columns=list(self.key_columns)):
                    self._db.register("indexed", pa.Table.from_batches([batch]))
                    # An anti join, which spills within the memory limit; NOT IN (a mark join) does not, and ran out
                    # of memory rebuilding the index of a 10M-event table, so the stream could not open.
                    self._exec(
                        f"INSERT INTO seen_{table_id} SELECT DISTINCT n.k "  # noqa: S608 (our own integers and SQL)
                        f"FROM (SELECT {self._key} AS k FROM indexed) n ANTI JOIN seen_{table_id} s ON n.k = s.k"
                    )
                    self._db.unregister("indexed")
        self._exec("UPDATE tables SET snapshot_id = ? WHERE name = ?", [current.snapshot_id, name])
        self._exec("COMMIT")
        return len(paths)

    def stage_unseen(self, name: str, keys: pa.Table) -> pa.Array:
        """Positions of the rows to commit: each key's first occurrence, unless already committed. ``keys`` holds the
        key columns of the rows.

        Their keys are staged until :meth:`commit_staged` (after the Iceberg commit) or :meth:`discard_staged`.
        """
        table_id = self._table_id(name)
        batch = keys.select(list(self.key_columns)).append_column("i", pa.array(range(keys.num_rows), pa.int64()))
        self._db.register("batch", batch)
        staged = f"staged_{table_id}"
        self._exec(
            f"CREATE OR REPLACE TEMP TABLE {staged} AS "  # noqa: S608
            f"WITH keyed AS (SELECT i, {self._key} AS k FROM batch), "
            f"firsts AS (SELECT k, min(i) AS i FROM keyed GROUP BY k) "
            f"SELECT f.i, f.k FROM firsts f ANTI JOIN seen_{table_id} s ON f.k = s.k"
        )
        self._db.unregister("batch")
        self._staged[name] = staged
        positions: pa.Array = self._db.sql(f"SELECT i FROM {staged} ORDER BY i").to_arrow_table().column(0)  # noqa: S608
        return positions.combine_chunks() if isinstance(positions, pa.ChunkedArray) else positions

    def commit_staged(self, name: str, snapshot_id: int) -> None:
        """Add the staged keys of ``name`` as committed in ``snapshot_id`` (one DuckDB transaction)."""
        staged = self._staged.pop(name)
        table_id = self._table_id(name)
        self._exec("BEGIN")
        self._exec(f"INSERT INTO seen_{table_id} SELECT k FROM {staged}")  # noqa: S608
        self._exec("UPDATE tables SET snapshot_id = ? WHERE name = ?", [snapshot_id, name])
        self._exec("COMMIT")
        self._exec(f"DROP TABLE {staged}")

    def discard_staged(self, name: str) -> None:
        """Forget the staged keys of ``name`` (its commit failed or had no rows)."""
        staged = self._staged.pop(name, None)
        if staged is not None:
            self._exec(f"DROP TABLE IF EXISTS {staged}")


# -- the stream -----------------------------------------------------------------------------------------------------


def access_log_settings(config: Config) -> TransformSettings:
    """The access-log transform's settings, from the config."""
    return TransformSettings(
        database=config.database_name,
        table=config.table_name,
        operation=SUPPORTED_OPERATION,
        unmetered_http_methods=frozenset(config.meterlake.unmetered_http_methods),
        tenants_by_api_key=config.meterlake.tenant_source.api_key_tenants,
    )


def access_log_handler(config: Config) -> Handler:
    """The transform the access-log stream runs: the Lambda's handler with the config's settings, no EMF metrics,
    answering JSON bytes as the deployed function does (``make_encoded_handler``)."""
    return make_encoded_handler(access_log_settings(config), emit_metrics=False)


class DeliveryStream:
    """The local Firehose delivery stream: durable puts, buffered flushes through the transform into Iceberg.

    ``recover=True`` repairs a damaged spool on open: each damaged segment is moved to the spool's quarantine (its
    damaged ranges noted) and every readable record in it is delivered; ``recovered`` lists what was skipped.

    ``target`` None delivers access-log lines (the config's stream, spool, transform and table, deduplicated on
    request_id); a :class:`StreamTarget` delivers another kind of record, through its own ``handler`` if given, else
    as it is to the target's table (a Firehose stream without a processing configuration: each record's lines are
    table rows).

    Raises (from the constructor):
        StreamInUseError: another process holds the spool.
        SpoolDamagedError: a spool segment is damaged (``recover=False``); nothing was changed.
        SpoolUnusableError: the spool does not hold the offsets still to be delivered, or cannot be repaired.
        ErrorPrefixError: the config's error output prefix cannot be rendered.
    """

    def __init__(
        self,
        *,
        config: Config,
        data_dir: DataDir,
        handler: Handler | None = None,
        on_commit: Callable[[int], None] | None = None,
        recover: bool = False,
        target: StreamTarget | None = None,
    ) -> None:
        self.config = config
        #: Told each new snapshot id right after its commit (e.g. to wake the forwarder); it must not block.
        self.on_commit = on_commit
        self.data_dir = data_dir.ensure()
        firehose = config.data_firehose_configuration
        hints = firehose.buffering_hints
        self.name = firehose.delivery_stream_name if target is None else target.name
        #: Where this stream spools (the data dir's spool for access logs).
        self.spool_dir = self.data_dir.spool if target is None else target.spool_dir
        self._size_bytes = (hints.size_in_mbs if target is None else target.size_in_mbs) * _MIB
        self._interval_s = float(hints.interval_in_seconds if target is None else target.interval_in_seconds)
        self._key_columns: tuple[str, ...] = (REQUEST_ID_COLUMN,) if target is None else target.key_columns
        processing = firehose.transform_records_with_aws_lambda
        # Firehose's processor buffer counts raw record bytes (their base64 makes the request ~4/3 of it); the
        # buffer is read and transformed one event's worth at a time.
        self._event_raw_bytes = max(1, int(processing.effective_buffer_size * _MIB))
        self._error_prefix = firehose.error_output_prefix
        render_error_prefix(self._error_prefix, when_ms=0, output_type=PROCESSING_FAILED)
        self._default_destination = (config.database_name, config.table_name) if target is None else target.destination
        invocation = Invocation(
            arn=f"arn:aws:firehose:local:000000000000:deliverystream/{self.name}",
            attempts=1 + processing.number_of_retries,
            event_raw_bytes=self._event_raw_bytes,
            default_destination=self._default_destination,
            request_limit=LAMBDA_REQUEST_LIMIT_BYTES,
            response_limit=LAMBDA_PAYLOAD_LIMIT_BYTES,
        )
        self._invoker: Invoker | DirectDelivery = (
            Invoker(access_log_handler(config) if handler is None else handler, invocation)
            if target is None or handler is not None
            else DirectDelivery(self._default_destination)
        )
        #: The access-log transform also runs in a worker process, for buffers of more than one event; a handler
        #: given by the caller always runs in this process, and a target without one has nothing to run.
        self._workers = (
            TransformWorkers(access_log_settings(config), invocation, processes=_WORKERS)
            if target is None and handler is None
            else None
        )
        self._read_ahead: _InFlight = collections.deque()
        self._arrow_schemas: dict[int, tuple[Schema, pa.Schema]] = {}

        self._catalog: Catalog = open_catalog(self.data_dir)
        table = ensure_metering_table(self._catalog, config) if target is None else target.ensure_table(self._catalog)
        if target is not None:
            self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for orphan in remove_orphan_metadata(table):
            logger.info("removed orphan table metadata %s", orphan)
        self._tables: dict[tuple[str, str], Table] = {self._default_destination: table}
        checkpoint = self._read_checkpoint()
        committed = max(checkpoint, self._table_offset(table))
        try:
            self._spool = Spool(self.spool_dir, initial_offset=committed, repair=recover)
        except SpoolInUseError as exc:
            raise StreamInUseError(exc.directory, exc.pid) from None
        except SegmentsDamagedError as exc:
            raise SpoolDamagedError(self.spool_dir, exc) from None
        except SpoolError as exc:  # overlapping segments, or damage too short to pad: no repair possible
            raise SpoolUnusableError(self.spool_dir, str(exc)) from None
        #: The spool segments ``recover=True`` repaired, with the ranges each skipped.
        self.recovered: tuple[SpoolRepair, ...] = tuple(self._spool.repairs)
        try:
            if not self._spool.start <= committed <= self._spool.end:
                raise SpoolUnusableError(
                    self.spool_dir,
                    f"it holds offsets [{self._spool.start}, {self._spool.end}] but delivery resumes at {committed}",
                )
            self._index = RequestIdIndex(self.spool_dir / REQUEST_ID_INDEX_FILE, key_columns=self._key_columns)
            try:
                self._catch_up_indexes()
            except duckdb.Error as exc:
                self._index.rebuild(exc)
                self._catch_up_indexes()
        except BaseException:
            with contextlib.suppress(AttributeError):
                self._index.close()
            self._spool.close()
            raise
        self._committed = committed
        self._spooled = self._spool.end
        # (end offset of a put, arrival ms) for puts not wholly committed: the oldest drives the interval trigger.
        self._pending_puts: collections.deque[tuple[int, int]] = collections.deque()
        if self._spooled > committed:
            first = self._spool.read(committed, 1)
            arrival_ms = first.arrivals_ms[0] if first.records else int(time.time() * 1000)
            self._pending_puts.append((self._spooled, arrival_ms))
        self._cond = threading.Condition()
        self._flush_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._last_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher that applies the buffering hints (idempotent)."""
        with self._cond:
            if self._closed:
                raise StreamClosedError(f"the delivery stream {self.name} is closed")
            if self._flusher is not None:
                return
            self._stopping = False
            self._flusher = threading.Thread(target=self._run_flusher, name=f"flusher-{self.name}", daemon=True)
            self._flusher.start()

    def stop(self) -> None:
        """Stop the background flusher after its current flush (no final flush; see :meth:`close`)."""
        with self._cond:
            flusher = self._flusher
            self._stopping = True
            self._cond.notify_all()
        if flusher is not None:
            flusher.join()
        with self._cond:
            self._flusher = None

    def close(self) -> FlushReport:
        """Stop the flusher, deliver everything acknowledged, and release the spool (idempotent)."""
        if self._closed:
            return FlushReport(committed_offset=self._committed)
        self.stop()
        try:
            report = self.flush()
        finally:
            self._closed = True
            self._discard(self._read_ahead)
            if self._workers is not None:
                self._workers.close()
            self._index.close()
            self._spool.close()
        return report

    def __enter__(self) -> DeliveryStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- putting -----------------------------------------------------------------------------------------------------

    def put_records(self, lines: Sequence[bytes]) -> None:
        """Durably accept ``lines`` (one fsync for the batch); returning is the acknowledgement.

        Backpressure: while the background flusher runs and is healthy, a put that would leave more than
        ``BACKLOG_BUFFERS`` buffers (``size_in_mbs`` each) spooled but not committed waits until commits make room, so
        a writer faster than the pipeline is slowed to its pace instead of growing an unbounded backlog. Without a
        flusher (nothing would make room), or while its deliveries fail, puts never wait: the disk holds the backlog.

        Raises:
            RecordTooLargeError: a line cannot fit in a Lambda request (nothing is written).
            StreamFullError: no room on the disk (nothing is written; puts succeed again once there is room).
            StreamWriteError: the disk refused the write or its sync otherwise (nothing is written).
            StreamClosedError: the stream was closed.
        """
        if self._closed:
            raise StreamClosedError(f"the delivery stream {self.name} is closed")
        if lines and max(map(len, lines)) > MAX_PUT_RECORD_BYTES:
            index = next(i for i, line in enumerate(lines) if len(line) > MAX_PUT_RECORD_BYTES)
            raise RecordTooLargeError(index, len(lines[index]))
        if not lines:
            return
        self._wait_for_room(sum(map(len, lines)) + HEADER_BYTES * len(lines))
        arrival_ms = int(time.time() * 1000)
        try:
            end = self._spool.append(lines, arrival_ms=arrival_ms)
        except SpoolFullError as exc:
            raise StreamFullError(self.name, len(lines), exc) from exc
        except SpoolWriteError as exc:
            raise StreamWriteError(self.name, len(lines), exc) from exc
        except SpoolClosedError:
            raise StreamClosedError(f"the delivery stream {self.name} is closed") from None
        with self._cond:
            self._spooled = max(self._spooled, end)
            self._pending_puts.append((end, arrival_ms))
            self._cond.notify_all()

    def _wait_for_room(self, size: int) -> None:
        """Wait while a put of ``size`` record bytes would leave more than the allowed backlog (see ``put_records``)."""
        limit = BACKLOG_BUFFERS * self._size_bytes
        with self._cond:
            while (
                self._flusher is not None
                and not self._stopping
                and not self._closed
                and self._last_error is None
                and self._spooled > self._committed
                and self._spooled - self._committed + size > limit
            ):
                self._cond.wait(_BACKPRESSURE_POLL_SECONDS)

    # -- status ------------------------------------------------------------------------------------------------------

    def stats(self) -> StreamStats:
        """Spooled and committed offsets, pending bytes and the age of the oldest pending record."""
        with self._cond:
            oldest = self._pending_puts[0][1] if self._pending_puts else None
            lag = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
            return StreamStats(
                spooled_offset=self._spooled,
                committed_offset=self._committed,
                pending_bytes=self._spooled - self._committed,
                lag_seconds=lag,
                last_error=None if self._last_error is None else str(self._last_error),
            )

    # -- flushing ----------------------------------------------------------------------------------------------------

    def flush(self) -> FlushReport:
        """Deliver everything spooled when called, one buffer (``size_in_mbs``) per commit.

        Raises:
            DeliveryFailedError: an Iceberg commit failed; nothing after the last good commit is lost.
            SpoolDamagedError: a spool segment is damaged (reopen with ``recover=True``).
        """
        if self._closed:
            raise StreamClosedError(f"the delivery stream {self.name} is closed")
        with self._cond:
            target = self._spooled
        report = FlushReport(committed_offset=self._committed)
        while self._committed < target:
            report += self._flush_buffer()
        return report

    def _due_in(self) -> float | None:
        """Seconds until the buffering hints call for a flush (0: now), None when nothing is pending."""
        pending = self._spooled - self._committed
        if pending <= 0 or not self._pending_puts:
            return None
        if pending >= self._size_bytes:
            return 0.0
        return max(0.0, self._pending_puts[0][1] / 1000 + self._interval_s - time.time())

    def _run_flusher(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (due := self._due_in()) != 0.0:
                    self._cond.wait(due)
                if self._stopping:
                    return
            try:
                self._flush_buffer()
                self._last_error = None
            except Exception as exc:  # the flusher must outlive a failed delivery, as Firehose retries it
                logger.exception("delivery stream %s: flush failed; retrying", self.name)
                self._last_error = exc
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, timeout=_FLUSHER_BACKOFF_SECONDS)

    def _flush_buffer(self) -> FlushReport:
        """Deliver one buffer (up to ``size_in_mbs`` of spool from the committed offset) and advance past it."""
        with self._flush_lock:
            buffer = _Buffer(start=self._committed, end=self._committed)
            try:
                report = self._deliver(buffer)
            except SpoolCorruptError as exc:
                raise SpoolDamagedError(self.spool_dir, exc) from None
            except SpoolError as exc:
                raise SpoolUnusableError(self.spool_dir, str(exc)) from None
            if buffer.end == buffer.start:
                return report
            _atomic_write(
                self.spool_dir / CHECKPOINT_FILE,
                json.dumps({"offset": buffer.end, "delivery_stream": self.name}).encode(),
            )
            with self._cond:
                self._committed = buffer.end
                while self._pending_puts and self._pending_puts[0][0] <= buffer.end:
                    self._pending_puts.popleft()
                self._cond.notify_all()
            self._spool.delete_below(buffer.end)
            return report

    def _deliver(self, buffer: _Buffer) -> FlushReport:
        """Transform one buffer piece by piece, write its rejects, and commit its Ok rows: one commit per table.

        The spool is read one Lambda event's worth at a time and each event's Ok rows are decoded to Arrow at once,
        so memory holds the buffer's Arrow rows, not its raw lines, base64 copies and transform answers too. When the
        transform runs in its worker processes, up to ``_PIECES_IN_FLIGHT`` pieces are there while this thread adds
        earlier ones to the buffer (a worker reads a piece that ends where a put ended itself, and answers Arrow rows;
        see :meth:`_read_pieces`), and the next buffer's first pieces are sent before this buffer commits, so the
        transform keeps running through the commit.
        """
        with self._cond:
            limit = min(self._spooled, buffer.start + self._size_bytes)
        parallel = self._workers is not None and limit - buffer.start > self._event_raw_bytes
        in_flight, self._read_ahead = self._read_ahead, collections.deque()
        if in_flight and in_flight[0].start != buffer.start:
            self._discard(in_flight)  # read ahead for a buffer that did not commit: this one starts elsewhere
        try:
            read_end = in_flight[-1].end if in_flight else buffer.start
            read_end = self._read_pieces(in_flight, read_end, limit, _PIECES_IN_FLIGHT if parallel else 1)
            while in_flight:
                piece = in_flight.popleft()
                buffer.end = piece.end
                self._take_piece(buffer, piece)
                read_end = self._read_pieces(in_flight, read_end, limit, _PIECES_IN_FLIGHT if parallel else 1)
            if parallel:
                with self._cond:
                    next_limit = min(self._spooled, buffer.end + self._size_bytes)
                self._read_pieces(self._read_ahead, buffer.end, next_limit, _PIECES_READ_AHEAD)
        except BaseException:
            self._discard(in_flight)
            self._discard(self._read_ahead)
            raise

        # Dedup every table's rows first, so all rejects reach the error folder before any commit.
        appends: list[tuple[str, Table, pa.Table, pa.Array]] = []
        # The configured table commits last: its snapshot's offset is what a restart resumes from.
        for destination in sorted(buffer.destinations, key=lambda d: d == self._default_destination):
            sink = buffer.destinations[destination]
            if sink.table is None or not sink.chunks:
                continue
            label = ".".join(destination)
            arrow = pa.concat_tables(sink.chunks)
            sink.chunks.clear()
            keep = self._index.stage_unseen(label, arrow.select(list(self._key_columns)))
            buffer.duplicates += arrow.num_rows - len(keep)
            appends.append((label, sink.table, arrow, keep))

        self._write_errors(buffer)

        ok_written = commits = 0
        snapshot_id: int | None = None
        try:
            for label, table, arrow, keep in appends:
                if len(keep) == 0:
                    continue
                rows = arrow if len(keep) == arrow.num_rows else arrow.take(keep)
                try:
                    table.append(
                        rows, snapshot_properties={SPOOL_OFFSET_PROPERTY: str(buffer.end), STREAM_PROPERTY: self.name}
                    )
                except Exception as exc:
                    self._tables = {d: t for d, t in self._tables.items() if t is not table}
                    self._discard(self._read_ahead)
                    raise DeliveryFailedError(label, exc) from exc
                snapshot = table.current_snapshot()
                assert snapshot is not None  # an append that returned has made a snapshot
                snapshot_id = snapshot.snapshot_id
                self._index.commit_staged(label, snapshot_id)
                ok_written += rows.num_rows
                commits += 1
                if self.on_commit is not None:
                    self.on_commit(snapshot_id)
        finally:
            for label, *_ in appends:
                self._index.discard_staged(label)
            # Give the buffer's Arrow memory back to the system rather than keep it for the next buffer.
            pa.default_memory_pool().release_unused()
        if buffer.records_read:
            # What `meterlake up` shows of each flush (its log at INFO): what landed where, and what did not.
            logger.info(
                "%s: flushed %d records: %d events committed to %s, %d rejected (kept under %s), %d dropped, "
                "%d duplicates skipped",
                self.name,
                buffer.records_read,
                ok_written,
                ", ".join(label for label, *_ in appends) or "no table",
                len(buffer.rejected),
                self.data_dir.errors,
                buffer.dropped,
                buffer.duplicates,
            )
        return FlushReport(
            records_read=buffer.records_read,
            ok_written=ok_written,
            dropped=buffer.dropped,
            failed=len(buffer.rejected),
            duplicates_skipped=buffer.duplicates,
            invocations=buffer.invocations,
            commits=commits,
            snapshot_id=snapshot_id,
            committed_offset=buffer.end,
        )

    def _read_pieces(self, in_flight: _InFlight, read_end: int, limit: int, depth: int) -> int:
        """Send pieces from ``read_end`` up to ``limit`` to the transform until ``depth`` are in flight; returns where
        the pieces sent end.

        With the worker processes (``depth`` > 1), a piece that ends where a put ended is read by the worker itself
        (:class:`PieceRequest`): a put's end is a frame boundary this process knows without reading. Otherwise (no
        put ends within an event's reach, e.g. the backlog found on open, or a repaired range) this process reads
        the piece and sends its records.
        """
        while read_end < limit and len(in_flight) < depth:
            if depth > 1 and self._workers is not None:
                stop = self._put_end_within(read_end, limit)
                if stop is not None:
                    request = self._piece_request(read_end, stop)
                    if request is not None:
                        in_flight.append(_Piece(read_end, stop, None, decoding=self._workers.submit_request(request)))
                        read_end = stop
                        continue
            batch = self._spool.read(read_end, min(self._event_raw_bytes, limit - read_end))
            if batch.end == read_end:
                break
            pending: Transformed | Future[Transformed] | None = None
            if batch.records:  # else only padding where a damaged range was repaired
                if depth > 1 and self._workers is not None:
                    pending = self._workers.submit(batch.offsets, batch.arrivals_ms, batch.records)
                else:
                    pending = self._invoker.transform(batch.offsets, batch.arrivals_ms, batch.records)
            in_flight.append(_Piece(batch.start, batch.end, batch, pending))
            read_end = batch.end
        return read_end

    def _put_end_within(self, start: int, limit: int) -> int | None:
        """The last end of a put in ``(start, min(limit, start + event_raw_bytes)]``, or else the first one within
        ``_PIECE_REACH`` events' bytes (one put larger than an event); None if there is neither."""
        with self._cond:
            puts = self._pending_puts
            reach = min(limit, start + self._event_raw_bytes)
            last = bisect.bisect_right(puts, reach, key=_PUT_END) - 1
            if last >= 0 and puts[last][0] > start:
                return puts[last][0]
            following = last + 1
            if following < len(puts) and start < puts[following][0] <= min(
                limit, start + _PIECE_REACH * self._event_raw_bytes
            ):
                return puts[following][0]
        return None

    def _piece_request(self, start: int, stop: int) -> PieceRequest | None:
        """The request for a worker to read, transform and decode ``[start, stop)``; None if the range holds padding
        (a repaired range, which this process reads)."""
        try:
            spool_range = self._spool.range(start, stop)
        except ValueError:
            return None
        table = self._tables[self._default_destination]
        return PieceRequest(spool_range, self._default_destination, self._arrow_schema(table))

    def _arrow_schema(self, table: Table) -> pa.Schema:
        """``table``'s Arrow schema, converted once per Iceberg schema."""
        schema = table.schema()
        cached = self._arrow_schemas.get(id(table))
        if cached is None or cached[0] is not schema:
            cached = self._arrow_schemas[id(table)] = (schema, schema.as_arrow())
        return cached[1]

    def _take_piece(self, buffer: _Buffer, piece: _Piece) -> None:
        """Add one piece's outcome to the buffer, waiting for the worker if it is still at it."""
        batch = piece.batch
        if batch is None:
            decoded = self._decoded(piece)
            if decoded is not None and self._take_decoded(buffer, piece, decoded):
                return
            # The worker failed, or decoded for another schema: read and transform the piece here.
            batch = self._read_range(piece.start, piece.end)
        if batch.records:
            if buffer.records_read == 0:
                buffer.first_arrival_ms = batch.arrivals_ms[0]
            buffer.records_read += len(batch)
            self._sort_transformed(buffer, batch, self._transformed(batch, piece.pending))

    def _decoded(self, piece: _Piece) -> DecodedPiece | None:
        """The worker's outcome of a piece it read itself; None if it failed (the caller redoes the piece)."""
        assert piece.decoding is not None  # a piece without a batch is one a worker reads
        try:
            return piece.decoding.result()
        except (WorkerStoppedError, WorkerPieceError) as exc:
            logger.warning("%s: %s; transforming [%d, %d) in this process", self.name, exc, piece.start, piece.end)
            return None

    def _take_decoded(self, buffer: _Buffer, piece: _Piece, decoded: DecodedPiece) -> bool:
        """Add a worker-decoded piece to the buffer; False (nothing added) if its rows cannot go in as they are: the
        destination's schema changed since the piece was sent, or the table is gone."""
        destination = self._default_destination
        sink = buffer.destinations.get(destination)
        if sink is None:
            sink = buffer.destinations[destination] = _Sink(self._load_table(destination))
        if decoded.rows.num_rows and (sink.table is None or not decoded.rows.schema.equals(sink.schema)):
            return False
        outcome = decoded.transformed
        batch: SpoolBatch | None = None
        if outcome.rejected or outcome.rows or decoded.bad:
            # Rejects carry their raw records, which only the worker read: read the piece here too (rare).
            batch = self._read_range(piece.start, piece.end)
            if len(batch) != decoded.records:
                return False
        if decoded.records:
            if buffer.records_read == 0:
                buffer.first_arrival_ms = decoded.first_arrival_ms
            buffer.records_read += decoded.records
        if batch is not None:
            self._sort_transformed(buffer, batch, outcome)
            buffer.rejected.extend(
                _Rejected.of(batch, i, "Iceberg.InvalidRecord", message, 1, DELIVERY_FAILED)
                for i, message in decoded.bad
            )
        else:
            buffer.invocations += outcome.invocations
            buffer.dropped += outcome.dropped
        if decoded.rows.num_rows:
            sink.chunks.append(decoded.rows)
        return True

    def _read_range(self, start: int, stop: int) -> SpoolBatch:
        """Every record of ``[start, stop)``, read by this process."""
        batch = self._spool.read(start, stop - start)
        while batch.end < stop:
            more = self._spool.read(batch.end, stop - batch.end)
            if more.end == batch.end:
                break
            batch = SpoolBatch(
                batch.start,
                more.end,
                batch.offsets + more.offsets,
                batch.arrivals_ms + more.arrivals_ms,
                batch.records + more.records,
            )
        return batch

    def _transformed(self, piece: SpoolBatch, pending: Transformed | Future[Transformed] | None) -> Transformed:
        """The transform's outcome for ``piece``, waiting for the worker if it is still transforming it."""
        if isinstance(pending, Transformed):
            return pending
        if pending is not None and self._workers is not None:
            try:
                return pending.result()
            except WorkerStoppedError as exc:
                logger.warning("%s: %s; transforming the piece in this process", self.name, exc)
        return self._invoker.transform(piece.offsets, piece.arrivals_ms, piece.records)

    @staticmethod
    def _discard(in_flight: _InFlight) -> None:
        """Drop pieces in flight (the worker's results for them are ignored)."""
        for piece in in_flight:
            for future in (piece.pending, piece.decoding):
                if isinstance(future, Future):
                    future.cancel()
        in_flight.clear()

    def _sort_transformed(self, buffer: _Buffer, piece: SpoolBatch, outcome: Transformed) -> None:
        """Add one piece's transform outcome to the buffer: rejects, drops, and Ok rows decoded to Arrow per table."""
        buffer.invocations += outcome.invocations
        buffer.dropped += outcome.dropped
        buffer.rejected.extend(
            _Rejected.of(piece, i, code, message, attempts, output_type)
            for i, code, message, attempts, output_type in outcome.rejected
        )
        for destination, (indices, lines) in outcome.rows.items():
            sink = buffer.destinations.get(destination)
            if sink is None:
                sink = buffer.destinations[destination] = _Sink(self._load_table(destination))
            if sink.table is None:
                message = f"table {'.'.join(destination)} does not exist"
                buffer.rejected.extend(
                    _Rejected.of(piece, i, "Iceberg.NoSuchTable", message, 1, DELIVERY_FAILED) for i in indices
                )
                continue
            arrow, bad = decode_rows(lines, sink.schema)
            buffer.rejected.extend(
                _Rejected.of(piece, indices[j], "Iceberg.InvalidRecord", message, 1, DELIVERY_FAILED)
                for j, message in bad
            )
            if arrow.num_rows:
                sink.chunks.append(arrow)

    def _load_table(self, destination: tuple[str, str]) -> Table | None:
        """The destination table, refreshed so the commit builds on its latest metadata; None if it does not exist."""
        table = self._tables.get(destination)
        try:
            if table is None:
                table = self._catalog.load_table(destination)
                self._tables[destination] = table
                self._catch_up_index(".".join(destination))
            else:
                table.refresh()
        except (NoSuchTableError, NoSuchNamespaceError):
            return None
        return table

    def _write_errors(self, buffer: _Buffer) -> None:
        """Write the buffer's rejects as Firehose error-output JSON lines, one file per output type.

        A file is named by the buffer's spool range: a replay after a crash starts at the same offset, so it
        replaces the file (any file of the same start) instead of adding a second copy.
        """
        if not buffer.rejected:
            return
        ended_ms = int(time.time() * 1000)
        by_type: dict[str, list[_Rejected]] = {}
        for reject in buffer.rejected:
            by_type.setdefault(reject.output_type, []).append(reject)
        for output_type, rejects in by_type.items():
            rejects.sort(key=lambda r: r.offset)
            folder = self.data_dir.errors / render_error_prefix(
                self._error_prefix, when_ms=buffer.first_arrival_ms, output_type=output_type
            )
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{self.name}-{buffer.start:020d}"
            body = "".join(
                json.dumps(
                    {
                        "attemptsMade": r.attempts,
                        "arrivalTimestamp": r.arrival_ms,
                        "errorCode": r.error_code,
                        "errorMessage": r.message,
                        "attemptEndingTimestamp": ended_ms,
                        "rawData": base64.b64encode(r.raw).decode("ascii"),
                    }
                )
                + "\n"
                for r in rejects
            )
            for stale in folder.glob(f"{stem}-*.jsonl"):
                stale.unlink()
            _atomic_write(folder / f"{stem}-{buffer.end:020d}.jsonl", body.encode())

    # -- recovery ----------------------------------------------------------------------------------------------------

    def _read_checkpoint(self) -> int:
        path = self.spool_dir / CHECKPOINT_FILE
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise SpoolUnusableError(self.spool_dir, f"checkpoint {path} is unreadable: {exc}") from None
        offset = raw.get("offset") if isinstance(raw, dict) else None
        if not isinstance(offset, int) or offset < 0:
            raise SpoolUnusableError(self.spool_dir, f"checkpoint {path} holds no offset: {raw!r}")
        return offset

    def _table_offset(self, table: Table) -> int:
        """The spool offset of this stream's newest commit in ``table`` (other writers' snapshots are skipped)."""
        snapshot = table.current_snapshot()
        while snapshot is not None:
            summary = snapshot.summary
            if summary is not None and summary.get(STREAM_PROPERTY) == self.name:
                offset = summary.get(SPOOL_OFFSET_PROPERTY)
                if offset is not None:
                    return int(offset)
            parent = snapshot.parent_snapshot_id
            snapshot = table.snapshot_by_id(parent) if parent is not None else None
        return 0

    def _catch_up_indexes(self) -> None:
        """Bring the request_id index up to date with the configured table and every table it already knows."""
        names = [".".join(self._default_destination)]
        names.extend(name for name in self._index.table_names() if name not in names)
        for name in names:
            self._catch_up_index(name)

    def _catch_up_index(self, label: str) -> None:
        destination = tuple(label.split(".", 1))
        table = self._tables.get((destination[0], destination[1]))
        if table is None:
            try:
                table = self._catalog.load_table(label)
            except (NoSuchTableError, NoSuchNamespaceError):
                return
            self._tables[(destination[0], destination[1])] = table
        read = self._index.catch_up(label, table)
        if read:
            logger.info("request_id index caught up with %s: %d data files", label, read)


# -- process entry --------------------------------------------------------------------------------------------------


def ingest_lines(
    stream: DeliveryStream,
    lines: Iterable[bytes],
    *,
    batch: int = 1000,
    on_ack: Callable[[int], None] | None = None,
) -> int:
    """Put ``lines`` into ``stream`` in batches of ``batch``, calling ``on_ack(total)`` after each durable batch.

    Returns:
        How many lines were put (all acknowledged).
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    total = 0
    pending: list[bytes] = []
    for line in lines:
        pending.append(line)
        if len(pending) >= batch:
            stream.put_records(pending)
            total += len(pending)
            pending = []
            if on_ack is not None:
                on_ack(total)
    if pending:
        stream.put_records(pending)
        total += len(pending)
        if on_ack is not None:
            on_ack(total)
    return total


def _read_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        for line in handle:
            stripped = line.rstrip(b"\r\n")
            if stripped:
                yield stripped


def _print_ack(acked: int) -> None:
    """One ``acked N`` line, written in a single call: the transform's logger shares stdout from the flush thread, and
    print()'s separate write of the newline could let a log record land inside the line."""
    sys.stdout.write(f"acked {acked}\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meterlake.local.stream ingest --home DIR [--config FILE] [--batch N] FILE``: put, ack, flush."""
    parser = argparse.ArgumentParser(prog="python -m meterlake.local.stream")
    commands = parser.add_subparsers(dest="command", required=True)
    ingest = commands.add_parser("ingest", help="put a file of access-log lines (one per line), then flush")
    ingest.add_argument("--home", type=Path, required=True, help="the data directory")
    ingest.add_argument("--config", type=Path, default=None, help="the config file (default: load_config's)")
    ingest.add_argument("--batch", type=int, default=1000, help="lines per put_records call")
    ingest.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        with DeliveryStream(config=config, data_dir=DataDir.resolve(args.home)) as stream:
            stream.start()
            ingest_lines(stream, _read_lines(args.file), batch=args.batch, on_ack=_print_ack)
            report = stream.close()
    except StreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"flushed: committed {report.ok_written}, rejected {report.failed}, dropped {report.dropped}, "
        f"duplicates skipped {report.duplicates_skipped}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
