"""Amberflo's API, defined once: request parsing and response shapes of ingest bodies, usage queries and meters.

The local Amberflo (:mod:`meterlake.amberflo.server`) and the metering service (:mod:`meterlake.service`) both speak
this contract (see the shared Amberflo notes), so a shape is written here and nowhere else: a usage report is built
by :func:`usage_report` from per-group, per-bucket aggregates however they were computed (in Python by the local
Amberflo, by SQL over the lake by the service).

Every parser raises :class:`RequestError` naming the offending field; nothing here stores anything.
"""

from __future__ import annotations

import datetime as dt
import gzip
import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import msgspec

#: The dimension that turns an ingested record into the cancellation of the matching earlier event.
CANCEL_DIMENSION: Final = "aflo.cancel_previous_resource_event"
#: Longest meterApiName a meter may have.
MAX_METER_API_NAME_LENGTH: Final = 50
METER_TYPES: Final = frozenset(
    {"sum_of_all_usage", "max_usage", "unique_count", "event_duration", "running_total", "active_users"}
)
LOCKING_STATUSES: Final = frozenset({"open", "close_to_changes", "close_to_deletion", "deprecated"})
#: The cancellation rule type Amberflo's custom filtering rules use to filter events out of usage.
FILTER_OUT_RULE_TYPE: Final = "by_property_filter_out"

#: Amberflo's aggregations, plus meterlake's UNIQUE_COUNT (distinct values of the meter's first dimension).
Aggregation = Literal["SUM", "COUNT", "MIN", "MAX", "UNIQUE_COUNT"]
#: The aggregations Amberflo itself answers.
AMBERFLO_AGGREGATIONS: Final[tuple[Aggregation, ...]] = ("SUM", "COUNT", "MIN", "MAX")
ALL_AGGREGATIONS: Final[tuple[Aggregation, ...]] = get_args(Aggregation)
TimeGroupingInterval = Literal["HOUR", "DAY", "WEEK", "MONTH"]
TIME_GROUPING_INTERVALS: Final[tuple[TimeGroupingInterval, ...]] = get_args(TimeGroupingInterval)
#: The group key usage is grouped and filtered by when it is the customer rather than a dimension.
CUSTOMER_KEY: Final = "customerId"

#: A usage report spans at most this many buckets.
MAX_BUCKETS: Final = 100_000
#: The latest instant (epoch seconds) a request may name: 9999-01-01T00:00:00Z. Every bucket of a range that ends by
#: then, and the next one, is a date Python, DuckDB and Iceberg can hold (year 10000 is none of them).
MAX_EPOCH_SECONDS: Final = 253_370_764_800
_FIXED_SECONDS: Final[Mapping[str, int]] = {"HOUR": 3600, "DAY": 86400, "WEEK": 7 * 86400}
# 1970-01-01 was a Thursday: day number + 3 is the ISO weekday offset (0 = Monday), so weeks start on Monday.
_EPOCH_WEEKDAY: Final = 3
_GZIP_ENCODINGS: Final = ("gzip", "x-gzip")


class IngestRecord(
    msgspec.Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True, frozen=True, gc=False
):
    """One record of Amberflo's ingest API (its field names): decoded from what callers send (the typed decode checks
    types in C), and encoded for what meterlake forwards (a field at its default, None, is left out)."""

    customer_id: str
    meter_api_name: str
    meter_value: float
    meter_time_in_millis: int
    unique_id: str | None = None
    dimensions: dict[str, str] | None = None


