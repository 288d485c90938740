"""Usage SQL: load the Athena (Trino) queries in ``sql/``, bind their parameters and run them locally with DuckDB.

Each ``sql/*.sql`` file is one query over the bare table name ``metering_events``, with named ``:name`` parameters
declared in its header (``-- @param <name> <timestamp|integer|string> <description> [(default: v) | (optional)]``).
:func:`prepare` rewrites the table reference on sqlglot's AST and turns the parameters into placeholders: for DuckDB
``$name`` with a dict, for Athena positional ``?`` with ExecutionParameters. Values are bound, never pasted into SQL.

The queries do not deduplicate: meterlake dedups at write (the local delivery stream drops committed request_ids;
Firehose upserts on its request_id and request_time unique keys), because a ``GROUP BY request_id`` in every query
costs ~6x.

Locally, DuckDB's TIMESTAMPTZ operations go through ICU even in a UTC session (measured on 10M events:
``CAST(request_time AS date)`` alone costs ~0.5 s). So the local relation exposes timestamp columns as naive UTC
TIMESTAMPs, ``from_iso8601_timestamp`` binds to the same, and result timestamps are tagged UTC again; Trino's
``approx_percentile`` runs as DuckDB's exact ``quantile_disc`` (nearest rank), ~0.3 s cheaper than its t-digest.

Locally, DuckDB reads only the data files the query can need: :func:`scan_filter` turns the time window and tenant
(any comparison of a column with a constant in the WHERE clause of the SELECT that reads the table) into an Iceberg
row filter, and pyiceberg plans the scan with it, skipping manifests, partitions (UTC days) and files whose column
bounds cannot match, as Athena prunes on the same predicates. The SQL still applies its whole WHERE clause, so the
result is the full scan's.

A .sql file can be anyone's (``meterlake query FILE.sql``), so only a query (SELECT) runs, and locally it runs in a
sandbox (:func:`sandboxed_duckdb`): DuckDB may read the table's current data files and nothing else, write nothing,
and cannot be reconfigured by the SQL. Results are shown with :func:`printable` text, never as markup.
"""

from __future__ import annotations

import csv
import ctypes
import enum
import functools
import io
import json
import os
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar, cast

import duckdb
import pyarrow as pa
import sqlglot
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import (
    AlwaysFalse,
    AlwaysTrue,
    And,
    BooleanExpression,
    EqualTo,
    GreaterThan,
    GreaterThanOrEqual,
    In,
    IsNull,
    LessThan,
    LessThanOrEqual,
    NotNull,
    Or,
)
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.manifest import DataFileContent, ManifestEntry
from pyiceberg.schema import Schema
from pyiceberg.table import FileScanTask, ManifestGroupPlanner, Table
from pyiceberg.table.delete_file_index import DeleteFileIndex
from pyiceberg.table.metadata import INITIAL_SEQUENCE_NUMBER
from pyiceberg.types import (
    IcebergType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    TimestampType,
    TimestamptzType,
)
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text
from sqlglot import exp
from sqlglot.errors import ErrorLevel, SqlglotError

from meterlake.aws.stacks import ATHENA_DEFAULT_CATALOG, S3_TABLES_CATALOG
from meterlake.config import Config
from meterlake.lake.catalog import current_metadata_location, ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.schema import METERING_EVENT_SCHEMA
from meterlake.window import WindowError, parse_instant, require_ordered

#: The directory of the project's queries.
SQL_DIR = (
    # An installed wheel carries the repository's sql/ as meterlake/sql (pyproject.toml); a checkout reads it in place.
    Path(__file__).parents[1] / "sql"
    if (Path(__file__).parents[1] / "sql").is_dir()
    else Path(__file__).parents[2] / "sql"
)

#: The table name the SQL files are written against; :func:`prepare` replaces it.
TABLE_PLACEHOLDER = "metering_events"

#: The dialect the SQL files are written in (Athena's engine).
SOURCE_DIALECT = "trino"

_PARAM_LINE = re.compile(r"^--\s*@param\b(?P<rest>.*)$")
_PARAM_DECL = re.compile(r"^\s+(?P<name>[A-Za-z_]\w*)\s+(?P<type>\w+)\s+(?P<doc>.*?)\s*$")
_DEFAULT = re.compile(r"\((?:default:\s*(?P<default>[^)]*?)|(?P<optional>optional))\s*\)$")
#: An integer parameter's lower bound, declared in its description: ``(min: 1)``.
_MINIMUM = re.compile(r"\(min:\s*(?P<minimum>-?\d+)\s*\)")
#: The timestamp parameters that bound a query's window: ``end`` must be after ``start`` (meterlake.window).
WINDOW_PARAMS = ("start", "end")
_ATHENA_NULL = "NULL"
_EMPTY_RELATION = "empty_metering_events"
#: The DuckDB parameter the local runner binds the data files to read to; no query may declare it.
_FILES_PARAM = "meterlake_data_files"
#: Marks each placeholder while rendering so their textual order can be read back from the tokens.
_ORDER_TAG = "meterlake_param_"
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class QueryError(Exception):
    """Base of every failure to find, prepare or run a query; the message is one line naming the problem."""


class UnknownQueryError(QueryError):
    """No query has this name, or the path is not a readable .sql file."""

    def __init__(self, name_or_path: str, known: Sequence[str]) -> None:
        self.name_or_path = name_or_path
        super().__init__(f"unknown query {name_or_path!r}; known: {', '.join(known) or '(none)'}")


class QueryDefinitionError(QueryError):
    """A .sql file is malformed: not UTF-8, bad @param line, undeclared placeholder, not one query (SELECT), or
    untranslatable SQL."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


class QueryParamError(QueryError):
    """A ``--param`` is unknown, missing, malformed or not of its declared type."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        super().__init__(f"parameter {name!r}: {problem}")


class UnsupportedTableStateError(QueryError):
    """The table holds something the local runner cannot read correctly (delete files, non-local data files)."""

    def __init__(self, location: str, problem: str) -> None:
        self.location = location
        self.problem = problem
        super().__init__(f"{location}: {problem}")


class QueryExecutionError(QueryError):
    """DuckDB rejected or failed the prepared query."""

    def __init__(self, query: str, detail: str) -> None:
        self.query = query
        super().__init__(f"query {query!r} failed: {detail}")


