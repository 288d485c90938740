"""The Firehose data-transformation Lambda: Powertools event in, ``normalize`` in the middle, Powertools response out.

The same handler runs on AWS (``lambda_handler``) and inside the local delivery stream: both run
``make_encoded_handler``, which answers the JSON bytes Lambda sends back to Firehose (see ``encode_answer``).
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import (
    KinesisFirehoseDataTransformationResponse,
    KinesisFirehoseEvent,
)
from aws_lambda_powertools.utilities.data_classes.kinesis_firehose_event import (
    KinesisFirehoseDataTransformationRecordMetadata,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from transform_lambda.normalize import (
    DocumentOutcome,
    Outcome,
    Rejection,
    Unmetered,
    transform_documents,
)

METRICS_NAMESPACE: Final = "meterlake"
SERVICE: Final = "transform"
#: Operations a metering transform may ask Firehose for: "update" (an upsert on the table's unique key) makes a
#: redelivered line replace its first copy; "delete" would remove the events being metered.
OTF_OPERATIONS: Final = frozenset({"insert", "update"})

ENV_DATABASE: Final = "METERING_DATABASE"
ENV_TABLE: Final = "METERING_TABLE"
ENV_OPERATION: Final = "OTF_OPERATION"
ENV_UNMETERED_HTTP_METHODS: Final = "UNMETERED_HTTP_METHODS"
ENV_TENANTS_BY_API_KEY: Final = "TENANTS_BY_API_KEY"

logger = Logger(service=SERVICE)

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
#: A handler that answers JSON bytes, as the AWS entry point does (the runtime sends bytes unchanged).
EncodedHandler = Callable[[dict[str, Any], Any], bytes]


class MissingSettingError(LookupError):
    """A required environment variable of the transform is not set (or empty)."""

    def __init__(self, variable: str) -> None:
        super().__init__(f"environment variable {variable} is required by the transform Lambda but is not set")
        self.variable = variable


class InvalidSettingError(ValueError):
    """A transform setting holds a value Firehose or the metering table cannot use."""

    def __init__(self, setting: str, value: object, expected: str) -> None:
        super().__init__(f"{setting}={value!r} is not valid: expected {expected}")
        self.setting = setting
        self.value = value


@dataclass(frozen=True, slots=True)
class TransformSettings:
    """Where Firehose writes Ok records, which requests are not metered and, when tenants come from API keys, each
    key id's tenant (None: the access log's tenant field is the tenant itself)."""

    database: str
    table: str
    operation: str = "insert"
    unmetered_http_methods: frozenset[str] = frozenset({"OPTIONS"})
    tenants_by_api_key: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.database:
            raise InvalidSettingError("database", self.database, "a Glue database name")
        if not self.table:
            raise InvalidSettingError("table", self.table, "a Glue table name")
        if self.operation not in OTF_OPERATIONS:
            raise InvalidSettingError("operation", self.operation, f"one of {sorted(OTF_OPERATIONS)}")
        for method in self.unmetered_http_methods:
            if not method or method != method.strip().upper():
                raise InvalidSettingError("unmetered_http_methods", method, "upper-case HTTP method names")
        for key_id, tenant in (self.tenants_by_api_key or {}).items():
            if not isinstance(key_id, str) or not isinstance(tenant, str) or not key_id or not tenant.strip():
                raise InvalidSettingError(
                    "tenants_by_api_key", {key_id: tenant}, "API key ids mapped to non-blank tenant strings"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TransformSettings:
        """Read METERING_DATABASE, METERING_TABLE (required), OTF_OPERATION, UNMETERED_HTTP_METHODS (comma-separated),
        TENANTS_BY_API_KEY (a JSON object; set only when tenants come from API keys).

        Raises:
            MissingSettingError: METERING_DATABASE or METERING_TABLE is unset or empty.
            InvalidSettingError: a value is not allowed (unknown operation, ...).
        """
        database, table = (environ.get(variable, "").strip() for variable in (ENV_DATABASE, ENV_TABLE))
        for variable, value in ((ENV_DATABASE, database), (ENV_TABLE, table)):
            if not value:
                raise MissingSettingError(variable)
        optional: dict[str, Any] = {}
        operation = environ.get(ENV_OPERATION, "").strip()
        if operation:
            optional["operation"] = operation
        methods = environ.get(ENV_UNMETERED_HTTP_METHODS)
        if methods is not None:
            optional["unmetered_http_methods"] = frozenset(m.strip().upper() for m in methods.split(",") if m.strip())
        tenants = environ.get(ENV_TENANTS_BY_API_KEY)
        if tenants is not None:
            try:
                optional["tenants_by_api_key"] = msgspec.json.decode(tenants, type=dict[str, str])
            except msgspec.DecodeError:
                raise InvalidSettingError(ENV_TENANTS_BY_API_KEY, tenants, "a JSON object of strings") from None
        return cls(database=database, table=table, **optional)


@dataclass(repr=False, order=False, frozen=True)
class IcebergRoutingMetadata(KinesisFirehoseDataTransformationRecordMetadata):
    """Record metadata routing an Ok record to an Iceberg table (``otfMetadata``), which Powertools does not model.

    ``asdict`` returns one shared dict: the same routing is attached to every record, so building it once keeps
    ~15k identical dicts per batch out of the response.
    """

    destination_database_name: str = ""
    destination_table_name: str = ""
    operation: str = "insert"
    _document: dict[str, Any] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        document: dict[str, Any] = {
            "otfMetadata": {
                "destinationDatabaseName": self.destination_database_name,
                "destinationTableName": self.destination_table_name,
                "operation": self.operation,
            }
        }
        if self.partition_keys:
            document["partitionKeys"] = self.partition_keys
        object.__setattr__(self, "_document", document)

    def asdict(self) -> dict[str, Any]:
        """The ``metadata`` member of a response record."""
        return self._document


@dataclass(repr=False, order=False)
class MeteringTransformationResponse(KinesisFirehoseDataTransformationResponse):
    """Powertools' Firehose response, rendering each record of the batch straight from its outcome.

    A Powertools record object per record costs ~1.5 µs to build and render, ~15-20 ms per full batch: as much as
    decoding the whole batch. Records differ only in recordId, result and data, so each is rendered straight into
    the dict Powertools' record gives (``KinesisFirehoseDataTransformationRecord.asdict``): an Ok record with its
    event and the routing metadata, a Dropped (unmetered) or ProcessingFailed (rejected) record with its original
    data and no metadata. Records added with ``add_record`` follow, as Powertools renders them. An empty response
    renders as ``{"records": []}`` (Powertools refuses it; Firehose never sends an empty batch, the local stream may).

    Args:
        batch: the event's records, in order (each with ``recordId`` and ``data``).
        outcomes: per record of the batch, its outcome from ``transform_records`` (an Ok document in base64) or
            ``transform_documents`` (an Ok document as its JSON bytes); both render the same.
        routing: the metadata of Ok records.
    """

    batch: list[dict[str, Any]] = field(default_factory=list)
    outcomes: Sequence[Outcome] | Sequence[DocumentOutcome] = field(default_factory=list)
    routing: IcebergRoutingMetadata | None = None

    def asdict(self) -> dict[str, Any]:
        """The Lambda's answer, one record per record, in order."""
        metadata = None if self.routing is None else self.routing.asdict()
        rendered = [
            {"recordId": record["recordId"], "result": "Ok", "data": outcome, "metadata": metadata}
            if type(outcome) is str
            else {"recordId": record["recordId"], "result": "Ok", "data": _base64(outcome), "metadata": metadata}
            if type(outcome) is bytes
            else {
                "recordId": record["recordId"],
                "result": "ProcessingFailed" if type(outcome) is Rejection else "Dropped",
                "data": record["data"],
            }
            for record, outcome in zip(self.batch, self.outcomes, strict=True)
        ]
        return {"records": rendered + [record.asdict() for record in self.records]}

    def encode(self) -> bytes:
        """The answer as JSON bytes, exactly ``encode_answer(self.asdict())``, rendered from a struct per record rather
        than a dict (faster to build), with the routing metadata encoded once and an Ok record's document, when it
        is bytes (``transform_documents``), base64-encoded by msgspec as it writes it: ~4 ms less of a full batch."""
        metadata = None if self.routing is None else msgspec.Raw(_ANSWER_ENCODER.encode(self.routing.asdict()))
        rendered: list[Any] = [
            _OkRecord(record["recordId"], "Ok", outcome, metadata)
            if type(outcome) is bytes or type(outcome) is str
            else _OtherRecord(
                record["recordId"], "ProcessingFailed" if type(outcome) is Rejection else "Dropped", record["data"]
            )
            for record, outcome in zip(self.batch, self.outcomes, strict=True)
        ]
        return _ANSWER_ENCODER.encode({"records": rendered + [record.asdict() for record in self.records]})


