"""Meters: which metering events become which Amberflo meter records, defined once as config.

A :class:`Meter` says which events count (``filter``), what each counts for (``value``: a constant or a numeric
column) and which columns travel along as Amberflo dimensions. :func:`meter_records` applies meters to an Arrow table
of events column-wise (pyarrow.compute), :func:`meter_predicate_sql` renders the same rule as a sqlglot expression so
reconciliation can aggregate the lake in DuckDB (``meterlake.amberflo.reconcile.aggregate_lake``) and compare it with
what was staged (:func:`expected_usage`).

Two rules are not meter filters but hold for every meter: an event without a tenant is never forwarded (it is
counted apart, :attr:`MeterBatch.untenanted`), and an event whose value column is null is not a record (Amberflo's
``meterValue`` must be a number). "Without a tenant" means null, blank (empty or whitespace only) or API Gateway's
``-`` (:data:`NO_TENANT_PATTERN`): Amberflo refuses an empty customerId, and a refused record would hold up its
batch. The rule is applied here, where records are built, so the local outbox, the AWS stager and reconciliation's
lake side (:func:`meter_predicate_sql`) agree on what is billable.

A record's ``uniqueId`` is ``"<meterApiName>:<request_id>"``: deterministic, so a re-send after a crash is an exact
duplicate that Amberflo drops, and readable in Amberflo's UI. Meter names cannot contain ``:`` or ``#``, so the id
maps back to exactly one (meter, request). A request id too long for Amberflo's 128-character limit is replaced by
its SHA-256 after a ``#`` instead: ``"<meterApiName>#<sha256 hex>"``.

This module is core: it imports nothing from the local runtime or the CLI, so ``meterlake.config`` can import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from msgspec import Meta
from pyiceberg.types import IntegerType, LongType, StringType, TimestamptzType

from meterlake.amberflo.api import IngestRecord
from meterlake.records import NO_TENANT_PATTERN
from meterlake.schema import METERING_EVENT_SCHEMA
from meterlake.structs import ConfigSection

if TYPE_CHECKING:
    from sqlglot import exp

#: Columns every meter reads besides its own: who (tenant), which request (uniqueId) and when (meterTimeInMillis).
TENANT_COLUMN = "tenant_id"
REQUEST_ID_COLUMN = "request_id"
TIME_COLUMN = "request_time"

#: Amberflo's limits: meter API names up to 50 characters, uniqueIds kept to 128.
METER_NAME_MAX = 50
UNIQUE_ID_MAX = 128
#: Letters, digits, '_' and '-': no ':' or '#', which separate the meter name from the request in a uniqueId.
METER_NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
_MS_PER_HOUR = 3_600_000

MeterType = Literal["sum_of_all_usage", "max_usage", "unique_count", "event_duration", "running_total", "active_users"]
Operator = Literal["=", "!=", "<", "<=", ">", ">=", "in", "not_in", "is_null", "is_not_null"]
MeterName = Annotated[str, Meta(min_length=1, max_length=METER_NAME_MAX, pattern=METER_NAME_PATTERN)]

_NULL_TESTS = frozenset({"is_null", "is_not_null"})
_SET_OPS = frozenset({"in", "not_in"})
_ORDER_OPS = frozenset({"<", "<=", ">", ">="})
_STRING_OPS = frozenset({"=", "!=", "in", "not_in"}) | _NULL_TESTS
_NUMBER_OPS = _STRING_OPS | _ORDER_OPS


def _column_kinds() -> dict[str, Literal["number", "string", "timestamp"]]:
    """Each event column's kind, which decides the operators and values a condition on it may use."""
    kinds: dict[str, Literal["number", "string", "timestamp"]] = {}
    for field in METERING_EVENT_SCHEMA.fields:
        if isinstance(field.field_type, IntegerType | LongType):
            kinds[field.name] = "number"
        elif isinstance(field.field_type, StringType):
            kinds[field.name] = "string"
        elif isinstance(field.field_type, TimestamptzType):
            kinds[field.name] = "timestamp"
    return kinds


_COLUMN_KINDS = _column_kinds()
_OPS_BY_KIND: dict[str, frozenset[str]] = {"number": _NUMBER_OPS, "string": _STRING_OPS, "timestamp": _NULL_TESTS}


class MeterError(ValueError):
    """A meter definition does not fit the metering-event table; the message names the meter and the key.

    A ValueError so that msgspec reports it, with its path, when a config file is converted.
    """


def _is_meter_name(name: str) -> bool:
    return all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in name)


