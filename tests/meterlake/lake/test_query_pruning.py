"""The local runner reads only the data files a query can need, and answers exactly as a full scan does.

The table holds four UTC days, several commits a day (so a day has files of different hours and column bounds),
events at the very first and last microsecond of days and hours, a commit of tenantless events only and one of a
single tenant. Every query of sql/ runs pruned and unpruned over windows placed on those edges, empty windows and
windows outside the data, with and without a tenant.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyiceberg.expressions import AlwaysFalse, AlwaysTrue, BooleanExpression

from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.lake.query import (
    QueryResult,
    bind_params,
    load_query,
    plan_data_files,
    run_local_query,
    scan_filter,
)
from meterlake.schema import metering_event_arrow_schema

CONFIG = Config()
DAY = datetime(2025, 6, 1, tzinfo=UTC)
DAYS = 4
MICROSECOND = timedelta(microseconds=1)
QUERIES = ["usage_per_tenant_day", "usage_per_tenant_hour", "top_routes_per_tenant", "requests_by_status_class"]
TENANTS = ("acme", "globex", None)


def _rows(times: list[datetime], tenants: list[str | None], first_id: int) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "request_id": f"req-{first_id + i}",
                "request_time": moment,
                "ingested_at": moment + timedelta(seconds=2),
                "tenant_id": tenant,
                "http_method": ("GET", "POST")[i % 2],
                "resource_path": ("/orders", "/items")[i % 3 % 2],
                "status": (200, 201, 404, 429, 500)[i % 5],
                "response_length": None if i % 11 == 0 else 100 + i,
                "response_latency_ms": None if i % 13 == 0 else 5 + i % 97,
            }
            for i, (moment, tenant) in enumerate(zip(times, tenants, strict=True))
        ],
        schema=metering_event_arrow_schema(),
    )


def _commits() -> list[pa.Table]:
    """Per day: a commit for each quarter of the day, each holding the quarter's first and last microsecond, a
    commit of tenantless events and one of acme alone; so each day is several files with narrow time bounds."""
    commits: list[pa.Table] = []
    first_id = 0
    for day in range(DAYS):
        midnight = DAY + timedelta(days=day)
        for quarter in range(4):
            start = midnight + timedelta(hours=6 * quarter)
            end = start + timedelta(hours=6)
            times = [
                start,
                start + MICROSECOND,
                end - MICROSECOND,
                *(start + timedelta(minutes=17 * k) for k in range(20)),
            ]
            tenants = [TENANTS[(day + quarter + k) % 2] for k in range(len(times))]  # acme and globex
            commits.append(_rows(times, tenants, first_id))
            first_id += len(times)
        tenantless = [midnight + timedelta(hours=3, minutes=k) for k in range(10)]
        commits.append(_rows(tenantless, [None] * len(tenantless), first_id))
        first_id += len(tenantless)
        acme = [midnight + timedelta(hours=20, seconds=k) for k in range(10)]
        commits.append(_rows(acme, ["acme"] * len(acme), first_id))
        first_id += len(acme)
    return commits


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    data = DataDir.resolve(tmp_path_factory.mktemp("pruning"))
    table = ensure_metering_table(open_catalog(data), CONFIG)
    for commit in _commits():
        table.append(commit)
    return data


#: The window parameters under other names: ``meterlake query`` refuses a window whose end is not after its start,
#: but the runner must still prune such a WHERE clause to nothing, exactly as the full scan finds nothing.
_UNCHECKED = {"start": "lower", "end": "upper"}


def _run(data: DataDir, name: str, *, prune: bool, **params: str) -> QueryResult:
    query = load_query(name)
    window = [datetime.fromisoformat(params[name]) for name in ("start", "end") if name in params]
    if len(window) == 2 and window[1] <= window[0]:
        sql = query.sql
        for old, new in _UNCHECKED.items():
            sql = re.sub(rf":{old}\b", f":{new}", sql)
        query = dataclasses.replace(
            query,
            sql=sql,
            params=tuple(dataclasses.replace(p, name=_UNCHECKED.get(p.name, p.name)) for p in query.params),
        )
        params = {_UNCHECKED.get(key, key): value for key, value in params.items()}
    return run_local_query(query, params, config=CONFIG, data_dir=data, prune=prune)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _assert_same_as_full_scan(data: DataDir, name: str, **params: str) -> QueryResult:
    pruned = _run(data, name, prune=True, **params)
    full = _run(data, name, prune=False, **params)
    assert pruned.rows == full.rows, (name, params)
    assert pruned.columns == full.columns
    assert pruned.files_read is not None
    assert full.files_read is not None
    assert pruned.files_read <= full.files_read
    return pruned


EDGE = DAY + timedelta(days=1)  # a UTC midnight with events at its last microsecond before and first after
WINDOWS: dict[str, tuple[datetime, datetime]] = {
    "one UTC day": (EDGE, EDGE + timedelta(days=1)),
    "ends on a midnight, exclusive": (EDGE - timedelta(hours=1), EDGE),
    "starts on a midnight, inclusive": (EDGE, EDGE + timedelta(hours=1)),
    "one microsecond at a midnight": (EDGE, EDGE + MICROSECOND),
    "the microsecond before a midnight": (EDGE - MICROSECOND, EDGE),
    "across a midnight": (EDGE - timedelta(minutes=1), EDGE + timedelta(minutes=1)),
    "quarter edges": (EDGE + timedelta(hours=6) - MICROSECOND, EDGE + timedelta(hours=12) + MICROSECOND),
    "empty: start == end": (EDGE, EDGE),
    "empty: start > end": (EDGE + timedelta(days=1), EDGE),
    "before the data": (DAY - timedelta(days=3), DAY),
    "after the data": (DAY + timedelta(days=DAYS), DAY + timedelta(days=DAYS + 2)),
    "all of it": (DAY - timedelta(days=1), DAY + timedelta(days=DAYS + 1)),
}


@pytest.mark.parametrize("window", list(WINDOWS))
def test_pruned_hourly_usage_answers_as_a_full_scan_on_every_edge(data_dir: DataDir, window: str) -> None:
    start, end = WINDOWS[window]
    for tenant in (None, "acme", "nobody"):
        params = {"start": _iso(start), "end": _iso(end)} | ({"tenant_id": tenant} if tenant else {})
        _assert_same_as_full_scan(data_dir, "usage_per_tenant_hour", **params)


@pytest.mark.parametrize("window", ["one UTC day", "across a midnight", "empty: start == end"])
@pytest.mark.parametrize("name", QUERIES)
def test_every_query_pruned_answers_as_a_full_scan(data_dir: DataDir, name: str, window: str) -> None:
    start, end = WINDOWS[window]
    _assert_same_as_full_scan(data_dir, name, start=_iso(start), end=_iso(end))


def test_a_day_reads_only_that_days_files(data_dir: DataDir) -> None:
    day = _assert_same_as_full_scan(data_dir, "usage_per_tenant_day", start=_iso(EDGE), end=_iso(EDGE + timedelta(1)))
    everything = _run(data_dir, "usage_per_tenant_day", prune=False)
    per_day = len(_commits()) // DAYS
    assert everything.files_read == DAYS * per_day
    assert day.files_read == per_day
    assert day.bytes_read is not None
    assert everything.bytes_read is not None
    assert day.bytes_read < everything.bytes_read / (DAYS - 1)
    assert {row[1] for row in day.rows} == {EDGE.date()}


def test_column_bounds_prune_within_a_day(data_dir: DataDir) -> None:
    """An hour reads the files whose time bounds hold it, not the day's other quarters."""
    hour = _assert_same_as_full_scan(
        data_dir, "usage_per_tenant_hour", start=_iso(EDGE + timedelta(hours=7)), end=_iso(EDGE + timedelta(hours=8))
    )
    assert hour.files_read == 1


