"""The durable outbox between the lake and Amberflo: committed metering events in, Amberflo meter records out.

The Iceberg table is the only source of truth. :meth:`Outbox.stage_committed` walks the table's snapshots committed
since its checkpoint, in commit order, reads only the data files each APPEND snapshot added, turns their events into
meter records (:func:`meterlake.meters.meter_records`) and stores them as batches of at most 100 records. A
snapshot's batches and the checkpoint (that snapshot's id) are written in ONE SQLite transaction (WAL,
``synchronous=FULL``), so a crash at any point re-stages nothing twice and skips nothing. Staging only reads the
catalog and the data files: it never blocks the delivery stream that commits them. Snapshots of other operations
(compaction's ``replace``, ``overwrite``, ``delete``) restate rows already staged and add no new requests: skipped.

:meth:`Outbox.drain` sends pending batches oldest first and marks each sent or dead in its own transaction after
Amberflo answers. Exactly once in effect: a batch's body is fixed when it is staged, and every record carries a
deterministic uniqueId (``<meter>:<request_id>``). If the process dies after Amberflo accepted a batch but before
it was marked sent, the batch is sent again after the restart with the same uniqueIds, and Amberflo drops the
duplicates. Transient failures leave a batch pending (never dead). When Amberflo refuses records of a batch (the
forwarder isolates them), the batch keeps the records it accepted, marked sent, and each refused record moves to the
dead-letter store as a batch of its own, with Amberflo's answer to it; a refusal no record explains (e.g. 404)
moves the whole batch. :meth:`Outbox.retry_dead` re-drives the dead letters.

When Amberflo refuses the API key (401/403), forwarding is paused, not failed: the batches stay pending, nothing is
dead-lettered, and :attr:`OutboxStatus.paused` says since when (kept in the outbox, so ``meterlake forward status``
sees what a running ``meterlake up`` met). The next batch Amberflo accepts ends the pause; :class:`ForwardingWorker`
tries again at growing intervals until then.

Without an API key the drain runs dry: records are staged (and can be reconciled with :meth:`staged_records`),
nothing is sent.

An outbox follows one table. By default it is the access-log table and its records are the meters'
(:func:`meterlake.meters.meter_records`); a :class:`RecordSource` names another (the metering service's meter_events,
whose rows are Amberflo records already): its own outbox file, the same staging, sending and exactly-once argument.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
from pyiceberg.manifest import DataFileContent, ManifestEntryStatus
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot

from meterlake.amberflo.api import IngestRecord
from meterlake.amberflo.forwarder import (
    DeadLetter,
    EncodedBatch,
    Forwarder,
    GaveUp,
    KeyRefused,
    RecordsRefused,
    SendOutcome,
    Sent,
    encode_batch,
)
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.lake.files import read_data_file
from meterlake.lake.home import DataDir
from meterlake.meters import (
    DEFAULT_METERS,
    REQUEST_ID_COLUMN,
    TENANT_COLUMN,
    TIME_COLUMN,
    Meter,
    MeterBatch,
    check_meters,
    meter_records,
)
from meterlake.schema import metering_event_arrow_schema

logger = logging.getLogger(__name__)

OUTBOX_DIR = "amberflo"
OUTBOX_FILE = "outbox.db"
#: The snapshot id recorded on batches queued by reconciliation repair rather than staged from a snapshot.
REPAIR_SNAPSHOT_ID = -1
#: Pending batches read from SQLite at a time while draining.
_DRAIN_PAGE = 256
_METER_TIME = attrgetter("meter_time_in_millis")
_PENDING, _SENT, _DEAD = "pending", "sent", "dead"
#: The meta key holding the pause (JSON of :class:`ForwardingPause`'s fields) while Amberflo refuses the API key.
_PAUSE_KEY = "key_refused"
#: Meta key of the last drain's mode: whether it sent or ran dry, when, and why dry.
_LAST_DRAIN_KEY = "last_drain"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    snapshot_id INTEGER NOT NULL UNIQUE,
    operation TEXT NOT NULL,
    committed_ms INTEGER NOT NULL,
    staged_ms INTEGER NOT NULL,
    data_files INTEGER NOT NULL,
    events INTEGER NOT NULL,
    records INTEGER NOT NULL,
    untenanted INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    snapshot_id INTEGER NOT NULL,
    committed_ms INTEGER NOT NULL,
    records INTEGER NOT NULL,
    min_time_ms INTEGER NOT NULL,
    max_time_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    answer TEXT,
    updated_ms INTEGER
);
CREATE INDEX IF NOT EXISTS batches_by_state ON batches (state, id);
"""


