"""Forwarding to Amberflo on AWS, the stager Lambda: what Iceberg committed -> SQS messages of meter records.

The stager reads what the snapshots committed since its checkpoint appended (:func:`committed_since`, the local
outbox's reader), turns the events into meter records (:func:`meter_records`, the meters rendered from the config at
synth time) and sends them as SQS messages of at most 100 records, THEN advances its checkpoint: an S3 object written
with a conditional put, so a concurrent stale writer cannot move it backwards. A crash between sending and the
checkpoint re-sends the same records with the same deterministic uniqueIds, which Amberflo drops: exactly once in
effect, as locally. The forwarder Lambda (``meterlake.aws.forwarding``) drains the queue.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from meterlake.amberflo.forwarder import MAX_BATCH_RECORDS
from meterlake.amberflo.outbox import columns_read, committed_since
from meterlake.aws.forwarding import ENV_BUCKET, METRICS_NAMESPACE, ForwardingError, required_env
from meterlake.meters import Meter, meter_records, parse_meters

STAGER_SERVICE: Final = "amberflo-stager"

#: Where the stager keeps its checkpoint, in the lake bucket.
CHECKPOINT_KEY: Final = "amberflo/checkpoint.json"
#: The lease that keeps stager runs one at a time, in the lake bucket beside the checkpoint.
LEASE_KEY: Final = "amberflo/stager-lease.json"

#: The stager Lambda's timeout; the CDK stack sets it from here.
STAGER_TIMEOUT_S: Final = 300
#: How long a run's lease lasts: past the Lambda's timeout, so a run that crashed or timed out frees it by expiring.
LEASE_DURATION_S: Final = STAGER_TIMEOUT_S + 60

ENV_DATABASE: Final = "METERING_DATABASE"
ENV_TABLE: Final = "METERING_TABLE"
ENV_QUEUE_URL: Final = "FORWARD_QUEUE_URL"
ENV_METERS: Final = "METERS_JSON"
ENV_BATCH_SIZE: Final = "FORWARD_BATCH_SIZE"
#: Set when the table is an S3 table: the table bucket's ARN (the table is read through S3 Tables' Iceberg API).
ENV_TABLE_BUCKET_ARN: Final = "METERING_TABLE_BUCKET_ARN"

#: SQS takes at most 256 KiB per message and per SendMessageBatch call; the margin covers the request framing.
MAX_MESSAGE_BYTES: Final = 250_000
#: SQS takes at most 10 entries per SendMessageBatch call.
MAX_ENTRIES_PER_CALL: Final = 10
#: Attempts at the entries SQS reports as failed before the run fails (and the checkpoint stays).
SEND_ATTEMPTS: Final = 3
#: The stager starts no new snapshot with less than this much time left (a snapshot's read, send and checkpoint).
STAGER_STOP_MARGIN_S: Final = 60.0

#: The service name comes from the Lambda's POWERTOOLS_SERVICE_NAME.
logger = Logger()


class CheckpointConflictError(ForwardingError):
    """The checkpoint object changed since it was read (a concurrent stager): this run's conditional put failed."""

    def __init__(self, bucket: str, key: str, expected: str | None) -> None:
        condition = "not to exist" if expected is None else f"to have ETag {expected}"
        super().__init__(f"s3://{bucket}/{key} was expected {condition}; another stager moved it, not overwritten")
        self.expected = expected


class CheckpointTableMismatchError(ForwardingError):
    """The checkpoint belongs to another table (a recreated table): its snapshot ids mean nothing here."""

    def __init__(self, checkpoint_uuid: str, table_uuid: str) -> None:
        super().__init__(
            f"the forwarding checkpoint is of table {checkpoint_uuid}, not of table {table_uuid}; "
            f"move {CHECKPOINT_KEY} aside to forward the new table"
        )


class CheckpointUnreadableError(ForwardingError):
    """S3 refused the checkpoint read and would not say whether the object exists (no s3:ListBucket on the bucket)."""

    def __init__(self, bucket: str, key: str, cause: str) -> None:
        super().__init__(
            f"s3://{bucket}/{key}: S3 answered {cause} and listing the key was refused too; the stager needs "
            "s3:GetObject on the key and s3:ListBucket on the bucket"
        )


class QueueSendError(ForwardingError):
    """SQS kept refusing some messages: the snapshot is not checkpointed and is sent again on the next run."""


# -- configuration rendered at synth time ---------------------------------------------------------------------------


