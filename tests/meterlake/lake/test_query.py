"""The usage SQL through the local runner, checked against numbers computed independently in Python."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from pyiceberg.io import InputFile
from pyiceberg.schema import Schema
from pyiceberg.serializers import FromInputFile
from pyiceberg.table import FileScanTask
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.types import ListType, LongType, MapType, NestedField, StringType
from sqlglot import exp

from meterlake.config import Config
from meterlake.lake import query as query_module
from meterlake.lake.catalog import current_metadata_location, ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.lake.query import (
    QueryDefinitionError,
    QueryError,
    QueryExecutionError,
    QueryParamError,
    QueryResult,
    UnknownQueryError,
    UnsupportedTableStateError,
    athena_table,
    bind_params,
    format_result,
    list_queries,
    load_query,
    local_data_files,
    parse_param_args,
    prepare,
    printable,
    run_local_query,
    sandboxed_cursor,
    sandboxed_duckdb,
    scan_filter,
)
from meterlake.local.auth import for_config, signing_key_path
from meterlake.schema import metering_event_arrow_schema

TENANTS = ("acme", "globex", "initech", None)
STATUSES = (200, 200, 200, 201, 304, 400, 404, 429, 500, 503)
ROUTES = (("/orders", "GET"), ("/orders", "POST"), ("/items", "GET"), ("/items/{id}", "GET"), (None, "GET"))
DAY_ONE = datetime(2024, 3, 4, tzinfo=UTC)
QUERY_NAMES = ["requests_by_status_class", "top_routes_per_tenant", "usage_per_tenant_day", "usage_per_tenant_hour"]
CONFIG = Config()


@dataclass(frozen=True)
class Event:
    """The columns the queries read, for the Python expectations."""

    tenant_id: str | None
    request_time: datetime
    http_method: str
    resource_path: str | None
    status: int
    response_length: int | None
    response_latency_ms: int | None


def _events() -> list[Event]:
    rng = random.Random(7)
    events = []
    for i in range(480):
        path, method = rng.choice(ROUTES)
        events.append(
            Event(
                tenant_id=TENANTS[i % 4] if i % 9 else rng.choice(TENANTS),
                request_time=DAY_ONE + timedelta(seconds=rng.randrange(2 * 86400)),
                http_method=method,
                resource_path=path,
                status=rng.choice(STATUSES),
                response_length=None if i % 17 == 0 else rng.randrange(5000),
                response_latency_ms=None if i % 23 == 0 else rng.randrange(1, 900),
            )
        )
    return events


EVENTS = _events()


def _arrow(events: Iterable[Event], first_id: int) -> pa.Table:
    rows = [
        {
            "request_id": f"req-{first_id + i}",
            "request_time": e.request_time,
            "ingested_at": e.request_time + timedelta(seconds=5),
            "tenant_id": e.tenant_id,
            "http_method": e.http_method,
            "resource_path": e.resource_path,
            "status": e.status,
            "response_length": e.response_length,
            "response_latency_ms": e.response_latency_ms,
        }
        for i, e in enumerate(events)
    ]
    return pa.Table.from_pylist(rows, schema=metering_event_arrow_schema())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    data = DataDir.resolve(tmp_path_factory.mktemp("query-data"))
    table = ensure_metering_table(open_catalog(data), CONFIG)
    half = len(EVENTS) // 2
    table.append(_arrow(EVENTS[:half], 0))  # two commits: several data files, like a real table
    table.append(_arrow(EVENTS[half:], half))
    return data


def run(name: str, data: DataDir, **params: str) -> QueryResult:
    return run_local_query(load_query(name), params, config=CONFIG, data_dir=data)


def _p95(values: list[int]) -> int | None:
    """Nearest-rank 95th percentile: the value at rank ceil(0.95 n)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(len(ordered) * 95 / 100) - 1]


def _tenant_order(tenant: str | None) -> tuple[bool, str]:
    return (tenant is None, tenant or "")