class ParamType(enum.Enum):
    """The types a query parameter can be declared with."""

    TIMESTAMP = "timestamp"
    INTEGER = "integer"
    STRING = "string"


#: A parameter's value once validated: the ISO-8601 UTC text of a timestamp, an int, a str, or None (optional).
BoundValue = str | int | None


@dataclass(frozen=True, slots=True)
class QueryParam:
    """One declared parameter: name, type, description and default (None with ``optional``: bound as NULL)."""

    name: str
    type: ParamType
    description: str
    default: str | None
    optional: bool
    #: The smallest value an integer parameter takes (``(min: N)`` in its declaration); None: any integer.
    minimum: int | None = None

    @property
    def required(self) -> bool:
        """Whether the caller must give a value."""
        return self.default is None and not self.optional


@dataclass(frozen=True, slots=True)
class QueryFile:
    """One query of ``sql/``: its name, file, one-line description, declared parameters and SQL text."""

    name: str
    path: Path
    description: str
    params: tuple[QueryParam, ...]
    sql: str


@dataclass(frozen=True, slots=True)
class PreparedQuery:
    """SQL ready for an engine plus its parameter values: a dict for DuckDB, an ordered list for Athena."""

    sql: str
    parameters: dict[str, BoundValue] | list[str]


@dataclass(frozen=True, slots=True)
class QueryResult:
    """A query's result: column names and rows (timestamps are timezone-aware UTC datetimes)."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    arrow: pa.Table | None = None
    #: Locally, the data files the query read and their bytes (after pruning); None from Athena.
    files_read: int | None = None
    bytes_read: int | None = None

    def to_arrow(self) -> pa.Table:
        """The result as an Arrow table: the one DuckDB produced, else built from the rows."""
        if self.arrow is not None:
            return self.arrow
        return pa.table({column: [row[i] for row in self.rows] for i, column in enumerate(self.columns)})


def list_queries() -> list[QueryFile]:
    """Every query in ``sql/``, sorted by name.

    Raises:
        QueryDefinitionError: a file in ``sql/`` is malformed.
    """
    return [_read_query_file(path) for path in sorted(SQL_DIR.glob("*.sql"))]


def load_query(name_or_path: str) -> QueryFile:
    """Load a query by its name in ``sql/`` (without ``.sql``) or from a path to a ``.sql`` file.

    Raises:
        UnknownQueryError: neither a known name nor an existing .sql file.
        QueryDefinitionError: the file is malformed.
    """
    candidate = Path(name_or_path)
    if candidate.suffix == ".sql" and candidate.is_file():
        return _read_query_file(candidate)
    named = SQL_DIR / f"{name_or_path}.sql"
    if re.fullmatch(r"\w+", name_or_path) and named.is_file():
        return _read_query_file(named)
    raise UnknownQueryError(name_or_path, [path.stem for path in sorted(SQL_DIR.glob("*.sql"))])


def parse_param_args(values: Sequence[str]) -> dict[str, str]:
    """Turn repeated ``--param k=v`` options into a dict (the value may itself contain '=').

    Raises:
        QueryParamError: an option has no '=' or an empty name, or a name is given twice.
    """
    params: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise QueryParamError(item, "expected name=value")
        if name in params:
            raise QueryParamError(name, "given more than once")
        params[name] = value
    return params


def bind_params(query: QueryFile, raw: Mapping[str, str], *, now: datetime | None = None) -> dict[str, BoundValue]:
    """Validate ``raw`` text values against the query's declarations and type them, filling defaults.

    Timestamps are ISO-8601, with or without a zone (naive means UTC), and come back as UTC ISO text ending in 'Z';
    ``now`` is the timestamp default ``now`` resolves to (the current time when not given).

    Raises:
        QueryParamError: an unknown name, a missing required value, or a value not of the declared type.
    """
    declared = {param.name: param for param in query.params}
    for name in raw:
        if name not in declared:
            raise QueryParamError(name, f"not a parameter of {query.name!r}; it takes: {', '.join(declared)}")
    bound: dict[str, BoundValue] = {}
    for param in query.params:
        if param.name in raw:
            bound[param.name] = _convert(param, raw[param.name], now)
        elif param.default is not None:
            bound[param.name] = _convert(param, param.default, now)
        elif param.optional:
            bound[param.name] = None
        else:
            raise QueryParamError(param.name, f"required by {query.name!r} ({param.type.value}: {param.description})")
    start, end = (bound.get(name) for name in WINDOW_PARAMS)
    if isinstance(start, str) and isinstance(end, str):
        try:
            require_ordered(
                parse_instant(start, name="start"), parse_instant(end, name="end"), start_name="start", end_name="end"
            )
        except WindowError as exc:
            raise QueryParamError("end", str(exc)) from None
    return bound


def prepare(
    sql: str,
    *,
    dialect: Literal["duckdb", "athena"],
    table: exp.Expr | str,
    params: Mapping[str, BoundValue],
) -> PreparedQuery:
    """Rewrite ``metering_events`` to ``table`` and translate one Trino statement for DuckDB or Athena.

    ``table`` is a table name (``db.table``) or an expression such as DuckDB's ``read_parquet([...])``. DuckDB gets
    ``$name`` placeholders and a dict; Athena gets ``?`` and the values in placeholder order as SQL literal text
    (strings quoted, ``NULL`` for an absent optional value), which is what ExecutionParameters expects. For DuckDB,
    ``from_iso8601_timestamp`` yields a naive UTC TIMESTAMP and ``approx_percentile`` the exact ``quantile_disc``
    (see the module doc), so the session must run in UTC.

    Raises:
        QueryDefinitionError: the SQL does not parse, is not one statement, does not read ``metering_events``,
            uses a placeholder without a value, or cannot be translated.
    """
    tree = _parse_statement(sql, "<sql>")
    replaced = False

    def swap_table(node: exp.Expr) -> exp.Expr:
        nonlocal replaced
        if not (isinstance(node, exp.Table) and node.name == TABLE_PLACEHOLDER and not node.args.get("db")):
            return node
        replaced = True
        target = exp.to_table(table, dialect=SOURCE_DIALECT) if isinstance(table, str) else table.copy()
        if isinstance(target, exp.Query):
            target = target.subquery()
        elif not isinstance(target, exp.Table | exp.Subquery):
            target = exp.Table(this=target)
        # Keep the name the SQL knows the table by, so qualified columns (metering_events.status) still resolve.
        alias = node.args.get("alias")
        target.set("alias", alias.copy() if alias else exp.TableAlias(this=exp.to_identifier(TABLE_PLACEHOLDER)))
        return target

    # The parse is this call's own copy: transform it in place.
    tree = tree.transform(swap_table, copy=False)
    if not replaced:
        raise QueryDefinitionError("<sql>", f"does not read from {TABLE_PLACEHOLDER}")
    missing = sorted({p.name for p in tree.find_all(exp.Placeholder)} - params.keys())
    if missing:
        raise QueryDefinitionError("<sql>", f"no value for placeholder(s) {', '.join(':' + m for m in missing)}")
    if dialect == "duckdb":
        used = {p.name for p in tree.find_all(exp.Placeholder)}
        tree = tree.transform(_duckdb_equivalent, copy=False)
        return PreparedQuery(_render(tree, "duckdb"), {name: params[name] for name in sorted(used)})
    order = _placeholder_order(tree)
    positional = tree.transform(lambda node: exp.Placeholder() if isinstance(node, exp.Placeholder) else node)
    return PreparedQuery(_render(positional, SOURCE_DIALECT), [_athena_literal(params[name]) for name in order])


class TableBucketUnknownError(QueryError):
    """An S3 table is queried on Athena without the name of the table bucket that holds it."""


def athena_catalog(config: Config, *, table_bucket: str | None = None) -> str:
    """The Athena catalog of the metering table: Glue's own, or ``s3tablescatalog/<bucket>`` for an S3 table.

    Raises:
        TableBucketUnknownError: the table is an S3 table and ``table_bucket`` is not given.
    """
    if config.s3_tables is None:
        return ATHENA_DEFAULT_CATALOG
    if table_bucket is None:
        raise TableBucketUnknownError(
            f"the metering table is an S3 table ({config.database_name}.{config.table_name}): its table bucket's "
            "name is needed to query it on Athena"
        )
    return f"{S3_TABLES_CATALOG}/{table_bucket}"


def athena_table(config: Config, *, table_bucket: str | None = None) -> exp.Table:
    """The metering-events table as Athena names it: ``"<database>"."<table>"``, or for an S3 table
    ``"s3tablescatalog/<bucket>"."<namespace>"."<table>"`` (a named query has no catalog of its own).

    Raises:
        TableBucketUnknownError: the table is an S3 table and ``table_bucket`` is not given.
    """
    catalog = None if config.s3_tables is None else athena_catalog(config, table_bucket=table_bucket)
    return exp.table_(config.table_name, db=config.database_name, catalog=catalog, quoted=True)


def run_local_query(
    query: QueryFile, params: Mapping[str, str], *, config: Config, data_dir: DataDir, prune: bool = True
) -> QueryResult:
    """Run a query over the local table's current snapshot with DuckDB (UTC session, all cores), sandboxed: the SQL
    can read the snapshot's data files and no other file, and can write none (see :func:`sandboxed_duckdb`).

    With ``prune`` (the default) only the data files :func:`scan_filter` lets through are read; without it, every
    data file of the snapshot (the result is the same, only slower).

    Raises:
        QueryParamError: a parameter is unknown, missing or malformed.
        UnsupportedTableStateError: the snapshot has delete files or data files that are not local.
        QueryDefinitionError: the query cannot be prepared for DuckDB.
        QueryExecutionError: DuckDB failed running it, or refused a file it reads that is not the table's.
    """
    bound = bind_params(query, params)
    if _FILES_PARAM in bound:
        raise QueryParamError(_FILES_PARAM, "the name is reserved for the data files the query reads")
    table = _current_table(data_dir, config)
    row_filter = scan_filter(query.sql, bound) if prune else AlwaysTrue()
    tasks = plan_data_files(table, row_filter)
    files = local_data_files(tasks)
    statement = _local_statement(query.sql, _SchemaKey(table.schema()), frozenset(bound), files=bool(files))
    values: dict[str, object] = {name: bound[name] for name in statement.used if name != _FILES_PARAM}
    con = sandboxed_cursor(files)
    try:
        if files:
            values[_FILES_PARAM] = files
        else:
            # An empty relation that still has the table's columns and types.
            con.register(_EMPTY_RELATION, table.schema().as_arrow().empty_table())
        try:
            arrow = _engine_types_to_table_types(con.sql(statement.sql, params=values).to_arrow_table())
        except duckdb.Error as exc:
            raise QueryExecutionError(query.name, str(exc).splitlines()[0]) from exc
    finally:
        con.close()
    columns = list(arrow.column_names)
    rows = list(zip(*(column.to_pylist() for column in arrow.columns), strict=True)) if arrow.num_rows else []
    bytes_read = sum(task.file.file_size_in_bytes for task in tasks)
    return QueryResult(columns=columns, rows=rows, arrow=arrow, files_read=len(files), bytes_read=bytes_read)


@dataclass(frozen=True, slots=True, eq=False)
class _SchemaKey:
    """A table schema as a cache key (pyiceberg's Schema is not hashable): equal when the schemas are."""

    schema: Schema

    def __hash__(self) -> int:
        return hash(tuple(self.schema.fields))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SchemaKey) and self.schema == other.schema