def _base64(document: bytes) -> str:
    """An Ok document's JSON bytes as the base64 text Firehose's ``data`` holds (as msgspec writes bytes)."""
    text: str = msgspec.to_builtins(document)
    return text


class _OkRecord(msgspec.Struct, gc=False, rename="camel"):
    """An Ok record of the answer, its members in the order ``asdict`` gives them (so the bytes are the same)."""

    record_id: str
    result: str
    data: bytes | str
    metadata: msgspec.Raw | None


class _OtherRecord(msgspec.Struct, gc=False, rename="camel"):
    """A Dropped or ProcessingFailed record of the answer: its original data, no metadata."""

    record_id: str
    result: str
    data: str


def make_handler(settings: TransformSettings, *, emit_metrics: bool = True) -> Handler:
    """Build the transform handler for these settings, answering Powertools' document (a dict); AWS and the local
    delivery stream run the same work answering its JSON bytes (``make_encoded_handler``).

    Args:
        settings: where Ok records go and what is not metered.
        emit_metrics: publish Powertools (EMF) metrics after each invocation. Off locally: Powertools prints each
            flush as a JSON blob on stdout, and even with POWERTOOLS_METRICS_DISABLED it still prints once 100
            values of a metric accumulate, so the local handler records no metrics at all.
    """
    respond = _responder(settings, emit_metrics=emit_metrics)

    def transform(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return respond(event).asdict()

    return transform


def _responder(
    settings: TransformSettings, *, emit_metrics: bool
) -> Callable[[dict[str, Any]], MeteringTransformationResponse]:
    """Both handlers' work: an event in, its response out (not yet rendered; Ok outcomes as the documents' JSON bytes,
    see ``transform_documents``), its metrics published."""
    routing = IcebergRoutingMetadata(
        destination_database_name=settings.database,
        destination_table_name=settings.table,
        operation=settings.operation,
    )
    metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE) if emit_metrics else None

    def respond(event: dict[str, Any]) -> MeteringTransformationResponse:
        firehose = KinesisFirehoseEvent(event)
        # The raw record dicts: a Powertools wrapper per record would cost ~1 µs, 10 ms per full batch.
        records: list[dict[str, Any]] = firehose["records"]
        outcomes = transform_documents(
            [record["data"] for record in records],
            ingested_at=time.time_ns() // 1000,
            unmetered_http_methods=settings.unmetered_http_methods,
            tenants_by_api_key=settings.tenants_by_api_key,
        )
        kinds = Counter(map(type, outcomes))
        dropped = kinds[Unmetered]
        failures: Counter[str] = Counter()
        if kinds[Rejection]:
            for record, outcome in zip(records, outcomes, strict=True):
                if type(outcome) is Rejection:
                    failures[f"RecordsFailed{outcome.kind.value}"] += 1
                    logger.warning(
                        "record rejected",
                        extra={"record_id": record["recordId"], "reason": outcome.reason, "kind": outcome.kind.value},
                    )
        response = MeteringTransformationResponse(batch=records, outcomes=outcomes, routing=routing)
        failed = failures.total()
        counts = {"RecordsOk": len(records) - failed - dropped, "RecordsDropped": dropped, "RecordsFailed": failed}
        logger.debug("batch transformed", extra={"invocation_id": firehose.get("invocationId"), **counts})
        if metrics is not None:
            for name, count in (counts | failures).items():
                metrics.add_metric(name=name, unit=MetricUnit.Count, value=count)
            metrics.flush_metrics()
        return response

    return respond