def _usage(events: Iterable[Event], bucket: Callable[[datetime], object]) -> list[tuple[Any, ...]]:
    groups: dict[tuple[str | None, object], list[Event]] = defaultdict(list)
    for e in events:
        groups[(e.tenant_id, bucket(e.request_time))].append(e)
    rows = [
        (
            tenant,
            when,
            len(group),
            sum(1 for e in group if e.status < 500 and e.tenant_id is not None),
            sum(e.response_length or 0 for e in group),
            sum(1 for e in group if 400 <= e.status < 500),
            sum(1 for e in group if e.status >= 500),
            _p95([e.response_latency_ms for e in group if e.response_latency_ms is not None]),
        )
        for (tenant, when), group in groups.items()
    ]
    return sorted(rows, key=lambda row: (row[1], _tenant_order(row[0])))


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _day(moment: datetime) -> date:
    return moment.date()


def test_usage_per_tenant_day_matches_python(data_dir: DataDir) -> None:
    result = run("usage_per_tenant_day", data_dir)
    assert result.columns == [
        "tenant_id",
        "usage_date",
        "requests",
        "billable_requests",
        "bytes_out",
        "errors_4xx",
        "errors_5xx",
        "p95_latency_ms",
    ]
    assert result.rows == _usage(EVENTS, _day)
    assert len(result.rows) == 8  # 3 tenants + unauthenticated, 2 days


def test_usage_per_tenant_hour_matches_python(data_dir: DataDir) -> None:
    result = run("usage_per_tenant_hour", data_dir)
    assert result.rows == _usage(EVENTS, _hour)
    assert all(row[1].tzinfo is not None and row[1].utcoffset() == timedelta(0) for row in result.rows)


def test_window_and_tenant_filter(data_dir: DataDir) -> None:
    start, end = DAY_ONE + timedelta(hours=6), DAY_ONE + timedelta(hours=30)
    inside = [e for e in EVENTS if start <= e.request_time < end and e.tenant_id == "globex"]
    # Naive means UTC; a zone offset is honoured.
    result = run(
        "usage_per_tenant_hour",
        data_dir,
        start="2024-03-04T06:00:00",
        end="2024-03-05T07:00:00+01:00",
        tenant_id="globex",
    )
    assert result.rows == _usage(inside, _hour)
    assert inside


def test_tenant_id_is_bound_not_pasted(data_dir: DataDir) -> None:
    assert run("usage_per_tenant_day", data_dir, tenant_id="x' OR 1=1 --").rows == []
    assert run("usage_per_tenant_day", data_dir, tenant_id="acme' OR '1'='1").rows == []


@pytest.mark.parametrize("limit", [None, "2"])
def test_top_routes_per_tenant_matches_python(data_dir: DataDir, limit: str | None) -> None:
    groups: dict[tuple[str | None, str | None, str], list[Event]] = defaultdict(list)
    for e in EVENTS:
        groups[(e.tenant_id, e.resource_path, e.http_method)].append(e)
    per_tenant: dict[str | None, list[tuple[Any, ...]]] = defaultdict(list)
    for (tenant, path, method), group in groups.items():
        latencies = [e.response_latency_ms for e in group if e.response_latency_ms is not None]
        per_tenant[tenant].append(
            (path, method, len(group), sum(e.response_length or 0 for e in group), _p95(latencies))
        )
    keep = int(limit) if limit else 10
    expected = []
    for tenant in sorted(per_tenant, key=_tenant_order):
        ranked = sorted(per_tenant[tenant], key=lambda r: (-r[2], r[0] is None, r[0] or "", r[1]))
        expected += [(tenant, rank, *route) for rank, route in enumerate(ranked[:keep], start=1)]

    result = run("top_routes_per_tenant", data_dir, **({"limit": limit} if limit else {}))
    assert result.columns == [
        "tenant_id",
        "route_rank",
        "resource_path",
        "http_method",
        "requests",
        "bytes_out",
        "p95_latency_ms",
    ]
    assert result.rows == expected


def test_requests_by_status_class_matches_python(data_dir: DataDir) -> None:
    counts: dict[tuple[str | None, str], int] = defaultdict(int)
    for e in EVENTS:
        counts[(e.tenant_id, f"{e.status // 100}xx")] += 1
    expected = sorted(((t, c, n) for (t, c), n in counts.items()), key=lambda r: (_tenant_order(r[0]), r[1]))
    assert run("requests_by_status_class", data_dir).rows == expected