def _numeric_columns() -> str:
    return "numeric columns: " + ", ".join(name for name, kind in _COLUMN_KINDS.items() if kind == "number")


def _check_condition(meter: str, key: str, condition: Condition) -> None:
    kind = _COLUMN_KINDS.get(condition.column)
    where = f"meter {meter!r}: {key}"
    if kind is None:
        raise MeterError(f"{where}.column {condition.column!r} is not a metering-event column")
    if condition.op not in _OPS_BY_KIND[kind]:
        allowed = ", ".join(sorted(_OPS_BY_KIND[kind]))
        raise MeterError(f"{where}.op {condition.op!r} does not apply to {kind} column {condition.column!r}: {allowed}")
    value = condition.value
    if condition.op in _NULL_TESTS:
        if value is not None:
            raise MeterError(f"{where}.value must be absent for {condition.op!r}, got {value!r}")
        return
    if condition.op in _SET_OPS:
        if not isinstance(value, tuple) or not value:
            raise MeterError(f"{where}.value must be a non-empty list for {condition.op!r}, got {value!r}")
        items: tuple[object, ...] = value
    else:
        if value is None or isinstance(value, tuple):
            raise MeterError(f"{where}.value must be one {kind} for {condition.op!r}, got {value!r}")
        items = (value,)
    expected = int if kind == "number" else str
    for item in items:
        if type(item) is not expected:
            raise MeterError(f"{where}.value {item!r} is not a {kind}, as column {condition.column!r} is")


class Condition(ConfigSection, frozen=True):
    """One test an event must pass to count for a meter: ``column op value`` with SQL's null semantics.

    A null column value fails every test except ``is_null``. ``in``/``not_in`` take a list; null tests take no value.
    """

    column: str
    op: Operator
    value: int | str | tuple[int | str, ...] | None = None


class Meter(ConfigSection, frozen=True):
    """An Amberflo meter and the rule that turns metering events into its records.

    Attributes:
        meter_api_name: Amberflo's ``meterApiName`` (1-50 letters, digits, ``_`` or ``-``).
        label: Amberflo's display label.
        meter_type: Amberflo's meter type.
        description: Free text, sent when the meter is provisioned.
        filter: Every condition must hold for an event to count (AND).
        value: A constant (e.g. 1 to count requests) or the name of a numeric event column (e.g. response_length).
        dimensions: Event columns sent as Amberflo dimensions, as text; null values are left out.
    """

    meter_api_name: MeterName
    label: Annotated[str, Meta(min_length=1)]
    meter_type: MeterType = "sum_of_all_usage"
    description: str = ""
    filter: tuple[Condition, ...] = ()
    value: int | str = 1
    dimensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = self.meter_api_name
        if not 1 <= len(name) <= METER_NAME_MAX or not _is_meter_name(name):
            raise MeterError(f"meter {name!r}: meter_api_name must be 1-{METER_NAME_MAX} letters, digits, '_' or '-'")
        if not self.label:
            raise MeterError(f"meter {name!r}: label must not be empty")
        for i, condition in enumerate(self.filter):
            _check_condition(name, f"filter[{i}]", condition)
        if isinstance(self.value, str) and _COLUMN_KINDS.get(self.value) != "number":
            kind = _COLUMN_KINDS.get(self.value)
            problem = "is not a metering-event column" if kind is None else f"is a {kind} column, not a number"
            raise MeterError(f"meter {name!r}: value {self.value!r} {problem}; {_numeric_columns()}")
        for i, column in enumerate(self.dimensions):
            if column not in _COLUMN_KINDS:
                raise MeterError(f"meter {name!r}: dimensions[{i}] {column!r} is not a metering-event column")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise MeterError(f"meter {name!r}: dimensions {list(self.dimensions)} name a column twice")

    @property
    def aggregation(self) -> Literal["sum", "max"]:
        """How Amberflo aggregates the meter's values over an interval: the maximum for max_usage, else the sum."""
        return "max" if self.meter_type == "max_usage" else "sum"


DEFAULT_METERS: tuple[Meter, ...] = (
    Meter(
        meter_api_name="api-calls",
        label="API calls",
        description="Billable requests: answered without a server error (status < 500).",
        filter=(Condition(column="status", op="<", value=500),),
        value=1,
        dimensions=("resource_path", "http_method"),
    ),
    Meter(
        meter_api_name="egress-bytes",
        label="Egress bytes",
        description="Response bytes of billable requests (status < 500) that report a length.",
        filter=(
            Condition(column="status", op="<", value=500),
            Condition(column="response_length", op="is_not_null"),
        ),
        value="response_length",
        dimensions=("resource_path",),
    ),
)