@dataclass(frozen=True, slots=True)
class _LocalStatement:
    """A query as DuckDB runs it over the local table, and the placeholders it binds."""

    sql: str
    used: frozenset[str]


@functools.lru_cache(maxsize=64)
def _local_statement(sql: str, schema: _SchemaKey, params: frozenset[str], *, files: bool) -> _LocalStatement:
    """``sql`` prepared for DuckDB over the table's data files (bound to the ``$meterlake_data_files`` placeholder)
    or, without ``files``, over the empty relation. Kept by query text, schema and parameter names: the SQL depends
    on nothing else, and preparing costs ~25 ms, a tenth of a pruned day query.

    Raises:
        QueryDefinitionError: as :func:`prepare` (not kept: the next call raises again).
    """
    source: exp.Expr = (
        read_table_files(exp.Placeholder(this=_FILES_PARAM), schema.schema) if files else exp.to_table(_EMPTY_RELATION)
    )
    relation = naive_utc_relation(source, schema.schema.as_arrow())
    prepared = prepare(sql, dialect="duckdb", table=relation, params=dict.fromkeys([*params, _FILES_PARAM]))
    return _LocalStatement(prepared.sql, frozenset(cast(dict[str, BoundValue], prepared.parameters)))


#: Iceberg primitive types -> the DuckDB types read_parquet reads them as.
_DUCKDB_TYPES: Final[dict[str, str]] = {
    "boolean": "BOOLEAN",
    "int": "INTEGER",
    "long": "BIGINT",
    "float": "FLOAT",
    "double": "DOUBLE",
    "date": "DATE",
    "time": "TIME",
    "timestamp": "TIMESTAMP",
    "timestamptz": "TIMESTAMPTZ",
    "string": "VARCHAR",
    "uuid": "UUID",
    "binary": "BLOB",
}