def test_empty_table_returns_no_rows(tmp_path: Path, data_dir: DataDir) -> None:
    empty = DataDir.resolve(tmp_path)
    for name in QUERY_NAMES:
        result = run(name, empty)
        assert result.rows == []
        assert result.columns == run(name, data_dir).columns


def test_a_commit_between_queries_is_seen_and_an_unchanged_table_is_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = DataDir.resolve(tmp_path)
    table = ensure_metering_table(open_catalog(data), CONFIG)
    table.append(_arrow(EVENTS[:100], 0))
    parsed: list[str] = []
    parse = FromInputFile.table_metadata

    def counting(input_file: InputFile, encoding: str = "utf-8") -> TableMetadata:
        parsed.append(input_file.location)
        return parse(input_file, encoding)

    monkeypatch.setattr(FromInputFile, "table_metadata", staticmethod(counting))
    assert sum(row[2] for row in run("usage_per_tenant_day", data).rows) == 100
    assert sum(row[2] for row in run("usage_per_tenant_hour", data).rows) == 100
    assert len(parsed) == 1  # the second query reused the table the first one loaded
    table.append(_arrow(EVENTS[100:130], 100))  # another writer's commit: the catalog names a new metadata file
    parsed.clear()
    assert sum(row[2] for row in run("usage_per_tenant_day", data).rows) == 130
    assert parsed == [table.metadata_location]  # the new metadata, read once


def test_a_catalog_row_that_cannot_be_read_directly_falls_back_to_the_catalog(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = run("usage_per_tenant_day", data_dir).rows

    def unreadable(data: DataDir, identifier: tuple[str, str]) -> str | None:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(query_module, "current_metadata_location", unreadable)
    assert run("usage_per_tenant_day", data_dir).rows == expected


def test_current_metadata_location_is_the_catalogs_and_none_before_the_table(tmp_path: Path) -> None:
    data = DataDir.resolve(tmp_path)
    identifier = (CONFIG.database_name, CONFIG.table_name)
    assert current_metadata_location(data, identifier) is None  # no catalog file yet
    catalog = open_catalog(data)
    assert current_metadata_location(data, identifier) is None  # a catalog, no table
    table = ensure_metering_table(catalog, CONFIG)
    table.append(_arrow(EVENTS[:10], 0))
    assert current_metadata_location(data, identifier) == catalog.load_table(identifier).metadata_location


def test_list_queries_describes_each_file() -> None:
    queries = {q.name: q for q in list_queries()}
    assert sorted(queries) == QUERY_NAMES
    day = queries["usage_per_tenant_day"]
    assert day.description.startswith("Usage per tenant and UTC day")
    params = {p.name: p for p in day.params}
    assert [p.name for p in day.params] == ["start", "end", "tenant_id"]
    assert params["start"].default == "1970-01-01T00:00:00Z"
    assert params["end"].default == "now"
    assert params["tenant_id"].optional
    assert not params["tenant_id"].required
    assert {p.name: p.default for p in queries["top_routes_per_tenant"].params}["limit"] == "10"


def test_load_query_by_path(tmp_path: Path) -> None:
    path = tmp_path / "custom.sql"
    path.write_text("-- Count everything.\nSELECT count(*) AS n FROM metering_events\n")
    query = load_query(str(path))
    assert (query.name, query.description, query.params) == ("custom", "Count everything.", ())


def test_unknown_query_names_the_known_ones() -> None:
    with pytest.raises(UnknownQueryError, match="unknown query 'usage_per_tenant_week'; known: requests_by_status"):
        load_query("usage_per_tenant_week")
    with pytest.raises(UnknownQueryError):
        load_query("../sql/usage_per_tenant_day")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tenant": "acme"}, "parameter 'tenant': not a parameter of 'usage_per_tenant_day'"),
        ({"start": "yesterday"}, "parameter 'start': 'yesterday' is not an ISO-8601 timestamp"),
        ({"end": "2024-13-01"}, "parameter 'end': '2024-13-01' is not an ISO-8601 timestamp"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, str], message: str) -> None:
    with pytest.raises(QueryParamError, match=message):
        bind_params(load_query("usage_per_tenant_day"), params)