def check_meters(meters: Sequence[Meter]) -> None:
    """Check that meters can be applied together.

    Raises:
        MeterError: two meters share a meter_api_name (their uniqueIds would collide).
    """
    seen: set[str] = set()
    for meter in meters:
        if meter.meter_api_name in seen:
            raise MeterError(f"meter {meter.meter_api_name!r}: meter_api_name is defined twice")
        seen.add(meter.meter_api_name)


def parse_meters(raw: object) -> tuple[Meter, ...]:
    """Validate decoded meter definitions (a list of meter objects) into meters with unique names.

    Raises:
        MeterError: a definition is invalid or two share a name; the message names the meter and key.
    """
    try:
        meters = msgspec.convert(raw, type=tuple[Meter, ...])
    except msgspec.ValidationError as exc:
        raise MeterError(str(exc)) from None
    check_meters(meters)
    return meters


def unique_id(meter_api_name: str, request_id: str) -> str:
    """The uniqueId of one request's record for one meter (see the module doc); what meter_records computes."""
    plain = f"{meter_api_name}:{request_id}"
    if len(plain.encode()) <= UNIQUE_ID_MAX:
        return plain
    return f"{meter_api_name}#{hashlib.sha256(request_id.encode()).hexdigest()}"


# -- records --------------------------------------------------------------------------------------------------------

#: Column names of a meter's record table, as Amberflo names the record's fields.
CUSTOMER_ID = "customerId"
METER_VALUE = "meterValue"
METER_TIME = "meterTimeInMillis"
UNIQUE_ID = "uniqueId"
DIMENSIONS = "dimensions"


@dataclass(frozen=True, slots=True)
class MeterRecords:
    """One meter's records, column-wise: customerId, meterValue, meterTimeInMillis, uniqueId[, dimensions struct]."""

    meter_api_name: str
    table: pa.Table

    def __len__(self) -> int:
        return int(self.table.num_rows)


@dataclass(frozen=True, slots=True)
class MeterBatch:
    """The Amberflo records of a set of events, one column-wise part per meter, and the events left out."""

    parts: tuple[MeterRecords, ...]
    #: Events that had no tenant (null, blank or "-"): never forwarded, counted here.
    untenanted: int

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def unique_ids(self) -> list[str]:
        """Every record's uniqueId, in record order."""
        return [uid for part in self.parts for uid in part.table.column(UNIQUE_ID).to_pylist()]

    def ingest_records(self) -> list[IngestRecord]:
        """The records as Amberflo's ingest API takes them, meter by meter in event order, typed: built column by
        column in C loops and encoded by msgspec (as dicts, building and encoding them cost ~4x as much)."""
        records: list[IngestRecord] = []
        for part in self.parts:
            table = part.table
            records.extend(
                map(
                    IngestRecord,
                    table.column(CUSTOMER_ID).to_pylist(),
                    repeat(part.meter_api_name),
                    table.column(METER_VALUE).to_pylist(),
                    table.column(METER_TIME).to_pylist(),
                    table.column(UNIQUE_ID).to_pylist(),
                    _present_dimensions(table),
                )
            )
        return records

    def records(self) -> list[dict[str, Any]]:
        """:meth:`ingest_records` as JSON-ready dicts (Amberflo's field names; no ``dimensions`` when none is set)."""
        records: list[dict[str, Any]] = msgspec.to_builtins(self.ingest_records())
        return records


def _present_dimensions(table: pa.Table) -> Iterator[dict[str, str] | None]:
    """Each record's dimensions with a value (None when it has none): the DIMENSIONS struct's non-null fields."""
    if DIMENSIONS not in table.column_names:
        return repeat(None, table.num_rows)
    column = table.column(DIMENSIONS).combine_chunks()
    dims: list[dict[str, str | None] | None] = column.to_pylist()
    fields = column.type.num_fields
    if fields and column.null_count == 0 and all(column.field(i).null_count == 0 for i in range(fields)):
        return iter(cast(list[dict[str, str] | None], dims))  # every record has every dimension: nothing to drop
    return iter([_without_nulls(dim) for dim in dims])


def _without_nulls(dim: dict[str, str | None] | None) -> dict[str, str] | None:
    present = {key: text for key, text in (dim or {}).items() if text is not None}
    return present or None