class OutboxError(Exception):
    """Base of the outbox's errors."""


class OutboxTableMismatchError(OutboxError):
    """The outbox was staged from another table (its UUID differs): a reset lake needs a fresh outbox."""

    def __init__(self, path: Path, staged_uuid: str, table_uuid: str) -> None:
        super().__init__(
            f"the outbox {path} holds records of table {staged_uuid}, not of table {table_uuid}; "
            "move it aside to forward the new table"
        )
        self.path = path


class LakeHistoryGapError(OutboxError):
    """The staged checkpoint is not an ancestor of the table's current snapshot (rolled back, or history expired
    before it was staged): which events were never staged cannot be told from the snapshots."""

    def __init__(self, checkpoint: int, current: int) -> None:
        super().__init__(
            f"snapshot {checkpoint}, the last one staged, is not an ancestor of the current snapshot {current}"
        )
        self.checkpoint = checkpoint
        self.current = current


@dataclass(frozen=True, slots=True)
class ForwardingPause:
    """Forwarding is paused: Amberflo refused the API key. Nothing is sent or dead-lettered until it accepts one."""

    #: Amberflo's status: 401 or 403.
    status: int
    #: When Amberflo first refused the key (epoch ms); the pause lasts until a batch is accepted.
    since_ms: int
    #: Amberflo's answer.
    answer: str

    @property
    def since(self) -> datetime:
        """When the pause began, in UTC."""
        return datetime.fromtimestamp(self.since_ms / 1000, UTC)

    def describe(self) -> str:
        """``Amberflo refused the API key (401), since 2025-11-24 16:00:00 UTC``."""
        return f"Amberflo refused the API key ({self.status}), since {self.since:%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True, slots=True)
class LastDrain:
    """How the outbox was last drained, by whichever process (`up`, `forward run`): sending, or a dry run and why.

    A command reporting the outbox reads this instead of its own environment: `up` may hold the API key that the
    shell running `meterlake forward status` does not.
    """

    sending: bool
    at_ms: int
    why_dry: str | None = None

    def describe(self) -> str:
        """``sending to Amberflo (last drain 2025-11-24 16:00:00 UTC)`` or ``dry run (...): nothing is sent``."""
        at = datetime.fromtimestamp(self.at_ms / 1000, UTC)
        if self.sending:
            return f"sending to Amberflo (last drain {at:%Y-%m-%d %H:%M:%S} UTC)"
        return f"dry run ({self.why_dry}; last drain {at:%Y-%m-%d %H:%M:%S} UTC): records are staged, nothing is sent"


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """The outbox at a glance. ``lag_seconds`` is the age of the oldest pending record's commit (0 if none);
    ``paused`` is set while Amberflo refuses the API key."""

    pending_batches: int
    pending_records: int
    sent_batches: int
    sent_records: int
    dead_batches: int
    dead_records: int
    untenanted_events: int
    staged_snapshots: int
    checkpoint_snapshot_id: int | None
    lag_seconds: float
    last_error: str | None
    paused: ForwardingPause | None = None
    #: None: never drained.
    last_drain: LastDrain | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """Records Amberflo refused for good (one refused record, or a whole batch refused without a record at fault),
    with its answer."""

    batch_id: int
    records: int
    http_status: int | None
    answer: str | None
    unique_ids: list[str]


@dataclass(frozen=True, slots=True)
class RecordSource:
    """What an outbox stages from its table: the columns it reads (typed by ``schema``) and the records they make."""

    columns: tuple[str, ...]
    schema: pa.Schema
    to_records: Callable[[pa.Table], MeterBatch]