def test_bad_integer_is_refused() -> None:
    with pytest.raises(QueryParamError, match="parameter 'limit': 'ten' is not an integer"):
        bind_params(load_query("top_routes_per_tenant"), {"limit": "ten"})


def test_missing_required_parameter(tmp_path: Path) -> None:
    path = tmp_path / "one_tenant.sql"
    path.write_text(
        "-- One tenant's requests.\n-- @param tenant_id string  The tenant\n"
        "SELECT count(*) AS n FROM metering_events WHERE tenant_id = :tenant_id\n"
    )
    with pytest.raises(QueryParamError, match="parameter 'tenant_id': required by 'one_tenant'"):
        bind_params(load_query(str(path)), {})


def test_bind_params_normalises_timestamps_to_utc() -> None:
    now = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    bound = bind_params(load_query("usage_per_tenant_day"), {"start": "2024-03-04T02:00:00+02:00"}, now=now)
    assert bound == {"start": "2024-03-04T00:00:00Z", "end": "2024-05-06T07:08:09.123456Z", "tenant_id": None}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("-- x\n-- @param start date  When\nSELECT 1 FROM metering_events WHERE request_time > :start", "type must be"),
        ("-- x\nSELECT 1 FROM metering_events WHERE tenant_id = :tenant_id", "do not match the @param"),
        ("-- x\n-- @param a integer  A (default: 1)\nSELECT 1 FROM metering_events", "do not match the @param"),
        ("-- x\n-- @param a integer  A (default: one)\nSELECT 1 FROM metering_events WHERE 1 = :a", "bad default"),
        ("-- x\nSELECT 1 FROM metering_events; SELECT 2 FROM metering_events", "expected one SQL statement"),
    ],
)
def test_malformed_sql_files_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.sql"
    path.write_text(text)
    with pytest.raises(QueryDefinitionError, match=problem):
        load_query(str(path))


def test_execution_failure_is_a_query_error(tmp_path: Path, data_dir: DataDir) -> None:
    path = tmp_path / "broken.sql"
    path.write_text("-- Broken.\nSELECT no_such_column FROM metering_events\n")
    with pytest.raises(QueryExecutionError, match=r"query 'broken' failed: .*no_such_column"):
        run_local_query(load_query(str(path)), {}, config=CONFIG, data_dir=data_dir)


def test_delete_files_are_refused() -> None:
    task = SimpleNamespace(
        delete_files=[SimpleNamespace(file_path="file:///w/deletes.parquet")],
        file=SimpleNamespace(file_path="file:///w/data.parquet"),
    )
    with pytest.raises(UnsupportedTableStateError, match=r"/w/deletes\.parquet: the table has delete files"):
        local_data_files([cast("FileScanTask", task)])
    remote = SimpleNamespace(delete_files=[], file=SimpleNamespace(file_path="s3://bucket/data.parquet"))
    with pytest.raises(UnsupportedTableStateError, match="not a local file"):
        local_data_files([cast("FileScanTask", remote)])


def test_parse_param_args() -> None:
    assert parse_param_args(["start=2024-01-01T00:00:00", "tenant_id=a=b"]) == {
        "start": "2024-01-01T00:00:00",
        "tenant_id": "a=b",
    }
    with pytest.raises(QueryParamError, match="parameter 'start': expected name=value"):
        parse_param_args(["start"])
    with pytest.raises(QueryParamError, match="given more than once"):
        parse_param_args(["a=1", "a=2"])
    assert issubclass(QueryParamError, QueryError)


def test_duckdb_sql_has_named_dollar_placeholders_only() -> None:
    query = load_query("usage_per_tenant_day")
    prepared = prepare(query.sql, dialect="duckdb", table="local_events", params=bind_params(query, {}))
    tokens = sqlglot.tokenize(prepared.sql, read="duckdb")
    assert not any(t.text == ":" for t in tokens)
    assert "$start" in prepared.sql
    assert "$tenant_id" in prepared.sql
    assert "local_events" in prepared.sql
    assert "metering_events" in prepared.sql
    assert isinstance(prepared.parameters, dict)
    assert set(prepared.parameters) == {"start", "end", "tenant_id"}


