"""Usage events: what an ingest request or a toolkit event holds, how each record is checked, and the row it becomes.

A record is Amberflo's ingest record (``customerId``, ``meterApiName``, ``meterValue``, ``meterTimeInMillis``,
``uniqueId``, ``dimensions``). The SaaS Builder Toolkit's application-plane event (EventBridge detail-type
``ingestUsage``, detail ``{tenantId, meterApiName, meterValue, ...dimensions}``) is read as one: ``tenantId`` is the
customer, every other detail member is a dimension (a number or a boolean as its JSON text: ``"tier": 3`` is the
dimension value ``"3"``, ``true`` is ``"true"``; an object, an array or null is refused), and its time is the
detail's ``meterTimeInMillis`` if it has one, else the envelope's ``time``, else when the service received it. Its
uniqueId is the detail's ``uniqueId``, else the EventBridge event id (the same on every redelivery), else derived
from its content.

A record without a uniqueId gets a deterministic one from its content (:func:`content_unique_id`), so a retried
request is the same event; two events that differ in nothing are one event, as in Amberflo.

Each accepted record becomes one :class:`MeterEventRow`, whose fields are the meter_events table's columns; the
rows travel as JSON lines through the meter-event delivery stream (a request's rows as one record), which has no
transform: like a Firehose stream without a Lambda, it delivers them to the table as they are.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from operator import attrgetter
from typing import Any, Final, Literal, TypeGuard

import msgspec

from meterlake.amberflo.api import CANCEL_DIMENSION, IngestRecord, RequestError, parse_ingest_body
from meterlake.records import MISSING, NO_TENANT_PATTERN_PYTHON
from meterlake.schema import METER_EVENT_SCHEMA
from meterlake.service.registry import RegisteredMeter
from meterlake.service.settings import UNIQUE_ID_MAX_CHARS, ServiceSettings

EventSource = Literal["ingest", "event"]
#: The EventBridge detail-type of the toolkit's usage event.
INGEST_USAGE_DETAIL_TYPE: Final = "ingestUsage"
#: Detail members of a toolkit event that are not dimensions.
_TOOLKIT_FIELDS: Final = frozenset({"tenantId", "meterApiName", "meterValue", "meterTimeInMillis", "uniqueId"})
_NO_CUSTOMER = re.compile(NO_TENANT_PATTERN_PYTHON)
#: Every character a value matching _NO_CUSTOMER can hold (the pattern's blanks and the missing marker).
_NO_CUSTOMER_CHARS: Final = "\t\n\f\r " + MISSING
_MICROS_PER_MS: Final = 1000


class MeterEventRow(msgspec.Struct, frozen=True, gc=False):
    """One row of the meter_events table, as its JSON line (timestamps in UTC epoch microseconds)."""

    unique_id: str
    meter_api_name: str
    customer_id: str
    meter_value: float
    meter_time: int
    dimensions: dict[str, str] | None
    ingested_at: int
    source: str


if MeterEventRow.__struct_fields__ != tuple(field.name for field in METER_EVENT_SCHEMA.fields):
    raise ImportError("MeterEventRow and the meter_events schema disagree")

_BODY_DECODER: Final = msgspec.json.Decoder(list[IngestRecord] | IngestRecord)
_ROW_ENCODER: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class RecordError:
    """Why one record of a request was refused: its 0-based index, the field at fault and the reason."""

    index: int
    field: str
    reason: str

    def to_api(self) -> dict[str, object]:
        """The error as the 400 answer lists it."""
        return {"index": self.index, "field": self.field, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class CheckedRecords:
    """The records of a request: those that passed (with their index) and why the others were refused."""

    accepted: list[tuple[int, IngestRecord]]
    errors: list[RecordError]


def decode_ingest_body(body: bytes) -> list[IngestRecord] | list[object]:
    """The records of an (inflated) ingest body: typed records when every one decodes, else the raw objects (one
    JSON object, an array, or NDJSON) for :func:`check_records` to word each problem.

    Raises:
        RequestError: the body is empty or not JSON.
    """
    try:
        decoded = _BODY_DECODER.decode(body)
    except msgspec.DecodeError:
        return parse_ingest_body(body, None)
    return decoded if isinstance(decoded, list) else [decoded]


def check_records(
    items: Sequence[IngestRecord] | Sequence[object],
    *,
    meters: Mapping[str, RegisteredMeter],
    request_meters: frozenset[str],
    settings: ServiceSettings,
    now_ms: int,
) -> CheckedRecords:
    """Check every record: its shape, a known event meter, a finite value, a customer, a time within the lateness
    window, bounded dimensions and uniqueId. Each refused record is named by index with the field and reason.

    ``meters`` are the event meters by name; ``request_meters`` the names of request meters (never ingested).
    """
    earliest_ms = now_ms - settings.late_arrival_window_s * 1000
    latest_ms = now_ms + settings.future_skew_s * 1000
    if _all_typed(items) and _all_valid(items, meters, settings, earliest_ms, latest_ms):
        return CheckedRecords(list(enumerate(items)), [])
    accepted: list[tuple[int, IngestRecord]] = []
    errors: list[RecordError] = []
    for index, item in enumerate(items):
        if isinstance(item, IngestRecord):
            record = item
        else:
            try:
                record = msgspec.convert(item, IngestRecord)
            except msgspec.ValidationError as exc:
                errors.append(_shape_error(index, str(exc), item))
                continue
        problem = _record_problem(record, meters, request_meters, settings, earliest_ms, latest_ms)
        if problem is None:
            accepted.append((index, record))
        else:
            errors.append(RecordError(index, *problem))
    return CheckedRecords(accepted, errors)


_METER_API_NAME: Final = attrgetter("meter_api_name")
_METER_VALUE: Final = attrgetter("meter_value")
_CUSTOMER_ID: Final = attrgetter("customer_id")
_METER_TIME: Final = attrgetter("meter_time_in_millis")
_UNIQUE_ID: Final = attrgetter("unique_id")
_DIMENSIONS: Final = attrgetter("dimensions")


def _all_typed(items: Sequence[object]) -> TypeGuard[Sequence[IngestRecord]]:
    return all(isinstance(item, IngestRecord) for item in items)


def _all_valid(
    records: Sequence[IngestRecord],
    meters: Mapping[str, RegisteredMeter],
    settings: ServiceSettings,
    earliest_ms: int,
    latest_ms: int,
) -> bool:
    """True when :func:`_record_problem` finds no problem in any record; False when some record may have one.

    The same checks, a column at a time: each distinct meter, customer and dimension name once, and the numbers
    through C loops (map, min, max, sum), instead of every check of every record in Python. A sum of floats is finite
    only if every term is; a finite sum's overflow just sends the batch to the record-by-record check.
    """
    for name in set(map(_METER_API_NAME, records)):
        meter = meters.get(name)
        if meter is None or meter.locking_status == "deprecated":
            return False
    if not math.isfinite(sum(map(_METER_VALUE, records))):
        return False
    for customer in set(map(_CUSTOMER_ID, records)):
        # Only a value made of blanks and the missing marker can match the pattern: strip() spares the regex.
        if not customer.strip(_NO_CUSTOMER_CHARS) and _NO_CUSTOMER.fullmatch(customer):
            return False
        if len(customer) > settings.max_customer_id_chars:
            return False
    times = list(map(_METER_TIME, records))
    if min(times) < earliest_ms or max(times) > latest_ms:
        return False
    unique_ids = list(filter(None, map(_UNIQUE_ID, records)))
    if unique_ids and max(map(len, unique_ids)) > UNIQUE_ID_MAX_CHARS:
        return False
    if len(unique_ids) < len(records) and "" in map(_UNIQUE_ID, records):
        return False
    dimensions: list[dict[str, str]] = list(filter(None, map(_DIMENSIONS, records)))
    if dimensions:
        if max(map(len, dimensions)) > settings.max_dimensions:
            return False
        for key in set(chain.from_iterable(dimensions)):
            if not 1 <= len(key) <= settings.max_dimension_name_chars or key == CANCEL_DIMENSION:
                return False
        values = chain.from_iterable(map(dict.values, dimensions))
        if max(map(len, values)) > settings.max_dimension_value_chars:
            return False
    return True


def _shape_error(index: int, message: str, item: object) -> RecordError:
    """msgspec's message as a RecordError naming the field: ``Expected `str`, got `int` - at `$.customerId```, or
    ``Object missing required field `meterValue``` (and ``... unknown field ...``) at the record itself. A bad
    dimension value (msgspec says ``dimensions[...]``) is named by its key."""
    match = re.search(r" - at `\$\.?(.*)`$", message)
    text = message if match is None else message[: match.start()]
    field = match.group(1) if match is not None else ""
    if not field:
        named = re.search(r"(?:missing required|unknown) field `([^`]*)`", text)
        field = named.group(1) if named is not None else "(record)"
    elif field == "dimensions[...]" and isinstance(item, dict) and isinstance(item.get("dimensions"), dict):
        key = next((k for k, v in item["dimensions"].items() if not isinstance(v, str)), None)
        field = "dimensions" if key is None else f"dimensions.{key}"
    return RecordError(index, field, text.replace("`", ""))


def _record_problem(
    record: IngestRecord,
    meters: Mapping[str, RegisteredMeter],
    request_meters: frozenset[str],
    settings: ServiceSettings,
    earliest_ms: int,
    latest_ms: int,
) -> tuple[str, str] | None:
    """(field, reason) of the record's first problem, or None."""
    name = record.meter_api_name
    meter = meters.get(name)
    if meter is None:
        if name in request_meters:
            return "meterApiName", f"{name!r} is a request meter: it counts access-log requests, not ingested events"
        return "meterApiName", f"{name!r} is not a meter (create it first: POST /meters)"
    if meter.locking_status == "deprecated":
        return "meterApiName", f"meter {name!r} is deprecated and takes no new events"
    if not math.isfinite(record.meter_value):
        return "meterValue", f"must be a finite number, got {record.meter_value!r}"
    customer = record.customer_id
    if _NO_CUSTOMER.fullmatch(customer):
        return "customerId", f"must name a customer (not blank or '-'), got {customer!r}"
    if len(customer) > settings.max_customer_id_chars:
        return "customerId", f"is {len(customer)} characters; at most {settings.max_customer_id_chars}"
    time_ms = record.meter_time_in_millis
    if not earliest_ms <= time_ms <= latest_ms:
        return "meterTimeInMillis", (
            f"{time_ms} is outside the accepted window [{earliest_ms}, {latest_ms}] (at most "
            f"{settings.late_arrival_window_s} s late, {settings.future_skew_s} s early)"
        )
    unique_id = record.unique_id
    if unique_id is not None and not 1 <= len(unique_id) <= UNIQUE_ID_MAX_CHARS:
        return "uniqueId", f"must be 1-{UNIQUE_ID_MAX_CHARS} characters, got {len(unique_id)}"
    dimensions = record.dimensions
    if dimensions:
        if len(dimensions) > settings.max_dimensions:
            return "dimensions", f"has {len(dimensions)} dimensions; at most {settings.max_dimensions}"
        for key, value in dimensions.items():
            if not 1 <= len(key) <= settings.max_dimension_name_chars:
                return "dimensions", f"name {key[:40]!r} must be 1-{settings.max_dimension_name_chars} characters"
            if key == CANCEL_DIMENSION:
                return f"dimensions.{key}", "is not taken here: cancel usage with a cancellation rule (DELETE /usage)"
            if len(value) > settings.max_dimension_value_chars:
                return f"dimensions.{key}", f"is {len(value)} characters; at most {settings.max_dimension_value_chars}"
    return None


