"""Forwarding to Amberflo on AWS: a scheduled stager Lambda fills an SQS queue, a forwarder Lambda drains it.

The stager reads what the snapshots committed since its checkpoint appended (:func:`committed_since`, the local
outbox's reader), turns the events into meter records (:func:`meter_records`, the meters rendered from the config at
synth time) and sends them as SQS messages of at most 100 records, THEN advances its checkpoint: an S3 object written
with a conditional put, so a concurrent stale writer cannot move it backwards. A crash between sending and the
checkpoint re-sends the same records with the same deterministic uniqueIds, which Amberflo drops: exactly once in
effect, as locally.

The forwarder sends each message through the same :class:`Forwarder` as the local runtime. Sent: done. GaveUp (the
retry budget was spent on transient failures): the message is reported in ``batchItemFailures``, SQS redelivers it,
and after the queue's maxReceiveCount it lands in the dead-letter queue (alarmed). DeadLetter (a permanent 4xx): the
records and Amberflo's answer are written to ``s3://<bucket>/amberflo/dead-letters/<date>/<messageId>.json`` and the
message counts as processed.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities import parameters
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from meterlake.amberflo.forwarder import MAX_BATCH_RECORDS, DeadLetter, Forwarder, GaveUp, encode_batch
from meterlake.amberflo.outbox import columns_read, committed_since
from meterlake.aws import AwsError
from meterlake.meters import AmberfloSettings, Meter, meter_records, parse_meters

METRICS_NAMESPACE: Final = "meterlake"
STAGER_SERVICE: Final = "amberflo-stager"
FORWARDER_SERVICE: Final = "amberflo-forwarder"

#: Where the stager keeps its checkpoint, and under which prefix the forwarder writes refused batches.
CHECKPOINT_KEY: Final = "amberflo/checkpoint.json"
DEAD_LETTER_PREFIX: Final = "amberflo/dead-letters/"

ENV_DATABASE: Final = "METERING_DATABASE"
ENV_TABLE: Final = "METERING_TABLE"
ENV_BUCKET: Final = "LAKE_BUCKET"
ENV_QUEUE_URL: Final = "FORWARD_QUEUE_URL"
ENV_METERS: Final = "METERS_JSON"
ENV_BATCH_SIZE: Final = "FORWARD_BATCH_SIZE"
ENV_AMBERFLO: Final = "AMBERFLO_SETTINGS_JSON"
ENV_SECRET_NAME: Final = "AMBERFLO_API_KEY_SECRET_NAME"  # noqa: S105 (a variable name, not a secret)
ENV_SECRET_JSON_KEY: Final = "AMBERFLO_API_KEY_SECRET_JSON_KEY"  # noqa: S105 (a variable name)

#: SQS takes at most 256 KiB per message and per SendMessageBatch call; the margin covers the request framing.
MAX_MESSAGE_BYTES: Final = 250_000
#: SQS takes at most 10 entries per SendMessageBatch call.
MAX_ENTRIES_PER_CALL: Final = 10
#: Attempts at the entries SQS reports as failed before the run fails (and the checkpoint stays).
SEND_ATTEMPTS: Final = 3
#: The stager starts no new snapshot with less than this much time left (a snapshot's read, send and checkpoint).
STAGER_STOP_MARGIN_S: Final = 60.0
#: The forwarder starts no new message, and stops retrying, this long before the Lambda's own timeout.
FORWARDER_STOP_MARGIN_S: Final = 5.0
#: How long the API key read from Secrets Manager is reused by a warm forwarder.
SECRET_MAX_AGE_S: Final = 300

#: The service name comes from each Lambda's POWERTOOLS_SERVICE_NAME (STAGER_SERVICE or FORWARDER_SERVICE).
logger = Logger()


class ForwardingError(AwsError):
    """Base of the failures of forwarding on AWS."""


class MissingSettingError(ForwardingError):
    """A forwarding Lambda's environment lacks a variable it needs."""

    def __init__(self, variable: str) -> None:
        super().__init__(f"environment variable {variable} is required but is not set")
        self.variable = variable


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


class QueueSendError(ForwardingError):
    """SQS kept refusing some messages: the snapshot is not checkpointed and is sent again on the next run."""


class ApiKeyMissingError(ForwardingError):
    """The Amberflo API key secret has no such JSON key."""

    def __init__(self, secret_name: str, json_key: str) -> None:
        super().__init__(f"secret {secret_name!r} holds no JSON key {json_key!r} with the Amberflo API key")


# -- configuration rendered at synth time ---------------------------------------------------------------------------


def render_meters(meters: Sequence[Meter]) -> str:
    """The meters as the stager's environment carries them: the config's own JSON shape."""
    return msgspec.json.encode(list(meters)).decode()


def render_amberflo_settings(settings: AmberfloSettings, *, retry_budget_s: float) -> str:
    """The forwarder's Amberflo settings as JSON, with the retry budget one message may spend in the Lambda."""
    return msgspec.json.encode(msgspec.structs.replace(settings, give_up_after_s=retry_budget_s)).decode()