def test_athena_prepare_uses_positional_placeholders_in_text_order() -> None:
    query = load_query("top_routes_per_tenant")
    params = bind_params(query, {"start": "2024-03-04", "end": "2024-03-05T00:00:00Z", "limit": "3"})
    prepared = prepare(query.sql, dialect="athena", table=athena_table(CONFIG), params=params)
    # start and end sit in a CTE before the outer WHERE's limit: the values must follow the text, not the AST.
    assert prepared.parameters == ["'2024-03-04T00:00:00Z'", "'2024-03-05T00:00:00Z'", "3"]
    assert prepared.sql.count("?") == 3
    assert ":" not in prepared.sql.replace("'", "")
    assert f'"{CONFIG.database_name}"."{CONFIG.table_name}" AS metering_events' in prepared.sql
    assert "APPROX_PERCENTILE" in prepared.sql


def test_athena_prepare_quotes_strings_and_sends_null_for_absent_optional() -> None:
    query = load_query("usage_per_tenant_day")
    given = bind_params(query, {"start": "2024-03-04", "end": "2024-03-05", "tenant_id": "x' OR 1=1 --"})
    prepared = prepare(query.sql, dialect="athena", table="db.events", params=given)
    assert isinstance(prepared.parameters, list)
    assert prepared.parameters[2:] == ["'x'' OR 1=1 --'", "'x'' OR 1=1 --'"]
    assert "x'" not in prepared.sql
    absent = prepare(
        query.sql,
        dialect="athena",
        table="db.events",
        params=bind_params(query, {"start": "2024-03-04", "end": "2024-03-05"}),
    )
    assert absent.parameters == [*prepared.parameters[:2], "NULL", "NULL"]
    table = sqlglot.parse_one(prepared.sql, read="trino").find(exp.Table)
    assert table is not None
    assert table.sql("trino") == "db.events AS metering_events"


def test_prepare_refuses_sql_without_the_table_or_a_value() -> None:
    with pytest.raises(QueryDefinitionError, match="does not read from metering_events"):
        prepare("SELECT 1 FROM other", dialect="duckdb", table="t", params={})
    with pytest.raises(QueryDefinitionError, match="no value for placeholder"):
        prepare("SELECT 1 FROM metering_events WHERE status = :s", dialect="athena", table="t", params={})


def test_a_query_parsed_once_is_prepared_afresh_each_time(tmp_path: Path) -> None:
    """The parse of a query's text is kept; each preparation works on its own copy, and errors name their file."""
    query = load_query("usage_per_tenant_day")
    params = bind_params(query, {})
    first = prepare(query.sql, dialect="duckdb", table="first_events", params=params)
    second = prepare(query.sql, dialect="duckdb", table="second_events", params=params)
    assert "first_events" in first.sql
    assert "second_events" in second.sql
    assert "first_events" not in second.sql
    assert load_query("usage_per_tenant_day") == query
    for name in ("one", "two"):  # the same text in two files
        path = tmp_path / f"{name}.sql"
        path.write_text("-- Two statements.\nSELECT 1 FROM metering_events; SELECT 2 FROM metering_events\n")
        with pytest.raises(QueryDefinitionError, match=rf"{name}\.sql: expected one SQL statement, found 2"):
            load_query(str(path))


def test_the_data_files_parameter_name_is_reserved(tmp_path: Path, data_dir: DataDir) -> None:
    """The runner binds the files to read to a parameter of its own; a query declaring that name is refused."""
    path = tmp_path / "reserved.sql"
    path.write_text(
        "-- Reserved.\n-- @param meterlake_data_files string  A name the runner binds itself (optional)\n"
        "SELECT count(*) AS n FROM metering_events WHERE :meterlake_data_files IS NULL\n"
    )
    with pytest.raises(QueryParamError, match="'meterlake_data_files': the name is reserved"):
        run_local_query(load_query(str(path)), {}, config=CONFIG, data_dir=data_dir)