def render_meters(meters: Sequence[Meter]) -> str:
    """The meters as the stager's environment carries them: the config's own JSON shape."""
    return msgspec.json.encode(list(meters)).decode()


@dataclass(frozen=True, slots=True)
class StagerSettings:
    """What the stager reads (the table), where it sends (the queue) and keeps its checkpoint, and which meters."""

    database: str
    table: str
    bucket: str
    queue_url: str
    meters: tuple[Meter, ...]
    batch_size: int = MAX_BATCH_RECORDS
    #: The table bucket of an S3 table; None for a Glue table.
    table_bucket_arn: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> StagerSettings:
        """Read the stager's environment.

        Raises:
            MissingSettingError: a variable is unset.
            MeterError: the meters JSON is invalid.
        """
        return cls(
            database=required_env(environ, ENV_DATABASE),
            table=required_env(environ, ENV_TABLE),
            bucket=required_env(environ, ENV_BUCKET),
            queue_url=required_env(environ, ENV_QUEUE_URL),
            meters=parse_meters(msgspec.json.decode(required_env(environ, ENV_METERS))),
            batch_size=int(environ.get(ENV_BATCH_SIZE, MAX_BATCH_RECORDS)),
            table_bucket_arn=environ.get(ENV_TABLE_BUCKET_ARN) or None,
        )


# -- the stager -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The last snapshot staged, of which table, and the ETag of the object that says so (None: no object yet)."""

    table_uuid: str | None = None
    snapshot_id: int | None = None
    etag: str | None = None


class _CheckpointDocument(msgspec.Struct, frozen=True):
    table_uuid: str
    snapshot_id: int
    committed_ms: int
    staged_ms: int


class S3Checkpoint:
    """The stager's checkpoint object; every write is conditional on the ETag that was read."""

    def __init__(self, s3: Any, *, bucket: str, key: str = CHECKPOINT_KEY) -> None:
        self._s3 = s3
        self.bucket = bucket
        self.key = key

    def read(self) -> Checkpoint:
        """The checkpoint as stored; an empty one if the object does not exist yet.

        Raises:
            CheckpointUnreadableError: S3 refused the read and the listing that would tell a missing key apart.
        """
        answer = read_if_exists(self._s3, bucket=self.bucket, key=self.key)
        if answer is None:
            return Checkpoint()
        document = msgspec.json.decode(answer[0], type=_CheckpointDocument)
        return Checkpoint(table_uuid=document.table_uuid, snapshot_id=document.snapshot_id, etag=answer[1])

    def advance(self, previous: Checkpoint, *, table_uuid: str, snapshot: Snapshot) -> Checkpoint:
        """Move the checkpoint to ``snapshot`` if the object is still the one ``previous`` was read from.

        Raises:
            CheckpointConflictError: the object changed (or appeared) since ``previous`` was read.
        """
        body = msgspec.json.encode(
            _CheckpointDocument(
                table_uuid=table_uuid,
                snapshot_id=snapshot.snapshot_id,
                committed_ms=snapshot.timestamp_ms,
                staged_ms=int(time.time() * 1000),
            )
        )
        condition = {"IfNoneMatch": "*"} if previous.etag is None else {"IfMatch": previous.etag}
        try:
            answer = self._s3.put_object(
                Bucket=self.bucket, Key=self.key, Body=body, ContentType="application/json", **condition
            )
        except self._s3.exceptions.ClientError as exc:
            if _lost_race(exc):
                raise CheckpointConflictError(self.bucket, self.key, previous.etag) from exc
            raise
        return Checkpoint(table_uuid=table_uuid, snapshot_id=snapshot.snapshot_id, etag=answer["ETag"])


def read_if_exists(s3: Any, *, bucket: str, key: str) -> tuple[bytes, str] | None:
    """(body, ETag) of an object, or None if it does not exist, whatever S3 answers for a missing key.

    S3 answers a GET of a missing key 404 NoSuchKey only to a caller allowed s3:ListBucket on the bucket (with no
    condition a GET could satisfy); to anyone else it answers 403 AccessDenied. A 403 is therefore settled by
    listing the key: absent means absent, present means the read itself is refused.

    Raises:
        CheckpointUnreadableError: the read and the listing were both refused.
    """
    try:
        answer = s3.get_object(Bucket=bucket, Key=key)
    except s3.exceptions.NoSuchKey:
        return None
    except s3.exceptions.ClientError as exc:
        if _error_code(exc) not in ("AccessDenied", "403"):
            raise
        try:
            listed = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except s3.exceptions.ClientError:
            raise CheckpointUnreadableError(bucket, key, _error_code(exc)) from exc
        if not any(item.get("Key") == key for item in listed.get("Contents", [])):
            return None
        raise
    return answer["Body"].read(), answer["ETag"]


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _lost_race(exc: Any) -> bool:
    """A conditional write refused: the ETag changed (412) or a concurrent conditional write won (409)."""
    return _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict")