def content_unique_id(record: IngestRecord) -> str:
    """The uniqueId of a record sent without one: a hash of everything that makes it this event (meter, customer,
    value, time, dimensions), so a resent copy is the same event."""
    content = _ROW_ENCODER.encode(
        [
            record.meter_api_name,
            record.customer_id,
            float(record.meter_value),
            record.meter_time_in_millis,
            sorted((record.dimensions or {}).items()),
        ]
    )
    return "sha256:" + hashlib.sha256(content).hexdigest()


def event_rows(records: Sequence[IngestRecord], *, ingested_at_us: int, source: EventSource) -> list[MeterEventRow]:
    """The table rows of accepted records, stamped with when the service accepted them."""
    row = MeterEventRow  # positional: the fields' order is the table's (checked at import)
    return [
        row(
            content_unique_id(record) if record.unique_id is None else record.unique_id,
            record.meter_api_name,
            record.customer_id,
            float(record.meter_value),
            record.meter_time_in_millis * _MICROS_PER_MS,
            record.dimensions or None,
            ingested_at_us,
            source,
        )
        for record in records
    ]


def encode_rows(rows: Sequence[MeterEventRow]) -> bytes:
    """A request's rows as the one record the delivery stream carries for it: their JSON lines, newline-separated.

    One spool frame (one length, one checksum) per request rather than per row: framing each row cost ~1.5 us of
    Python, holding the GIL, on the path every acknowledgement waits for. The stream's decoding reads a record's
    lines as rows; a request's rows are checked before they are made durable, so none is refused there.
    """
    return _ROW_ENCODER.encode_lines(rows).rstrip(b"\n")


