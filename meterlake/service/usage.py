"""Usage from the lake: a usage query answered by one SQL aggregate over the table that holds the meter's events.

* An **event meter** reads ``meter_events``: its rows of the meter, by their own time (``meter_time``); the customer
  is ``customer_id``, a dimension is a key of the ``dimensions`` map, the value ``meter_value``.
* A **request meter** reads the access-log table with the config meter's own predicate
  (:func:`meterlake.meters.meter_predicate_sql`: a tenant, the meter's filter): the customer is ``tenant_id``, a
  dimension one of the meter's dimension columns, the value the meter's value (a constant or a column).

Both bucket by UTC HOUR, DAY, WEEK (Monday) or MONTH and aggregate with SUM, COUNT, MIN, MAX or UNIQUE_COUNT
(distinct values of the meter's first dimension), the meter's own unless the query names one, per group and bucket
and over the whole range. Events inside the window only, those matching an active
cancellation rule excluded. Duplicates never reach the tables (the delivery streams drop them before commit), so
nothing is deduplicated here, as in every sql/ query. Every value of the query is bound, never pasted into the SQL:
what the SQL text holds are this module's own column names and the config meters' definitions.

Locally it runs in the local queries' DuckDB sandbox over the tables' current Parquet files (files are chosen by
Iceberg's partition and column statistics for the window): the window and the rules compare stored instants with
bound ones, and only the bucket reads the time as a naive UTC timestamp (see ``meterlake.lake.query``: no ICU work per
row). SUM, COUNT, MIN and MAX over the whole range are their buckets' combined; UNIQUE_COUNT's is a grouping set of its
own. ``sql/meter_events/usage.sql`` is the same aggregate for event meters in Athena's dialect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlglot
from pyiceberg import expressions
from pyiceberg.expressions import And, BooleanExpression
from pyiceberg.table import Table

from meterlake.amberflo.api import (
    CUSTOMER_KEY,
    Aggregation,
    GroupUsage,
    RequestError,
    UsageQuery,
    usage_report,
)
from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.lake.query import (
    SOURCE_DIALECT,
    SQL_DIR,
    TABLE_PLACEHOLDER,
    QueryResult,
    UnsupportedTableStateError,
    bind_params,
    load_query,
    local_data_files,
    naive_utc_relation,
    plan_data_files,
    prepare,
    read_table_files,
    sandboxed_cursor,
)
from meterlake.meters import TENANT_COLUMN, TIME_COLUMN, Meter, meter_predicate_sql
from meterlake.schema import METER_EVENTS_TABLE, METER_INGESTED_AT_COLUMN, METER_TIME_COLUMN
from meterlake.service.cancellation import CancellationRule, CancellationRules
from meterlake.service.registry import MeterRegistry, RegisteredMeter

#: The Athena query of event-meter usage (over meter_events, which it names).
EVENT_USAGE_SQL = SQL_DIR / "meter_events" / "usage.sql"
#: DuckDB's date_trunc parts of the usage intervals (a WEEK starts on Monday, as ISO and Amberflo have it).
_TRUNCATE = {"HOUR": "hour", "DAY": "day", "WEEK": "week", "MONTH": "month"}


@dataclass(frozen=True, slots=True)
class _Source:
    """How one kind of meter's events are read: table columns and the SQL of customer, dimension and value."""

    table: Table
    time_column: str
    customer: str
    predicate: str
    value: str
    #: The SQL of a dimension's value by name (binding what it needs in the parameters given).
    dimension: Callable[[str, dict[str, object]], str]
    row_filter: BooleanExpression | None