class _LeaseDocument(msgspec.Struct, frozen=True):
    holder: str
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease: who holds it, until when (epoch ms), and the ETag of the object that says so."""

    holder: str
    expires_ms: int
    etag: str


class StagerLease:
    """Keeps stager runs one at a time with an S3 object written only by conditional puts.

    Lambda could serialize runs with reserved concurrency 1, but reserving concurrency fails in accounts whose
    quota leaves less than 100 unreserved (new accounts may have 10). A run takes the lease if no object exists
    (If-None-Match) or if the one there has expired (If-Match on its ETag); two runs racing for it cannot both win.
    A lease outlives the Lambda's timeout, so one left by a crashed run frees itself.
    """

    def __init__(self, s3: Any, *, bucket: str, key: str = LEASE_KEY, duration_s: float = LEASE_DURATION_S) -> None:
        self._s3 = s3
        self.bucket = bucket
        self.key = key
        self.duration_s = duration_s

    def acquire(self, holder: str, *, now: Callable[[], float] = time.time) -> Lease | None:
        """Take the lease for ``holder``; None if another run holds an unexpired one or won the race for it."""
        found = read_if_exists(self._s3, bucket=self.bucket, key=self.key)
        condition: dict[str, str] = {"IfNoneMatch": "*"}
        if found is not None:
            current = msgspec.json.decode(found[0], type=_LeaseDocument)
            if current.expires_ms > now() * 1000:
                logger.info("another stager run holds the lease", extra={"holder": current.holder})
                return None
            condition = {"IfMatch": found[1]}
        return self._put(holder, int((now() + self.duration_s) * 1000), condition)

    def release(self, lease: Lease) -> None:
        """Give the lease up early (expired at once), unless another run took it over meanwhile."""
        self._put(lease.holder, 0, {"IfMatch": lease.etag})

    def _put(self, holder: str, expires_ms: int, condition: dict[str, str]) -> Lease | None:
        body = msgspec.json.encode(_LeaseDocument(holder=holder, expires_ms=expires_ms))
        try:
            answer = self._s3.put_object(
                Bucket=self.bucket, Key=self.key, Body=body, ContentType="application/json", **condition
            )
        except self._s3.exceptions.ClientError as exc:
            if _lost_race(exc):
                return None
            raise
        return Lease(holder=holder, expires_ms=expires_ms, etag=answer["ETag"])


def record_messages(records: Iterable[Mapping[str, Any]], *, batch_size: int = MAX_BATCH_RECORDS) -> Iterator[bytes]:
    """Message bodies: JSON arrays of at most ``batch_size`` (<= 100) records, each under :data:`MAX_MESSAGE_BYTES`.

    A chunk too large for one message is halved until it fits.

    Raises:
        QueueSendError: a single record is larger than a message may be.
    """
    size = min(batch_size, MAX_BATCH_RECORDS)
    chunk: list[Mapping[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield from _fitting(chunk)
            chunk = []
    if chunk:
        yield from _fitting(chunk)


def _fitting(chunk: Sequence[Mapping[str, Any]]) -> Iterator[bytes]:
    body = msgspec.json.encode(chunk)
    if len(body) <= MAX_MESSAGE_BYTES:
        yield body
    elif len(chunk) == 1:
        raise QueueSendError(f"record {chunk[0].get('uniqueId')!r} alone is {len(body)} bytes, over an SQS message")
    else:
        half = len(chunk) // 2
        yield from _fitting(chunk[:half])
        yield from _fitting(chunk[half:])


def send_messages(sqs: Any, queue_url: str, bodies: Iterable[bytes]) -> int:
    """Send ``bodies`` with SendMessageBatch (<= 10 entries and <= 256 KiB a call); returns how many were sent.

    Raises:
        QueueSendError: SQS still refused some entries after :data:`SEND_ATTEMPTS` attempts.
    """
    sent = 0
    call: list[bytes] = []
    call_bytes = 0
    for body in bodies:
        if call and (len(call) == MAX_ENTRIES_PER_CALL or call_bytes + len(body) > MAX_MESSAGE_BYTES):
            sent += _send_call(sqs, queue_url, call)
            call, call_bytes = [], 0
        call.append(body)
        call_bytes += len(body)
    if call:
        sent += _send_call(sqs, queue_url, call)
    return sent


def _send_call(sqs: Any, queue_url: str, bodies: Sequence[bytes]) -> int:
    entries = {str(index): body.decode() for index, body in enumerate(bodies)}
    for _ in range(SEND_ATTEMPTS):
        answer = sqs.send_message_batch(
            QueueUrl=queue_url, Entries=[{"Id": entry_id, "MessageBody": body} for entry_id, body in entries.items()]
        )
        failed = {failure["Id"]: failure for failure in answer.get("Failed", [])}
        entries = {entry_id: body for entry_id, body in entries.items() if entry_id in failed}
        if not entries:
            return len(bodies)
    reasons = sorted({f"{f.get('Code')}: {f.get('Message')}" for f in failed.values()})
    raise QueueSendError(f"SQS refused {len(entries)} of {len(bodies)} messages {SEND_ATTEMPTS} times: {reasons}")


@dataclass(frozen=True, slots=True)
class StageReport:
    """What one stager run did; ``lag_seconds`` is how far forwarding trails the table's commits."""

    snapshots: int
    records: int
    messages: int
    untenanted: int
    lag_seconds: float
    checkpoint_snapshot_id: int | None
    #: False if the run stopped for time with snapshots still unstaged.
    complete: bool