class RequestError(Exception):
    """A request that is refused: answered with ``status`` (a 4xx, or 503 when the service cannot answer it now) and
    ``{"message": ...}``, nothing stored.

    ``extra`` holds more members of the answer (e.g. ``errors``, one per bad record).
    """

    def __init__(self, message: str, *, status: int = 400, extra: Mapping[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.extra = dict(extra or {})


# -- ingest bodies --------------------------------------------------------------------------------------------------


def inflate(body: bytes, content_encoding: str | None) -> bytes:
    """The body without its Content-Encoding (gzip or none).

    Raises:
        RequestError: not valid gzip; 415 for another Content-Encoding.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in _GZIP_ENCODINGS:
        try:
            return gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as exc:
            raise RequestError(f"body is not valid gzip: {exc}") from None
    if encoding != "identity":
        raise RequestError(f"unsupported Content-Encoding {content_encoding!r}", status=415)
    return body


def parse_ingest_body(body: bytes, content_encoding: str | None) -> list[object]:
    """The records of an ingest body: gzip or plain; one JSON object, a JSON array, or NDJSON.

    Raises:
        RequestError: undecodable body (415 for an unsupported Content-Encoding).
    """
    body = inflate(body, content_encoding)
    if not body.strip():
        raise RequestError("body is empty")
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError as whole_error:
        lines = [line for line in body.splitlines() if line.strip()]
        if len(lines) < 2:
            raise RequestError(f"body is not JSON: {whole_error}") from None
        records: list[object] = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(msgspec.json.decode(line))
            except msgspec.DecodeError as exc:
                raise RequestError(f"NDJSON line {number} is not JSON: {exc}") from None
        return records
    if isinstance(document, list):
        return document
    return [document]


# -- usage queries --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageQuery:
    """A validated usage query, in either accepted request shape.

    ``aggregation`` None: the meter's own (only where the caller allows it, see :func:`parse_usage_query`).
    ``filters`` maps customerId or a dimension to the values kept.
    """

    meter_api_name: str
    aggregation: Aggregation | None
    interval: TimeGroupingInterval
    start_s: int
    end_s: int
    group_by: tuple[str, ...]
    filters: Mapping[str, frozenset[str]]
    take_limit: int | None
    take_ascending: bool


def enum_value(name: str, value: object, allowed: Iterable[str]) -> str:
    """``value`` upper-cased if it is one of ``allowed`` (any case).

    Raises:
        RequestError: naming ``name`` and the allowed values.
    """
    options = list(allowed)
    if isinstance(value, str) and value.upper() in options:
        return value.upper()
    raise RequestError(f"{name} must be one of {options} (any case), got {value!r}")


def epoch_seconds(name: str, value: object) -> int:
    """``value`` as epoch seconds.

    Raises:
        RequestError: not an integer from 0 to :data:`MAX_EPOCH_SECONDS` (9999-01-01).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EPOCH_SECONDS:
        raise RequestError(
            f"{name} must be an integer of epoch seconds from 0 to {MAX_EPOCH_SECONDS} (9999-01-01), got {value!r}"
        )
    return value


def string_list(name: str, value: object) -> list[str]:
    """``value`` as a list of strings.

    Raises:
        RequestError: not a list of strings.
    """
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{name} must be a list of strings, got {value!r}")
    return list(value)


def parse_filter(name: str, value: object) -> dict[str, frozenset[str]]:
    """A filter object: customerId or a dimension name -> the values kept (a list of strings).

    Raises:
        RequestError: not an object of string lists.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be an object of string lists, got {value!r}")
    return {key: frozenset(string_list(f"{name}.{key}", values)) for key, values in value.items()}


def parse_usage_query(
    body: object,
    *,
    now_s: int,
    aggregations: Collection[Aggregation] = AMBERFLO_AGGREGATIONS,
    aggregation_required: bool = True,
) -> UsageQuery:
    """Validate a usage query: ``timeRange``/``filter`` (the SDKs' shape) or top-level ``startTimeInSeconds``/
    ``endTimeInSeconds``/``customerFilter`` (the workflow fixture's shape).

    ``aggregations`` are those accepted; without ``aggregation_required`` a missing aggregation is None (the meter's).

    Raises:
        RequestError: naming the offending field.
    """
    if not isinstance(body, dict):
        raise RequestError(f"a usage query must be a JSON object, got {type(body).__name__}")
    name = body.get("meterApiName")
    if not isinstance(name, str) or not name:
        raise RequestError(f"meterApiName must be a non-empty string, got {name!r}")
    raw_aggregation = body.get("aggregation")
    aggregation: Aggregation | None = None
    if raw_aggregation is not None or aggregation_required:
        aggregation = enum_value("aggregation", raw_aggregation, aggregations)  # type: ignore[assignment]
    interval: TimeGroupingInterval = enum_value(  # type: ignore[assignment]
        "timeGroupingInterval", body.get("timeGroupingInterval"), TIME_GROUPING_INTERVALS
    )
    time_range = body.get("timeRange")
    if time_range is None:
        time_range = {k: body[k] for k in ("startTimeInSeconds", "endTimeInSeconds") if k in body}
    elif not isinstance(time_range, dict):
        raise RequestError(f"timeRange must be an object, got {time_range!r}")
    if "startTimeInSeconds" not in time_range:
        raise RequestError("timeRange.startTimeInSeconds (or top-level startTimeInSeconds) is required")
    start_s = epoch_seconds("startTimeInSeconds", time_range["startTimeInSeconds"])
    end_value = time_range.get("endTimeInSeconds")
    end_s = now_s if end_value is None else epoch_seconds("endTimeInSeconds", end_value)
    if end_s <= start_s:
        raise RequestError(f"endTimeInSeconds ({end_s}) must be after startTimeInSeconds ({start_s})")

    group_by_value = body.get("groupBy")
    if group_by_value is None:
        group_by: list[str] = []
    elif isinstance(group_by_value, str):
        group_by = [group_by_value]
    else:
        group_by = string_list("groupBy", group_by_value)
    if len(set(group_by)) != len(group_by):
        raise RequestError(f"groupBy names a key twice: {group_by}")

    filters = parse_filter("filter", body.get("filter"))
    customer_filter = body.get("customerFilter")
    if customer_filter is not None:
        if CUSTOMER_KEY in filters:
            raise RequestError("give the customer filter once: filter.customerId or customerFilter, not both")
        filters[CUSTOMER_KEY] = frozenset(string_list("customerFilter", customer_filter))

    take = body.get("take")
    take_limit: int | None = None
    take_ascending = False
    if take is not None:
        if not isinstance(take, dict):
            raise RequestError(f"take must be an object, got {take!r}")
        limit = take.get("limit")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise RequestError(f"take.limit must be a positive integer, got {limit!r}")
        ascending = take.get("isAscending", False)
        if not isinstance(ascending, bool):
            raise RequestError(f"take.isAscending must be a boolean, got {ascending!r}")
        take_limit, take_ascending = limit, ascending
    return UsageQuery(name, aggregation, interval, start_s, end_s, tuple(group_by), filters, take_limit, take_ascending)


def bucket_start(epoch_s: int, interval: TimeGroupingInterval) -> int:
    """The UTC start of the ``interval`` bucket holding ``epoch_s`` (weeks start on Monday)."""
    if interval == "MONTH":
        moment = dt.datetime.fromtimestamp(epoch_s, dt.UTC)
        return int(dt.datetime(moment.year, moment.month, 1, tzinfo=dt.UTC).timestamp())
    if interval == "WEEK":
        day = epoch_s // 86400
        return (day - (day + _EPOCH_WEEKDAY) % 7) * 86400
    size = _FIXED_SECONDS[interval]
    return epoch_s - epoch_s % size


def next_bucket(start_s: int, interval: TimeGroupingInterval) -> int:
    """The start of the bucket after the one starting at ``start_s``."""
    if interval == "MONTH":
        moment = dt.datetime.fromtimestamp(start_s, dt.UTC)
        year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
        return int(dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp())
    return start_s + _FIXED_SECONDS[interval]


def bucket_grid(query: UsageQuery) -> list[int]:
    """The starts of every bucket the query's range touches, oldest first.

    Raises:
        RequestError: the range spans more than :data:`MAX_BUCKETS` buckets.
    """
    intervals: list[int] = []
    boundary = bucket_start(query.start_s, query.interval)
    while boundary < query.end_s:
        intervals.append(boundary)
        if len(intervals) > MAX_BUCKETS:
            raise RequestError(f"the time range spans more than {MAX_BUCKETS} {query.interval} buckets")
        boundary = next_bucket(boundary, query.interval)
    return intervals


def percentage_from_previous(previous: float, current: float) -> float:
    """``(cur - prev) / prev * 100`` rounded to 2 places; with prev = 0: 100 if cur > 0, -100 if cur < 0, else 0."""
    if previous == 0:
        return 100.0 if current > 0 else -100.0 if current < 0 else 0.0
    return round((current - previous) / previous * 100, 2)


@dataclass(frozen=True, slots=True)
class GroupUsage:
    """One group's aggregates: over the whole range (``group_value``) and per bucket that holds events.

    ``key`` has one value per groupBy key (a dimension an event lacks is None); ``buckets`` maps a bucket's start
    (epoch seconds) to its value, for buckets with at least one event only.
    """

    key: tuple[str | None, ...]
    group_value: float
    buckets: Mapping[int, float]


def usage_report(
    query: UsageQuery, groups: Iterable[GroupUsage], *, aggregation: str, zero_fill: bool
) -> dict[str, Any]:
    """Amberflo's usage report for ``query`` from its groups' aggregates (computed with ``aggregation``).

    Groups are those with at least one event in the range; without groupBy there is exactly one (all zero when there
    are no events). Without ``take`` groups are ordered by their group values; with it, by groupValue (descending
    unless ``isAscending``) and cut to ``limit``. Sparse reports (``zero_fill=False``) leave out buckets with no
    events from ``values``; their percentageFromPrevious still compares with the preceding bucket of the grid.

    Raises:
        RequestError: the range spans too many buckets.
    """
    intervals = bucket_grid(query)
    chosen = list(groups)
    if not query.group_by and not chosen:
        chosen = [GroupUsage((), 0.0, {})]
    meters: list[tuple[tuple[str | None, ...], float, dict[str, Any]]] = []
    for group in chosen:
        values: list[dict[str, Any]] = []
        previous = 0.0
        for bucket in intervals:
            has_events = bucket in group.buckets
            value = float(group.buckets.get(bucket, 0.0))
            if has_events or zero_fill:
                values.append(
                    {
                        "secondsSinceEpochUtc": bucket,
                        "value": value,
                        "percentageFromPrevious": percentage_from_previous(previous, value),
                    }
                )
            previous = value
        meter: dict[str, Any] = {"groupValue": float(group.group_value), "values": values}
        if query.group_by:
            meter = {"group": {"groupInfo": dict(zip(query.group_by, group.key, strict=True))}, **meter}
        meters.append((group.key, float(group.group_value), meter))

    meters.sort(key=lambda item: tuple("" if part is None else part for part in item[0]))
    if query.take_limit is not None:
        meters.sort(key=lambda item: item[1], reverse=not query.take_ascending)
        meters = meters[: query.take_limit]

    return {
        "metadata": {
            "meterApiName": query.meter_api_name,
            "aggregation": aggregation,
            "timeGroupingInterval": query.interval,
            "timeRange": {"startTimeInSeconds": query.start_s, "endTimeInSeconds": query.end_s},
            "filter": {key: sorted(values) for key, values in query.filters.items()},
            "groupBy": list(query.group_by) if query.group_by else None,
            "take": None
            if query.take_limit is None
            else {"limit": query.take_limit, "isAscending": query.take_ascending},
        },
        "secondsSinceEpochIntervals": intervals,
        "clientMeters": [meter for _, _, meter in meters],
    }


# -- meters ---------------------------------------------------------------------------------------------------------


def validate_meter(body: object) -> dict[str, Any]:
    """The stored fields of a meter from a create/update body (``id`` and times are the server's).

    Raises:
        RequestError: a required field is missing or a field is invalid (the message names it).
    """
    if not isinstance(body, dict):
        raise RequestError(f"a meter must be a JSON object, got {type(body).__name__}")
    for required in ("label", "meterApiName", "meterType"):
        value = body.get(required)
        if not isinstance(value, str) or not value:
            raise RequestError(f"{required} is required (a non-empty string), got {value!r}")
    name: str = body["meterApiName"]
    if len(name) > MAX_METER_API_NAME_LENGTH:
        raise RequestError(f"meterApiName must be at most {MAX_METER_API_NAME_LENGTH} characters, got {len(name)}")
    meter_type = body["meterType"].lower()
    if meter_type not in METER_TYPES:
        raise RequestError(f"meterType must be one of {sorted(METER_TYPES)}, got {body['meterType']!r}")
    description = body.get("description") or ""
    if not isinstance(description, str):
        raise RequestError(f"description must be a string, got {description!r}")
    locking = body.get("lockingStatus") or "open"
    if not isinstance(locking, str) or locking.lower() not in LOCKING_STATUSES:
        raise RequestError(f"lockingStatus must be one of {sorted(LOCKING_STATUSES)}, got {locking!r}")
    return {
        "label": body["label"],
        "meterApiName": name,
        "meterType": meter_type,
        "description": description,
        "dimensions": string_list("dimensions", body.get("dimensions") or []),
        "aggregationDimensions": string_list("aggregationDimensions", body.get("aggregationDimensions") or []),
        "lockingStatus": locking.lower(),
    }


def meter_type_aggregation(meter_type: str) -> Aggregation:
    """How a meter aggregates when a query names no aggregation: MAX for max_usage, UNIQUE_COUNT for unique_count
    and active_users, else SUM."""
    if meter_type == "max_usage":
        return "MAX"
    if meter_type in ("unique_count", "active_users"):
        return "UNIQUE_COUNT"
    return "SUM"


#: The fields of Amberflo's customer (``POST``/``PUT /customers``); customerId and customerName are required.
CUSTOMER_FIELDS: Final = ("customerId", "customerName", "customerEmail", "enabled", "traits")


def parse_customer(body: object) -> dict[str, Any]:
    """An Amberflo customer body, checked: ``{customerId, customerName, customerEmail?, enabled?, traits?}``.

    Returns the customer with ``enabled`` (default true) and ``traits`` (default ``{}``) filled in.

    Raises:
        RequestError: (400) not an object, an unknown field, or a field of the wrong type (the message names it).
    """
    if not isinstance(body, dict):
        raise RequestError(f"a customer must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(CUSTOMER_FIELDS))
    if unknown:
        raise RequestError(f"{unknown[0]}: not a customer field (fields: {', '.join(CUSTOMER_FIELDS)})")
    customer: dict[str, Any] = {}
    for name in ("customerId", "customerName"):
        value = body.get(name)
        if not isinstance(value, str) or not value.strip():
            raise RequestError(f"{name} is required: a non-blank string, got {value!r}")
        customer[name] = value
    email = body.get("customerEmail")
    if email is not None:
        if not isinstance(email, str):
            raise RequestError(f"customerEmail must be a string, got {email!r}")
        customer["customerEmail"] = email
    enabled = body.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RequestError(f"enabled must be true or false, got {enabled!r}")
    customer["enabled"] = enabled
    traits = body.get("traits") or {}
    if not isinstance(traits, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in traits.items()):
        raise RequestError(f"traits must be an object of strings, got {traits!r}")
    customer["traits"] = dict(traits)
    return customer