def _small_result(data: DataDir) -> QueryResult:
    return run("usage_per_tenant_hour", data, start="2024-03-04T00:00:00Z", end="2024-03-04T01:00:00Z")


def test_format_csv(data_dir: DataDir) -> None:
    result = _small_result(data_dir)
    rows = list(csv.reader(io.StringIO(format_result(result, "csv"))))
    assert rows[0] == result.columns
    assert len(rows) == len(result.rows) + 1
    assert rows[1][1] == "2024-03-04T00:00:00Z"
    null_tenant = [r for r in rows[1:] if r[0] == ""]
    assert len(null_tenant) == sum(1 for r in result.rows if r[0] is None) == 1


def test_format_json(data_dir: DataDir) -> None:
    result = _small_result(data_dir)
    objects = json.loads(format_result(result, "json"))
    assert [list(o) for o in objects] == [result.columns] * len(result.rows)
    assert objects[0]["usage_hour"] == "2024-03-04T00:00:00Z"
    assert [o["requests"] for o in objects] == [r[2] for r in result.rows]
    assert any(o["tenant_id"] is None for o in objects)


def test_format_table(data_dir: DataDir) -> None:
    result = _small_result(data_dir)
    text = format_result(result, "table")
    lines = text.splitlines()
    assert all(column in lines[1] for column in result.columns)
    assert "2024-03-04T00:00:00Z" in text
    assert "NULL" in text
    assert len(lines) == len(result.rows) + 4  # top border, header, rule, rows, bottom border
    assert "\x1b[" not in text


def test_to_arrow_keeps_types_and_works_for_a_hand_built_result(data_dir: DataDir) -> None:
    table = _small_result(data_dir).to_arrow()
    assert table.schema.field("usage_hour").type == pa.timestamp("us", "UTC")
    assert table.schema.field("bytes_out").type == pa.int64()
    built = QueryResult(columns=["tenant_id", "requests"], rows=[("acme", 3), (None, 1)]).to_arrow()
    assert built.to_pylist() == [{"tenant_id": "acme", "requests": 3}, {"tenant_id": None, "requests": 1}]


# -- the local runner is a sandbox: only the table's own files can be read, nothing can be written ------------------


def _query_file(tmp_path: Path, name: str, sql: str) -> Path:
    path = tmp_path / f"{name}.sql"
    path.write_text(f"-- {name}\n{sql}\n")
    return path


def test_a_query_cannot_read_the_signing_key_or_system_files(tmp_path: Path, data_dir: DataDir) -> None:
    key = signing_key_path(data_dir)
    for_config(CONFIG, data_dir).issue_id_token(user="alice", tenant_id="acme")  # the gateway's private key exists
    outside = tmp_path / "other.parquet"
    pq.write_table(_arrow(EVENTS[:3], 10_000), outside)  # a Parquet file that is not one of the table's
    hostile = {
        "read_key": f"SELECT content FROM read_text('{key}') UNION ALL SELECT tenant_id FROM metering_events",
        "read_passwd": "SELECT * FROM read_csv('/etc/passwd') CROSS JOIN (SELECT count(*) AS n FROM metering_events)",
        "read_other_parquet": f"SELECT tenant_id FROM read_parquet('{outside}') UNION ALL "
        "SELECT tenant_id FROM metering_events",
    }
    for name, sql in hostile.items():
        query = load_query(str(_query_file(tmp_path, name, sql)))
        with pytest.raises(QueryExecutionError, match=rf"query '{name}' failed: .*Cannot access file") as refused:
            run_local_query(query, {}, config=CONFIG, data_dir=data_dir)
        assert "PRIVATE KEY" not in str(refused.value)


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT tenant_id FROM metering_events) TO '{target}'",
        "COPY (SELECT tenant_id FROM metering_events) TO '{target}' (FORMAT csv)",
    ],
)
def test_a_query_cannot_write_files(tmp_path: Path, data_dir: DataDir, sql: str) -> None:
    target = tmp_path / "copied.csv"
    path = _query_file(tmp_path, "copy_out", sql.format(target=target))
    with pytest.raises(QueryDefinitionError, match=r"copy_out\.sql: only a query \(SELECT\) can run, not COPY"):
        run_local_query(load_query(str(path)), {}, config=CONFIG, data_dir=data_dir)
    assert not target.exists()