def stage(
    settings: StagerSettings,
    *,
    load_table: Callable[[], Table],
    s3: Any,
    sqs: Any,
    time_left_s: Callable[[], float] | None = None,
    now: Callable[[], float] = time.time,
) -> StageReport:
    """Send the records of every snapshot committed since the checkpoint to the queue, checkpointing each after.

    ``load_table`` gives the table as of now (the Glue catalog on AWS). ``time_left_s`` (the Lambda's remaining
    time) stops the run between snapshots before it times out; the rest waits for the next run.

    Raises:
        CheckpointConflictError: another stager moved the checkpoint during this run.
        CheckpointTableMismatchError: the checkpoint belongs to another table.
        LakeHistoryGapError: the checkpoint snapshot is no ancestor of the current one.
        QueueSendError: SQS refused messages.
    """
    table = load_table()
    table_uuid = str(table.metadata.table_uuid)
    store = S3Checkpoint(s3, bucket=settings.bucket)
    checkpoint = store.read()
    if checkpoint.table_uuid is not None and checkpoint.table_uuid != table_uuid:
        raise CheckpointTableMismatchError(checkpoint.table_uuid, table_uuid)
    columns = columns_read(settings.meters)
    snapshots = records = messages = untenanted = 0
    newest_staged_ms: int | None = None
    complete = True
    for committed in committed_since(table, checkpoint.snapshot_id, columns=columns):
        batch = meter_records(committed.events, settings.meters)
        messages += send_messages(
            sqs, settings.queue_url, record_messages(batch.records(), batch_size=settings.batch_size)
        )
        checkpoint = store.advance(checkpoint, table_uuid=table_uuid, snapshot=committed.snapshot)
        snapshots += 1
        records += len(batch)
        untenanted += batch.untenanted
        newest_staged_ms = committed.snapshot.timestamp_ms
        if time_left_s is not None and time_left_s() < STAGER_STOP_MARGIN_S:
            complete = _is_current(table, checkpoint.snapshot_id)
            break
    oldest_unstaged_ms = None if complete else _oldest_after(table, checkpoint.snapshot_id)
    reference_ms = oldest_unstaged_ms if oldest_unstaged_ms is not None else newest_staged_ms
    lag = 0.0 if reference_ms is None else max(0.0, now() - reference_ms / 1000)
    return StageReport(
        snapshots=snapshots,
        records=records,
        messages=messages,
        untenanted=untenanted,
        lag_seconds=lag,
        checkpoint_snapshot_id=checkpoint.snapshot_id,
        complete=complete and oldest_unstaged_ms is None,
    )


def _is_current(table: Table, snapshot_id: int | None) -> bool:
    current = table.current_snapshot()
    return current is None or current.snapshot_id == snapshot_id


def _oldest_after(table: Table, snapshot_id: int | None) -> int | None:
    """Commit time (epoch ms) of the oldest snapshot after ``snapshot_id`` on the current branch; None if none."""
    oldest: int | None = None
    snapshot = table.current_snapshot()
    while snapshot is not None and snapshot.snapshot_id != snapshot_id:
        oldest = snapshot.timestamp_ms
        parent = snapshot.parent_snapshot_id
        snapshot = table.snapshot_by_id(parent) if parent is not None else None
    return oldest