# -- the toolkit's event --------------------------------------------------------------------------------------------


def toolkit_records(body: object, *, received_ms: int) -> list[object]:
    """The ingest records of toolkit usage events, accepted as the toolkit emits them.

    ``body`` is an EventBridge event as a target receives it (``detail-type``, ``detail``, ``id``, ``time``), a list
    of them, or a PutEvents request (``{"Entries": [{"DetailType", "Detail": "<JSON text>", ...}]}``). Each becomes
    an ingest record object for :func:`check_records` (see the module doc for its customer, time and uniqueId).

    Raises:
        RequestError: (400) not such an event, naming the member at fault.
    """
    events: list[object]
    if isinstance(body, dict) and "Entries" in body:
        entries = body["Entries"]
        if not isinstance(entries, list) or not entries:
            raise RequestError(f"Entries must be a non-empty list of events, got {entries!r}")
        events = [_put_events_entry(index, entry) for index, entry in enumerate(entries)]
    elif isinstance(body, list):
        events = list(body)
    else:
        events = [body]
    if not events:
        raise RequestError("no events: send an EventBridge event, a list of them, or a PutEvents request")
    return [_toolkit_record(index, event, received_ms) for index, event in enumerate(events)]


def _put_events_entry(index: int, entry: object) -> dict[str, Any]:
    """A PutEvents entry as the event EventBridge would deliver (its Detail is JSON text)."""
    if not isinstance(entry, dict):
        raise RequestError(f"Entries[{index}] must be an object, got {entry!r}")
    detail = entry.get("Detail")
    if not isinstance(detail, str):
        raise RequestError(f"Entries[{index}].Detail must be JSON text, got {detail!r}")
    try:
        decoded = msgspec.json.decode(detail)
    except msgspec.DecodeError as exc:
        raise RequestError(f"Entries[{index}].Detail is not JSON: {exc}") from None
    event: dict[str, Any] = {"detail-type": entry.get("DetailType"), "detail": decoded}
    if entry.get("Time") is not None:
        event["time"] = entry["Time"]
    return event