def meter_records(events: pa.Table, meters: Sequence[Meter]) -> MeterBatch:
    """Apply ``meters`` to ``events`` (metering-event columns): one record per event and meter it matches.

    Column-wise with pyarrow.compute; ``events`` needs the tenant, request id and time columns plus those the meters
    read. The record time is the request's own time (``request_time`` in epoch ms), never when it was processed.

    Raises:
        MeterError: two meters share a name.
        KeyError: ``events`` lacks a column a meter reads.
    """
    check_meters(meters)
    tenant = events.column(TENANT_COLUMN)
    has_tenant = tenanted(tenant)
    untenanted = events.num_rows - int(pc.sum(has_tenant).as_py() or 0)
    time_ms = pc.divide(events.column(TIME_COLUMN).cast(pa.int64()), 1000)
    parts = []
    for meter in meters:
        mask = has_tenant
        for condition in meter.filter:
            mask = pc.and_(mask, _condition_mask(events.column(condition.column), condition))
        if isinstance(meter.value, str):
            value = events.column(meter.value).cast(pa.int64())
            mask = pc.and_(mask, pc.is_valid(value))
        else:
            value = pa.repeat(pa.scalar(meter.value, pa.int64()), events.num_rows)
        columns: dict[str, pa.Array | pa.ChunkedArray] = {
            CUSTOMER_ID: pc.filter(tenant, mask),
            METER_VALUE: pc.filter(value, mask),
            METER_TIME: pc.filter(time_ms, mask),
            UNIQUE_ID: _unique_ids(meter.meter_api_name, pc.filter(events.column(REQUEST_ID_COLUMN), mask)),
        }
        if meter.dimensions:
            dims = [pc.filter(events.column(c), mask).cast(pa.string()).combine_chunks() for c in meter.dimensions]
            columns[DIMENSIONS] = pa.StructArray.from_arrays(dims, names=list(meter.dimensions))
        parts.append(MeterRecords(meter.meter_api_name, pa.table(columns)))
    return MeterBatch(parts=tuple(parts), untenanted=untenanted)