#: One encoder for every answer (msgspec: compact separators, non-ASCII as UTF-8).
_ANSWER_ENCODER: Final = msgspec.json.Encoder()


def encode_answer(answer: dict[str, Any]) -> bytes:
    """The handler's answer as the JSON document the AWS entry point returns.

    Lambda's Python runtime JSON-encodes what a handler returns with simplejson, except bytes, which it sends
    unchanged (``LambdaMarshaller.marshal_response`` in aws-lambda-python-runtime-interface-client, the runtime's
    bootstrap, since its first version). For a full batch that encoding bills ~35 ms, as much as typing every record;
    msgspec encodes the same answer in ~5 ms, never larger than simplejson's (no spaces after separators).
    """
    return _ANSWER_ENCODER.encode(answer)


def make_encoded_handler(settings: TransformSettings, *, emit_metrics: bool = True) -> EncodedHandler:
    """``make_handler``'s handler answering JSON bytes (the same bytes as ``encode_answer`` of its answer, rendered
    faster: :meth:`MeteringTransformationResponse.encode`): what the Lambda returns on AWS, and what the local
    delivery stream invokes, measures against Lambda's response limit and parses as Firehose does."""
    respond = _responder(settings, emit_metrics=emit_metrics)

    def transform(event: dict[str, Any], context: Any) -> bytes:
        return respond(event).encode()

    return transform


@functools.cache
def _aws_handler() -> EncodedHandler:
    """The AWS handler, configured from the Lambda's environment at first use (so importing never fails)."""
    return make_encoded_handler(TransformSettings.from_env())


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> bytes:
    """AWS Lambda entry point of the Firehose processor: the answer as JSON bytes (see ``encode_answer``)."""
    return _aws_handler()(event, context)
