"""Access-log lines in, metering-event documents out: the transform's pure logic, free of Lambda and Powertools.

Each Firehose record holds one access-log line rendered from ``meterlake.records``: a JSON object whose values are
all strings, ``-`` where API Gateway had no value. A line becomes one compact JSON object holding exactly the
metering-events table's columns, typed: ``-`` -> null, numbers from strings, ``request_time`` epoch milliseconds ->
epoch microseconds (Firehose sends timestamptz columns as JSON numbers in microseconds), plus ``ingested_at``.

The contract is strict: every field of the record must be present and no other key may be. A key the transform
does not know means the stage's access-log format and this transform disagree (a deployment in flight, a hand
edit); ignoring it would drop data silently, rejecting it sends the line to Firehose's error prefix, where it can be
replayed once both sides agree.

Speed: a full Firehose batch (6 MB) holds ~10k lines. They are decoded by one msgspec call over all of them,
framed so that a line can never borrow from its neighbours, and typed by msgspec in lax mode (strings to integers,
with range constraints; ``-`` is accepted where a field may be missing). All events are encoded by one call, and
``-`` values become null in that output. When the batch call fails, the batch is split in halves until the bad lines
are isolated and decoded one by one, by the path that also names the reason (``rejection_reason``). Both paths give
identical results.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Annotated, Any, Final, Literal, cast

import msgspec
from msgspec import Meta

from meterlake.records import (
    ACCESS_LOG_FIELDS,
    FIELDS_BY_NAME,
    INGESTED_AT,
    MISSING,
    NO_TENANT_PATTERN_PYTHON,
    TENANT_FIELD,
    AccessLogField,
    FieldType,
)

#: Firehose's limit on one record; larger records are rejected before any parsing.
MAX_RECORD_BYTES: Final = 1000 * 1024


class RejectionKind(enum.Enum):
    """Why a record was rejected, coarsely: one metric per kind. Values are CamelCase metric-name suffixes."""

    NOT_BASE64 = "NotBase64"
    TOO_LARGE = "TooLarge"
    NOT_UTF8 = "NotUtf8"
    NOT_JSON = "NotJson"
    NOT_OBJECT = "NotObject"
    UNKNOWN_FIELD = "UnknownField"
    ABSENT_FIELD = "AbsentField"
    REQUIRED_MISSING = "RequiredMissing"
    WRONG_TYPE = "WrongType"
    OUT_OF_RANGE = "OutOfRange"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that cannot become a metering event: its kind (for metrics) and the reason (for people)."""

    kind: RejectionKind
    reason: str


class Unmetered(enum.Enum):
    """A valid request that is not billable (its HTTP method is in the unmetered set): Firehose drops it."""

    DROPPED = "dropped"


#: A record's outcome: the base64 metering-event document, ``Unmetered.DROPPED`` or a ``Rejection``.
Outcome = str | Unmetered | Rejection
#: The same, with the metering-event document as its JSON bytes (``transform_documents``).
DocumentOutcome = bytes | Unmetered | Rejection


@dataclass(frozen=True, slots=True)
class _Range:
    """The sane values of an integer field, and how to say so."""

    low: int
    high: int
    meaning: str


_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
# 2000-01-01 .. 2099-12-31 UTC: API Gateway cannot log earlier requests; later ones are clock or parsing errors.
_REQUEST_TIME_RANGE = _Range(946_684_800_000, 4_102_444_799_999, "epoch milliseconds in years 2000-2099")
_RANGE_BY_TYPE: dict[FieldType, _Range] = {
    FieldType.INT: _Range(0, _INT32_MAX, "a non-negative 32-bit integer"),
    FieldType.LONG: _Range(0, _INT64_MAX, "a non-negative 64-bit integer"),
    FieldType.EPOCH_MILLIS: _REQUEST_TIME_RANGE,
}
#: Field-specific sanity rules that are stricter than the field type's.
_RANGE_BY_FIELD: dict[str, _Range] = {"status": _Range(100, 599, "an HTTP status")}
if not _RANGE_BY_FIELD.keys() <= FIELDS_BY_NAME.keys():
    raise ImportError(f"sanity rules name fields the access-log record lacks: {sorted(_RANGE_BY_FIELD)}")

_TYPE_NOUN: dict[FieldType, str] = {
    FieldType.STRING: "a string",
    FieldType.INT: "an integer",
    FieldType.LONG: "an integer",
    FieldType.EPOCH_MILLIS: "an integer (epoch milliseconds)",
}


@dataclass(frozen=True, slots=True)
class _FieldRule:
    """How one access-log field is decoded and, when decoding fails, explained."""

    field: AccessLogField
    value_type: Any
    base_decoder: msgspec.json.Decoder[Any]
    decoder: msgspec.json.Decoder[Any]
    range: _Range | None