def _duckdb_type(field_type: IcebergType) -> str | None:
    """The DuckDB type read_parquet reads an Iceberg column of ``field_type`` as: a primitive, or a map of them
    (meter_events' dimensions); None for any other nested type."""
    if isinstance(field_type, MapType):
        key, value = _DUCKDB_TYPES.get(str(field_type.key_type)), _DUCKDB_TYPES.get(str(field_type.value_type))
        return None if key is None or value is None else f"MAP({key}, {value})"
    return _DUCKDB_TYPES.get(str(field_type))


def read_table_files(files: Sequence[str] | exp.Expr, schema: Schema) -> exp.Expr:
    """DuckDB's ``read_parquet`` over data files of a table whose schema is ``schema``, its columns mapped by Iceberg
    field id, as Iceberg readers map them: a column added to the table after a file was written reads as null from
    that file (DuckDB's default, by name from the first file, drops it or fails on the older files).

    ``files`` is the paths, or an expression giving their list, such as a placeholder bound to them: the runner binds
    them so, for SQL text of the same size whatever the number of files (rendering 2,880 paths costs ~50 ms).

    Raises:
        UnsupportedTableStateError: a column has a nested type other than a map of primitives (the tables have none).
    """
    columns = []
    for field in schema.fields:
        duckdb_type = _duckdb_type(field.field_type)
        if duckdb_type is None:
            raise UnsupportedTableStateError(field.name, f"the local runner reads no {field.field_type} column")
        column = exp.Struct(
            expressions=[
                exp.PropertyEQ(this=exp.to_identifier("name"), expression=exp.Literal.string(field.name)),
                exp.PropertyEQ(this=exp.to_identifier("type"), expression=exp.Literal.string(duckdb_type)),
                exp.PropertyEQ(this=exp.to_identifier("default_value"), expression=exp.null()),
            ]
        )
        columns.append(exp.PropertyEQ(this=exp.Literal.number(field.field_id), expression=column))
    return exp.func(
        "read_parquet",
        files if isinstance(files, exp.Expr) else exp.array(*(exp.Literal.string(path) for path in files)),
        exp.EQ(this=exp.var("hive_partitioning"), expression=exp.false()),
        exp.EQ(this=exp.var("schema"), expression=exp.ToMap(this=exp.Struct(expressions=columns))),
    )


def plan_data_files(table: Table, row_filter: BooleanExpression) -> list[FileScanTask]:
    """The current snapshot's data files ``row_filter`` can match, planned as pyiceberg plans a scan, with two
    differences.

    A manifest listing no live file (only files a commit removed) is not read, as Java's scans skip it
    (``ignoreDeleted``): a compaction's replace snapshot keeps one listing every file it replaced, and reading it
    would cost each query as much as the small files it removed. And no task carries a residual filter (each is
    always true): pyiceberg derives one per data file (~0.5 ms each, most of a pruned query's planning), while
    DuckDB applies the query's whole WHERE clause to every row it reads anyway.

    Raises:
        UnsupportedTableStateError: a manifest holds equality deletes (pyiceberg cannot plan them).
    """
    snapshot = table.current_snapshot()
    if snapshot is None:
        return []
    manifests = [m for m in snapshot.manifests(table.io) if m.has_added_files() or m.has_existing_files()]
    data_entries: list[ManifestEntry] = []
    deletes = DeleteFileIndex()
    for entries in ManifestGroupPlanner(table.metadata, table.io, row_filter).plan_manifest_entries(manifests):
        for entry in entries:
            content = entry.data_file.content
            if content == DataFileContent.DATA:
                data_entries.append(entry)
            elif content == DataFileContent.POSITION_DELETES:
                deletes.add_delete_file(entry, partition_key=entry.data_file.partition)
            else:
                raise UnsupportedTableStateError(entry.data_file.file_path, "the table has equality delete files")
    return [
        FileScanTask(
            entry.data_file,
            delete_files=deletes.for_data_file(
                entry.sequence_number or INITIAL_SEQUENCE_NUMBER,
                entry.data_file,
                partition_key=entry.data_file.partition,
            ),
        )
        for entry in data_entries
    ]


def scan_filter(sql: str, params: Mapping[str, BoundValue]) -> BooleanExpression:
    """The Iceberg row filter every row a query can use from ``metering_events`` satisfies: what to plan its scan with.

    It is read from the WHERE clause of the one SELECT that reads the table (without joins, whose outer sides would
    keep rows the clause rejects): each comparison (``=``, ``<``, ``<=``, ``>``, ``>=``, ``BETWEEN``, ``IN``,
    ``IS [NOT] NULL``) of a column of the table with a constant, combined by its ANDs and ORs. A constant is literals
    and parameters under casts and ``from_iso8601_timestamp``; DuckDB evaluates it as the query will, in a sandbox that
    reads no file, so the bounds are the query's own, and a part made of constants alone (``:tenant_id IS NULL``)
    becomes true or false. Anything else (a function of a column, ``now()``, a subquery, a NOT, a value of another type
    than its column's) is left out, which only widens the filter: a file the filter excludes holds no row the WHERE
    clause accepts, so the query's result is that of a full scan. A table read twice, or a CTE named like it, is not
    pruned at all.

    Raises:
        QueryDefinitionError: the SQL is not one query.
    """
    return _scan_filter(sql, tuple(sorted(params.items())))