# -- Lambda entry point ---------------------------------------------------------------------------------------------


@functools.cache
def _stager_settings() -> StagerSettings:
    return StagerSettings.from_env()


@functools.cache
def _clients() -> tuple[Any, Any]:
    import boto3  # type: ignore[import-untyped]

    return boto3.client("s3"), boto3.client("sqs")


def load_glue_table(database: str, table: str, environ: Mapping[str, str] = os.environ) -> Table:
    """The table as the Glue catalog of the Lambda's region has it now.

    Table files are read through Arrow's S3 client, which ignores the AWS SDKs' endpoint variables; they are passed
    on (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``) so the stager reads from the endpoint boto3 talks to.
    """
    from pyiceberg.catalog.glue import GlueCatalog

    region = environ.get("AWS_REGION", "")
    properties = {"glue.region": region, "s3.region": region}
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        properties["s3.endpoint"] = endpoint
    catalog = GlueCatalog("glue", **properties)
    return catalog.load_table((database, table))


def s3_tables_catalog_properties(table_bucket_arn: str, region: str) -> dict[str, str]:
    """pyiceberg's REST catalog properties for S3 Tables' Iceberg endpoint of ``table_bucket_arn``.

    The endpoint serves one table bucket (the warehouse), signs with SigV4 as ``s3tables`` and needs no Glue or Lake
    Formation permission: S3 Tables' own (GetTableMetadataLocation, GetTableData, ...) authorize the reads, the
    table files' included.
    """
    return {
        "type": "rest",
        "uri": f"https://s3tables.{region}.amazonaws.com/iceberg",
        "warehouse": table_bucket_arn,
        "rest.sigv4-enabled": "true",
        "rest.signing-name": "s3tables",
        "rest.signing-region": region,
    }


def load_s3_table(table_bucket_arn: str, namespace: str, table: str, environ: Mapping[str, str] = os.environ) -> Table:
    """The S3 table as S3 Tables' Iceberg endpoint has it now."""
    from pyiceberg.catalog.rest import RestCatalog

    region = environ.get("AWS_REGION", "")
    catalog = RestCatalog("s3tables", **s3_tables_catalog_properties(table_bucket_arn, region))
    loaded: Table = catalog.load_table((namespace, table))
    return loaded


def load_metering_table(settings: StagerSettings) -> Table:
    """The metering table: an S3 table if the settings name a table bucket, else the Glue table."""
    if settings.table_bucket_arn is not None:
        return load_s3_table(settings.table_bucket_arn, settings.database, settings.table)
    return load_glue_table(settings.database, settings.table)


def reset_caches() -> None:
    """Forget the settings and clients read so far (tests; a warm Lambda keeps them)."""
    for cached in (_stager_settings, _clients):
        cached.cache_clear()


@logger.inject_lambda_context
def stager_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Scheduled entry point: stage what was committed since the checkpoint; publish lag and volume metrics.

    A run that finds the lease held by another (a previous run still staging a backlog) does nothing: the holder
    stages what this one would have.
    """
    settings = _stager_settings()
    s3, sqs = _clients()
    leases = StagerLease(s3, bucket=settings.bucket)
    lease = leases.acquire(context.aws_request_id)
    if lease is None:
        return {"skipped": "another stager run holds the lease"}
    try:
        report = stage(
            settings,
            load_table=lambda: load_metering_table(settings),
            s3=s3,
            sqs=sqs,
            time_left_s=lambda: context.get_remaining_time_in_millis() / 1000,
        )
    finally:
        leases.release(lease)
    metrics = Metrics(namespace=METRICS_NAMESPACE, service=STAGER_SERVICE)
    metrics.add_metric(name="ForwardLagSeconds", unit=MetricUnit.Seconds, value=report.lag_seconds)
    metrics.add_metric(name="RecordsStaged", unit=MetricUnit.Count, value=report.records)
    metrics.add_metric(name="UntenantedEvents", unit=MetricUnit.Count, value=report.untenanted)
    metrics.flush_metrics()
    logger.info("staged committed snapshots", extra=_as_dict(report))
    return _as_dict(report)


def _as_dict(report: StageReport) -> dict[str, Any]:
    return {name: getattr(report, name) for name in StageReport.__slots__}