def test_a_tenant_skips_files_without_it_and_the_tenantless(data_dir: DataDir) -> None:
    window = {"start": _iso(EDGE), "end": _iso(EDGE + timedelta(days=1))}
    acme = _assert_same_as_full_scan(data_dir, "usage_per_tenant_day", tenant_id="acme", **window)
    day = _run(data_dir, "usage_per_tenant_day", prune=True, **window)
    assert acme.files_read is not None
    assert day.files_read is not None
    assert acme.files_read < day.files_read  # the tenantless commit holds only nulls: its bounds say so
    nobody = _assert_same_as_full_scan(data_dir, "usage_per_tenant_day", tenant_id="nobody", **window)
    assert nobody.rows == []
    assert nobody.files_read == 0  # "nobody" sorts after every tenant's upper bound


def test_null_tenants_are_read_where_they_are(data_dir: DataDir, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("sql") / "tenantless.sql"
    path.write_text(
        "-- Tenantless requests per day.\n"
        "SELECT CAST(request_time AS date) AS day, count(*) AS n FROM metering_events\n"
        "WHERE tenant_id IS NULL GROUP BY 1 ORDER BY 1\n"
    )
    pruned = _assert_same_as_full_scan(data_dir, str(path))
    assert pruned.files_read == DAYS  # the tenantless commits only
    assert [row[1] for row in pruned.rows] == [10] * DAYS


@pytest.mark.parametrize("window", ["one UTC day", "quarter edges", "before the data", "all of it"])
@pytest.mark.parametrize("tenant", [None, "acme", "nobody"])
def test_planning_finds_the_files_a_pyiceberg_scan_plans(data_dir: DataDir, window: str, tenant: str | None) -> None:
    """plan_data_files skips pyiceberg's per-file residuals, and nothing else: the same files, none with deletes."""
    start, end = WINDOWS[window]
    query = load_query("usage_per_tenant_day")
    params = {"start": _iso(start), "end": _iso(end)} | ({"tenant_id": tenant} if tenant else {})
    row_filter = scan_filter(query.sql, bind_params(query, params))
    table = ensure_metering_table(open_catalog(data_dir), CONFIG)
    planned = plan_data_files(table, row_filter)
    expected = sorted(task.file.file_path for task in table.scan(row_filter=row_filter).plan_files())
    assert sorted(task.file.file_path for task in planned) == expected
    assert all(task.residual == AlwaysTrue() and not task.delete_files for task in planned)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    start=st.integers(min_value=-2, max_value=DAYS * 24 * 4 + 2),
    length=st.integers(min_value=-2, max_value=24 * 4 * 2),
    nudge=st.sampled_from([-1, 0, 1]),
    tenant=st.sampled_from(["", "acme", "globex", "nobody"]),
)
def test_any_window_on_quarter_hour_edges_answers_as_a_full_scan(
    data_dir: DataDir, start: int, length: int, nudge: int, tenant: str
) -> None:
    begin = DAY + timedelta(minutes=15 * start) + nudge * MICROSECOND
    end = begin + timedelta(minutes=15 * length)
    params = {"start": _iso(begin), "end": _iso(end)} | ({"tenant_id": tenant} if tenant else {})
    _assert_same_as_full_scan(data_dir, "usage_per_tenant_hour", **params)


