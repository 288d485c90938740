"""Usage from the lake: event and request meters, every aggregation and interval, against the sql/ files and an
independent Python count; late and backfilled events, filters, groups, take, and cancellation rules."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pyarrow as pa
import pytest

from meterlake.amberflo.api import (
    Aggregation,
    RequestError,
    TimeGroupingInterval,
    UsageQuery,
    bucket_start,
    parse_usage_query,
)
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.query import load_query, run_local_query
from meterlake.schema import metering_event_arrow_schema
from meterlake.service.cancellation import CancellationRules, parse_rule
from meterlake.service.usage import UsageEngine, run_event_usage_sql

from .conftest import NOW_MS, Harness, record

HOUR_S, DAY_S = 3600, 86400
CUSTOMERS = ("acme", "globex", "initech")
MODELS = ("m1", "m2", "m3")
INTERVALS: tuple[TimeGroupingInterval, ...] = get_args(TimeGroupingInterval)
AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
SQL_COLUMN = {"SUM": 2, "COUNT": 3, "MIN": 4, "MAX": 5, "UNIQUE_COUNT": 6}


@pytest.fixture
def engine(harness: Harness) -> UsageEngine:
    rules = CancellationRules(harness.store)
    return UsageEngine(
        config=harness.config,
        data_dir=harness.data_dir,
        registry=harness.registry,
        rules=rules,
        before_read=harness.stream.flush,
    )


def query(meter: str = "gpu-seconds", **body: Any) -> UsageQuery:
    document = {
        "meterApiName": meter,
        "timeGroupingInterval": "DAY",
        "timeRange": {"startTimeInSeconds": NOW_MS // 1000 - 34 * DAY_S, "endTimeInSeconds": NOW_MS // 1000 + HOUR_S},
        **body,
    }
    return parse_usage_query(document, now_s=NOW_MS // 1000, aggregations=AGGREGATIONS, aggregation_required=False)


def by_customer_bucket(report: dict[str, Any]) -> dict[tuple[str, int], float]:
    return {
        (meter["group"]["groupInfo"]["customerId"], value["secondsSinceEpochUtc"]): value["value"]
        for meter in report["clientMeters"]
        for value in meter["values"]
    }


def _generated(count: int, seed: int = 11) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        record(
            meterApiName="gpu-seconds",
            customerId=rng.choice(CUSTOMERS),
            meterValue=rng.randrange(1, 1000),
            meterTimeInMillis=NOW_MS - rng.randrange(33 * DAY_S * 1000),
            uniqueId=f"g-{i}",
            dimensions={"model": rng.choice(MODELS), "region": rng.choice(("eu", "us"))},
        )
        for i in range(count)
    ]


def _expected(records: list[dict[str, Any]], aggregation: str, interval: TimeGroupingInterval) -> dict[Any, float]:
    members: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for item in records:
        members[(item["customerId"], bucket_start(item["meterTimeInMillis"] // 1000, interval))].append(item)
    values = {key: [float(item["meterValue"]) for item in group] for key, group in members.items()}
    if aggregation == "SUM":
        return {key: sum(v) for key, v in values.items()}
    if aggregation == "COUNT":
        return {key: float(len(v)) for key, v in values.items()}
    if aggregation == "MIN":
        return {key: min(v) for key, v in values.items()}
    if aggregation == "MAX":
        return {key: max(v) for key, v in values.items()}
    return {key: float(len({item["dimensions"]["model"] for item in group})) for key, group in members.items()}


def test_event_meter_usage_equals_the_sql_file_and_python_for_every_aggregation_and_interval(
    harness: Harness, engine: UsageEngine
) -> None:
    harness.registry.create(
        {
            "label": "GPU",
            "meterApiName": "gpu-seconds",
            "meterType": "sum_of_all_usage",
            "dimensions": ["model", "region"],
        }
    )
    generated = _generated(1500)
    for start in range(0, len(generated), 100):
        harness.ingest(generated[start : start + 100])
    harness.ingest(generated[:100])  # a retried batch changes nothing
    harness.stream.flush()
    window = query()
    for interval in INTERVALS:
        sql = run_event_usage_sql(
            {
                "meter_api_name": "gpu-seconds",
                "start": datetime.fromtimestamp(window.start_s, UTC).isoformat(),
                "end": datetime.fromtimestamp(window.end_s, UTC).isoformat(),
                "unit": interval.lower(),
                "unique_dimension": "model",
            },
            config=harness.config,
            data_dir=harness.data_dir,
        )
        assert sql.columns[:2] == ["customer_id", "bucket_epoch_s"]
        for aggregation in AGGREGATIONS:
            report = engine.report(
                query(timeGroupingInterval=interval, aggregation=aggregation, groupBy=["customerId"]), zero_fill=False
            )
            usage = by_customer_bucket(report)
            from_sql = {(row[0], int(row[1])): float(row[SQL_COLUMN[aggregation]]) for row in sql.rows}
            expected = _expected(generated, aggregation, interval)
            assert usage == from_sql == expected, (interval, aggregation)
            totals = {m["group"]["groupInfo"]["customerId"]: m["groupValue"] for m in report["clientMeters"]}
            if aggregation in ("SUM", "COUNT"):  # over the whole range: the buckets' sum
                assert totals == {c: sum(v for (cc, _), v in expected.items() if cc == c) for c in CUSTOMERS}


def test_group_values_filters_groups_and_take(harness: Harness, engine: UsageEngine) -> None:
    harness.registry.create(
        {"label": "GPU", "meterApiName": "gpu-seconds", "meterType": "max_usage", "dimensions": ["model"]}
    )
    base = NOW_MS - 2 * DAY_S * 1000
    harness.ingest(
        [
            record(
                meterApiName="gpu-seconds",
                customerId="acme",
                meterValue=5,
                meterTimeInMillis=base,
                dimensions={"model": "m1"},
            ),
            record(
                meterApiName="gpu-seconds",
                customerId="acme",
                meterValue=9,
                meterTimeInMillis=base + DAY_S * 1000,
                dimensions={"model": "m2"},
            ),
            record(
                meterApiName="gpu-seconds",
                customerId="globex",
                meterValue=7,
                meterTimeInMillis=base,
                dimensions={"model": "m1"},
            ),
            record(meterApiName="gpu-seconds", customerId="globex", meterValue=1, meterTimeInMillis=base),
        ]
    )
    whole = engine.report(query(), zero_fill=True)  # the meter's own aggregation: MAX for max_usage
    assert whole["metadata"]["aggregation"] == "MAX"
    [meter] = whole["clientMeters"]
    assert "group" not in meter
    assert meter["groupValue"] == 9.0
    assert len(meter["values"]) == len(whole["secondsSinceEpochIntervals"])  # zero-filled
    by_model = engine.report(query(aggregation="SUM", groupBy=["model"]), zero_fill=False)
    assert {m["group"]["groupInfo"]["model"]: m["groupValue"] for m in by_model["clientMeters"]} == {
        None: 1.0,
        "m1": 12.0,
        "m2": 9.0,
    }
    filtered = engine.report(
        query(aggregation="SUM", groupBy=["customerId", "model"], filter={"model": ["m1"], "customerId": ["acme"]}),
        zero_fill=False,
    )
    assert [(m["group"]["groupInfo"], m["groupValue"]) for m in filtered["clientMeters"]] == [
        ({"customerId": "acme", "model": "m1"}, 5.0)
    ]
    top = engine.report(query(aggregation="SUM", groupBy=["customerId"], take={"limit": 1}), zero_fill=False)
    assert [m["group"]["groupInfo"]["customerId"] for m in top["clientMeters"]] == ["acme"]
    nothing = engine.report(query(aggregation="SUM", filter={"customerId": ["nobody"]}), zero_fill=True)
    assert nothing["clientMeters"][0]["groupValue"] == 0.0


def test_late_and_backfilled_events_count_in_their_own_buckets(harness: Harness, engine: UsageEngine) -> None:
    harness.ingest([record(meterValue=10, uniqueId="today")])
    before = engine.report(query("llm-tokens", groupBy=["customerId"]), zero_fill=False)
    harness.ingest([record(meterValue=3, meterTimeInMillis=NOW_MS - 3 * DAY_S * 1000, uniqueId="late")])
    harness.ingest([record(meterValue=4, meterTimeInMillis=NOW_MS - 30 * DAY_S * 1000, uniqueId="backfill")])
    after = engine.report(query("llm-tokens", groupBy=["customerId"]), zero_fill=False)
    today = bucket_start(NOW_MS // 1000, "DAY")
    assert by_customer_bucket(before) == {("acme", today): 10.0}
    assert by_customer_bucket(after) == {
        ("acme", today): 10.0,
        ("acme", bucket_start(NOW_MS // 1000 - 3 * DAY_S, "DAY")): 3.0,
        ("acme", bucket_start(NOW_MS // 1000 - 30 * DAY_S, "DAY")): 4.0,
    }
    recent = {"startTimeInSeconds": NOW_MS // 1000 - 2 * DAY_S, "endTimeInSeconds": NOW_MS // 1000 + 1}
    outside = query("llm-tokens", timeRange=recent)
    assert engine.report(outside, zero_fill=True)["clientMeters"][0]["groupValue"] == 10.0


def test_cancellation_rules_exclude_matching_events_by_ingestion_time(harness: Harness, engine: UsageEngine) -> None:
    rules = CancellationRules(harness.store)
    harness.ingest([record(meterValue=1, uniqueId="a1"), record(customerId="globex", meterValue=2, uniqueId="g1")])
    time.sleep(1.1)  # rules select by ingestion time, in whole seconds
    cut = int(time.time())
    harness.ingest(
        [
            record(meterValue=10, uniqueId="a2", dimensions={"model": "m1"}),
            record(meterValue=20, uniqueId="a3", dimensions={"model": "m2"}),
            record(customerId="globex", meterValue=40, uniqueId="g2"),
        ]
    )

    def totals() -> dict[str, float]:
        report = engine.report(query("llm-tokens", groupBy=["customerId"]), zero_fill=False)
        return {m["group"]["groupInfo"]["customerId"]: m["groupValue"] for m in report["clientMeters"]}

    assert totals() == {"acme": 31.0, "globex": 42.0}
    window = {"startTimeInSeconds": cut, "endTimeInSeconds": cut + 600}
    now_ms = int(time.time() * 1000)
    narrowed = parse_rule(
        {
            "id": "r1",
            "meterApiName": "llm-tokens",
            "ingestionTimeRange": window,
            "filter": {"customerId": ["acme"], "model": ["m2"]},
        },
        harness.registry,
        now_ms=now_ms,
    )
    rules.put(narrowed)
    assert totals() == {"acme": 11.0, "globex": 42.0}
    rules.put(
        parse_rule(
            {"id": "r2", "meterApiName": "llm-tokens", "ingestionTimeRange": window}, harness.registry, now_ms=now_ms
        )
    )
    assert totals() == {"acme": 1.0, "globex": 2.0}
    assert [rule.id for rule in rules.rules()] == ["r1", "r2"]
    removed = rules.remove("r2")
    assert removed.removed_ms is not None
    assert totals() == {"acme": 11.0, "globex": 42.0}
    assert [rule.id for rule in rules.rules(include_removed=True)] == ["r1", "r2"]
    with pytest.raises(RequestError) as missing:
        rules.remove("r2")
    assert missing.value.status == 404
    assert len(harness.committed_rows()) == 5  # nothing was deleted


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"meterApiName": "llm-tokens", "ingestionTimeRange": {"startTimeInSeconds": 1, "endTimeInSeconds": 2}}, "id"),
        ({"id": "r", "ingestionTimeRange": {"startTimeInSeconds": 1, "endTimeInSeconds": 2}}, "meterApiName"),
        ({"id": "r", "meterApiName": "llm-tokens"}, "ingestionTimeRange"),
        (
            {"id": "r", "meterApiName": "nope", "ingestionTimeRange": {"startTimeInSeconds": 1, "endTimeInSeconds": 2}},
            "meterApiName 'nope'",
        ),
        (
            {
                "id": "r",
                "meterApiName": "llm-tokens",
                "ingestionTimeRange": {"startTimeInSeconds": 3, "endTimeInSeconds": 2},
            },
            "endTimeInSeconds",
        ),
        (
            {
                "id": "r",
                "meterApiName": "llm-tokens",
                "ingestionTimeRange": {"startTimeInSeconds": "1", "endTimeInSeconds": 2},
            },
            "startTimeInSeconds",
        ),
        (
            {
                "id": "r",
                "meterApiName": "llm-tokens",
                "type": "other",
                "ingestionTimeRange": {"startTimeInSeconds": 1, "endTimeInSeconds": 2},
            },
            "type",
        ),
        (
            {
                "id": "r",
                "meterApiName": "llm-tokens",
                "filter": {"customerId": []},
                "ingestionTimeRange": {"startTimeInSeconds": 1, "endTimeInSeconds": 2},
            },
            "filter.customerId",
        ),
        (
            {
                "id": "r",
                "meterApiName": "api-calls",
                "filter": {"status": ["500"]},
                "ingestionTimeRange": {"startTimeInSeconds": 1, "endTimeInSeconds": 2},
            },
            "filter.status",
        ),
        (
            {
                "id": "",
                "meterApiName": "llm-tokens",
                "ingestionTimeRange": {"startTimeInSeconds": 1, "endTimeInSeconds": 2},
            },
            "id must be",
        ),
    ],
)
def test_invalid_rules_are_400_naming_the_field(harness: Harness, body: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message) as refused:
        parse_rule(body, harness.registry, now_ms=NOW_MS)
    assert refused.value.status == 400


def test_unknown_meters_keys_and_aggregations_are_refused(engine: UsageEngine) -> None:
    with pytest.raises(RequestError) as unknown:
        engine.report(query("nope"), zero_fill=True)
    assert unknown.value.status == 404
    with pytest.raises(RequestError, match="'status'"):
        engine.report(query("api-calls", groupBy=["status"]), zero_fill=True)
    with pytest.raises(RequestError, match="UNIQUE_COUNT"):
        engine.report(query("llm-tokens", aggregation="UNIQUE_COUNT"), zero_fill=True)


# -- request meters ------------------------------------------------------------------------------------------------


def _access_log_rows(count: int, seed: int = 5) -> pa.Table:
    rng = random.Random(seed)
    start = datetime.fromtimestamp(NOW_MS / 1000, UTC) - timedelta(days=3)
    rows = []
    for i in range(count):
        moment = start + timedelta(seconds=rng.randrange(3 * DAY_S))
        rows.append(
            {
                "request_id": f"req-{i}",
                "request_time": moment,
                "ingested_at": moment + timedelta(seconds=2),
                "tenant_id": rng.choice((*CUSTOMERS, None)),
                "http_method": rng.choice(("GET", "POST")),
                "resource_path": rng.choice(("/orders", "/items")),
                "status": rng.choice((200, 201, 404, 500, 503)),
                "response_length": rng.choice((None, rng.randrange(4000))),
            }
        )
    schema = metering_event_arrow_schema()
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.table(columns, schema=schema)


def test_request_meter_usage_equals_the_usage_queries_on_every_bucket(harness: Harness, engine: UsageEngine) -> None:
    table = ensure_metering_table(open_catalog(harness.data_dir), harness.config)
    table.append(_access_log_rows(3000))
    start = datetime.fromtimestamp(NOW_MS / 1000, UTC) - timedelta(days=4)
    end = datetime.fromtimestamp(NOW_MS / 1000, UTC) + timedelta(hours=1)
    params = {"start": start.isoformat(), "end": end.isoformat()}
    span = {"startTimeInSeconds": int(start.timestamp()), "endTimeInSeconds": int(end.timestamp())}
    for interval, name, column in (
        ("DAY", "usage_per_tenant_day", "usage_date"),
        ("HOUR", "usage_per_tenant_hour", "usage_hour"),
    ):
        result = run_local_query(load_query(name), params, config=harness.config, data_dir=harness.data_dir)
        at = {c: i for i, c in enumerate(result.columns)}
        expected: dict[tuple[str, int], float] = {}
        for row in result.rows:
            tenant, bucket, billable = row[at["tenant_id"]], row[at[column]], row[at["billable_requests"]]
            if tenant is None or not billable:
                continue
            moment = (
                bucket if isinstance(bucket, datetime) else datetime(bucket.year, bucket.month, bucket.day, tzinfo=UTC)
            )
            expected[(tenant, int(moment.timestamp()))] = float(billable)
        report = engine.report(
            query("api-calls", timeGroupingInterval=interval, timeRange=span, groupBy=["customerId"]), zero_fill=False
        )
        assert by_customer_bucket(report) == expected, interval
        if interval == "DAY":  # WEEK (Monday) and MONTH buckets are sums of the day query's rows
            for coarser in get_args(TimeGroupingInterval):
                if coarser in ("WEEK", "MONTH"):
                    rolled: dict[tuple[str, int], float] = defaultdict(float)
                    for (tenant, day), billable in expected.items():
                        rolled[(tenant, bucket_start(day, coarser))] += billable
                    report = engine.report(
                        query("api-calls", timeGroupingInterval=coarser, timeRange=span, groupBy=["customerId"]),
                        zero_fill=False,
                    )
                    assert by_customer_bucket(report) == dict(rolled), coarser
    by_route = engine.report(query("api-calls", timeRange=span, groupBy=["resource_path"]), zero_fill=False)
    assert {m["group"]["groupInfo"]["resource_path"] for m in by_route["clientMeters"]} == {"/orders", "/items"}
    egress = engine.report(query("egress-bytes", timeRange=span, filter={"customerId": ["acme"]}), zero_fill=False)
    rows = _access_log_rows(3000).to_pylist()
    assert egress["clientMeters"][0]["groupValue"] == sum(
        r["response_length"] or 0 for r in rows if r["tenant_id"] == "acme" and r["status"] < 500
    )


def _request_meter_expected(
    rows: list[dict[str, Any]], meter: str, aggregation: Aggregation, interval: TimeGroupingInterval
) -> tuple[dict[tuple[str, int], float], dict[str, float]]:
    """Per (customer, bucket) and per customer over the range, counted in Python from the config meters' definitions
    as the docs state them: a tenant, status < 500 (egress-bytes: and a response length); the value 1 or the length;
    UNIQUE_COUNT counts distinct values of the first dimension (resource_path)."""
    members: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["tenant_id"] is None or row["status"] >= 500:
            continue
        if meter == "egress-bytes" and row["response_length"] is None:
            continue
        members[(row["tenant_id"], bucket_start(int(row["request_time"].timestamp()), interval))].append(row)

    def aggregate(group: list[dict[str, Any]]) -> float:
        values = [1.0 if meter == "api-calls" else float(row["response_length"]) for row in group]
        if aggregation == "UNIQUE_COUNT":
            return float(len({row["resource_path"] for row in group}))
        if aggregation == "COUNT":
            return float(len(values))
        return float({"SUM": sum(values), "MIN": min(values), "MAX": max(values)}[aggregation])

    per_customer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (customer, _), group in members.items():
        per_customer[customer].extend(group)
    return (
        {key: aggregate(group) for key, group in members.items()},
        {customer: aggregate(group) for customer, group in per_customer.items()},
    )


def test_request_meters_equal_a_python_count_for_every_aggregation_and_interval(
    harness: Harness, engine: UsageEngine
) -> None:
    generated = _access_log_rows(3000, seed=17)
    ensure_metering_table(open_catalog(harness.data_dir), harness.config).append(generated)
    rows = generated.to_pylist()
    start = datetime.fromtimestamp(NOW_MS / 1000, UTC) - timedelta(days=4)
    span = {"startTimeInSeconds": int(start.timestamp()), "endTimeInSeconds": NOW_MS // 1000 + HOUR_S}
    for meter in ("api-calls", "egress-bytes"):
        for interval in INTERVALS:
            for aggregation in AGGREGATIONS:
                report = engine.report(
                    query(meter, timeGroupingInterval=interval, timeRange=span, aggregation=aggregation,
                          groupBy=["customerId"]),
                    zero_fill=False,
                )  # fmt: skip
                buckets, totals = _request_meter_expected(rows, meter, aggregation, interval)
                assert by_customer_bucket(report) == buckets, (meter, interval, aggregation)
                groups = {m["group"]["groupInfo"]["customerId"]: m["groupValue"] for m in report["clientMeters"]}
                assert groups == totals, (meter, interval, aggregation)
    assert set(totals) == set(CUSTOMERS)


def test_the_sql_file_counts_before_rules_so_it_exceeds_usage_by_exactly_the_cancelled_events(
    harness: Harness, engine: UsageEngine
) -> None:
    harness.registry.create(
        {"label": "GPU", "meterApiName": "gpu-seconds", "meterType": "sum_of_all_usage", "dimensions": ["model"]}
    )
    generated = _generated(300, seed=23)
    harness.ingest(generated)
    harness.stream.flush()
    now = int(time.time())
    rule = {
        "id": "wrong-model",
        "meterApiName": "gpu-seconds",
        "filter": {"customerId": ["acme", "globex"], "model": ["m2"]},
        "ingestionTimeRange": {"startTimeInSeconds": now - 600, "endTimeInSeconds": now + 600},
    }
    CancellationRules(harness.store).put(parse_rule(rule, harness.registry, now_ms=now * 1000))
    cancelled = [r for r in generated if r["customerId"] in ("acme", "globex") and r["dimensions"]["model"] == "m2"]
    assert 0 < len(cancelled) < len(generated)
    window = query()
    for interval in INTERVALS:
        sql = run_event_usage_sql(
            {
                "meter_api_name": "gpu-seconds",
                "start": datetime.fromtimestamp(window.start_s, UTC).isoformat(),
                "end": datetime.fromtimestamp(window.end_s, UTC).isoformat(),
                "unit": interval.lower(),
            },
            config=harness.config,
            data_dir=harness.data_dir,
        )
        for aggregation in ("SUM", "COUNT"):
            from_sql = {(row[0], int(row[1])): float(row[SQL_COLUMN[aggregation]]) for row in sql.rows}
            assert from_sql == _expected(generated, aggregation, interval)  # every event: the rule is not applied
            usage = by_customer_bucket(
                engine.report(
                    query(timeGroupingInterval=interval, aggregation=aggregation, groupBy=["customerId"]),
                    zero_fill=True,
                )
            )
            gone = _expected(cancelled, aggregation, interval)
            difference = {key: value - usage.get(key, 0.0) for key, value in from_sql.items()}
            assert {key: value for key, value in difference.items() if value} == gone, (interval, aggregation)