@functools.lru_cache(maxsize=64)
def _scan_filter(sql: str, params: tuple[tuple[str, BoundValue], ...]) -> BooleanExpression:
    """:func:`scan_filter`, kept by query text and values (~6 ms: each constant is evaluated by DuckDB); a filter is
    immutable, so callers can share it."""
    tree = _parse_statement(sql, "<sql>")
    reads = [node for node in tree.find_all(exp.Table) if node.name == TABLE_PLACEHOLDER and not node.args.get("db")]
    if len(reads) != 1 or any(cte.alias_or_name == TABLE_PLACEHOLDER for cte in tree.find_all(exp.CTE)):
        return AlwaysTrue()
    (read,) = reads
    select = read.parent.parent if isinstance(read.parent, exp.From) else None
    if not isinstance(select, exp.Select) or select.args.get("joins") or select.args.get("laterals"):
        return AlwaysTrue()
    where = select.args.get("where")
    if where is None:
        return AlwaysTrue()
    qualifiers = {TABLE_PLACEHOLDER, read.alias.lower()} - {""}
    constants = _ConstantEvaluator(dict(params))
    return _implied_filter(where.this, _TableColumns(METERING_EVENT_SCHEMA, qualifiers), constants)


class _Unknown:
    """A constant whose value the filter cannot use (not a constant, an error, a type it cannot compare)."""


_UNKNOWN: Final = _Unknown()

#: The expression nodes a constant may consist of (anything else, a function or a column, is not a constant).
_CONSTANT_NODES: Final = (
    exp.Literal,
    exp.Placeholder,
    exp.Null,
    exp.Boolean,
    exp.Cast,
    exp.TryCast,
    exp.DataType,
    exp.DataTypeParam,
    exp.FromISO8601Timestamp,
    exp.Paren,
    exp.Neg,
    exp.Add,
    exp.Sub,
    exp.Interval,
    exp.Var,
    exp.Not,
    exp.And,
    exp.Or,
    exp.Is,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
)
#: An Iceberg predicate on a column and a value, and on a column and values. (pyiceberg's predicates are pydantic
#: models that take the column name positionally; mypy sees only their fields.)
_Predicate = Callable[[str, Any], BooleanExpression]
_SetPredicate = Callable[[str, Sequence[Any]], BooleanExpression]
_ColumnPredicate = Callable[[str], BooleanExpression]
#: SQL comparisons and their Iceberg predicates; the mirror is the comparison with its operands swapped.
_PREDICATES: Final[dict[type[exp.Expr], _Predicate]] = {
    exp.EQ: cast(_Predicate, EqualTo),
    exp.GT: cast(_Predicate, GreaterThan),
    exp.GTE: cast(_Predicate, GreaterThanOrEqual),
    exp.LT: cast(_Predicate, LessThan),
    exp.LTE: cast(_Predicate, LessThanOrEqual),
}
_IN: Final = cast(_SetPredicate, In)
_IS_NULL: Final = cast(_ColumnPredicate, IsNull)
_NOT_NULL: Final = cast(_ColumnPredicate, NotNull)
_MIRRORED: Final[dict[type[exp.Expr], type[exp.Expr]]] = {
    exp.EQ: exp.EQ,
    exp.GT: exp.LT,
    exp.GTE: exp.LTE,
    exp.LT: exp.GT,
    exp.LTE: exp.GTE,
}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: Serialises use of the constants' engine: a DuckDB connection is not for concurrent use.
_CONSTANTS_LOCK = threading.Lock()


@functools.cache
def _constants_engine() -> duckdb.DuckDBPyConnection:
    """One sandbox per process for constants (a new database costs ~20 ms a query): it may read no file."""
    return sandboxed_duckdb([])


def _forget_constants_engine_in_child() -> None:
    """A forked child opens its own constants' engine (see :func:`_keep_forever`) and lock."""
    global _CONSTANTS_LOCK
    if _constants_engine.cache_info().currsize:
        _keep_forever(_constants_engine())
        _constants_engine.cache_clear()
    _CONSTANTS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_constants_engine_in_child)


@dataclass(frozen=True, slots=True)
class _TableColumns:
    """The table's columns as the SELECT that reads it names them (bare or qualified by its name or alias)."""

    schema: Schema
    qualifiers: set[str]

    def field_of(self, node: exp.Expr) -> tuple[str, IcebergType] | None:
        """The column's name and Iceberg type if ``node`` is a column of the table, else None."""
        if not isinstance(node, exp.Column) or node.args.get("db") or node.args.get("catalog"):
            return None
        if node.table and node.table.lower() not in self.qualifiers:
            return None
        field = self.schema.find_field(node.name.lower(), case_sensitive=False) if node.name else None
        return None if field is None else (field.name, field.field_type)


class _ConstantEvaluator:
    """Evaluates constant expressions with DuckDB, as the query will, in a sandbox that may read no file."""

    def __init__(self, params: Mapping[str, BoundValue]) -> None:
        self.params = params

    def value(self, node: exp.Expr) -> object:
        """The constant's value (a Python value as DuckDB returns it), or ``_UNKNOWN``."""
        if not all(isinstance(part, _CONSTANT_NODES) for part in node.walk()):
            return _UNKNOWN
        tree = exp.select(node.copy()).transform(_duckdb_equivalent)
        used = {placeholder.name for placeholder in tree.find_all(exp.Placeholder)}
        if not used <= self.params.keys():
            return _UNKNOWN
        try:
            sql = _render(tree, "duckdb")
            with _CONSTANTS_LOCK:
                cursor = _constants_engine().execute(sql, {name: self.params[name] for name in used})
                kind = str(cursor.description[0][1]) if cursor.description else ""
                row = cursor.fetchone()
        except (duckdb.Error, QueryDefinitionError):
            return _UNKNOWN
        # Python's datetime holds microseconds: a nanosecond bound would be rounded, so it is not used.
        return _UNKNOWN if row is None or kind == "TIMESTAMP_NS" else row[0]