class UsageEngine:
    """Answers usage queries from the lake; ``before_read`` runs first (e.g. committing what ingest acknowledged).

    ``rules`` None counts every event (what was forwarded before any rule, for a dry run's reconciliation).
    """

    def __init__(
        self,
        *,
        config: Config,
        data_dir: DataDir,
        registry: MeterRegistry,
        rules: CancellationRules | None,
        before_read: Callable[[], object] | None = None,
    ) -> None:
        self._config = config
        self._data_dir = data_dir
        self._registry = registry
        self._rules = rules
        self._before_read = before_read
        self._config_meters = {meter.meter_api_name: meter for meter in config.meters}

    def meter(self, meter_api_name: str) -> RegisteredMeter:
        """The meter a query names.

        Raises:
            RequestError: (404) no meter has this name.
        """
        meter = self._registry.by_name(meter_api_name)
        if meter is None:
            raise RequestError(f"meterApiName {meter_api_name!r} is not a meter", status=404)
        return meter

    def report(self, query: UsageQuery, *, zero_fill: bool) -> dict[str, Any]:
        """Amberflo's usage report for ``query``, computed from the lake.

        Raises:
            RequestError: (404) unknown meter; (400) a groupBy or filter key the meter does not have, UNIQUE_COUNT
                for a meter without dimensions, or a range of too many buckets.
        """
        meter = self.meter(query.meter_api_name)
        aggregation = query.aggregation or meter.default_aggregation
        groups = self.groups(meter, query, aggregation)
        return usage_report(query, groups, aggregation=aggregation, zero_fill=zero_fill)

    def has_events(self, meter: RegisteredMeter) -> bool:
        """Whether the lake holds any event of an event meter (cancelled or not), what ingest acknowledged included."""
        if self._before_read is not None:
            self._before_read()
        table = ensure_meter_events_table(open_catalog(self._data_dir), self._config)
        row_filter = _predicate("EqualTo", "meter_api_name", meter.meter_api_name)
        scan = table.scan(row_filter=row_filter, selected_fields=("meter_api_name",), limit=1)
        return bool(scan.to_arrow().num_rows)

    def groups(self, meter: RegisteredMeter, query: UsageQuery, aggregation: Aggregation) -> list[GroupUsage]:
        """Each group's aggregate over the range and per bucket with events (the lake side of a report)."""
        if self._before_read is not None:
            self._before_read()
        catalog = open_catalog(self._data_dir)
        params: dict[str, object] = {}
        source = self._source(meter, catalog, params)
        for key in (*query.group_by, *query.filters):
            self._check_key(meter, key)
        start = datetime.fromtimestamp(query.start_s, UTC)
        end = datetime.fromtimestamp(query.end_s, UTC)
        row_filter = And(
            _predicate("GreaterThanOrEqual", source.time_column, start.isoformat()),
            _predicate("LessThan", source.time_column, end.isoformat()),
        )
        if source.row_filter is not None:
            row_filter = And(row_filter, source.row_filter)
        measure = _aggregate_sql(aggregation, meter, source, params)
        files = _data_files(source.table, row_filter)
        if not files:
            return []
        params["files"] = files
        params["start"] = start
        params["end"] = end
        params["unit"] = _TRUNCATE[query.interval]

        def key_sql(key: str) -> str:
            return source.customer if key == CUSTOMER_KEY else source.dimension(key, params)

        # The window and the rules compare the stored TIMESTAMPTZ with bound aware instants (no ICU work per row,
        # and Parquet statistics can skip row groups); only the bucket reads the time as a naive UTC TIMESTAMP.
        conditions = [source.predicate, f"{source.time_column} >= $start", f"{source.time_column} < $end"]
        for key, values in sorted(query.filters.items()):
            conditions.append(f"{key_sql(key)} IN ({_bind_list(params, values)})")
        for rule in [] if self._rules is None else self._rules.rules(meter_api_name=meter.meter_api_name):
            conditions.append(f"NOT ({_rule_sql(rule, params, key_sql)})")
        groups = [key_sql(key) for key in query.group_by]
        bucket = f"date_trunc($unit, make_timestamp(epoch_us({source.time_column})))"
        selected = [f"{sql} AS g{i}" for i, sql in enumerate(groups)]
        grouped = ", ".join([*(f"g{i}" for i in range(len(groups))), "bucket"])
        if aggregation == "UNIQUE_COUNT":
            # Distinct counts do not add up over buckets: the whole range is its own grouping set.
            whole = ", ".join(f"g{i}" for i in range(len(groups)))
            selected += [f"{bucket} AS bucket", "grouping(bucket) AS whole", f"{measure} AS value"]
            grouping = f"GROUPING SETS (({grouped}), ({whole}))"
        else:
            selected += [f"{bucket} AS bucket", "0 AS whole", f"{measure} AS value"]
            grouping = grouped
        where = " AND ".join(f"({condition})" for condition in conditions)
        # Columns by field id, as Iceberg reads them: a meter on a column added later reads older files' as null.
        files_sql = read_table_files(sqlglot.exp.Placeholder(this="files"), source.table.schema()).sql(dialect="duckdb")
        sql = (
            f"SELECT {', '.join(selected)} "  # noqa: S608 (our own column names; every value is a $parameter)
            f"FROM {files_sql} WHERE {where} GROUP BY {grouping}"
        )
        con = sandboxed_cursor(files)
        try:
            rows = con.execute(sql, params).fetchall()
        finally:
            con.close()
        return _assemble(rows, len(groups), aggregation)

    def _source(self, meter: RegisteredMeter, catalog: Any, params: dict[str, object]) -> _Source:
        if meter.kind == "event":
            params["meter"] = meter.meter_api_name
            return _Source(
                table=ensure_meter_events_table(catalog, self._config),
                time_column=METER_TIME_COLUMN,
                customer="customer_id",
                predicate="meter_api_name = $meter",
                value="meter_value",
                dimension=lambda name, params: f"map_extract_value(dimensions, {_bind(params, name)})",
                row_filter=_predicate("EqualTo", "meter_api_name", meter.meter_api_name),
            )
        config_meter = self._config_meters[meter.meter_api_name]
        return _Source(
            table=ensure_metering_table(catalog, self._config),
            time_column=TIME_COLUMN,
            customer=TENANT_COLUMN,
            predicate=meter_predicate_sql(config_meter).sql(dialect="duckdb"),
            value=_request_value(config_meter),
            dimension=lambda name, _params: _request_dimension(config_meter, name),
            row_filter=None,
        )

    def _check_key(self, meter: RegisteredMeter, key: str) -> None:
        if key == CUSTOMER_KEY or meter.kind == "event":
            return
        if key not in meter.dimensions:
            raise RequestError(
                f"groupBy/filter key {key!r}: request meter {meter.meter_api_name!r} has customerId and its "
                f"dimensions {list(meter.dimensions)}"
            )