def _toolkit_record(index: int, event: object, received_ms: int) -> dict[str, Any]:
    where = f"events[{index}]"
    if not isinstance(event, dict):
        raise RequestError(f"{where} must be an EventBridge event object, got {event!r}")
    detail_type = event.get("detail-type")
    if detail_type != INGEST_USAGE_DETAIL_TYPE:
        raise RequestError(f"{where}.detail-type must be {INGEST_USAGE_DETAIL_TYPE!r}, got {detail_type!r}")
    detail = event.get("detail")
    if not isinstance(detail, dict):
        raise RequestError(f"{where}.detail must be an object, got {detail!r}")
    for required in ("tenantId", "meterApiName", "meterValue"):
        if required not in detail:
            raise RequestError(f"{where}.detail.{required} is required")
    dimensions = {key: _dimension_value(value) for key, value in detail.items() if key not in _TOOLKIT_FIELDS}
    record: dict[str, Any] = {
        "customerId": detail["tenantId"],
        "meterApiName": detail["meterApiName"],
        "meterValue": detail["meterValue"],
        "meterTimeInMillis": detail.get("meterTimeInMillis", _event_time_ms(where, event, received_ms)),
    }
    if dimensions:
        record["dimensions"] = dimensions
    unique_id = detail.get("uniqueId", event.get("id"))
    if unique_id is not None:
        record["uniqueId"] = unique_id if "uniqueId" in detail else f"eventbridge:{unique_id}"
    return record