def _field_rule(field: AccessLogField) -> _FieldRule:
    if field.type is FieldType.STRING:
        base: Any = str
        constrained: Any = Annotated[str, Meta(min_length=1)] if field.required else str
        value_range = None
    else:
        base = int
        value_range = _RANGE_BY_FIELD.get(field.name, _RANGE_BY_TYPE[field.type])
        constrained = Annotated[int, Meta(ge=value_range.low, le=value_range.high)]
    # An optional field may hold "-" (kept as such until the output, see _SENTINEL_VALUE) or null; a required string
    # holding "-" is refused after decoding (_REQUIRED_STRINGS), a required integer cannot decode it.
    if field.required:
        value_type = constrained
    elif field.type is FieldType.STRING:
        value_type = constrained | None
    else:
        value_type = constrained | Literal[MISSING] | None
    return _FieldRule(
        field=field,
        value_type=value_type,
        base_decoder=msgspec.json.Decoder(base, strict=False),
        decoder=msgspec.json.Decoder(value_type, strict=False),
        range=value_range,
    )


_RULES: tuple[_FieldRule, ...] = tuple(_field_rule(f) for f in ACCESS_LOG_FIELDS)
_REQUIRED_STRINGS: tuple[str, ...] = tuple(
    f.name for f in ACCESS_LOG_FIELDS if f.required and f.type is FieldType.STRING
)
_EPOCH_MILLIS_FIELDS: tuple[str, ...] = tuple(f.name for f in ACCESS_LOG_FIELDS if f.type is FieldType.EPOCH_MILLIS)
#: The field that decides whether a request is metered at all.
_HTTP_METHOD = "http_method"
_http_method_of = attrgetter(_HTTP_METHOD)
if _HTTP_METHOD not in FIELDS_BY_NAME or not FIELDS_BY_NAME[_HTTP_METHOD].required:
    raise ImportError(f"the transform drops unmetered requests by the required field {_HTTP_METHOD!r}")

# One struct both decodes a line and encodes the metering event: its fields are the record's, in order, then
# ingested_at, typed UnsetType so that a line carrying that key fails to decode; the transform sets it after.
# gc=False: ~15k instances per batch must not wake the cyclic garbage collector.
_MeteringEvent: Any = msgspec.defstruct(
    "MeteringEvent",
    [(rule.field.name, rule.value_type) for rule in _RULES] + [(INGESTED_AT, msgspec.UnsetType, msgspec.UNSET)],
    forbid_unknown_fields=True,
    gc=False,
)

# "-" -> null happens in the encoded output, one replace over the whole batch: msgspec's output is valid JSON
# without whitespace, and in valid JSON `":"-"` can only be a key followed by the complete value "-" (were the
# first quote escaped, or opening a string, the quote after the colon would close it and "-" would follow a string).
_SENTINEL_VALUE: Final = re.compile(re.escape(b'":"' + MISSING.encode() + b'"'))
_NULLED: Final = b'":null'
# A blank tenant, or "-" among blanks, is no tenant (records.NO_TENANT_PATTERN): stored as null, so every reader's
# "has a tenant" is IS NOT NULL. A batch holds a handful of distinct tenants, so they are matched once each, on the
# decoded values; a lone "-" is left to the sentinel replacement above.
_is_no_tenant: Final = re.compile(NO_TENANT_PATTERN_PYTHON).match
_tenant_of: Final = attrgetter(TENANT_FIELD)

# Batch framing: [[N,line0],[N,line1],...] decoded as list[tuple[Literal[N], event]]. N is secret and random, so
# only the framing can supply it; n elements that each start with N must then be exactly the n frames, i.e. each
# line is exactly one JSON value: a line that is several values, or half of one, fails the batch instead of
# shifting its neighbours. (A plain "[" + ",".join(lines) + "]" would let "{a},{b}" plus a line cut in two keep
# the count and misattribute records.)
_FRAME_NONCE: Final = secrets.randbits(62)
_FRAME_HEAD: Final = b"[[" + str(_FRAME_NONCE).encode() + b","
_FRAME_JOIN: Final = b"],[" + str(_FRAME_NONCE).encode() + b","
_FRAME_TAIL: Final = b"]]"
_BATCH_DECODER: Final = msgspec.json.Decoder(
    list[tuple[Literal[_FRAME_NONCE], _MeteringEvent]],  # type: ignore[valid-type]
    strict=False,
)
_LINE_DECODER: Final = msgspec.json.Decoder(_MeteringEvent, strict=False)
_ENCODER: Final = msgspec.json.Encoder()
# Below this many lines a failed batch is decoded line by line rather than halved again.
_SMALLEST_SPLIT: Final = 16
_DECODE_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def transform_records(
    encoded: Sequence[object],
    *,
    ingested_at: int,
    unmetered_http_methods: frozenset[str],
    tenants_by_api_key: Mapping[str, str] | None = None,
) -> list[Outcome]:
    """Transform a batch of base64 Firehose record payloads, one outcome per payload, in order.

    Args:
        encoded: each record's ``data`` (base64 of one access-log line).
        ingested_at: the invocation's time, UTC epoch microseconds, written to every event.
        unmetered_http_methods: requests with these (exact) HTTP methods are dropped, not metered.
        tenants_by_api_key: set when the access log's tenant field holds the caller's API key id: each id becomes
            its tenant, and an id missing here (or no key) becomes no tenant.
    """
    outcomes: list[Outcome] = _transform(
        encoded,
        ingested_at=ingested_at,
        unmetered_http_methods=unmetered_http_methods,
        tenants_by_api_key=tenants_by_api_key,
        base64=True,
    )
    return outcomes