def _request_value(meter: Meter) -> str:
    return f'"{meter.value}"' if isinstance(meter.value, str) else str(int(meter.value))


def _request_dimension(meter: Meter, name: str) -> str:
    """The meter's own dimension column named ``name`` as text; only the config's column names reach the SQL. A name
    that is not one (a rule's, after the config dropped the dimension) is NULL, which no filter value matches."""
    column = next((column for column in meter.dimensions if column == name), None)
    return "NULL" if column is None else f'CAST("{column}" AS VARCHAR)'


def _aggregate_sql(aggregation: Aggregation, meter: RegisteredMeter, source: _Source, params: dict[str, object]) -> str:
    if aggregation == "COUNT":
        return "count(*)"
    if aggregation == "UNIQUE_COUNT":
        if not meter.dimensions:
            raise RequestError(
                f"aggregation UNIQUE_COUNT counts distinct values of a meter's first dimension; meter "
                f"{meter.meter_api_name!r} has none"
            )
        first = meter.dimensions[0]
        return f"count(DISTINCT {source.dimension(first, params)})"
    return f"{aggregation.lower()}({source.value})"


def _rule_sql(rule: CancellationRule, params: dict[str, object], key_sql: Callable[[str], str]) -> str:
    start = _bind(params, datetime.fromtimestamp(rule.start_s, UTC))
    end = _bind(params, datetime.fromtimestamp(rule.end_s, UTC))
    terms = [f"{METER_INGESTED_AT_COLUMN} >= {start}", f"{METER_INGESTED_AT_COLUMN} < {end}"]
    for key, values in sorted(rule.filters.items()):
        terms.append(f"coalesce({key_sql(key)} IN ({_bind_list(params, values)}), false)")
    return " AND ".join(terms)