def _implied_filter(node: exp.Expr, columns: _TableColumns, constants: _ConstantEvaluator) -> BooleanExpression:
    """An Iceberg predicate true for every row for which the SQL condition ``node`` is true (see scan_filter)."""
    node = node.unnest()
    if isinstance(node, exp.And):
        return And(_implied_filter(node.left, columns, constants), _implied_filter(node.right, columns, constants))
    if isinstance(node, exp.Or):
        return Or(_implied_filter(node.left, columns, constants), _implied_filter(node.right, columns, constants))
    if node.find(exp.Column) is None:
        value = constants.value(node)
        if value is True:
            return AlwaysTrue()
        # A WHERE clause keeps no row for which its condition is false or NULL.
        return AlwaysFalse() if value is False or value is None else AlwaysTrue()
    if type(node) in _PREDICATES:
        operator, column, constant = type(node), node.args["this"], node.args["expression"]
        if columns.field_of(column) is None:
            operator, column, constant = _MIRRORED[operator], constant, column
        return _comparison(operator, column, [constant], columns, constants)
    if isinstance(node, exp.Between):
        low = _comparison(exp.GTE, node.this, [node.args["low"]], columns, constants)
        return And(low, _comparison(exp.LTE, node.this, [node.args["high"]], columns, constants))
    if isinstance(node, exp.In) and not node.args.get("query") and not node.args.get("unnest"):
        return _comparison(exp.In, node.this, node.expressions, columns, constants)
    if isinstance(node, exp.Is) and isinstance(node.expression, exp.Null):
        field = columns.field_of(node.this)
        return AlwaysTrue() if field is None else _IS_NULL(field[0])
    if isinstance(node, exp.Not) and isinstance(node.this, exp.Is) and isinstance(node.this.expression, exp.Null):
        field = columns.field_of(node.this.this)
        return AlwaysTrue() if field is None else _NOT_NULL(field[0])
    return AlwaysTrue()


def _comparison(
    operator: type[exp.Expr],
    column: exp.Expr,
    operands: Sequence[exp.Expr],
    columns: _TableColumns,
    constants: _ConstantEvaluator,
) -> BooleanExpression:
    """``column <operator> operands`` as an Iceberg predicate, or always true if it cannot be one."""
    field = columns.field_of(column)
    if field is None or not operands:
        return AlwaysTrue()
    name, field_type = field
    values = [_iceberg_value(constants.value(operand), field_type) for operand in operands]
    if any(value is _UNKNOWN for value in values):
        return AlwaysTrue()
    if operator is exp.In:
        return _IN(name, values)
    return _PREDICATES[operator](name, values[0])