def transform_documents(
    encoded: Sequence[object],
    *,
    ingested_at: int,
    unmetered_http_methods: frozenset[str],
    tenants_by_api_key: Mapping[str, str] | None = None,
) -> list[DocumentOutcome]:
    """``transform_records`` with each Ok outcome as the document's JSON bytes rather than their base64: for an
    answer encoded by msgspec, which base64-encodes bytes as it writes them (one str per record fewer to build)."""
    outcomes: list[DocumentOutcome] = _transform(
        encoded,
        ingested_at=ingested_at,
        unmetered_http_methods=unmetered_http_methods,
        tenants_by_api_key=tenants_by_api_key,
        base64=False,
    )
    return outcomes


def _transform(
    encoded: Sequence[object],
    *,
    ingested_at: int,
    unmetered_http_methods: frozenset[str],
    tenants_by_api_key: Mapping[str, str] | None,
    base64: bool,
) -> list[Any]:
    """Both transforms' work: Ok outcomes as base64 strings (``base64``) or as the documents' JSON bytes."""
    decoded = _decode_payloads(_decode_base64(encoded))
    all_valid = Rejection not in set(map(type, decoded))
    events = decoded if all_valid else [event for event in decoded if type(event) is not Rejection]
    if tenants_by_api_key is not None:
        tenant_of_key = tenants_by_api_key.get
        for event in events:
            setattr(event, TENANT_FIELD, tenant_of_key(_tenant_of(event)))
    no_tenant = {tenant for tenant in set(map(_tenant_of, events)) - {None, MISSING} if _is_no_tenant(tenant)}
    if no_tenant:
        for event in events:
            if _tenant_of(event) in no_tenant:
                setattr(event, TENANT_FIELD, None)
    for name in _EPOCH_MILLIS_FIELDS:
        for event in events:
            millis = getattr(event, name)
            if type(millis) is int:
                setattr(event, name, millis * 1000)
    for event in events:
        event.ingested_at = ingested_at
    # JSON output holds no raw newline, so encode_lines splits back into one document per event; to_builtins
    # base64-encodes a list of bytes in one C call.
    documents = _SENTINEL_VALUE.sub(_NULLED, _ENCODER.encode_lines(events)).split(b"\n")
    documents.pop()
    outcomes: list[Any] = msgspec.to_builtins(documents) if base64 else documents
    if not all_valid:
        remaining = iter(outcomes)
        outcomes = [event if type(event) is Rejection else next(remaining) for event in decoded]
    if unmetered_http_methods and not unmetered_http_methods.isdisjoint(map(_http_method_of, events)):
        positions = range(len(decoded)) if all_valid else [i for i, e in enumerate(decoded) if type(e) is not Rejection]
        for index, event in zip(positions, events, strict=True):
            if _http_method_of(event) in unmetered_http_methods:
                outcomes[index] = Unmetered.DROPPED
    return outcomes


def rejection_reason(line: bytes) -> str | None:
    """The reason the transform rejects this decoded access-log line, or None if it is metered or dropped."""
    if len(line) > MAX_RECORD_BYTES:
        return _too_large(line).reason
    outcome = _decode_line(line)
    return outcome.reason if type(outcome) is Rejection else None


def _decode_base64(encoded: Sequence[object]) -> list[bytes | Rejection]:
    # msgspec would pass bytes objects through undecoded, so it only gets the batch when every payload is a str.
    if set(map(type, encoded)) <= {str}:
        try:
            lines: list[bytes | Rejection] = msgspec.convert(encoded, type=list[bytes])
        except msgspec.ValidationError:
            pass
        else:
            return lines
    return [_decode_one_base64(data) for data in encoded]


def _decode_one_base64(data: object) -> bytes | Rejection:
    if not isinstance(data, str):
        return Rejection(RejectionKind.NOT_BASE64, f"data is not a base64 string: got {type(data).__name__}")
    try:
        line: bytes = msgspec.convert(data, type=bytes)
    except msgspec.ValidationError:
        return Rejection(RejectionKind.NOT_BASE64, f"data is not valid base64: {_preview(data)}")
    return line