def _bind(params: dict[str, object], value: object) -> str:
    """A new named parameter holding ``value``; returns its placeholder."""
    name = f"p{len(params)}"
    params[name] = value
    return f"${name}"


def _bind_list(params: dict[str, object], values: Sequence[str] | frozenset[str]) -> str:
    return ", ".join(_bind(params, value) for value in sorted(values))


def _predicate(name: str, column: str, value: str) -> BooleanExpression:
    """An Iceberg predicate ``column <name> value`` (pyiceberg's predicates are typed for their pydantic fields)."""
    made: BooleanExpression = getattr(expressions, name)(column, value)
    return made


def _data_files(table: Table, row_filter: BooleanExpression) -> list[str]:
    """The local Parquet files of the table's current snapshot that may hold rows passing ``row_filter``, planned as
    the query runner plans them (:func:`plan_data_files`: without pyiceberg's per-file residuals).

    Raises:
        RequestError: (500) the snapshot has delete files, which reading the files directly would ignore, or files
            that are not local.
    """
    try:
        return local_data_files(plan_data_files(table, row_filter))
    except UnsupportedTableStateError as exc:  # the problem, not the local path, goes in the answer
        raise RequestError(exc.problem, status=500) from None


def _assemble(rows: Sequence[Sequence[Any]], width: int, aggregation: Aggregation) -> list[GroupUsage]:
    """GroupUsage per group from rows (g0..gN, bucket, whole, value). A group's value over the range is its own row
    (``whole``) for UNIQUE_COUNT, else the buckets' sum (SUM, COUNT), least (MIN) or greatest (MAX)."""
    totals: dict[tuple[str | None, ...], float] = {}
    buckets: dict[tuple[str | None, ...], dict[int, float]] = {}
    for row in rows:
        key = tuple(None if value is None else str(value) for value in row[:width])
        bucket, whole, value = row[width], row[width + 1], row[width + 2]
        number = 0.0 if value is None else float(value)
        if whole:
            totals[key] = number
        else:
            moment = bucket.replace(tzinfo=UTC) if bucket.tzinfo is None else bucket
            buckets.setdefault(key, {})[int(moment.timestamp())] = number
    if aggregation != "UNIQUE_COUNT":
        combine = {"MIN": min, "MAX": max}.get(aggregation, sum)
        totals = {key: float(combine(values.values())) for key, values in buckets.items()}
    return [GroupUsage(key, totals.get(key, 0.0), buckets.get(key, {})) for key in totals]


def run_event_usage_sql(params: Mapping[str, str], *, config: Config, data_dir: DataDir) -> QueryResult:
    """Run ``sql/meter_events/usage.sql`` (Athena's dialect) locally with DuckDB over meter_events' current files,
    as ``meterlake query`` runs the access-log queries: sandboxed, parameters bound, timestamps read as naive UTC.

    Raises:
        QueryError: a parameter is missing or malformed, or the SQL cannot be prepared or run.
    """
    query = load_query(str(EVENT_USAGE_SQL))
    bound = bind_params(query, params)
    # The file names its own table; the shared preparation swaps the access-log queries' placeholder name.
    tree = sqlglot.parse_one(query.sql, read=SOURCE_DIALECT)
    for named in tree.find_all(sqlglot.exp.Table):
        if named.name == METER_EVENTS_TABLE and not named.args.get("db"):
            named.set("this", sqlglot.exp.to_identifier(TABLE_PLACEHOLDER))
    table = ensure_meter_events_table(open_catalog(data_dir), config)
    files = _data_files(table, expressions.AlwaysTrue())
    if not files:
        return QueryResult(columns=[], rows=[])
    schema = table.schema()
    relation = naive_utc_relation(read_table_files(files, schema), schema.as_arrow())
    prepared = prepare(tree.sql(dialect=SOURCE_DIALECT), dialect="duckdb", table=relation, params=bound)
    con = sandboxed_cursor(files)
    try:
        cursor = con.execute(prepared.sql, prepared.parameters)
        columns = [column[0] for column in cursor.description or []]
        rows = [tuple(row) for row in cursor.fetchall()]
    finally:
        con.close()
    return QueryResult(columns=columns, rows=rows)