def tenanted(tenant: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Which tenant values are a tenant: not null, not blank and not API Gateway's "-" (never null itself)."""
    no_tenant = pc.match_substring_regex(tenant, NO_TENANT_PATTERN)
    return pc.and_(pc.is_valid(tenant), pc.invert(pc.fill_null(no_tenant, True)))


UsageKey = tuple[str, str, int]
"""(customerId, meterApiName, start of the UTC hour in epoch seconds)."""


def expected_usage(events: pa.Table, meters: Sequence[Meter]) -> dict[UsageKey, int]:
    """What Amberflo should report per customer, meter and UTC hour for ``events`` (from :func:`meter_records`)."""
    return usage_of(meter_records(events, meters), meters)


def usage_of(batch: MeterBatch, meters: Sequence[Meter]) -> dict[UsageKey, int]:
    """Aggregate records per customer, meter and UTC hour the way each meter aggregates (sum, or max)."""
    aggregation = {meter.meter_api_name: meter.aggregation for meter in meters}
    usage: dict[UsageKey, int] = {}
    for part in batch.parts:
        hours = pc.multiply(pc.divide(part.table.column(METER_TIME), _MS_PER_HOUR), 3600)
        keyed = pa.table({"c": part.table.column(CUSTOMER_ID), "h": hours, "v": part.table.column(METER_VALUE)})
        how = aggregation.get(part.meter_api_name, "sum")
        grouped = keyed.group_by(["c", "h"]).aggregate([("v", how)])
        for customer, hour, total in zip(
            grouped.column("c").to_pylist(),
            grouped.column("h").to_pylist(),
            grouped.column(f"v_{how}").to_pylist(),
            strict=True,
        ):
            usage[(customer, part.meter_api_name, hour)] = total
    return usage


# -- SQL ------------------------------------------------------------------------------------------------------------
# DuckDB and sqlglot are imported where they are used: the stager Lambda applies meters (above) and its asset leaves
# both out (~70 MB, a quarter of Lambda's package limit).


def meter_predicate_sql(meter: Meter) -> exp.Expr:
    """The events a meter counts, as a sqlglot condition: a tenant (see :func:`tenanted`), every filter, and a
    non-null value column.

    Values become AST literals, never pasted text, so any dialect renders them quoted correctly.
    """
    from sqlglot import exp

    tenant = exp.column(TENANT_COLUMN)
    no_tenant = exp.RegexpLike(this=tenant.copy(), expression=exp.Literal.string(NO_TENANT_PATTERN))
    terms: list[exp.Expr] = [tenant.is_(exp.null()).not_(), no_tenant.not_()]
    for condition in meter.filter:
        terms.append(_condition_sql(condition))
    value = meter.value
    if isinstance(value, str) and not any(c.column == value and c.op == "is_not_null" for c in meter.filter):
        terms.append(exp.column(value).is_(exp.null()).not_())
    return exp.and_(*terms)


def lake_usage_query(meters: Sequence[Meter], source: exp.Expr | str) -> exp.Query:
    """SQL over ``source`` (metering-event rows) giving customer_id, meter, hour_epoch_s, usage per meter and hour.

    ``request_time`` is read with DuckDB's ``epoch_ms``; render the query for DuckDB.
    """
    from sqlglot import exp

    check_meters(meters)
    relation = exp.to_table(source) if isinstance(source, str) else source
    hour = exp.Mul(
        this=exp.IntDiv(
            this=exp.Anonymous(this="epoch_ms", expressions=[exp.column(TIME_COLUMN)]),
            expression=exp.Literal.number(_MS_PER_HOUR),
        ),
        expression=exp.Literal.number(3600),
    )
    selects: list[exp.Select] = []
    for meter in meters:
        value: exp.Expr = exp.column(meter.value) if isinstance(meter.value, str) else exp.Literal.number(meter.value)
        aggregate = exp.Max(this=value) if meter.aggregation == "max" else exp.Sum(this=value)
        selects.append(
            exp.select(
                exp.alias_(exp.column(TENANT_COLUMN), "customer_id"),
                exp.alias_(exp.Literal.string(meter.meter_api_name), "meter"),
                exp.alias_(hour, "hour_epoch_s"),
                exp.alias_(aggregate, "usage"),
            )
            .from_(relation.copy())
            .where(meter_predicate_sql(meter))
            .group_by(exp.Literal.number(1), exp.Literal.number(3))
        )
    if not selects:
        raise MeterError("no meters to aggregate")
    query: exp.Query = selects[0]
    for select in selects[1:]:
        query = exp.union(query, select, distinct=False)
    return query


# -- internals ------------------------------------------------------------------------------------------------------


def _condition_mask(column: pa.ChunkedArray | pa.Array, condition: Condition) -> pa.ChunkedArray | pa.Array:
    """Rows passing ``condition``; null is false except for is_null (SQL's WHERE semantics)."""
    op = condition.op
    if op == "is_null":
        return pc.is_null(column)
    if op == "is_not_null":
        return pc.is_valid(column)
    if op in _SET_OPS:
        assert isinstance(condition.value, tuple)
        value_set = pa.array(condition.value, type=column.type)
        hit = pc.is_in(column, value_set=value_set)
        result = hit if op == "in" else pc.invert(hit)
    else:
        compare = {"=": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater}
        function = compare.get(op, pc.greater_equal)
        result = function(column, pa.scalar(condition.value, type=column.type))
    return pc.and_(pc.is_valid(column), pc.fill_null(result, False))


def _unique_ids(meter_api_name: str, request_ids: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``<meter>:<request_id>``, or ``<meter>#<sha256>`` where that would exceed UNIQUE_ID_MAX bytes."""
    request_ids = request_ids.cast(pa.string())
    ids = pc.binary_join_element_wise(pa.scalar(meter_api_name, pa.string()), request_ids, ":")
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    too_long = pc.greater(pc.binary_length(ids), UNIQUE_ID_MAX)
    if not pc.any(too_long).as_py():
        return ids
    long_ids = pc.filter(request_ids, too_long).to_pylist()
    hashed = pa.array([unique_id(meter_api_name, rid) for rid in long_ids], pa.string())
    return pc.replace_with_mask(ids, too_long, hashed)


def _condition_sql(condition: Condition) -> exp.Expr:
    from sqlglot import exp

    column = exp.column(condition.column)
    op = condition.op
    if op == "is_null":
        return column.is_(exp.null())
    if op == "is_not_null":
        return column.is_(exp.null()).not_()
    if op in _SET_OPS:
        assert isinstance(condition.value, tuple)
        within = column.isin(*(_literal(item) for item in condition.value))
        return within if op == "in" else within.not_()
    assert condition.value is not None
    assert not isinstance(condition.value, tuple)
    right = _literal(condition.value)
    binary: dict[str, type[exp.Binary]] = {
        "=": exp.EQ,
        "!=": exp.NEQ,
        "<": exp.LT,
        "<=": exp.LTE,
        ">": exp.GT,
        ">=": exp.GTE,
    }
    return binary[op](this=column, expression=right)


def _literal(value: int | str) -> exp.Expr:
    from sqlglot import exp

    return exp.Literal.number(value) if isinstance(value, int) else exp.Literal.string(value)