def _required(environ: Mapping[str, str], variable: str) -> str:
    value = environ.get(variable, "").strip()
    if not value:
        raise MissingSettingError(variable)
    return value


@dataclass(frozen=True, slots=True)
class StagerSettings:
    """What the stager reads (the table), where it sends (the queue) and keeps its checkpoint, and which meters."""

    database: str
    table: str
    bucket: str
    queue_url: str
    meters: tuple[Meter, ...]
    batch_size: int = MAX_BATCH_RECORDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> StagerSettings:
        """Read the stager's environment.

        Raises:
            MissingSettingError: a variable is unset.
            MeterError: the meters JSON is invalid.
        """
        return cls(
            database=_required(environ, ENV_DATABASE),
            table=_required(environ, ENV_TABLE),
            bucket=_required(environ, ENV_BUCKET),
            queue_url=_required(environ, ENV_QUEUE_URL),
            meters=parse_meters(msgspec.json.decode(_required(environ, ENV_METERS))),
            batch_size=int(environ.get(ENV_BATCH_SIZE, MAX_BATCH_RECORDS)),
        )


@dataclass(frozen=True, slots=True)
class ForwarderSettings:
    """How the forwarder reaches Amberflo, where its API key is and where refused batches go."""

    amberflo: AmberfloSettings
    bucket: str
    secret_name: str
    secret_json_key: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ForwarderSettings:
        """Read the forwarder's environment.

        Raises:
            MissingSettingError: a variable is unset.
            msgspec.ValidationError: the Amberflo settings JSON is invalid.
        """
        return cls(
            amberflo=msgspec.json.decode(_required(environ, ENV_AMBERFLO), type=AmberfloSettings),
            bucket=_required(environ, ENV_BUCKET),
            secret_name=_required(environ, ENV_SECRET_NAME),
            secret_json_key=_required(environ, ENV_SECRET_JSON_KEY),
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
        """The checkpoint as stored; an empty one if the object does not exist yet."""
        try:
            answer = self._s3.get_object(Bucket=self.bucket, Key=self.key)
        except self._s3.exceptions.NoSuchKey:
            return Checkpoint()
        document = msgspec.json.decode(answer["Body"].read(), type=_CheckpointDocument)
        return Checkpoint(table_uuid=document.table_uuid, snapshot_id=document.snapshot_id, etag=answer["ETag"])

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
            # 409 ConditionalRequestConflict: a concurrent conditional write to the same key won the race.
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise CheckpointConflictError(self.bucket, self.key, previous.etag) from exc
            raise
        return Checkpoint(table_uuid=table_uuid, snapshot_id=snapshot.snapshot_id, etag=answer["ETag"])


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


# -- the forwarder --------------------------------------------------------------------------------------------------


class RetryLaterError(ForwardingError):
    """A message's batch was not delivered yet (transient failures, or no time left): SQS redelivers it."""


class S3DeadLetters:
    """Batches Amberflo refused for good: ``<prefix><YYYY-MM-DD>/<messageId>.json`` with its status and answer."""

    def __init__(self, s3: Any, *, bucket: str, prefix: str = DEAD_LETTER_PREFIX) -> None:
        self._s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    def put(self, message_id: str, records: Sequence[Mapping[str, Any]], outcome: DeadLetter) -> str:
        """Write one refused batch; returns its key."""
        now = datetime.now(UTC)
        key = f"{self.prefix}{now:%Y-%m-%d}/{message_id}.json"
        document = {
            "messageId": message_id,
            "deadLetteredAt": now.isoformat(),
            "status": outcome.status,
            "answer": outcome.body,
            "attempts": outcome.attempts,
            "records": list(records),
        }
        self._s3.put_object(
            Bucket=self.bucket, Key=key, Body=msgspec.json.encode(document), ContentType="application/json"
        )
        return key


@dataclass(slots=True)
class ForwardCounts:
    """What one invocation did with its messages."""

    records_sent: int = 0
    records_dead_lettered: int = 0
    batches_retried: int = 0


class MessageForwarder:
    """Forwards one SQS message's records through the shared :class:`Forwarder`; the record handler of the batch.

    After one message gave up (Amberflo unreachable for the whole budget), or once ``deadline`` (monotonic) is near,
    the remaining messages are handed back to SQS without a request: they would only spend the Lambda's time.
    """

    def __init__(
        self, forwarder: Forwarder, *, api_key: str, dead_letters: S3DeadLetters, deadline: float | None = None
    ) -> None:
        self._forwarder = forwarder
        self._api_key = api_key
        self._dead_letters = dead_letters
        self._deadline = deadline
        self._unreachable: str | None = None
        self.counts = ForwardCounts()

    def __call__(self, record: SQSRecord) -> None:
        """Send the message's records; return if Sent or dead-lettered.

        Raises:
            RetryLaterError: not delivered yet; the batch processor reports the message in batchItemFailures.
        """
        records: list[dict[str, Any]] = msgspec.json.decode(record.body)
        if self._unreachable is not None:
            self._retry_later(f"not tried: {self._unreachable}")
        halt = threading.Event()
        timer: threading.Timer | None = None
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._retry_later("not tried: the invocation is out of time")
            timer = threading.Timer(left, halt.set)
            timer.start()
        try:
            outcome = self._forwarder.send_batch(encode_batch(records), api_key=self._api_key, halt=halt)
        finally:
            if timer is not None:
                timer.cancel()
        if isinstance(outcome, GaveUp):
            self._unreachable = outcome.last_error
            self._retry_later(outcome.last_error)
        elif isinstance(outcome, DeadLetter):
            key = self._dead_letters.put(record.message_id, records, outcome)
            logger.error("Amberflo refused a batch for good", extra={"key": key, "status": outcome.status})
            self.counts.records_dead_lettered += len(records)
        else:
            self.counts.records_sent += len(records)

    def _retry_later(self, why: str) -> None:
        self.counts.batches_retried += 1
        raise RetryLaterError(why)


def forward_messages(event: dict[str, Any], handler: MessageForwarder, context: Any = None) -> dict[str, Any]:
    """Run ``handler`` on every message of an SQS event; the partial response names those to redeliver.

    Every message failing is a partial response too (no exception), so SQS counts a receive for each and the
    redrive policy applies the same way.
    """
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return dict(process_partial_response(event=event, record_handler=handler, processor=processor, context=context))


# -- Lambda entry points --------------------------------------------------------------------------------------------


@functools.cache
def _stager_settings() -> StagerSettings:
    return StagerSettings.from_env()


@functools.cache
def _forwarder_runtime() -> tuple[ForwarderSettings, Forwarder]:
    settings = ForwarderSettings.from_env()
    return settings, Forwarder(settings.amberflo)


@functools.cache
def _clients() -> tuple[Any, Any]:
    import boto3  # type: ignore[import-untyped]

    return boto3.client("s3"), boto3.client("sqs")


def load_glue_table(database: str, table: str) -> Table:
    """The table as the Glue catalog of the Lambda's region has it now."""
    from pyiceberg.catalog.glue import GlueCatalog

    region = os.environ.get("AWS_REGION", "")
    catalog = GlueCatalog("glue", **{"glue.region": region, "s3.region": region})
    return catalog.load_table((database, table))


def reset_caches() -> None:
    """Forget the settings, clients and API key read so far (tests; a warm Lambda keeps them)."""
    for cached in (_stager_settings, _forwarder_runtime, _clients):
        cached.cache_clear()
    parameters.clear_caches()  # type: ignore[no-untyped-call]


@logger.inject_lambda_context
def stager_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Scheduled entry point: stage what was committed since the checkpoint; publish lag and volume metrics."""
    settings = _stager_settings()
    s3, sqs = _clients()
    report = stage(
        settings,
        load_table=lambda: load_glue_table(settings.database, settings.table),
        s3=s3,
        sqs=sqs,
        time_left_s=lambda: context.get_remaining_time_in_millis() / 1000,
    )
    metrics = Metrics(namespace=METRICS_NAMESPACE, service=STAGER_SERVICE)
    metrics.add_metric(name="ForwardLagSeconds", unit=MetricUnit.Seconds, value=report.lag_seconds)
    metrics.add_metric(name="RecordsStaged", unit=MetricUnit.Count, value=report.records)
    metrics.add_metric(name="UntenantedEvents", unit=MetricUnit.Count, value=report.untenanted)
    metrics.flush_metrics()
    logger.info("staged committed snapshots", extra=_as_dict(report))
    return _as_dict(report)


@logger.inject_lambda_context
def forwarder_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """SQS entry point: forward each message's records; answer with the messages SQS must redeliver."""
    settings, forwarder = _forwarder_runtime()
    s3, _ = _clients()
    secret = parameters.get_secret(settings.secret_name, transform="json", max_age=SECRET_MAX_AGE_S)
    api_key = secret.get(settings.secret_json_key) if isinstance(secret, dict) else None
    if not isinstance(api_key, str) or not api_key:
        raise ApiKeyMissingError(settings.secret_name, settings.secret_json_key)
    deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - FORWARDER_STOP_MARGIN_S
    handler = MessageForwarder(
        forwarder, api_key=api_key, dead_letters=S3DeadLetters(s3, bucket=settings.bucket), deadline=deadline
    )
    response = forward_messages(event, handler, context)
    metrics = Metrics(namespace=METRICS_NAMESPACE, service=FORWARDER_SERVICE)
    metrics.add_metric(name="RecordsSent", unit=MetricUnit.Count, value=handler.counts.records_sent)
    metrics.add_metric(name="RecordsDeadLettered", unit=MetricUnit.Count, value=handler.counts.records_dead_lettered)
    metrics.add_metric(name="BatchesRetried", unit=MetricUnit.Count, value=handler.counts.batches_retried)
    metrics.flush_metrics()
    return response


def _as_dict(report: StageReport) -> dict[str, Any]:
    return {name: getattr(report, name) for name in StageReport.__slots__}