def _filter(sql: str, **params: str | int | None) -> BooleanExpression:
    return scan_filter(sql, params)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM metering_events",
        # A join keeps rows its WHERE would reject (outer sides); the table read twice; a CTE named like the table.
        "SELECT * FROM metering_events e LEFT JOIN metering_events f ON e.request_id = f.request_id"
        " WHERE f.tenant_id = 'a'",
        "SELECT * FROM metering_events WHERE tenant_id = 'a' UNION ALL SELECT * FROM metering_events",
        "WITH metering_events AS (SELECT 1 AS tenant_id) SELECT * FROM metering_events WHERE tenant_id = 1",
        # Not a column compared with a constant: a function of it, a NOT, now(), another column, a subquery.
        "SELECT * FROM metering_events WHERE lower(tenant_id) = 'a'",
        "SELECT * FROM metering_events WHERE NOT tenant_id = 'a'",
        "SELECT * FROM metering_events WHERE request_time > now()",
        "SELECT * FROM metering_events WHERE tenant_id = user",
        "SELECT * FROM metering_events WHERE tenant_id IN (SELECT 'a')",
        # A value of another type than its column's, or finer than Iceberg's microseconds.
        "SELECT * FROM metering_events WHERE status = '200'",
        "SELECT * FROM metering_events WHERE request_time >= '2025-06-01'",
        "SELECT * FROM metering_events WHERE request_time >= CAST('2025-06-01 00:00:00.0000001' AS TIMESTAMP(9))",
        # Another table's column.
        "SELECT * FROM metering_events WHERE other.tenant_id = 'a'",
        # An outer query's WHERE over a subquery of the table.
        "SELECT * FROM (SELECT * FROM metering_events) t WHERE t.tenant_id = 'a'",
    ],
)
def test_what_cannot_be_read_as_a_filter_prunes_nothing(sql: str) -> None:
    assert _filter(sql) == AlwaysTrue()


def test_constants_are_the_querys_own_values() -> None:
    query = load_query("usage_per_tenant_day")
    bound = bind_params(query, {"start": "2025-06-02T01:00:00+01:00", "end": "2025-06-03", "tenant_id": "acme"})
    assert str(scan_filter(query.sql, bound)) == str(
        _filter(
            "SELECT 1 FROM metering_events WHERE request_time >= TIMESTAMP '2025-06-02 00:00:00'"
            " AND metering_events.request_time < DATE '2025-06-03' AND 'acme' = tenant_id"
        )
    )
    no_tenant = bind_params(query, {"start": "2025-06-02", "end": "2025-06-03"})
    assert "tenant_id" not in str(scan_filter(query.sql, no_tenant))


def test_a_condition_no_row_can_meet_prunes_everything() -> None:
    assert _filter("SELECT * FROM metering_events WHERE 1 = 0 AND tenant_id = 'a'") == AlwaysFalse()
    assert _filter("SELECT * FROM metering_events WHERE :t IS NOT NULL", t=None) == AlwaysFalse()
    assert _filter("SELECT * FROM metering_events WHERE NULL") == AlwaysFalse()