def _decode_payloads(lines: list[bytes | Rejection]) -> list[Any]:
    """Decode each payload to a metering event or a rejection; base64 rejections pass through."""
    if Rejection not in set(map(type, lines)):
        payloads = cast("list[bytes]", lines)
        if max(map(len, payloads), default=0) <= MAX_RECORD_BYTES:
            return _decode_lines(payloads)
    decodable = [line for line in lines if type(line) is bytes and len(line) <= MAX_RECORD_BYTES]
    decoded = iter(_decode_lines(decodable))
    return [
        line if isinstance(line, Rejection) else next(decoded) if len(line) <= MAX_RECORD_BYTES else _too_large(line)
        for line in lines
    ]


def _too_large(line: bytes) -> Rejection:
    return Rejection(RejectionKind.TOO_LARGE, f"record exceeds 1000 KiB ({len(line)} bytes decoded)")


def _decode_lines(lines: list[bytes]) -> list[Any]:
    """Decode lines to metering events (or rejections): in one call if possible, else by halves."""
    if not lines:
        return []
    try:
        framed = _BATCH_DECODER.decode(_FRAME_HEAD + _FRAME_JOIN.join(lines) + _FRAME_TAIL)
    except _DECODE_ERRORS:
        if len(lines) <= _SMALLEST_SPLIT:
            return [_decode_line(line) for line in lines]
        middle = len(lines) // 2
        return _decode_lines(lines[:middle]) + _decode_lines(lines[middle:])
    events = [event for _, event in framed]
    if any(MISSING in map(attrgetter(name), events) for name in _REQUIRED_STRINGS):
        return [_required_present(event) for event in events]
    return events


def _decode_line(line: bytes) -> Any:
    """Decode one line to a metering event, or say precisely why it cannot be one.

    The verdict is msgspec's, by the decoder the batch path uses, so both paths agree; the checks around it only
    name the reason.
    """
    try:
        line.decode()
    except UnicodeDecodeError as error:
        return Rejection(RejectionKind.NOT_UTF8, f"not UTF-8: {error.reason} at byte {error.start}")
    try:
        original = msgspec.json.decode(line)
    except msgspec.DecodeError as error:
        return Rejection(RejectionKind.NOT_JSON, f"not valid JSON: {error}")
    if not isinstance(original, dict):
        return Rejection(RejectionKind.NOT_OBJECT, f"not a JSON object: got {_json_kind(original)}")
    try:
        event = _LINE_DECODER.decode(line)
    except msgspec.DecodeError as error:  # a ValidationError is a DecodeError
        return _explain(original, error)
    return _required_present(event)


def _required_present(event: Any) -> Any:
    """The event, unless a required string field holds API Gateway's "-" (no value)."""
    for name in _REQUIRED_STRINGS:
        if getattr(event, name) == MISSING:
            return Rejection(RejectionKind.REQUIRED_MISSING, f"{name}: required but missing ('{MISSING}')")
    return event


def _explain(original: dict[str, Any], error: msgspec.DecodeError) -> Rejection:
    """Name the first problem of a line msgspec refused, field by field, with the offending value."""
    for key in original:
        if key not in FIELDS_BY_NAME:
            return Rejection(
                RejectionKind.UNKNOWN_FIELD, f"unknown field {_preview(key)}: not in the access-log format"
            )
    for rule in _RULES:
        name = rule.field.name
        if name not in original:
            return Rejection(RejectionKind.ABSENT_FIELD, f"{name}: absent from the line")
        value = original[name]
        if value is None or value == MISSING:
            if rule.field.required:
                said = "null" if value is None else f"'{MISSING}'"
                return Rejection(RejectionKind.REQUIRED_MISSING, f"{name}: required but missing ({said})")
            continue
        value_json = msgspec.json.encode(value)
        try:
            rule.decoder.decode(value_json)
        except msgspec.DecodeError:
            pass
        else:
            continue
        try:
            typed = rule.base_decoder.decode(value_json)
        except msgspec.DecodeError:
            noun = _TYPE_NOUN[rule.field.type]
            return Rejection(RejectionKind.WRONG_TYPE, f"{name}: expected {noun}, got {_preview(value)}")
        if rule.range is None:
            return Rejection(RejectionKind.OUT_OF_RANGE, f"{name}: must not be empty")
        bounds = f"{rule.range.low}..{rule.range.high}"
        return Rejection(RejectionKind.OUT_OF_RANGE, f"{name}: {typed} is out of range {bounds} ({rule.range.meaning})")
    return Rejection(RejectionKind.WRONG_TYPE, f"does not match the access-log record: {error}")


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), "null")


def _preview(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
