"""A local Amberflo: the ingest, usage, meters and customers API on loopback, with faults injected on demand.

It speaks the contract in the shared Amberflo notes, so the forwarder, its tests, ``make demo`` and the benchmark can
run against it exactly as against ``ingest.amberflo.io`` / ``app.amberflo.io`` (point both base URLs at ``.url``).

Deduplication, precisely. Every accepted record has a key:

* with a ``uniqueId``: ``(meterApiName, uniqueId)``. A later record with the same meter and uniqueId is the SAME event
  and is dropped, even if its other fields differ (that case is counted in ``ServerStats.conflicting_duplicates``,
  as it means the sender reuses uniqueIds);
* without one: the whole record, ``(customerId, meterApiName, meterValue, meterTimeInMillis, dimensions)``, so only
  exact duplicates are dropped (``1`` and ``1.0`` are the same meterValue).

A record whose dimensions hold ``"aflo.cancel_previous_resource_event": "true"`` is not stored: it removes the stored
event whose key equals its own computed without that dimension (nothing happens if there is none).

A wrong or missing ``X-API-KEY`` is refused with 401 (or 403, as an API gateway in front of Amberflo may answer;
``key_refusal_status``); the accepted key can be changed while serving (:attr:`LocalAmberflo.api_key`), as an
operator who fixes or rotates a key in Amberflo does.

Faults (:class:`FaultPlan`) apply to ``/ingest`` only and are drawn per request, after authentication, from the
server's own ``random.Random(seed)``: the same requests in the same order meet the same faults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Annotated, Any, Final, Literal, get_args

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from meterlake.amberflo.api import (
    CANCEL_DIMENSION,
    Aggregation,
    GroupUsage,
    RequestError,
    UsageQuery,
    bucket_start,
    parse_customer,
    parse_ingest_body,
    parse_usage_query,
    validate_meter,
)
from meterlake.amberflo.api import usage_report as build_usage_report
from meterlake.local.serving import (
    BackgroundServer,
    ServingError,
    abort_connection,
    bind_listening_socket,
    stop_signals,
)

FaultKind = Literal["429", "500", "503", "slow", "reset"]
#: Every transient fault kind, in the order ``FaultPlan.kinds`` defaults to.
FAULT_KINDS: Final[tuple[FaultKind, ...]] = get_args(FaultKind)

_HOST: Final = "127.0.0.1"
_JSON: Final = "application/json"
_GRACEFUL_SHUTDOWN_SECONDS: Final = 1.0


@dataclass(frozen=True)
class FaultPlan:
    """Which faults the server injects into ``/ingest`` requests.

    Attributes:
        transient_rate: share (0..1) of ingest requests that get a transient fault.
        kinds: the transient faults to choose from, uniformly: ``"429"`` (with ``Retry-After``), ``"500"``,
            ``"503"`` (nothing stored), ``"slow"`` (answer after ``slow_s``), ``"reset"`` (TCP reset, no answer).
        retry_after_s: the ``Retry-After`` header of a 429, in whole seconds.
        slow_s: how long a slow request waits before answering; make it longer than the client's read timeout.
        slow_then_ingest: a slow request stores its records and answers 200 late (the client's retry must then be
            deduplicated); False: it stores nothing and answers 504 late.
        reset_after_ingest: a reset request stores its records before dropping the connection (the nasty case);
            False: it stores nothing.
        reject_unique_ids: a request holding any of these uniqueIds gets a permanent 400 naming them, nothing stored.
        seed: seeds the server's fault draws.

    Raises:
        ValueError: a field is out of range or names an unknown fault kind.
    """

    transient_rate: float = 0.0
    kinds: tuple[FaultKind, ...] = FAULT_KINDS
    retry_after_s: int = 1
    slow_s: float = 30.0
    slow_then_ingest: bool = True
    reset_after_ingest: bool = True
    reject_unique_ids: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.transient_rate <= 1.0:
            raise ValueError(f"transient_rate must be within 0..1, got {self.transient_rate}")
        unknown = [kind for kind in self.kinds if kind not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
        if self.transient_rate > 0 and not self.kinds:
            raise ValueError("transient_rate > 0 needs at least one fault kind")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.slow_s < 0:
            raise ValueError(f"slow_s must be >= 0, got {self.slow_s}")


@dataclass(frozen=True, slots=True)
class IngestedRecord:
    """One meter event as accepted by the server (fields as in the ingest record; absent optionals are None)."""

    customer_id: str
    meter_api_name: str | None
    meter_value: float | None
    meter_time_in_millis: int
    unique_id: str | None = None
    dimensions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerStats:
    """What the server saw and did since it started (or was reset).

    Attributes:
        ingest_requests: authenticated ``/ingest`` requests, whatever their outcome.
        unauthorized_requests: requests to any endpoint refused for their API key (401 or 403).
        records_received: records in ingest requests whose body was read and parsed (not those answered with a
            429/500/503 fault, which the server refuses before reading).
        records_accepted: records newly stored.
        duplicates_dropped: records of accepted requests dropped as duplicates of a stored event.
        conflicting_duplicates: of those, records whose uniqueId matched a stored event with different fields.
        events_cancelled: stored events removed by a cancel record.
        permanent_rejections: ingest requests answered 400/415 (invalid body or record, or a rejected uniqueId).
        faults_injected: transient faults injected, by kind.
    """

    ingest_requests: int = 0
    unauthorized_requests: int = 0
    records_received: int = 0
    records_accepted: int = 0
    duplicates_dropped: int = 0
    conflicting_duplicates: int = 0
    events_cancelled: int = 0
    permanent_rejections: int = 0
    faults_injected: Mapping[str, int] = field(default_factory=dict)


_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _WireRecord(msgspec.Struct, rename="camel", frozen=True, gc=False):
    """A stored event, decoded straight from an ingest body: the typed decode does the common validation in C.

    It accepts only what :func:`validate_record` accepts (anything else fails the decode and takes that slower path,
    which words the error); ``gc=False`` is safe as it holds only strings, numbers and a dict of strings.
    """

    customer_id: _NonEmpty
    meter_time_in_millis: Annotated[int, msgspec.Meta(gt=0)]
    meter_api_name: _NonEmpty | None = None
    meter_value: int | float | None = None
    unique_id: _NonEmpty | None = None
    dimensions: dict[str, str] = {}


_RECORDS_DECODER: Final = msgspec.json.Decoder(list[_WireRecord])


def _to_wire(record: IngestedRecord) -> _WireRecord:
    return _WireRecord(
        customer_id=record.customer_id,
        meter_time_in_millis=record.meter_time_in_millis,
        meter_api_name=record.meter_api_name,
        meter_value=record.meter_value,
        unique_id=record.unique_id,
        dimensions=dict(record.dimensions),
    )


def _to_ingested(record: _WireRecord) -> IngestedRecord:
    return IngestedRecord(
        record.customer_id,
        record.meter_api_name,
        record.meter_value,
        record.meter_time_in_millis,
        record.unique_id,
        record.dimensions,
    )


_DedupKey = tuple[object, ...]


def _dedup_key(record: _WireRecord, dimensions: Mapping[str, str]) -> _DedupKey:
    if record.unique_id is not None:
        return ("uniqueId", record.meter_api_name, record.unique_id)
    return (
        "record",
        record.customer_id,
        record.meter_api_name,
        record.meter_value,
        record.meter_time_in_millis,
        tuple(sorted(dimensions.items())),
    )


def _without_cancel(dimensions: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in dimensions.items() if k != CANCEL_DIMENSION}


KeyRefusalStatus = Literal[401, 403]
_KEY_REFUSALS: Final[Mapping[int, str]] = {401: "Unauthorized", 403: "Forbidden"}


class AmberfloState:
    """The server's memory: events, meters, counters, the accepted API key and the fault plan; safe to use from any
    thread. ``api_key`` None accepts any key (or none)."""

    def __init__(
        self,
        faults: FaultPlan | None = None,
        *,
        api_key: str | None = None,
        key_refusal_status: KeyRefusalStatus = 401,
    ) -> None:
        if key_refusal_status not in _KEY_REFUSALS:
            raise ValueError(f"key_refusal_status must be 401 or 403, got {key_refusal_status}")
        self._lock = threading.Lock()
        self._api_key = api_key
        self._key_refusal_status = key_refusal_status
        self._faults = faults or FaultPlan()
        self._rng = random.Random(self._faults.seed)
        self._events: dict[_DedupKey, _WireRecord] = {}
        self._meters: dict[str, dict[str, Any]] = {}
        self._rules: dict[str, dict[str, Any]] = {}
        self._customers: dict[str, dict[str, Any]] = {}
        self._counters: dict[str, int] = {}
        self._faults_injected: dict[str, int] = {}

    @property
    def api_key(self) -> str | None:
        """The API key requests must present (None: any); assign another to fix or rotate it while serving."""
        with self._lock:
            return self._api_key

    @api_key.setter
    def api_key(self, key: str | None) -> None:
        with self._lock:
            self._api_key = key

    def key_refusal(self, presented: str | None) -> Response | None:
        """The answer refusing ``presented`` as the API key (counted as unauthorized), or None if it is accepted."""
        with self._lock:
            if self._api_key is None or presented == self._api_key:
                return None
            self._counters["unauthorized_requests"] = self._counters.get("unauthorized_requests", 0) + 1
            status = self._key_refusal_status
        return _json({"message": _KEY_REFUSALS[status]}, status)

    @property
    def faults(self) -> FaultPlan:
        """The fault plan; assigning one also reseeds the draws from its seed."""
        with self._lock:
            return self._faults

    @faults.setter
    def faults(self, plan: FaultPlan) -> None:
        with self._lock:
            self._faults = plan
            self._rng = random.Random(plan.seed)

    def reset(self) -> None:
        """Forget every event, meter and counter, and restart the fault draws from the plan's seed."""
        with self._lock:
            self._events.clear()
            self._meters.clear()
            self._rules.clear()
            self._customers.clear()
            self._counters.clear()
            self._faults_injected.clear()
            self._rng = random.Random(self._faults.seed)

    def records(self) -> list[IngestedRecord]:
        """The stored events (after deduplication and cancellation), in the order they were accepted."""
        with self._lock:
            return [_to_ingested(r) for r in self._events.values()]

    def accepted_unique_ids(self) -> set[str]:
        """The uniqueIds of the stored events."""
        with self._lock:
            return {r.unique_id for r in self._events.values() if r.unique_id is not None}

    def stats(self) -> ServerStats:
        """A snapshot of the counters."""
        with self._lock:
            return ServerStats(**self._counters, faults_injected=dict(self._faults_injected))

    def count(self, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to one of :class:`ServerStats`' integer counters."""
        with self._lock:
            self._counters[counter] = self._counters.get(counter, 0) + amount

    def draw_fault(self) -> tuple[FaultPlan, FaultKind | None]:
        """Count one ingest request and draw its transient fault (None: none) under the current plan."""
        with self._lock:
            plan = self._faults
            self._counters["ingest_requests"] = self._counters.get("ingest_requests", 0) + 1
            if plan.transient_rate <= 0 or self._rng.random() >= plan.transient_rate:
                return plan, None
            kind = self._rng.choice(plan.kinds)
            self._faults_injected[kind] = self._faults_injected.get(kind, 0) + 1
            return plan, kind

    def ingest(self, records: Sequence[IngestedRecord]) -> None:
        """Store ``records`` (already validated), dropping duplicates and applying cancellations."""
        self.store([_to_wire(r) for r in records])

    def store(self, records: Sequence[_WireRecord]) -> None:
        """:meth:`ingest` for records decoded from a body (the hot path: one pass, one lock)."""
        accepted = duplicates = conflicts = cancelled = 0
        events = self._events
        with self._lock:
            for record in records:
                dimensions = record.dimensions
                if CANCEL_DIMENSION in dimensions and dimensions[CANCEL_DIMENSION].lower() == "true":
                    if events.pop(_dedup_key(record, _without_cancel(dimensions)), None) is not None:
                        cancelled += 1
                    continue
                unique_id = record.unique_id
                # _dedup_key, with its common case inlined.
                key = (
                    ("uniqueId", record.meter_api_name, unique_id)
                    if unique_id is not None
                    else _dedup_key(record, dimensions)
                )
                stored = events.setdefault(key, record)
                if stored is record:
                    accepted += 1
                else:
                    duplicates += 1
                    conflicts += stored != record
            counters = self._counters
            for name, amount in (
                ("records_accepted", accepted),
                ("duplicates_dropped", duplicates),
                ("conflicting_duplicates", conflicts),
                ("events_cancelled", cancelled),
            ):
                counters[name] = counters.get(name, 0) + amount

    def events_of(self, meter_api_name: str) -> list[IngestedRecord]:
        """The stored events of one meter."""
        with self._lock:
            return [_to_ingested(r) for r in self._events.values() if r.meter_api_name == meter_api_name]

    def meter_api_names(self) -> list[str]:
        """Every meterApiName with stored events, sorted."""
        with self._lock:
            return sorted({r.meter_api_name for r in self._events.values() if r.meter_api_name is not None})

    # Meters

    def create_meter(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Store a new meter with a fresh id.

        Raises:
            RequestError: (409) another meter has this meterApiName.
        """
        now = time.time_ns() // 1_000_000
        with self._lock:
            self._check_unique_name(fields["meterApiName"], except_id=None)
            meter = {"id": str(uuid.uuid4()), **fields, "createTime": now, "updateTime": now}
            self._meters[meter["id"]] = meter
            return dict(meter)

    def update_meter(self, meter_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a meter's fields, keeping its id and createTime.

        Raises:
            RequestError: (404) no such meter; (409) another meter has this meterApiName.
        """
        with self._lock:
            existing = self._meters.get(meter_id)
            if existing is None:
                raise RequestError(f"meter {meter_id!r} not found", status=404)
            self._check_unique_name(fields["meterApiName"], except_id=meter_id)
            meter = {
                "id": meter_id,
                **fields,
                "createTime": existing["createTime"],
                "updateTime": time.time_ns() // 1_000_000,
            }
            self._meters[meter_id] = meter
            return dict(meter)

    def meters(self) -> list[dict[str, Any]]:
        """Every meter, in creation order."""
        with self._lock:
            return [dict(m) for m in self._meters.values()]

    def meter(self, meter_id: str) -> dict[str, Any]:
        """One meter.

        Raises:
            RequestError: (404) no such meter.
        """
        with self._lock:
            meter = self._meters.get(meter_id)
            if meter is None:
                raise RequestError(f"meter {meter_id!r} not found", status=404)
            return dict(meter)

    def delete_meter(self, meter_id: str) -> dict[str, Any]:
        """Remove a meter and return it.

        Raises:
            RequestError: (404) no such meter.
        """
        with self._lock:
            meter = self._meters.pop(meter_id, None)
            if meter is None:
                raise RequestError(f"meter {meter_id!r} not found", status=404)
            return meter

    # Custom filtering rules (cancellation)

    def put_filtering_rule(self, body: object) -> dict[str, Any]:
        """Keep a custom filtering rule (create or replace by id). The local Amberflo records rules; its usage does
        not apply them.

        Raises:
            RequestError: (400) no id, meterApiName or ingestionTimeRange.
        """
        if not isinstance(body, dict) or not all(key in body for key in ("id", "meterApiName", "ingestionTimeRange")):
            raise RequestError("a filtering rule needs id, meterApiName and ingestionTimeRange")
        with self._lock:
            self._rules[str(body["id"])] = dict(body)
            return dict(body)

    def filtering_rules(self) -> list[dict[str, Any]]:
        """The rules kept, in the order they were first made."""
        with self._lock:
            return [dict(rule) for rule in self._rules.values()]

    def customers(self) -> list[dict[str, Any]]:
        """Every customer, in the order they were created."""
        with self._lock:
            return [dict(c) for c in self._customers.values()]

    def customer(self, customer_id: str) -> dict[str, Any]:
        """One customer, or ``{}`` when there is none with this id (as Amberflo answers)."""
        with self._lock:
            return dict(self._customers.get(customer_id, {}))

    def create_customer(self, body: object) -> dict[str, Any]:
        """Add a customer.

        Raises:
            RequestError: (400) an invalid body; (409) the customerId exists (update it with ``PUT /customers``).
        """
        customer = parse_customer(body)
        now = int(time.time() * 1000)
        with self._lock:
            if customer["customerId"] in self._customers:
                raise RequestError(f"customer {customer['customerId']!r} exists: update it with PUT", status=409)
            stored = self._customers[customer["customerId"]] = {**customer, "createTime": now, "updateTime": now}
            return dict(stored)

    def update_customer(self, body: object) -> dict[str, Any]:
        """Replace a customer's fields (PUT semantics: what the body leaves out is reset).

        Raises:
            RequestError: (400) an invalid body; (404) no customer with this customerId.
        """
        customer = parse_customer(body)
        with self._lock:
            existing = self._customers.get(customer["customerId"])
            if existing is None:
                raise RequestError(f"customer {customer['customerId']!r} not found: add it with POST", status=404)
            stored = {**customer, "createTime": existing["createTime"], "updateTime": int(time.time() * 1000)}
            self._customers[customer["customerId"]] = stored
            return dict(stored)

    def _check_unique_name(self, name: str, *, except_id: str | None) -> None:
        for meter in self._meters.values():
            if meter["meterApiName"] == name and meter["id"] != except_id:
                raise RequestError(f"a meter with meterApiName {name!r} already exists: {meter['id']}", status=409)


# Ingest records


def validate_record(index: int, item: object) -> IngestedRecord:
    """One ingest record, checked field by field.

    Raises:
        RequestError: naming the record's (0-based) index and the offending field.
    """

    def bad(message: str) -> RequestError:
        return RequestError(f"record {index}: {message}")

    if not isinstance(item, dict):
        raise bad(f"expected a JSON object, got {type(item).__name__}")
    customer_id = item.get("customerId")
    if not isinstance(customer_id, str) or not customer_id:
        raise bad(f"customerId must be a non-empty string, got {customer_id!r}")
    time_ms = item.get("meterTimeInMillis")
    if isinstance(time_ms, bool) or not isinstance(time_ms, int) or time_ms <= 0:
        raise bad(f"meterTimeInMillis must be a positive integer (epoch milliseconds), got {time_ms!r}")
    name = item.get("meterApiName")
    if name is not None and (not isinstance(name, str) or not name):
        raise bad(f"meterApiName must be a non-empty string, got {name!r}")
    value = item.get("meterValue")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise bad(f"meterValue must be a number, got {value!r}")
    unique_id = item.get("uniqueId")
    if unique_id is not None and (not isinstance(unique_id, str) or not unique_id):
        raise bad(f"uniqueId must be a non-empty string, got {unique_id!r}")
    dimensions = item.get("dimensions")
    if dimensions is None:
        dimensions = {}
    elif not isinstance(dimensions, dict):
        raise bad(f"dimensions must be an object of strings, got {dimensions!r}")
    for key, dim_value in dimensions.items():
        if not isinstance(dim_value, str):
            raise bad(f"dimensions.{key} must be a string, got {dim_value!r}")
    return IngestedRecord(
        customer_id=customer_id,
        meter_api_name=name,
        meter_value=value,
        meter_time_in_millis=time_ms,
        unique_id=unique_id,
        dimensions=dimensions,
    )


# Usage queries


def _aggregate(aggregation: Aggregation, events: Sequence[IngestedRecord]) -> float:
    """COUNT counts events; SUM/MIN/MAX use the events that carry a meterValue (0 when none do)."""
    if aggregation == "COUNT":
        return float(len(events))
    values = [e.meter_value for e in events if e.meter_value is not None]
    if not values:
        return 0.0
    if aggregation == "SUM":
        return float(sum(values))
    return float(min(values) if aggregation == "MIN" else max(values))


def _group_value(record: IngestedRecord, key: str) -> str | None:
    return record.customer_id if key == "customerId" else record.dimensions.get(key)


def usage_report(query: UsageQuery, events: Iterable[IngestedRecord], *, zero_fill: bool) -> dict[str, Any]:
    """Amberflo's usage report for ``query`` over ``events`` (all of the query's meter), aggregated in Python.

    Events count when ``startTimeInSeconds <= meterTimeInMillis / 1000 < endTimeInSeconds`` and pass the filters;
    the report's shape is :func:`meterlake.amberflo.api.usage_report`'s.

    Raises:
        RequestError: the range spans too many buckets.
    """
    aggregation = query.aggregation or "SUM"
    start_ms, end_ms = query.start_s * 1000, query.end_s * 1000
    grouped: dict[tuple[str | None, ...], list[IngestedRecord]] = {}
    for event in events:
        if not start_ms <= event.meter_time_in_millis < end_ms:
            continue
        if any(_group_value(event, key) not in allowed for key, allowed in query.filters.items()):
            continue
        grouped.setdefault(tuple(_group_value(event, key) for key in query.group_by), []).append(event)
    groups = []
    for group_key, group_events in grouped.items():
        by_bucket: dict[int, list[IngestedRecord]] = {}
        for event in group_events:
            by_bucket.setdefault(bucket_start(event.meter_time_in_millis // 1000, query.interval), []).append(event)
        buckets = {bucket: _aggregate(aggregation, members) for bucket, members in by_bucket.items()}
        groups.append(GroupUsage(group_key, _aggregate(aggregation, group_events), buckets))
    return build_usage_report(query, groups, aggregation=aggregation, zero_fill=zero_fill)


# The app

_Endpoint = Callable[[Request], Awaitable[Response]]
_GZIP_ENCODINGS: Final = ("gzip", "x-gzip")
_TEXT_PLAIN: Final = b"text/plain; charset=utf-8"


def _json(body: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type=_JSON, headers=headers)


class _ConnectionReset(Response):
    """Not a response: resets the TCP connection, so the client sees a connection error and no HTTP answer."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        abort_connection(scope)
        # Wait until the server noticed the connection is gone, so it does not answer on our behalf.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while (await receive())["type"] != "http.disconnect":
                    pass


def decode_records_fast(body: bytes, content_encoding: str | None) -> list[_WireRecord] | None:
    """The records of a (gzip or plain) JSON array body whose every record is valid; None: anything else.

    The quick path of ``/ingest``: one inflate and one typed decode, both in C. On None, :func:`parse_ingest_body`
    and :func:`validate_record` take over, and word the error if there is one.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in _GZIP_ENCODINGS:
        inflater = zlib.decompressobj(wbits=31)  # gzip framing only; checks the CRC and length
        try:
            body = inflater.decompress(body)
        except zlib.error:
            return None
        if not inflater.eof or inflater.unused_data:  # truncated, or several members: gzip.decompress decides
            return None
    elif encoding != "identity":
        return None
    try:
        return _RECORDS_DECODER.decode(body)
    except msgspec.DecodeError:
        return None


class _IngestEndpoint:
    """``POST /ingest`` as a raw ASGI app: the hot route, spared Starlette's per-request objects."""

    def __init__(self, state: AmberfloState) -> None:
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, read the body and answer (or fault)."""
        api_key = content_encoding = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                if api_key is None:
                    api_key = value.decode("latin-1")
            elif name == b"content-encoding" and content_encoding is None:
                content_encoding = value.decode("latin-1")
        refusal = self._state.key_refusal(api_key)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            accepted = await self._ingest(b"".join(chunks), content_encoding)
        except RequestError as exc:
            await _json({"message": exc.message, **exc.extra}, exc.status)(scope, receive, send)
            return
        if isinstance(accepted, Response):
            await accepted(scope, receive, send)
            return
        text = f"{accepted} records were ingested".encode()
        headers = [(b"content-length", str(len(text)).encode()), (b"content-type", _TEXT_PLAIN)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": text})

    async def _ingest(self, body: bytes, content_encoding: str | None) -> int | Response:
        """The number of records ingested, or the fault's answer.

        Raises:
            RequestError: the body or a record is invalid, or holds a rejected uniqueId.
        """
        state = self._state
        plan, fault = state.draw_fault()
        if fault == "429":
            return _json({"message": "Too Many Requests"}, 429, headers={"Retry-After": str(plan.retry_after_s)})
        if fault == "500":
            return _json({"message": "Internal server error"}, 500)
        if fault == "503":
            return _json({"message": "Service Unavailable"}, 503)
        if fault == "slow" and not plan.slow_then_ingest:
            await asyncio.sleep(plan.slow_s)
            return _json({"message": "Endpoint request timed out"}, 504)
        if fault == "reset" and not plan.reset_after_ingest:
            return _ConnectionReset()
        try:
            records = decode_records_fast(body, content_encoding)
            if records is None:
                items = parse_ingest_body(body, content_encoding)
                state.count("records_received", len(items))
                records = [_to_wire(validate_record(index, item)) for index, item in enumerate(items)]
            else:
                state.count("records_received", len(records))
            if plan.reject_unique_ids:
                rejected = sorted({r.unique_id for r in records if r.unique_id is not None} & plan.reject_unique_ids)
                if rejected:
                    raise RequestError(f"rejected uniqueIds: {rejected}", extra={"rejectedUniqueIds": rejected})
        except RequestError:
            state.count("permanent_rejections")
            raise
        state.store(records)
        if fault == "slow":
            await asyncio.sleep(plan.slow_s)
        elif fault == "reset":
            return _ConnectionReset()
        return len(records)


class _AmberfloApp:
    """Sends ``POST /ingest`` straight to its raw endpoint and everything else (lifespan too) to Starlette."""

    def __init__(self, ingest: ASGIApp, rest: ASGIApp) -> None:
        self._ingest = ingest
        self._rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in ("/ingest", "/ingest/")
            and not scope.get("root_path")
        ):
            await self._ingest(scope, receive, send)
        else:
            await self._rest(scope, receive, send)


def create_app(state: AmberfloState) -> ASGIApp:
    """The Amberflo API over ``state``; every endpoint needs ``X-API-KEY: <state.api_key>`` unless that is None."""

    def authorized(endpoint: _Endpoint) -> _Endpoint:
        async def guarded(request: Request) -> Response:
            refusal = state.key_refusal(request.headers.get("x-api-key"))
            if refusal is not None:
                return refusal
            try:
                return await endpoint(request)
            except RequestError as exc:
                return _json({"message": exc.message, **exc.extra}, exc.status)

        return guarded

    async def json_body(request: Request) -> object:
        try:
            return msgspec.json.decode(await request.body())
        except msgspec.DecodeError as exc:
            raise RequestError(f"body is not JSON: {exc}") from None

    ingest = _IngestEndpoint(state)

    async def usage(request: Request) -> Response:
        query = parse_usage_query(await json_body(request), now_s=int(time.time()))
        zero_fill = not request.url.path.rstrip("/").endswith("/sparse")
        return _json(usage_report(query, state.events_of(query.meter_api_name), zero_fill=zero_fill))

    async def usage_batch(request: Request) -> Response:
        body = await json_body(request)
        if not isinstance(body, list):
            raise RequestError(f"a usage batch must be a JSON array of queries, got {type(body).__name__}")
        now_s = int(time.time())
        queries = []
        for index, item in enumerate(body):
            try:
                queries.append(parse_usage_query(item, now_s=now_s))
            except RequestError as exc:
                raise RequestError(f"query {index}: {exc.message}") from None
        return _json([usage_report(q, state.events_of(q.meter_api_name), zero_fill=True) for q in queries])

    async def usage_all(request: Request) -> Response:
        params = request.query_params
        body: dict[str, object] = {"aggregation": "SUM", "timeGroupingInterval": params.get("timeGroupingInterval")}
        for name in ("startTimeInSeconds", "endTimeInSeconds"):
            if name in params:
                try:
                    body[name] = int(params[name])
                except ValueError:
                    raise RequestError(f"{name} must be an integer, got {params[name]!r}") from None
        if "groupBy" in params:
            body["groupBy"] = [params["groupBy"]]
        if "customerId" in params:
            body["customerFilter"] = params.getlist("customerId")
        now_s = int(time.time())
        reports = []
        for meter_api_name in state.meter_api_names():
            query = parse_usage_query({**body, "meterApiName": meter_api_name}, now_s=now_s)
            reports.append(usage_report(query, state.events_of(meter_api_name), zero_fill=True))
        return _json(reports)

    async def create_meter(request: Request) -> Response:
        return _json(state.create_meter(validate_meter(await json_body(request))))

    async def update_meter(request: Request) -> Response:
        body = await json_body(request)
        path_id = request.path_params.get("meter_id")
        body_id = body.get("id") if isinstance(body, dict) else None
        if path_id is not None and body_id is not None and body_id != path_id:
            raise RequestError(f"the body's id {body_id!r} differs from the path's {path_id!r}")
        meter_id = path_id or body_id
        if not isinstance(meter_id, str) or not meter_id:
            raise RequestError("id is required: in the body for PUT /meters")
        return _json(state.update_meter(meter_id, validate_meter(body)))

    async def put_rule(request: Request) -> Response:
        return _json(state.put_filtering_rule(await json_body(request)))

    async def list_rules(_: Request) -> Response:
        return _json(state.filtering_rules())

    async def get_customers(request: Request) -> Response:
        customer_id = request.query_params.get("customerId")
        return _json(state.customers() if customer_id is None else state.customer(customer_id))

    async def create_customer(request: Request) -> Response:
        return _json(state.create_customer(await json_body(request)))

    async def update_customer(request: Request) -> Response:
        return _json(state.update_customer(await json_body(request)))

    async def list_meters(_: Request) -> Response:
        return _json(state.meters())

    async def get_meter(request: Request) -> Response:
        return _json(state.meter(request.path_params["meter_id"]))

    async def delete_meter(request: Request) -> Response:
        return _json(state.delete_meter(request.path_params["meter_id"]))

    rest = Starlette(
        routes=[
            Route("/ingest", ingest, methods=["POST"]),
            Route("/ingest/", ingest, methods=["POST"]),
            Route("/usage", authorized(usage), methods=["POST"]),
            Route("/usage/", authorized(usage), methods=["POST"]),
            Route("/usage/sparse", authorized(usage), methods=["POST"]),
            Route("/usage/batch", authorized(usage_batch), methods=["POST"]),
            Route("/usage/all", authorized(usage_all), methods=["GET"]),
            Route("/meters", authorized(create_meter), methods=["POST"]),
            Route("/meters", authorized(update_meter), methods=["PUT"]),
            Route("/meters", authorized(list_meters), methods=["GET"]),
            Route("/meters/{meter_id}", authorized(update_meter), methods=["PUT"]),
            Route("/meters/{meter_id}", authorized(get_meter), methods=["GET"]),
            Route("/meters/{meter_id}", authorized(delete_meter), methods=["DELETE"]),
            *(
                Route(path, authorized(endpoint), methods=[method])
                for path in ("/customers", "/customers/")
                for method, endpoint in (("GET", get_customers), ("POST", create_customer), ("PUT", update_customer))
            ),
            Route("/ingest-snapshot/custom-filtering-rules", authorized(put_rule), methods=["POST"]),
            Route("/ingest-snapshot/custom-filtering-rules", authorized(list_rules), methods=["GET"]),
        ]
    )
    return _AmberfloApp(ingest, rest)


class LocalAmberflo:
    """The local Amberflo served on ``127.0.0.1`` from a background thread; running until :meth:`close`.

    Point both of Amberflo's base URLs (ingest and app) at :attr:`url`.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "local-api-key",
        faults: FaultPlan | None = None,
        port: int = 0,
        key_refusal_status: KeyRefusalStatus = 401,
    ) -> None:
        """Bind ``port`` (0: ephemeral) and start serving; a wrong API key is answered ``key_refusal_status``.

        Raises:
            PortInUseError: ``port`` is taken.
            ServingError: the server cannot listen or did not start.
        """
        self.state = AmberfloState(faults, api_key=api_key, key_refusal_status=key_refusal_status)
        self.app = create_app(self.state)
        self._server = BackgroundServer(
            self.app,
            bind_listening_socket(_HOST, port),
            name="local-amberflo",
            graceful_shutdown_s=_GRACEFUL_SHUTDOWN_SECONDS,
        )
        self.port = self._server.port
        #: Base URL, e.g. ``http://127.0.0.1:8851``.
        self.url = self._server.url

    @property
    def api_key(self) -> str | None:
        """The API key the server accepts (None: any); assign another at any time, as a key fixed in Amberflo."""
        return self.state.api_key

    @api_key.setter
    def api_key(self, key: str | None) -> None:
        self.state.api_key = key

    @property
    def faults(self) -> FaultPlan:
        """The fault plan; assign a new one at any time (it reseeds the fault draws)."""
        return self.state.faults

    @faults.setter
    def faults(self, plan: FaultPlan) -> None:
        self.state.faults = plan

    def accepted_unique_ids(self) -> set[str]:
        """The uniqueIds of the stored events."""
        return self.state.accepted_unique_ids()

    def records(self) -> list[IngestedRecord]:
        """The stored events, after deduplication and cancellation, in the order they were accepted."""
        return self.state.records()

    def stats(self) -> ServerStats:
        """A snapshot of the server's counters."""
        return self.state.stats()

    def reset(self) -> None:
        """Forget every event, meter and counter; keep the fault plan, restarting its draws."""
        self.state.reset()

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving (idempotent); requests still running after a second are cancelled.

        Raises:
            ServingError: the server thread did not stop within ``timeout`` seconds.
        """
        self._server.close(timeout)

    def __enter__(self) -> LocalAmberflo:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a LocalAmberflo until interrupted: ``python -m meterlake.amberflo.server --port 8851``."""
    parser = argparse.ArgumentParser(prog="python -m meterlake.amberflo.server", description=main.__doc__)
    parser.add_argument("--port", type=int, default=8851, help="port on 127.0.0.1 (0: ephemeral)")
    parser.add_argument("--api-key", default="local-api-key", help="the X-API-KEY to require")
    parser.add_argument("--no-auth", action="store_true", help="accept any (or no) X-API-KEY")
    parser.add_argument("--transient-rate", type=float, default=0.0, help="share of ingest requests to fault")
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS), help="comma-separated fault kinds")
    parser.add_argument("--retry-after", type=int, default=1, help="Retry-After of a 429, seconds")
    parser.add_argument("--slow-s", type=float, default=30.0, help="delay of a slow answer, seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    args = parser.parse_args(argv)
    try:
        plan = FaultPlan(
            transient_rate=args.transient_rate,
            kinds=tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip()),
            retry_after_s=args.retry_after,
            slow_s=args.slow_s,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        server = LocalAmberflo(api_key=None if args.no_auth else args.api_key, faults=plan, port=args.port)
    except ServingError as exc:
        parser.exit(1, f"error: {exc}\n")
    # SIGTERM stops it as Ctrl-C does (a service manager's stop; a background job started by a script ignores SIGINT).
    with stop_signals() as wait_for_stop, server:
        print(server.url, flush=True)
        wait_for_stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