def _iceberg_value(value: object, field_type: IcebergType) -> object:
    """A DuckDB value as the Iceberg literal of a column of ``field_type`` compares it, or ``_UNKNOWN``.

    Timestamps compare in UTC (the local relation's are naive UTC, the session's zone is UTC), a date as its UTC
    midnight, as DuckDB promotes it.
    """
    if isinstance(field_type, TimestamptzType | TimestampType):
        if isinstance(value, datetime):
            moment = value if value.tzinfo else value.replace(tzinfo=UTC)
            return (moment - _EPOCH) // timedelta(microseconds=1)
        if type(value) is date:
            return (datetime(value.year, value.month, value.day, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
    elif isinstance(field_type, StringType):
        if type(value) is str:
            return value
    elif isinstance(field_type, IntegerType | LongType) and type(value) is int:
        return value
    return _UNKNOWN


def format_result(result: QueryResult, fmt: Literal["table", "csv", "json"]) -> str:
    """Render a result as a rich table, CSV (header row first) or a JSON array of objects; timestamps in UTC ISO."""
    if fmt == "json":
        objects = [
            {column: _json_value(value) for column, value in zip(result.columns, row, strict=True)}
            for row in result.rows
        ]
        return json.dumps(objects, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([("" if value is None else _text(value) for value in row) for row in result.rows])
        return buffer.getvalue()
    # Cells are Text, not str: rich would read a value such as "[/bold]" as markup (and ":smile:" as an emoji).
    headers = [printable(column) for column in result.columns]
    cells = [["NULL" if value is None else printable(_text(value)) for value in row] for row in result.rows]
    grid = RichTable()
    for header in headers:
        grid.add_column(Text(header))
    for row_cells in cells:
        grid.add_row(*(Text(cell) for cell in row_cells))
    # Wide enough that rich never wraps a cell: each column's widest text plus borders and padding.
    widths = [
        max([cell_len(header), *(cell_len(row_cells[i]) for row_cells in cells)]) + 3
        for i, header in enumerate(headers)
    ]
    buffer = io.StringIO()
    Console(file=buffer, width=max(80, sum(widths) + 1), color_system=None).print(grid)
    return buffer.getvalue()


def printable(text: str, *, escape_backslash: bool = True) -> str:
    """``text`` as a terminal should show it: what it would act on or not show at all written out as an escape.

    Control characters (ANSI escapes, newlines, tabs, DEL, C1), format characters (bidi overrides, zero-width), line
    and paragraph separators, non-space blanks and lone surrogates become ``\\x1b``, ``\\n``, ``\\u202e``, ... as in
    Python's ``repr``; so do backslashes (``\\\\``) unless ``escape_backslash`` is false (for prose such as error
    messages), so that no two values look alike.
    """
    if text.isprintable() and "\\" not in text:
        return text
    shown: list[str] = []
    for char in text:
        if char == "\\":
            shown.append("\\\\" if escape_backslash else char)
        elif char.isprintable():
            shown.append(char)
        elif char in _NAMED_ESCAPES:
            shown.append(_NAMED_ESCAPES[char])
        else:
            code = ord(char)
            shown.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(shown)


def sandboxed_duckdb(readable: Sequence[str]) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB (all cores, UTC, no progress bar) that may read the files ``readable`` and no other.

    External access is off but for those paths (DuckDB's ``allowed_paths``): reading any other file (``read_text``
    of the gateway's signing key, ``read_csv('/etc/passwd')``, another Parquet file), writing any (``COPY ... TO``),
    ``ATTACH``, installing extensions and network URLs are refused with a Permission Error. The configuration is
    then locked, so the SQL cannot turn access back on; that is also why a database serves one set of files (kept
    for queries of the same files, see :func:`sandboxed_cursor`) rather than all: the allowed paths cannot change
    once locked.
    """
    con = duckdb.connect(config={"threads": os.cpu_count() or 1})
    try:
        con.execute("SET TimeZone = 'UTC'")
        # DuckDB draws its progress bar on stdout, which would corrupt CSV or JSON output.
        con.execute("SET enable_progress_bar = false")
        if readable:
            con.execute("SET allowed_paths = $paths", {"paths": list(readable)})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


_K = TypeVar("_K")
_V = TypeVar("_V")


class _RecentlyUsed(Generic[_K, _V]):
    """The ``size`` most recently used values by key, shared by this process's threads. A value pushed out is not
    closed (a query may still use it; the last reference frees it). A forked child starts with none and a new lock,
    and never frees what it inherited (see :func:`_keep_forever`)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._values: OrderedDict[_K, _V] = OrderedDict()
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        _keep_forever(self._values)
        self._values = OrderedDict()
        self._lock = threading.Lock()  # another thread may have held it at the fork

    def get(self, key: _K) -> _V | None:
        """The value kept for ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def put(self, key: _K, value: _V) -> None:
        """Keep ``value`` for ``key``, pushing out the least recently used beyond the size."""
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self._size:
                self._values.popitem(last=False)


def _keep_forever(inherited: object) -> None:
    """Never free ``inherited``, what a forked child got from its parent and leaves unused: DuckDB databases, whose
    worker threads did not survive the fork (freeing one, when it is dropped or at the child's exit, crashes the
    child), and tables whose catalog's SQLite connections are the parent's."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(inherited))


#: Sandboxed databases by the files each may read (see :func:`sandboxed_cursor`): a few recent file sets (a
#: dashboard's queries, a pruned query and the full scan it is checked by).
_SANDBOXES: Final[_RecentlyUsed[frozenset[str], duckdb.DuckDBPyConnection]] = _RecentlyUsed(size=4)
#: Tables the runner loaded (see :func:`_current_table`), by catalog and identifier: a process usually reads one.
_TABLES: Final[_RecentlyUsed[tuple[Path, tuple[str, str]], Table]] = _RecentlyUsed(size=4)


def _current_table(data_dir: DataDir, config: Config) -> Table:
    """The metering table as the catalog names it now (created if there is none yet), reusing the one last loaded
    while the catalog still names its metadata file: a query then neither opens the catalog (~3 ms) nor parses the
    metadata again (~9 ms for a month of commits), a tenth of a pruned day query. Never stale: each call reads the
    catalog's pointer first."""
    identifier = (config.database_name, config.table_name)
    key = (data_dir.catalog_db, identifier)
    try:
        location = current_metadata_location(data_dir, identifier)
    except sqlite3.Error:  # e.g. a crashed writer's journal, which only a writable connection rolls back
        location = None  # then the catalog loads it, as it would without the reuse
    table = _TABLES.get(key)
    if table is not None and table.metadata_location == location:
        return table
    catalog = open_catalog(data_dir)
    try:
        table = catalog.load_table(identifier)
    except NoSuchTableError:
        table = ensure_metering_table(catalog, config)
    _TABLES.put(key, table)
    return table


def sandboxed_cursor(readable: Sequence[str]) -> duckdb.DuckDBPyConnection:
    """A cursor on a sandboxed database (:func:`sandboxed_duckdb`) that may read exactly the files ``readable``,
    reusing one opened for the same files: a new database costs ~25 ms to open and ~8 ms to close, a fifth of a pruned
    day query. Only the same files: a database allowed more is slower for every file it opens (DuckDB checks each
    path against its whole allow list; allowed a 2,880-file snapshot, a 96-file query took ~25 ms longer). The
    caller closes the cursor; its temporary views (``register``) are its own.
    """
    wanted = frozenset(readable)
    database = _SANDBOXES.get(wanted)
    if database is None:
        database = sandboxed_duckdb(readable)
        _SANDBOXES.put(wanted, database)
    return database.cursor()


def _read_query_file(path: Path) -> QueryFile:
    """Parse a .sql file's header (description, @param lines) and check the placeholders match the declarations."""
    try:
        sql = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise QueryDefinitionError(path, f"cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        raise QueryDefinitionError(path, f"not UTF-8 text (byte 0x{bad:02x} at offset {exc.start})") from None
    comments = [line.strip() for line in sql.splitlines() if line.strip().startswith("--")]
    description = comments[0].lstrip("-").strip() if comments else ""
    params: list[QueryParam] = []
    for line in comments:
        match = _PARAM_LINE.match(line)
        if match:
            params.append(_parse_param_line(path, match.group("rest")))
    names = [param.name for param in params]
    if len(set(names)) != len(names):
        raise QueryDefinitionError(path, f"a parameter is declared twice: {names}")
    used = {p.name for p in _parse_statement(sql, path).find_all(exp.Placeholder)}
    if used != set(names):
        raise QueryDefinitionError(
            path, f"placeholders {sorted(used)} do not match the @param declarations {sorted(names)}"
        )
    return QueryFile(name=path.stem, path=path, description=description, params=tuple(params), sql=sql)


def _parse_param_line(path: Path, rest: str) -> QueryParam:
    """Parse what follows ``-- @param``: ``<name> <type> <description> [(default: v) | (optional)]``."""
    match = _PARAM_DECL.match(rest)
    if not match:
        raise QueryDefinitionError(path, f"bad @param line {rest.strip()!r}: expected '<name> <type> <description>'")
    try:
        kind = ParamType(match.group("type"))
    except ValueError:
        types = ", ".join(t.value for t in ParamType)
        raise QueryDefinitionError(path, f"@param {match.group('name')}: type must be one of {types}") from None
    doc = match.group("doc")
    default = _DEFAULT.search(doc)
    minimum = _MINIMUM.search(doc)
    param = QueryParam(
        name=match.group("name"),
        type=kind,
        description=doc,
        default=default.group("default") if default else None,
        optional=bool(default and default.group("optional")),
        minimum=int(minimum.group("minimum")) if minimum else None,
    )
    if param.default is not None:
        try:
            _convert(param, param.default, None)
        except QueryParamError as exc:
            raise QueryDefinitionError(path, f"bad default: {exc}") from None
    return param


def _convert(param: QueryParam, text: str, now: datetime | None) -> BoundValue:
    """Type one parameter value; timestamps become UTC ISO-8601 text."""
    value = text.strip()
    if param.type is ParamType.INTEGER:
        try:
            number = int(value)
        except ValueError:
            raise QueryParamError(param.name, f"{text!r} is not an integer") from None
        if param.minimum is not None and number < param.minimum:
            raise QueryParamError(param.name, f"{number} is below its minimum, {param.minimum}")
        return number
    if param.type is ParamType.STRING:
        return text
    try:
        utc = parse_instant(text, name=repr(text), now=now)
    except WindowError:
        raise QueryParamError(param.name, f"{text!r} is not an ISO-8601 timestamp") from None
    return utc.isoformat(timespec="microseconds" if utc.microsecond else "seconds").replace("+00:00", "Z")


def _parse_statement(sql: str, source: Path | str) -> exp.Expr:
    """Parse exactly one Trino query: a SELECT (with its WITH, UNION, ...), never COPY, CREATE, SET, ATTACH, ...

    Returns a tree of the caller's own (a copy of the one parsed once per text, see :func:`_parsed_statement`).
    """
    parsed = _parsed_statement(sql)
    if isinstance(parsed, str):
        raise QueryDefinitionError(source, parsed)
    return parsed.copy()


@functools.lru_cache(maxsize=64)
def _parsed_statement(sql: str) -> exp.Expr | str:
    """The one query ``sql`` holds, or what is wrong with it; kept by text, as a query is parsed three times a run
    (loading, pruning, preparing; ~3 ms each, a copy ~0.5 ms). Never hand the tree out: callers get copies."""
    try:
        statements = [s for s in sqlglot.parse(sql, read=SOURCE_DIALECT) if s is not None]
    except SqlglotError as exc:
        return f"not valid Trino SQL ({str(exc).splitlines()[0]})"
    if len(statements) != 1:
        return f"expected one SQL statement, found {len(statements)}"
    statement = statements[0]
    if not isinstance(statement, exp.Query):
        kind = statement.name if isinstance(statement, exp.Command) else statement.key
        return f"only a query (SELECT) can run, not {kind.upper()}"
    return statement


def _render(tree: exp.Expr, dialect: str) -> str:
    """Generate SQL, failing rather than emitting something the target engine does not support."""
    try:
        return tree.sql(dialect=dialect, comments=False, unsupported_level=ErrorLevel.RAISE)
    except SqlglotError as exc:
        raise QueryDefinitionError("<sql>", f"cannot translate to {dialect} ({exc})") from None


def _placeholder_order(tree: exp.Expr) -> list[str]:
    """The parameter names in the order their placeholders appear in the generated SQL (the order ``?`` binds)."""
    names: list[str] = []

    def tag(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Placeholder):
            names.append(node.name)
            return exp.Placeholder(this=f"{_ORDER_TAG}{len(names) - 1}")
        return node

    tagged = tree.transform(tag)
    tokens = sqlglot.tokenize(_render(tagged, SOURCE_DIALECT), read=SOURCE_DIALECT)
    return [names[int(token.text[len(_ORDER_TAG) :])] for token in tokens if token.text.startswith(_ORDER_TAG)]


def _athena_literal(value: BoundValue) -> str:
    """An Athena ExecutionParameter: the value as SQL literal text (strings must be single-quoted)."""
    if value is None:
        return _ATHENA_NULL
    if isinstance(value, int):
        return str(value)
    return exp.Literal.string(value).sql(dialect=SOURCE_DIALECT)


#: Why a snapshot with delete files is not read locally, and the way out (meterlake's compaction leaves such days alone,
#: and neither pipeline writes delete files: another engine did).
DELETE_FILES_REFUSAL: Final = (
    "the table has delete files, which the local runner cannot apply; rewrite them into its data files with an engine "
    "that applies them (e.g. Spark's rewrite_data_files) before querying locally"
)


def local_data_files(tasks: Iterable[FileScanTask]) -> list[str]:
    """Local paths of the planned data files, for read_parquet.

    Raises:
        UnsupportedTableStateError: a file has delete files (which read_parquet would ignore) or is not local.
    """
    paths: list[str] = []
    for task in tasks:
        if task.delete_files:
            delete = next(iter(task.delete_files)).file_path
            raise UnsupportedTableStateError(delete, DELETE_FILES_REFUSAL)
        scheme, _, path = PyArrowFileIO.parse_location(task.file.file_path)
        if scheme != "file":
            raise UnsupportedTableStateError(task.file.file_path, "not a local file; the local runner reads file://")
        paths.append(path)
    return paths


def naive_utc_relation(source: exp.Expr, schema: pa.Schema) -> exp.Select:
    """``SELECT * REPLACE (<each timestamptz column> as a naive UTC TIMESTAMP) FROM source``: no ICU per row."""
    timestamptz = [f.name for f in schema if pa.types.is_timestamp(f.type) and f.type.tz]
    naive = [
        exp.alias_(exp.func("make_timestamp", exp.func("epoch_us", exp.column(name))), name) for name in timestamptz
    ]
    return exp.select(exp.Star(replace=naive)).from_(source)


def _duckdb_equivalent(node: exp.Expr) -> exp.Expr:
    """Map a Trino construct to its fastest DuckDB equivalent over the naive-UTC relation (see the module doc)."""
    if isinstance(node, exp.FromISO8601Timestamp):
        return exp.cast(exp.cast(node.this, exp.DataType.Type.TIMESTAMPTZ), exp.DataType.Type.TIMESTAMP)
    if isinstance(node, exp.ApproxQuantile) and set(node.args) <= {"this", "quantile"}:
        return exp.Anonymous(this="quantile_disc", expressions=[node.this, node.args["quantile"]])
    return node


def _engine_types_to_table_types(table: pa.Table) -> pa.Table:
    """Undo DuckDB's local types: naive timestamps are UTC; SUM(BIGINT) gives HUGEINT (Arrow decimal), Trino BIGINT."""
    for index, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type) and field.type.tz is None:
            table = table.set_column(index, field.name, table.column(index).cast(pa.timestamp(field.type.unit, "UTC")))
        elif pa.types.is_decimal(field.type) and field.type.scale == 0:
            table = table.set_column(index, field.name, table.column(index).cast(pa.int64()))
    return table


def _text(value: object) -> str:
    """Show a value in text output: timestamps as UTC ISO-8601 with 'Z', dates as ISO, the rest as str()."""
    if isinstance(value, datetime | date):
        return str(_json_value(value))
    return str(value)


def _json_value(value: object) -> object:
    """Make a value JSON-ready: timestamps become UTC ISO-8601 text ending in 'Z', dates ISO text."""
    if isinstance(value, datetime):
        utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return utc.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return value