def _dimension_value(value: object) -> object:
    """A detail member as a dimension value: a number or boolean as its JSON text (the toolkit forwards detail members
    as they are, and a tier or a count is a number there); anything else unchanged, for the record's check to accept
    (a string) or refuse (an object, an array, null) naming the dimension."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return msgspec.json.encode(value).decode()
    return value


def _event_time_ms(where: str, event: Mapping[str, Any], received_ms: int) -> int:
    """The envelope's ``time`` (ISO-8601, as EventBridge stamps it) in epoch ms, else ``received_ms``."""
    stamp = event.get("time")
    if stamp is None:
        return received_ms
    if isinstance(stamp, str):
        try:
            moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is not None:
                return int(moment.timestamp() * 1000)
    raise RequestError(f"{where}.time must be an ISO-8601 time with a zone, as EventBridge writes it, got {stamp!r}")


# -- the toolkit's onboarding event ----------------------------------------------------------------------------------

#: The EventBridge detail-type the toolkit's control plane emits when a tenant is onboarded (sbt-aws's
#: ``DetailType.ONBOARDING_REQUEST``, the event its billing provider creates the customer on).
ONBOARDING_DETAIL_TYPE: Final = "onboardingRequest"


def onboarding_customers(body: object) -> list[dict[str, Any]] | None:
    """The customers of toolkit onboarding events, or None when ``body`` holds usage events instead.

    ``body`` is shaped as for :func:`toolkit_records`. The control plane's detail is the tenant's registration and
    tenant data with its ``tenantId``: the customer is ``{customerId: tenantId, customerName: tenantName (else the
    tenantId), customerEmail: email}``, with the tenant's ``tier`` as a trait when it has one.

    Raises:
        RequestError: (400) onboarding and usage events in one request, or an onboarding event without a tenantId.
    """
    if isinstance(body, dict) and isinstance(body.get("Entries"), list):
        events: list[object] = [
            _put_events_entry(index, entry) if isinstance(entry, dict) else entry
            for index, entry in enumerate(body["Entries"])
        ]
    else:
        events = list(body) if isinstance(body, list) else [body]
    onboarding = [isinstance(e, dict) and e.get("detail-type") == ONBOARDING_DETAIL_TYPE for e in events]
    if not any(onboarding):
        return None
    if not all(onboarding):
        raise RequestError(f"send {ONBOARDING_DETAIL_TYPE} and {INGEST_USAGE_DETAIL_TYPE} events in separate requests")
    customers = []
    for index, event in enumerate(events):
        assert isinstance(event, dict)  # checked above
        detail = event.get("detail")
        tenant_id = detail.get("tenantId") if isinstance(detail, dict) else None
        if not isinstance(detail, dict) or not isinstance(tenant_id, str) or not tenant_id.strip():
            raise RequestError(f"events[{index}].detail.tenantId is required, got {tenant_id!r}")
        customer: dict[str, Any] = {"customerId": tenant_id, "customerName": detail.get("tenantName") or tenant_id}
        if detail.get("email") is not None:
            customer["customerEmail"] = detail["email"]
        if isinstance(detail.get("tier"), str):
            customer["traits"] = {"tier": detail["tier"]}
        customers.append(customer)
    return customers