def test_the_sandbox_is_refused_by_duckdb_itself_and_locked(tmp_path: Path, data_dir: DataDir) -> None:
    """Past the statement check, DuckDB refuses a write and any change of its settings (belt and braces)."""
    target = tmp_path / "copied.csv"
    files = local_data_files(ensure_metering_table(open_catalog(data_dir), CONFIG).scan().plan_files())
    con = sandboxed_duckdb(files)
    try:
        assert con.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall() == [(len(EVENTS),)]
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"COPY (SELECT 1) TO '{target}'")
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.execute("SET enable_external_access = true")
        assert con.sql("SELECT current_setting('TimeZone')").fetchall() == [("UTC",)]
    finally:
        con.close()
    assert not target.exists()


def _marker_visible(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(con.sql("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'pool_marker'").fetchall()[0][0])


def test_a_sandbox_is_reused_for_the_same_files_only(tmp_path: Path) -> None:
    """The same file list gets a cursor on the same locked database; other files (fewer or more) get their own, as
    does a forked child; a cursor keeps working after its database left the pool."""
    files = []
    for name in ("a", "b", "c"):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"n": [1, 2]}), path)
        files.append(str(path))
    first = sandboxed_cursor(files[:2])
    first.execute("CREATE TABLE pool_marker AS SELECT 1 AS x")
    again = sandboxed_cursor(list(reversed(files[:2])))
    fewer = sandboxed_cursor(files[:1])
    more = sandboxed_cursor(files)
    try:
        assert _marker_visible(again)
        assert not _marker_visible(fewer)
        assert not _marker_visible(more)
        with pytest.raises(duckdb.PermissionException):
            again.sql(f"SELECT * FROM read_parquet('{files[2]}')").fetchall()
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            again.execute("SET enable_external_access = true")
        for other in range(4):  # push the first database out of the pool of four
            sandboxed_cursor([*files[:2], str(tmp_path / f"other{other}.parquet")]).close()
        assert not _marker_visible(sandboxed_cursor(files[:2]))
        assert _marker_visible(first)
        assert first.sql(f"SELECT sum(n) FROM read_parquet({files[:2]!r})").fetchall() == [(6,)]
    finally:
        for con in (first, again, fewer, more):
            con.close()


def test_a_forked_child_queries_with_its_own_sandboxes(tmp_path: Path, data_dir: DataDir) -> None:
    """A child forked after queries (the pool and the constants' engine hold databases whose threads do not survive
    a fork) runs a pruned query on databases of its own, gets the parent's answer and exits cleanly."""
    query = load_query("usage_per_tenant_day")
    window = {"start": "2024-03-04T00:00:00Z", "end": "2024-03-05T00:00:00Z"}
    expected = run_local_query(query, window, config=CONFIG, data_dir=data_dir).rows
    answer = tmp_path / "child.txt"
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            rows = run_local_query(query, window, config=CONFIG, data_dir=data_dir).rows
            answer.write_text(repr(rows == expected))
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the child died of signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else '?'}"
    assert os.WEXITSTATUS(status) == 0
    assert answer.read_text() == "True"


def test_a_query_is_prepared_and_its_filter_derived_once(data_dir: DataDir) -> None:
    """Repeating a query reuses its DuckDB statement and its scan filter; other values get their own filter."""
    query = load_query("usage_per_tenant_day")
    window = {"start": "2024-03-04T00:00:00Z", "end": "2024-03-05T00:00:00Z"}
    first = run_local_query(query, window, config=CONFIG, data_dir=data_dir)
    hits = query_module._local_statement.cache_info().hits
    assert run_local_query(query, window, config=CONFIG, data_dir=data_dir).rows == first.rows
    assert query_module._local_statement.cache_info().hits == hits + 1
    bound = bind_params(query, window)
    assert scan_filter(query.sql, bound) is scan_filter(query.sql, dict(reversed(bound.items())))
    other = bind_params(query, {**window, "end": "2024-03-06T00:00:00Z"})
    assert scan_filter(query.sql, other) != scan_filter(query.sql, bound)
    assert run_local_query(query, {**window, "tenant_id": "acme"}, config=CONFIG, data_dir=data_dir).rows == [
        row for row in first.rows if row[0] == "acme"
    ]