def meter_source(meters: Sequence[Meter]) -> RecordSource:
    """The access-log table's source: each event becomes one record per meter it matches."""
    check_meters(meters)
    chosen = tuple(meters)
    return RecordSource(
        columns=tuple(columns_read(chosen)),
        schema=metering_event_arrow_schema(),
        to_records=lambda events: meter_records(events, chosen),
    )


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What one drain did. ``dry_run``: nothing was sent (no API key, or dry_run set). ``dead_batches`` counts the
    dead letters made: a record refused on its own is one. ``paused``: Amberflo refuses the API key."""

    dry_run: bool
    sent_batches: int = 0
    sent_records: int = 0
    dead_batches: int = 0
    dead_records: int = 0
    gave_up_batches: int = 0
    pending_batches: int = 0
    paused: ForwardingPause | None = None


class Outbox:
    """The SQLite outbox (WAL, synchronous=FULL). Methods may be called from several threads (one lock guards it).

    Raises (from the constructor):
        OutboxError: the database cannot be opened.
    """

    def __init__(
        self,
        path: Path,
        *,
        meters: Sequence[Meter] = DEFAULT_METERS,
        settings: AmberfloSettings | None = None,
        source: RecordSource | None = None,
    ) -> None:
        check_meters(meters)
        self.path = path
        self.meters = tuple(meters)
        self.settings = settings or AmberfloSettings()
        self._source = source or meter_source(self.meters)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {path}: {exc}") from exc
        self._lock = threading.RLock()

    @classmethod
    def in_data_dir(
        cls, data_dir: DataDir, *, meters: Sequence[Meter] = DEFAULT_METERS, settings: AmberfloSettings | None = None
    ) -> Outbox:
        """The outbox of the local runtime: ``<data dir>/amberflo/outbox.db``."""
        return cls(data_dir.root / OUTBOX_DIR / OUTBOX_FILE, meters=meters, settings=settings)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- staging -----------------------------------------------------------------------------------------------------

    def stage_committed(self, table: Table) -> int:
        """Stage the records of every snapshot ``table`` committed since the checkpoint; returns records staged.

        ``table`` is read as loaded: refresh it first to see the latest commits.

        Raises:
            OutboxTableMismatchError: the outbox belongs to another table.
            LakeHistoryGapError: the checkpoint is not an ancestor of the current snapshot.
        """
        table_uuid = str(table.metadata.table_uuid)
        staged = 0
        while True:
            checkpoint = self._checkpoint(table_uuid)
            raced = False
            for committed in committed_since(
                table, checkpoint, columns=self._source.columns, schema=self._source.schema
            ):
                written = self._stage_snapshot(committed, expected_checkpoint=checkpoint)
                if written is None:
                    raced = True
                    break  # another process staged concurrently: walk again from its checkpoint
                staged += written
                checkpoint = committed.snapshot.snapshot_id
            if not raced:
                return staged

    def _stage_snapshot(self, committed: CommittedSnapshot, *, expected_checkpoint: int | None) -> int | None:
        """Stage one snapshot's records and advance the checkpoint to it in one transaction; None if raced."""
        snapshot, events = committed.snapshot, committed.events
        batch = self._source.to_records(events)
        rows = list(self._encode(batch.ingest_records(), snapshot))
        now_ms = _now_ms()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._meta("checkpoint") != (None if expected_checkpoint is None else str(expected_checkpoint)):
                    self._db.execute("ROLLBACK")
                    return None
                self._db.executemany(
                    "INSERT INTO batches (snapshot_id, committed_ms, records, min_time_ms, max_time_ms, body, state) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*row, _PENDING) for row in rows],
                )
                self._db.execute(
                    "INSERT INTO snapshots (snapshot_id, operation, committed_ms, staged_ms, data_files, events, "
                    "records, untenanted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        snapshot.snapshot_id,
                        str(committed.operation.value),
                        snapshot.timestamp_ms,
                        now_ms,
                        committed.data_files,
                        events.num_rows,
                        len(batch),
                        batch.untenanted,
                    ),
                )
                self._set_meta("checkpoint", str(snapshot.snapshot_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if len(batch):
            logger.info(
                "staged snapshot %d: %d events -> %d records in %d batches (%d without tenant)",
                snapshot.snapshot_id,
                events.num_rows,
                len(batch),
                len(rows),
                batch.untenanted,
            )
        return len(batch)

    def _encode(
        self, records: list[IngestRecord], snapshot: Snapshot
    ) -> Iterator[tuple[int, int, int, int, int, bytes]]:
        """Rows of the batches table: (snapshot, committed_ms, records, min time, max time, gzip body)."""
        size = self.settings.batch_size
        times = list(map(_METER_TIME, records))
        for start in range(0, len(records), size):
            chunk = times[start : start + size]
            encoded = encode_batch(records[start : start + size])
            yield (snapshot.snapshot_id, snapshot.timestamp_ms, encoded.records, min(chunk), max(chunk), encoded.body)

    # -- draining ----------------------------------------------------------------------------------------------------

    def drain(self, forwarder: Forwarder, *, api_key: str | None, halt: threading.Event | None = None) -> DrainReport:
        """Send pending batches, oldest first, the forwarder's ``concurrency`` at a time; mark each after its answer.

        Without ``api_key`` (or with ``settings.dry_run``) nothing is sent and the report says ``dry_run``. A batch
        whose transient failures outlast the retry budget stays pending and ends this drain; ``halt`` ends it early.
        """
        if api_key is None or self.settings.dry_run:
            pending = self.status().pending_batches
            why = "dry_run is set" if self.settings.dry_run else f"${self.settings.api_key_env} is not set"
            self._note_drain(LastDrain(sending=False, at_ms=_now_ms(), why_dry=why))
            logger.info("Amberflo forwarding is a dry run (%s): %d batches stay staged, nothing sent", why, pending)
            return DrainReport(dry_run=True, pending_batches=pending)
        self._note_drain(LastDrain(sending=True, at_ms=_now_ms()))
        counts = {"sent": 0, "sent_records": 0, "dead": 0, "dead_records": 0, "gave_up": 0}

        def on_outcome(batch_id: int, batch: EncodedBatch, outcome: SendOutcome) -> None:
            self._mark(batch_id, batch, outcome)
            if isinstance(outcome, DeadLetter):
                counts["dead"] += 1
                counts["dead_records"] += batch.records
            elif isinstance(outcome, RecordsRefused):
                accepted = batch.records - len(outcome.refused)
                counts["sent"] += 1 if accepted else 0
                counts["sent_records"] += accepted
                counts["dead"] += len(outcome.refused)
                counts["dead_records"] += len(outcome.refused)
            elif isinstance(outcome, GaveUp):
                counts["gave_up"] += 1
            elif isinstance(outcome, Sent):
                counts["sent"] += 1
                counts["sent_records"] += batch.records

        forwarder.forward(self._pending_batches(), on_outcome, api_key=api_key, halt=halt)
        status = self.status()
        return DrainReport(
            dry_run=False,
            sent_batches=counts["sent"],
            sent_records=counts["sent_records"],
            dead_batches=counts["dead"],
            dead_records=counts["dead_records"],
            gave_up_batches=counts["gave_up"],
            pending_batches=status.pending_batches,
            paused=status.paused,
        )

    def _pending_batches(self) -> Iterator[tuple[int, EncodedBatch]]:
        """Pending batches in staging order, read a page at a time (each batch once per drain)."""
        after = 0
        while True:
            with self._lock:
                page = self._db.execute(
                    "SELECT id, records, body FROM batches WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
                    (_PENDING, after, _DRAIN_PAGE),
                ).fetchall()
            if not page:
                return
            for batch_id, records, body in page:
                yield int(batch_id), EncodedBatch(body=bytes(body), records=int(records))
            after = int(page[-1][0])

    def _mark(self, batch_id: int, batch: EncodedBatch, outcome: SendOutcome) -> None:
        """Record one batch's answer (one transaction)."""
        now_ms = _now_ms()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if isinstance(outcome, DeadLetter):
                    self._db.execute(
                        "UPDATE batches SET state = ?, attempts = attempts + ?, http_status = ?, answer = ?, "
                        "updated_ms = ? WHERE id = ? AND state = ?",
                        (_DEAD, outcome.attempts, outcome.status, outcome.body, now_ms, batch_id, _PENDING),
                    )
                    self._set_meta("last_error", f"batch {batch_id}: HTTP {outcome.status}: {outcome.body[:500]}")
                elif isinstance(outcome, RecordsRefused):
                    self._split_refused(batch_id, batch, outcome, now_ms)
                    self._db.execute("DELETE FROM meta WHERE key = ?", (_PAUSE_KEY,))
                elif isinstance(outcome, KeyRefused):
                    self._db.execute(
                        "UPDATE batches SET attempts = attempts + ?, answer = ?, updated_ms = ? WHERE id = ?",
                        (outcome.attempts, f"HTTP {outcome.status}: {outcome.body}", now_ms, batch_id),
                    )
                    if self._meta(_PAUSE_KEY) is None:
                        pause = {"status": outcome.status, "since_ms": now_ms, "answer": outcome.body[:500]}
                        self._set_meta(_PAUSE_KEY, json.dumps(pause))
                    self._set_meta("last_error", f"Amberflo refused the API key: HTTP {outcome.status}")
                elif isinstance(outcome, GaveUp):
                    self._db.execute(
                        "UPDATE batches SET attempts = attempts + ?, answer = ?, updated_ms = ? WHERE id = ?",
                        (outcome.attempts, outcome.last_error, now_ms, batch_id),
                    )
                    self._set_meta("last_error", f"batch {batch_id}: {outcome.last_error}")
                else:
                    self._db.execute(
                        "UPDATE batches SET state = ?, attempts = attempts + ?, http_status = 200, answer = NULL, "
                        "updated_ms = ? WHERE id = ? AND state = ?",
                        (_SENT, outcome.attempts, now_ms, batch_id, _PENDING),
                    )
                    self._db.execute("DELETE FROM meta WHERE key = ?", (_PAUSE_KEY,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _split_refused(self, batch_id: int, batch: EncodedBatch, outcome: RecordsRefused, now_ms: int) -> None:
        """Keep the records Amberflo accepted in the batch, marked sent, and move each refused record to a dead
        batch of its own with Amberflo's answer to it (in the caller's transaction).

        The records stay where they were staged, once each: what was staged can still be reconciled.
        """
        refused = {item.index for item in outcome.refused}
        accepted = [record for index, record in enumerate(batch.decode()) if index not in refused]
        snapshot_id, committed_ms = self._db.execute(
            "SELECT snapshot_id, committed_ms FROM batches WHERE id = ? AND state = ?", (batch_id, _PENDING)
        ).fetchone() or (None, None)
        if snapshot_id is None:
            return  # marked by a concurrent drain already
        # (records, state, status, answer): the accepted part first; the first part takes over the batch's row.
        parts: list[tuple[list[dict[str, Any]], str, int, str | None]] = (
            [(accepted, _SENT, 200, None)] if accepted else []
        )
        parts.extend(([item.record], _DEAD, item.status, item.body) for item in outcome.refused)
        (records, state, status, answer), *others = parts
        self._db.execute(
            "UPDATE batches SET records = ?, min_time_ms = ?, max_time_ms = ?, body = ?, state = ?, "
            "attempts = attempts + ?, http_status = ?, answer = ?, updated_ms = ? WHERE id = ?",
            (*_body_columns(records), state, outcome.attempts, status, answer, now_ms, batch_id),
        )
        self._db.executemany(
            "INSERT INTO batches (snapshot_id, committed_ms, records, min_time_ms, max_time_ms, body, state, "
            "attempts, http_status, answer, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (snapshot_id, committed_ms, *_body_columns(records), state, outcome.attempts, status, answer, now_ms)
                for records, state, status, answer in others
            ],
        )
        first = outcome.refused[0]
        self._set_meta(
            "last_error",
            f"batch {batch_id}: Amberflo refused {len(refused)} of its {batch.records} records "
            f"(dead-lettered; the others were accepted), e.g. {first.record.get('uniqueId')}: "
            f"HTTP {first.status}: {first.body[:300]}",
        )

    # -- inspection and repair ---------------------------------------------------------------------------------------

    def status(self) -> OutboxStatus:
        """Backlog, sent and dead counts, untenanted events skipped, lag and the last error."""
        with self._lock:
            by_state = {
                state: (int(batches), int(records or 0))
                for state, batches, records in self._db.execute(
                    "SELECT state, count(*), sum(records) FROM batches GROUP BY state"
                )
            }
            oldest = self._db.execute("SELECT min(committed_ms) FROM batches WHERE state = ?", (_PENDING,)).fetchone()[
                0
            ]
            snapshots, untenanted = self._db.execute("SELECT count(*), sum(untenanted) FROM snapshots").fetchone()
            checkpoint = self._meta("checkpoint")
            last_error = self._meta("last_error")
            pause = self._meta(_PAUSE_KEY)
            last_drain = self._meta(_LAST_DRAIN_KEY)
        lag = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
        return OutboxStatus(
            pending_batches=by_state.get(_PENDING, (0, 0))[0],
            pending_records=by_state.get(_PENDING, (0, 0))[1],
            sent_batches=by_state.get(_SENT, (0, 0))[0],
            sent_records=by_state.get(_SENT, (0, 0))[1],
            dead_batches=by_state.get(_DEAD, (0, 0))[0],
            dead_records=by_state.get(_DEAD, (0, 0))[1],
            untenanted_events=int(untenanted or 0),
            staged_snapshots=int(snapshots),
            checkpoint_snapshot_id=None if checkpoint is None else int(checkpoint),
            lag_seconds=lag,
            last_error=last_error,
            paused=None if pause is None else ForwardingPause(**json.loads(pause)),
            last_drain=None if last_drain is None else LastDrain(**json.loads(last_drain)),
        )

    def dead_letters(self) -> list[DeadLetterEntry]:
        """The dead-letter store: batches Amberflo refused, oldest first, with its status and answer."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, records, http_status, answer, body FROM batches WHERE state = ? ORDER BY id", (_DEAD,)
            ).fetchall()
        return [
            DeadLetterEntry(
                batch_id=int(batch_id),
                records=int(records),
                http_status=None if status is None else int(status),
                answer=answer,
                unique_ids=[r["uniqueId"] for r in EncodedBatch(bytes(body), int(records)).decode()],
            )
            for batch_id, records, status, answer, body in rows
        ]

    def retry_dead(self) -> int:
        """Move every dead batch back to pending (after the cause was fixed); returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE batches SET state = ?, updated_ms = ? WHERE state = ?", (_PENDING, _now_ms(), _DEAD)
            )
            return int(cursor.rowcount)

    def staged_records(self, start_ms: int | None = None, end_ms: int | None = None) -> list[dict[str, Any]]:
        """Every staged record (pending, sent or dead) whose meterTimeInMillis is in ``[start_ms, end_ms)``."""
        low = -(2**63) if start_ms is None else start_ms
        high = 2**63 - 1 if end_ms is None else end_ms
        with self._lock:
            rows = self._db.execute(
                "SELECT records, body FROM batches WHERE max_time_ms >= ? AND min_time_ms < ? ORDER BY id",
                (low, high),
            ).fetchall()
        return [
            record
            for records, body in rows
            for record in EncodedBatch(bytes(body), int(records)).decode()
            if low <= record["meterTimeInMillis"] < high
        ]

    def restage(self, records: Sequence[dict[str, Any]]) -> int:
        """Queue ``records`` again as pending batches (reconciliation's repair); returns the batches queued.

        The records carry the uniqueIds they were first staged with, so a record Amberflo already has is dropped
        there: re-sending can fill a gap but never double a number.
        """
        size = self.settings.batch_size
        now_ms = _now_ms()
        rows = []
        for start in range(0, len(records), size):
            chunk = list(records[start : start + size])
            times = [record["meterTimeInMillis"] for record in chunk]
            encoded = encode_batch(chunk)
            rows.append((REPAIR_SNAPSHOT_ID, now_ms, encoded.records, min(times), max(times), encoded.body, _PENDING))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO batches (snapshot_id, committed_ms, records, min_time_ms, max_time_ms, body, state) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    # -- internals ---------------------------------------------------------------------------------------------------

    def _checkpoint(self, table_uuid: str) -> int | None:
        """The last staged snapshot id; binds the outbox to ``table_uuid`` on first use."""
        with self._lock:
            staged_uuid = self._meta("table_uuid")
            if staged_uuid is None:
                self._set_meta("table_uuid", table_uuid)
            elif staged_uuid != table_uuid:
                raise OutboxTableMismatchError(self.path, staged_uuid, table_uuid)
            checkpoint = self._meta("checkpoint")
        return None if checkpoint is None else int(checkpoint)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _note_drain(self, drain: LastDrain) -> None:
        """Remember how this drain runs, for `forward status` in another process."""
        with self._lock:
            self._set_meta(
                _LAST_DRAIN_KEY, json.dumps({"sending": drain.sending, "at_ms": drain.at_ms, "why_dry": drain.why_dry})
            )

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


class ForwardingWorker:
    """A thread that stages committed snapshots and drains the outbox: after each :meth:`wake`, and every
    ``settings.poll_interval_s``. Embedded by ``meterlake up`` and ``make demo``; call :meth:`wake` after a commit.

    While Amberflo refuses the API key the worker keeps staging but drains only at growing intervals (from
    ``poll_interval_s``, doubling up to ``key_refused_retry_max_s``); it logs the pause once at ERROR and the end of it
    when a batch is accepted again (the key was fixed in Amberflo; a new key needs a restart).
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        load_table: Callable[[], Table],
        forwarder: Forwarder,
        api_key: str | None,
    ) -> None:
        self.outbox = outbox
        self._load_table = load_table
        self._forwarder = forwarder
        self._api_key = api_key
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._cycles = 0
        self._in_cycle = False
        self._cycle_done = threading.Condition()
        #: The last cycle's failure (the worker keeps running and retries on the next cycle), or None.
        self.last_error: BaseException | None = None
        #: The pause as the last drain left it; None while Amberflo accepts the key.
        self.paused: ForwardingPause | None = None
        self._next_drain_at = 0.0
        self._key_retry_s = 0.0

    def start(self) -> None:
        """Start the thread (idempotent); its first cycle runs at once, so a backlog left by a previous run drains."""
        if self._thread is None:
            self._wake.set()
            self._thread = threading.Thread(target=self._run, name="amberflo-forwarder", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Stage and drain now (call after each Iceberg commit); cheap and non-blocking."""
        self._wake.set()

    def wait_for_cycle(self, timeout: float) -> bool:
        """Wake the worker and wait until a cycle that started after this call has finished; False on timeout."""
        with self._cycle_done:
            # A cycle under way may have read the table before the call: then wait for the next one too.
            target = self._cycles + (2 if self._in_cycle else 1)
            self._wake.set()
            return self._cycle_done.wait_for(lambda: self._cycles >= target, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after a final stage and drain; past ``timeout`` seconds, retries are abandoned (batches stay pending).

        Requests in flight then still end within the connect and read timeouts.
        """
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            self._halt.set()
            settings = self._forwarder.settings
            thread.join(settings.connect_timeout_s + settings.read_timeout_s + 1.0)
        self._thread = None

    def _run(self) -> None:
        interval = self.outbox.settings.poll_interval_s
        while True:
            self._wake.wait(interval)
            with self._cycle_done:
                self._wake.clear()
                self._in_cycle = True
            final = self._stopping.is_set()
            try:
                table = self._load_table()
                self.outbox.stage_committed(table)
                if self.paused is None or time.monotonic() >= self._next_drain_at:
                    report = self.outbox.drain(self._forwarder, api_key=self._api_key, halt=self._halt)
                    self._follow_pause(report.paused)
                self.last_error = None
            except Exception as exc:  # the worker outlives a failed cycle: the lake and outbox keep the records
                logger.exception("Amberflo forwarding cycle failed; retrying on the next cycle")
                self.last_error = exc
            with self._cycle_done:
                self._cycles += 1
                self._in_cycle = False
                self._cycle_done.notify_all()
            if final or self._halt.is_set():
                return

    def _follow_pause(self, pause: ForwardingPause | None) -> None:
        """Log a pause once (ERROR) and its end; schedule the next drain of a paused outbox."""
        settings = self.outbox.settings
        if pause is None:
            if self.paused is not None:
                logger.warning(
                    "Amberflo accepts the API key again: forwarding resumed (paused since %s UTC)",
                    f"{self.paused.since:%Y-%m-%d %H:%M:%S}",
                )
            self.paused = None
            return
        if self.paused is None:
            self._key_retry_s = settings.poll_interval_s
            logger.error(
                "%s: Amberflo forwarding is paused; nothing is dead-lettered, the backlog waits. Trying again in "
                "%.0f s, then less and less often (at most every %.0f s) until Amberflo accepts the key: fix it in "
                "Amberflo, or set $%s and restart. Amberflo said: %s",
                pause.describe(),
                self._key_retry_s,
                settings.key_refused_retry_max_s,
                settings.api_key_env,
                pause.answer[:200],
            )
        else:
            self._key_retry_s = min(self._key_retry_s * 2, settings.key_refused_retry_max_s)
            logger.info(
                "Amberflo still refuses the API key (%d); trying again in %.0f s", pause.status, self._key_retry_s
            )
        self.paused = pause
        self._next_drain_at = time.monotonic() + self._key_retry_s


# -- the lake -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommittedSnapshot:
    """What one committed snapshot added: the events of the data files it appended (none for other operations)."""

    snapshot: Snapshot
    operation: Operation
    #: How many data files the snapshot appended (and ``events`` were read from).
    data_files: int
    #: The requested columns of those files, typed as the metering-event schema.
    events: pa.Table


#: Snapshot operations whose added data files hold newly committed requests.
_ADDING_OPERATIONS = frozenset({Operation.APPEND, Operation.OVERWRITE})


def committed_since(
    table: Table, checkpoint: int | None, *, columns: Sequence[str], schema: pa.Schema | None = None
) -> Iterator[CommittedSnapshot]:
    """Each snapshot committed after ``checkpoint``, oldest first, with the events it appended.

    The one way committed events are read for Amberflo (the local outbox and the AWS stager): only the data files a
    snapshot itself added, so a replayed snapshot adds nothing twice. Both ``append`` (the local stream) and
    ``overwrite`` count: Firehose's upserts on request_id commit ``overwrite`` snapshots (equality deletes plus the new
    rows), and a redelivered row they re-add carries the same uniqueIds, which Amberflo drops. Compaction's ``replace``
    and ``delete`` only restate or remove rows already read, so they yield no events. Lazy: each snapshot's files are
    read when reached.

    ``schema`` types the columns read (default: the metering-event table's).

    Raises:
        LakeHistoryGapError: the checkpoint is not an ancestor of the current snapshot (raised on first iteration).
    """
    for snapshot in _snapshots_after(table, checkpoint):
        operation = snapshot.summary.operation if snapshot.summary is not None else Operation.APPEND
        if operation in _ADDING_OPERATIONS:
            paths = _added_data_files(table, snapshot)
        else:
            paths = []
            logger.info("snapshot %d is a %s: it adds no new requests, skipped", snapshot.snapshot_id, operation)
        yield CommittedSnapshot(
            snapshot=snapshot,
            operation=operation,
            data_files=len(paths),
            events=_read_events(table, paths, columns, schema or metering_event_arrow_schema()),
        )


def _read_events(table: Table, paths: Sequence[str], columns: Sequence[str], schema: pa.Schema) -> pa.Table:
    """The ``columns`` of the given data files, typed as ``schema`` has them."""
    target = pa.schema([schema.field(name) for name in columns])
    pieces = []
    for path in paths:
        with table.io.new_input(path).open() as handle:
            pieces.append(read_data_file(handle, target))
    return pa.concat_tables(pieces) if pieces else target.empty_table()


def _snapshots_after(table: Table, checkpoint: int | None) -> list[Snapshot]:
    """Snapshots committed after ``checkpoint``, oldest first (all retained ones if there is no checkpoint).

    Raises:
        LakeHistoryGapError: the checkpoint is not an ancestor of the current snapshot.
    """
    current = table.current_snapshot()
    if current is None or current.snapshot_id == checkpoint:
        return []
    chain: list[Snapshot] = []
    snapshot: Snapshot | None = current
    while snapshot is not None:
        chain.append(snapshot)
        parent = snapshot.parent_snapshot_id
        if parent is not None and parent == checkpoint:
            return chain[::-1]
        snapshot = table.snapshot_by_id(parent) if parent is not None else None
        if snapshot is None and parent is not None and checkpoint is None:
            logger.warning("snapshots before %d are expired; only retained snapshots are staged", parent)
    if checkpoint is not None:
        raise LakeHistoryGapError(checkpoint, current.snapshot_id)
    return chain[::-1]


def _added_data_files(table: Table, snapshot: Snapshot) -> list[str]:
    """Paths of the data files ``snapshot`` itself added (not those it inherited)."""
    paths: list[str] = []
    for manifest in snapshot.manifests(table.io):
        if manifest.added_snapshot_id != snapshot.snapshot_id:
            continue
        paths.extend(
            entry.data_file.file_path
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
            if entry.status == ManifestEntryStatus.ADDED
            and entry.snapshot_id == snapshot.snapshot_id
            and entry.data_file.content == DataFileContent.DATA
        )
    return paths


def columns_read(meters: Sequence[Meter]) -> list[str]:
    """Event columns the meters need (tenant, request id and time included), in schema order."""
    needed = {TENANT_COLUMN, REQUEST_ID_COLUMN, TIME_COLUMN}
    for meter in meters:
        needed.update(condition.column for condition in meter.filter)
        needed.update(meter.dimensions)
        if isinstance(meter.value, str):
            needed.add(meter.value)
    return [name for name in metering_event_arrow_schema().names if name in needed]


def _body_columns(records: Sequence[dict[str, Any]]) -> tuple[int, int, int, bytes]:
    """A batch row's records, min_time_ms, max_time_ms and body for ``records``."""
    times = [record["meterTimeInMillis"] for record in records]
    encoded = encode_batch(records)
    return encoded.records, min(times), max(times), encoded.body


def _now_ms() -> int:
    return int(time.time() * 1000)