@pytest.mark.parametrize("name", QUERY_NAMES)
def test_every_shipped_query_runs_in_the_sandbox(data_dir: DataDir, name: str) -> None:
    assert run(name, data_dir, start="2024-03-04T00:00:00Z", end="2024-03-06T00:00:00Z").rows


def test_a_sql_file_that_is_not_utf8_is_a_definition_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.sql"
    path.write_bytes("-- caf\xe9\nSELECT 1 FROM metering_events\n".encode("latin-1"))
    with pytest.raises(QueryDefinitionError, match=r"latin1\.sql: not UTF-8 text \(byte 0xe9 at offset 6\)"):
        load_query(str(path))


# -- data is shown as text: never rich markup, never raw control characters ----------------------------------------

HOSTILE_TENANTS = ("[/bold]", "[red]x[/red]", "x", "\x1b[31mevil\x1b[0m", "tab\there", "back\\slash", ":thumbs_up:")


def test_table_cells_are_text_with_control_characters_made_visible() -> None:
    result = QueryResult(columns=["tenant_id", "[b]requests[/b]"], rows=[(t, 1) for t in HOSTILE_TENANTS])
    text = format_result(result, "table")
    assert "\x1b" not in text
    assert "\t" not in text
    shown = ("[/bold]", "[red]x[/red]", "[b]requests[/b]", r"\x1b[31mevil\x1b[0m", r"tab\there", r"back\\slash")
    for value in (*shown, ":thumbs_up:"):
        assert value in text
    assert len(text.splitlines()) == len(HOSTILE_TENANTS) + 4


def test_csv_and_json_carry_the_raw_values() -> None:
    result = QueryResult(columns=["tenant_id", "requests"], rows=[(t, 1) for t in HOSTILE_TENANTS])
    rows = list(csv.reader(io.StringIO(format_result(result, "csv"))))
    assert [row[0] for row in rows[1:]] == list(HOSTILE_TENANTS)
    assert [o["tenant_id"] for o in json.loads(format_result(result, "json"))] == list(HOSTILE_TENANTS)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain", "plain"),
        ("\x1b[2J", r"\x1b[2J"),
        ("a\nb\rc\td", r"a\nb\rc\td"),
        ("\x7f\x85\xa0", r"\x7f\x85\xa0"),
        ("\u202eevil\u2028", r"\u202eevil\u2028"),
        ("\ud800", r"\ud800"),
        ("caf\xe9 \u6771\u4eac \U0001f600", "caf\xe9 \u6771\u4eac \U0001f600"),
        ("C:\\x1b", r"C:\\x1b"),
    ],
)
def test_printable_makes_what_a_terminal_would_act_on_visible(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_read_table_files_reads_a_map_column_by_field_id_and_refuses_a_list(tmp_path: Path) -> None:
    schema = Schema(
        NestedField(1, "id", LongType(), required=False),
        NestedField(2, "dimensions", MapType(3, StringType(), 4, StringType(), value_required=False), required=False),
    )
    catalog = open_catalog(DataDir(tmp_path).ensure())
    catalog.create_namespace("t")
    table = catalog.create_table(("t", "maps"), schema=schema)
    table.append(
        pa.table(
            {"id": [1, 2], "dimensions": [[("model", "m1")], None]},
            schema=pa.schema([("id", pa.int64()), ("dimensions", pa.map_(pa.string(), pa.string()))]),
        )
    )
    files = [task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()]
    source = query_module.read_table_files(files, table.schema())
    select = exp.select("id", "dimensions['model'] AS model").from_(source).order_by("id")
    assert duckdb.connect().execute(select.sql(dialect="duckdb")).fetchall() == [(1, "m1"), (2, None)]
    listed = Schema(NestedField(1, "tags", ListType(2, StringType()), required=False))
    with pytest.raises(UnsupportedTableStateError, match="the local runner reads no list<string> column"):
        query_module.read_table_files(files, listed)
