"""The local Amberflo over real HTTP: ingest, dedup, usage queries, meters, faults, and Amberflo's own SDK."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from metering.ingest import IngestApiClient, create_ingest_payload  # type: ignore[import-untyped]
from metering.session.api_session import ApiSession  # type: ignore[import-untyped]
from metering.session.ingest_session import IngestSession  # type: ignore[import-untyped]
from metering.usage import (  # type: ignore[import-untyped]
    AggregationType,
    TimeGroupingInterval,
    TimeRange,
    UsageApiClient,
    create_usage_query,
)

from meterlake.amberflo.api import CANCEL_DIMENSION, bucket_start, percentage_from_previous
from meterlake.amberflo.server import FaultPlan, IngestedRecord, LocalAmberflo, main
from meterlake.local.serving import PortInUseError

KEY = "test-key"
HEADERS = {"X-API-KEY": KEY}
DAY = 86400
# 2021-04-25 00:00:00 UTC, a Sunday.
T0 = 1619308800
MISSING = object()
WORKFLOW_NAME = "amberflo-ingest-and-query-usage-workflow.yml"
WORKFLOW_CANDIDATES = [
    Path(__file__).parent / "fixtures" / WORKFLOW_NAME,
    Path("/work/shared/fixtures") / WORKFLOW_NAME,
]


def test_the_repos_workflow_fixture_is_the_shared_one() -> None:
    """The tests run the repo's copy (a fresh clone has no ../shared); where the shared original is present, the copy
    must be identical to it, byte for byte."""
    shared = Path(__file__).resolve().parents[4] / "shared" / "fixtures" / WORKFLOW_NAME
    if not shared.exists():
        pytest.skip(f"no shared original at {shared}")
    assert WORKFLOW_CANDIDATES[0].read_bytes() == shared.read_bytes()


@pytest.fixture(scope="module")
def module_server() -> Iterator[LocalAmberflo]:
    with LocalAmberflo(api_key=KEY) as server:
        yield server


@pytest.fixture
def server(module_server: LocalAmberflo) -> Iterator[LocalAmberflo]:
    module_server.faults = FaultPlan()
    module_server.reset()
    yield module_server
    module_server.faults = FaultPlan()


@pytest.fixture
def client(server: LocalAmberflo) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=10) as http:
        yield http


def record(
    customer: str = "c1",
    value: float = 1,
    at_s: int = T0,
    meter: str = "ApiCalls",
    unique_id: str | None = None,
    dimensions: dict[str, str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customerId": customer,
        "meterApiName": meter,
        "meterValue": value,
        "meterTimeInMillis": at_s * 1000,
    }
    if unique_id is not None:
        body["uniqueId"] = unique_id
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


def ingest(client: httpx.Client, records: list[dict[str, Any]]) -> httpx.Response:
    response = client.post("/ingest", json=records)
    assert response.status_code == 200, response.text
    return response


# Ingest


def test_gzip_array_is_ingested_with_amberflos_answer(server: LocalAmberflo, client: httpx.Client) -> None:
    records = [record(unique_id=f"u{i}", value=i) for i in range(10)]
    response = client.post(
        "/ingest/",
        content=gzip.compress(json.dumps(records).encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert (response.status_code, response.text) == (200, "10 records were ingested")
    assert response.headers["content-type"].startswith("text/plain")
    assert server.accepted_unique_ids() == {f"u{i}" for i in range(10)}
    assert server.records()[3] == IngestedRecord("c1", "ApiCalls", 3, T0 * 1000, "u3", {})


def test_single_record_and_ndjson_bodies(server: LocalAmberflo, client: httpx.Client) -> None:
    single = client.post("/ingest", content=json.dumps(record(unique_id="one")))
    ndjson = "\n".join(json.dumps(record(unique_id=f"n{i}")) for i in range(3)) + "\n"
    lines = client.post("/ingest", content=gzip.compress(ndjson.encode()), headers={"Content-Encoding": "gzip"})
    assert (single.text, lines.text) == ("1 records were ingested", "3 records were ingested")
    assert server.accepted_unique_ids() == {"one", "n0", "n1", "n2"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"customerId": MISSING}, "record 2: customerId must be a non-empty string, got None"),
        ({"meterTimeInMillis": MISSING}, "record 2: meterTimeInMillis must be a positive integer"),
        ({"customerId": ""}, "record 2: customerId must be a non-empty string"),
        ({"meterTimeInMillis": 1.5}, "record 2: meterTimeInMillis must be a positive integer"),
        ({"meterTimeInMillis": "1619308800000"}, "record 2: meterTimeInMillis must be a positive integer"),
        ({"meterValue": "3"}, "record 2: meterValue must be a number"),
        ({"meterValue": True}, "record 2: meterValue must be a number"),
        ({"meterApiName": 7}, "record 2: meterApiName must be a non-empty string"),
        ({"uniqueId": 7}, "record 2: uniqueId must be a non-empty string"),
        ({"dimensions": {"region": 1}}, "record 2: dimensions.region must be a string"),
        ({"dimensions": ["a"]}, "record 2: dimensions must be an object"),
    ],
)
def test_an_invalid_record_refuses_the_whole_request(
    server: LocalAmberflo, client: httpx.Client, bad: dict[str, Any], message: str
) -> None:
    invalid = {k: v for k, v in {**record(unique_id="bad"), **bad}.items() if v is not MISSING}
    response = client.post("/ingest", json=[record(unique_id="a"), record(unique_id="b"), invalid])
    assert response.status_code == 400
    assert response.json()["message"].startswith(message), response.json()
    assert server.records() == []
    assert server.stats().permanent_rejections == 1


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"),
    [
        (b"", {}, 400, "body is empty"),
        (b"{nope", {}, 400, "body is not JSON"),
        (b'{"customerId": "c"}\n{nope', {}, 400, "NDJSON line 2 is not JSON"),
        (b"not gzip", {"Content-Encoding": "gzip"}, 400, "body is not valid gzip"),
        (b"[]", {"Content-Encoding": "br"}, 415, "unsupported Content-Encoding"),
        (b"[1]", {}, 400, "record 0: expected a JSON object"),
    ],
)
def test_undecodable_bodies_are_refused(
    client: httpx.Client, content: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    response = client.post("/ingest", content=content, headers=headers)
    assert response.status_code == status
    assert response.json()["message"].startswith(message)


def test_every_endpoint_needs_the_api_key(server: LocalAmberflo) -> None:
    for headers in ({}, {"X-API-KEY": "wrong"}):
        responses = [
            httpx.post(server.url + "/ingest", json=record(), headers=headers),
            httpx.post(server.url + "/usage", json={}, headers=headers),
            httpx.get(server.url + "/meters", headers=headers),
        ]
        assert [(r.status_code, r.json()) for r in responses] == [(401, {"message": "Unauthorized"})] * 3
    assert server.records() == []
    assert server.stats().unauthorized_requests == 6


def test_a_wrong_key_may_be_answered_403_and_the_key_changed_while_serving() -> None:
    with LocalAmberflo(api_key="old", key_refusal_status=403) as rotating:
        refused = httpx.post(rotating.url + "/ingest", json=record(), headers={"X-API-KEY": "new"})
        assert (refused.status_code, refused.json()) == (403, {"message": "Forbidden"})
        rotating.api_key = "new"
        assert httpx.post(rotating.url + "/ingest", json=record(), headers={"X-API-KEY": "new"}).status_code == 200
        assert httpx.get(rotating.url + "/meters", headers={"X-API-KEY": "old"}).status_code == 403
        assert (len(rotating.records()), rotating.stats().unauthorized_requests) == (1, 2)
    with pytest.raises(ValueError, match="401 or 403"):
        LocalAmberflo(key_refusal_status=500)  # type: ignore[arg-type]


def test_without_an_api_key_anyone_may_ingest() -> None:
    with LocalAmberflo(api_key=None) as open_server:
        assert httpx.post(open_server.url + "/ingest", json=record()).status_code == 200
        assert len(open_server.records()) == 1


def test_dedup_drops_exact_duplicates_and_repeated_unique_ids(server: LocalAmberflo, client: httpx.Client) -> None:
    ingest(client, [record(), record()])  # exact duplicates, no uniqueId: one event
    ingest(client, [record(value=1.0)])  # the same meterValue spelled as a float
    ingest(client, [record(unique_id="u1"), record(unique_id="u2")])  # otherwise identical: both kept
    ingest(client, [record(unique_id="u1")])  # a retry
    ingest(client, [record(unique_id="u2", value=99)])  # same uniqueId, other value: the same event
    assert [(r.unique_id, r.meter_value) for r in server.records()] == [(None, 1), ("u1", 1), ("u2", 1)]
    stats = server.stats()
    assert (stats.records_received, stats.records_accepted) == (7, 3)
    assert (stats.duplicates_dropped, stats.conflicting_duplicates) == (4, 1)


def test_a_cancel_record_removes_the_matching_event(server: LocalAmberflo, client: httpx.Client) -> None:
    ingest(client, [record(unique_id="u1"), record(unique_id="u2"), record(customer="c2")])
    ingest(client, [record(unique_id="u1", dimensions={CANCEL_DIMENSION: "true"})])
    ingest(client, [record(customer="c2", dimensions={CANCEL_DIMENSION: "true"})])
    ingest(client, [record(unique_id="never-sent", dimensions={CANCEL_DIMENSION: "true"})])
    assert server.accepted_unique_ids() == {"u2"}
    assert len(server.records()) == 1
    assert server.stats().events_cancelled == 2


# Usage


def usage(client: httpx.Client, query: dict[str, Any], path: str = "/usage") -> dict[str, Any]:
    response = client.post(path, json=query)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def query(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "meterApiName": "ApiCalls",
        "aggregation": "SUM",
        "timeGroupingInterval": "DAY",
        "timeRange": {"startTimeInSeconds": T0 - DAY + 5000, "endTimeInSeconds": T0 + 2 * DAY - 1},
    }
    return {**base, **overrides}


@pytest.fixture
def usage_data(client: httpx.Client) -> None:
    ingest(
        client,
        [
            record("c1", 4000, T0 + 10),
            record("c1", 40, T0 + 3600, unique_id="x"),
            record("c1", 19605, T0 + DAY + 1),
            record("c2", 7, T0 + DAY + 7200, dimensions={"region": "eu"}),
            record("c3", 2, T0 + DAY + 7300, dimensions={"region": "us"}),
            record("c3", 6, T0 + DAY + 7400, dimensions={"region": "us"}),
            record("c1", 1000, T0 - 2 * DAY),  # before the range
            record("c1", 1000, T0 + 10, meter="Other"),  # another meter
        ],
    )


@pytest.mark.usefixtures("usage_data")
def test_sum_by_day_grouped_by_customer_has_the_contracts_shape(client: httpx.Client) -> None:
    report = usage(client, query(groupBy=["customerId"], filter={"customerId": ["c1"]}))
    assert report == {
        "metadata": {
            "meterApiName": "ApiCalls",
            "aggregation": "SUM",
            "timeGroupingInterval": "DAY",
            "timeRange": {"startTimeInSeconds": T0 - DAY + 5000, "endTimeInSeconds": T0 + 2 * DAY - 1},
            "filter": {"customerId": ["c1"]},
            "groupBy": ["customerId"],
            "take": None,
        },
        "secondsSinceEpochIntervals": [T0 - DAY, T0, T0 + DAY],
        "clientMeters": [
            {
                "group": {"groupInfo": {"customerId": "c1"}},
                "groupValue": 23645.0,
                "values": [
                    {"secondsSinceEpochUtc": T0 - DAY, "value": 0.0, "percentageFromPrevious": 0.0},
                    {"secondsSinceEpochUtc": T0, "value": 4040.0, "percentageFromPrevious": 100.0},
                    {"secondsSinceEpochUtc": T0 + DAY, "value": 19605.0, "percentageFromPrevious": 385.27},
                ],
            }
        ],
    }


@pytest.mark.usefixtures("usage_data")
def test_count_and_max_by_hour_without_group_by(client: httpx.Client) -> None:
    hour_range = {"startTimeInSeconds": T0, "endTimeInSeconds": T0 + 3 * 3600}
    counted = usage(client, query(aggregation="count", timeGroupingInterval="hour", timeRange=hour_range))
    assert counted["secondsSinceEpochIntervals"] == [T0, T0 + 3600, T0 + 7200]
    [meter] = counted["clientMeters"]
    assert "group" not in meter
    assert (meter["groupValue"], [v["value"] for v in meter["values"]]) == (2.0, [1.0, 1.0, 0.0])
    maximum = usage(client, query(aggregation="Max"))
    [meter] = maximum["clientMeters"]
    assert (meter["groupValue"], [v["value"] for v in meter["values"]]) == (19605.0, [0.0, 4000.0, 19605.0])
    minimum = usage(client, query(aggregation="MIN", filter={"customerId": ["c3"]}))
    assert minimum["clientMeters"][0]["groupValue"] == 2.0


@pytest.mark.usefixtures("usage_data")
def test_sparse_leaves_out_empty_buckets(client: httpx.Client) -> None:
    dense = usage(client, query(groupBy=["customerId"]))
    sparse = usage(client, query(groupBy=["customerId"]), path="/usage/sparse")
    assert sparse["secondsSinceEpochIntervals"] == dense["secondsSinceEpochIntervals"]
    assert [len(m["values"]) for m in dense["clientMeters"]] == [3, 3, 3]
    c2 = sparse["clientMeters"][1]
    assert c2["group"]["groupInfo"] == {"customerId": "c2"}
    assert c2["values"] == [{"secondsSinceEpochUtc": T0 + DAY, "value": 7.0, "percentageFromPrevious": 100.0}]


@pytest.mark.usefixtures("usage_data")
def test_group_by_and_filter_a_dimension(client: httpx.Client) -> None:
    report = usage(client, query(groupBy=["region"], filter={"region": ["us", "eu"]}))
    groups = [(m["group"]["groupInfo"], m["groupValue"]) for m in report["clientMeters"]]
    assert groups == [({"region": "eu"}, 7.0), ({"region": "us"}, 8.0)]


@pytest.mark.usefixtures("usage_data")
def test_take_orders_by_group_value_and_limits(client: httpx.Client) -> None:
    def top(ascending: bool) -> list[str]:
        take = {"limit": 2, "isAscending": ascending}
        report = usage(client, query(groupBy=["customerId"], take=take))
        assert report["metadata"]["take"] == take
        return [m["group"]["groupInfo"]["customerId"] for m in report["clientMeters"]]

    assert (top(False), top(True)) == (["c1", "c3"], ["c2", "c3"])


@pytest.mark.usefixtures("usage_data")
def test_the_top_level_shape_equals_the_nested_one(client: httpx.Client) -> None:
    nested = query(groupBy=["customerId"], filter={"customerId": ["c1", "c2"]})
    top_level = {k: v for k, v in nested.items() if k not in ("timeRange", "filter")}
    top_level.update(nested["timeRange"], customerFilter=["c1", "c2"])
    assert usage(client, top_level) == usage(client, nested)


@pytest.mark.usefixtures("usage_data")
def test_batch_answers_each_query_in_order(client: httpx.Client) -> None:
    queries = [query(), query(meterApiName="Other"), query(aggregation="COUNT")]
    response = client.post("/usage/batch", json=queries)
    assert response.status_code == 200
    assert [r["clientMeters"][0]["groupValue"] for r in response.json()] == [23660.0, 1000.0, 6.0]
    bad = client.post("/usage/batch", json=[query(), query(aggregation="AVG")])
    assert bad.status_code == 400
    assert bad.json()["message"].startswith("query 1: aggregation must be one of")


@pytest.mark.usefixtures("usage_data")
def test_usage_all_reports_every_meter(client: httpx.Client) -> None:
    params: dict[str, str | int] = {
        "startTimeInSeconds": T0,
        "endTimeInSeconds": T0 + DAY,
        "timeGroupingInterval": "DAY",
        "groupBy": "customerId",
    }
    response = client.get("/usage/all", params=params)
    assert response.status_code == 200
    totals = {r["metadata"]["meterApiName"]: r["clientMeters"][0]["groupValue"] for r in response.json()}
    assert totals == {"ApiCalls": 4040.0, "Other": 1000.0}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"meterApiName": None}, "meterApiName must be a non-empty string"),
        ({"aggregation": "AVG"}, "aggregation must be one of"),
        ({"timeGroupingInterval": "YEAR"}, "timeGroupingInterval must be one of"),
        ({"timeRange": {}}, "timeRange.startTimeInSeconds (or top-level startTimeInSeconds) is required"),
        ({"timeRange": {"startTimeInSeconds": 10, "endTimeInSeconds": 5}}, "endTimeInSeconds (5) must be after"),
        ({"filter": {"customerId": "c1"}}, "filter.customerId must be a list of strings"),
        ({"filter": {"customerId": ["c1"]}, "customerFilter": ["c1"]}, "give the customer filter once"),
        ({"take": {"limit": 0}}, "take.limit must be a positive integer"),
    ],
)
def test_invalid_usage_queries_are_refused(client: httpx.Client, bad: dict[str, Any], message: str) -> None:
    response = client.post("/usage", json=query(**bad))
    assert response.status_code == 400
    assert response.json()["message"].startswith(message), response.json()


def test_percentage_from_previous_rule() -> None:
    assert percentage_from_previous(0, 0) == 0.0
    assert percentage_from_previous(0, 5) == 100.0
    assert percentage_from_previous(4040, 19605) == 385.27
    assert percentage_from_previous(10, 5) == -50.0
    assert percentage_from_previous(10, 0) == -100.0


def test_buckets_start_at_utc_boundaries() -> None:
    moment = T0 + DAY + 7400  # Monday 2021-04-26 02:03:20 UTC
    assert bucket_start(moment, "HOUR") == T0 + DAY + 7200
    assert bucket_start(moment, "DAY") == T0 + DAY
    assert bucket_start(moment, "WEEK") == T0 + DAY  # weeks start on Monday
    assert bucket_start(T0, "WEEK") == T0 - 6 * DAY
    assert bucket_start(moment, "MONTH") == 1617235200  # 2021-04-01


def test_week_and_month_intervals(client: httpx.Client) -> None:
    ingest(client, [record(value=1, at_s=1617235200), record(value=2, at_s=1619827200)])  # Apr 1, May 1
    span = {"startTimeInSeconds": 1617235200, "endTimeInSeconds": 1622505600}  # Apr 1 .. Jun 1
    monthly = usage(client, query(timeGroupingInterval="MONTH", timeRange=span))
    assert monthly["secondsSinceEpochIntervals"] == [1617235200, 1619827200]
    assert [v["value"] for v in monthly["clientMeters"][0]["values"]] == [1.0, 2.0]
    weekly = usage(client, query(timeGroupingInterval="WEEK", timeRange=span))
    assert weekly["secondsSinceEpochIntervals"][0] == 1617235200 - 3 * DAY  # Monday 2021-03-29
    assert weekly["clientMeters"][0]["groupValue"] == 3.0


def _load_workflow() -> dict[str, Any]:
    for path in WORKFLOW_CANDIDATES:
        if path.exists():
            loaded: dict[str, Any] = yaml.safe_load(path.read_text())
            return loaded
    pytest.skip(f"{WORKFLOW_NAME} not found in {[str(p) for p in WORKFLOW_CANDIDATES]}")


def _substitute(value: Any, inputs: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("$inputs."):
        return inputs[value.removeprefix("$inputs.")]
    if isinstance(value, dict):
        return {k: _substitute(v, inputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, inputs) for v in value]
    return value


def test_the_shared_ingest_and_query_workflow_succeeds(server: LocalAmberflo) -> None:
    workflow = _load_workflow()["workflows"][0]
    inputs = {
        "apiKey": KEY,
        "meterApiName": "ApiCalls",
        "customerId": "tenant-a",
        "meterValue": 3,
        "meterTimeInMillis": (T0 + 60) * 1000,
        "uniqueId": "req-1",
        "startTimeInSeconds": T0,
        "endTimeInSeconds": T0 + DAY,
    }
    assert set(workflow["inputs"]["required"]) <= set(inputs)
    operations = {"ingestMeterEvents": "/ingest", "queryUsage": "/usage"}
    responses = {}
    for step in workflow["steps"]:
        headers = {p["name"]: _substitute(p["value"], inputs) for p in step["parameters"] if p["in"] == "header"}
        payload = _substitute(step["requestBody"]["payload"], inputs)
        response = httpx.post(server.url + operations[step["operationId"]], json=payload, headers=headers)
        assert step["successCriteria"] == [{"condition": "$statusCode == 200"}]
        assert response.status_code == 200, (step["stepId"], response.text)
        responses[step["stepId"]] = response
    assert responses["ingestEvent"].text == "1 records were ingested"
    [meter] = responses["queryUsage"].json()["clientMeters"]
    assert meter["group"] == {"groupInfo": {"customerId": "tenant-a"}}
    assert (meter["groupValue"], meter["values"][0]["value"]) == (3.0, 3.0)


# Meters


def meter_body(**overrides: Any) -> dict[str, Any]:
    return {"label": "API calls", "meterApiName": "ApiCalls", "meterType": "sum_of_all_usage", **overrides}


def test_meters_crud(client: httpx.Client) -> None:
    created = client.post("/meters", json=meter_body(dimensions=["region"]))
    assert created.status_code == 200
    meter = created.json()
    assert meter["createTime"] == meter["updateTime"]
    assert {k: meter[k] for k in ("meterApiName", "meterType", "dimensions", "lockingStatus")} == {
        "meterApiName": "ApiCalls",
        "meterType": "sum_of_all_usage",
        "dimensions": ["region"],
        "lockingStatus": "open",
    }
    meter_id = meter["id"]
    assert meter_id != "ApiCalls"
    assert client.get(f"/meters/{meter_id}").json() == meter
    time.sleep(0.002)
    updated = client.put("/meters", json={**meter_body(label="Calls"), "id": meter_id}).json()
    assert (updated["label"], updated["createTime"]) == ("Calls", meter["createTime"])
    assert updated["updateTime"] > meter["updateTime"]
    by_path = client.put(f"/meters/{meter_id}", json=meter_body(meterType="MAX_USAGE")).json()
    assert by_path["meterType"] == "max_usage"
    assert client.get("/meters").json() == [by_path]
    assert client.delete(f"/meters/{meter_id}").json() == by_path
    assert client.get("/meters").json() == []
    assert client.get(f"/meters/{meter_id}").status_code == 404
    assert client.delete(f"/meters/{meter_id}").status_code == 404
    assert client.put(f"/meters/{meter_id}", json=meter_body()).status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"label": None}, "label is required"),
        ({"meterApiName": ""}, "meterApiName is required"),
        ({"meterType": None}, "meterType is required"),
        ({"meterApiName": "m" * 51}, "meterApiName must be at most 50 characters"),
        ({"meterType": "average"}, "meterType must be one of"),
        ({"lockingStatus": "frozen"}, "lockingStatus must be one of"),
    ],
)
def test_invalid_meters_are_refused(client: httpx.Client, body: dict[str, Any], message: str) -> None:
    response = client.post("/meters", json=meter_body(**body))
    assert response.status_code == 400
    assert response.json()["message"].startswith(message)


def test_a_duplicate_meter_api_name_is_a_conflict(client: httpx.Client) -> None:
    first = client.post("/meters", json=meter_body()).json()
    assert client.post("/meters", json=meter_body(label="again")).status_code == 409
    other = client.post("/meters", json=meter_body(meterApiName="Other")).json()
    renamed = client.put(f"/meters/{other['id']}", json=meter_body())
    assert renamed.status_code == 409
    assert first["id"] in renamed.json()["message"]
    assert client.put("/meters", json=meter_body()).status_code == 400  # no id anywhere


# Faults


@pytest.mark.parametrize(("kind", "status"), [("429", 429), ("500", 500), ("503", 503)])
def test_status_faults_store_nothing(server: LocalAmberflo, client: httpx.Client, kind: str, status: int) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=(kind,), retry_after_s=7)  # type: ignore[arg-type]
    response = client.post("/ingest", json=[record(unique_id="u1")])
    assert response.status_code == status
    assert (response.headers.get("retry-after") == "7") is (kind == "429")
    assert server.records() == []
    server.faults = FaultPlan()
    ingest(client, [record(unique_id="u1")])
    assert server.accepted_unique_ids() == {"u1"}
    assert server.stats().faults_injected == {kind: 1}


def _wait_for(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_slow_answer_times_out_the_client_but_ingests_so_the_retry_is_deduped(
    server: LocalAmberflo, client: httpx.Client
) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=("slow",), slow_s=3)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/ingest", json=[record(unique_id="u1")], timeout=0.3)
    _wait_for(lambda: server.accepted_unique_ids() == {"u1"})
    server.faults = FaultPlan()
    ingest(client, [record(unique_id="u1")])
    assert len(server.records()) == 1
    assert server.stats().duplicates_dropped == 1


def test_slow_without_ingest_answers_504_late_and_stores_nothing(server: LocalAmberflo, client: httpx.Client) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=("slow",), slow_s=0.3, slow_then_ingest=False)
    started = time.monotonic()
    response = client.post("/ingest", json=[record(unique_id="u1")])
    assert (response.status_code, time.monotonic() - started >= 0.3) == (504, True)
    assert server.records() == []


@pytest.mark.parametrize("after_ingest", [True, False])
def test_reset_is_a_connection_error(server: LocalAmberflo, client: httpx.Client, after_ingest: bool) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=("reset",), reset_after_ingest=after_ingest)
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        client.post("/ingest", json=[record(unique_id="u1")])
    assert server.accepted_unique_ids() == ({"u1"} if after_ingest else set())
    assert server.stats().faults_injected == {"reset": 1}


def test_faults_hit_the_configured_share_deterministically(server: LocalAmberflo, client: httpx.Client) -> None:
    def statuses() -> list[int]:
        server.faults = FaultPlan(transient_rate=0.3, kinds=("500", "503"), seed=42)
        return [client.post("/ingest", json=record(unique_id=f"u{i}")).status_code for i in range(200)]

    first = statuses()
    assert first == statuses()  # the same seed, the same faults
    faulted = sum(status != 200 for status in first)
    assert 35 <= faulted <= 85
    assert {500, 503, 200} == set(first)
    assert len(server.accepted_unique_ids()) == 200 - faulted


def test_faults_do_not_touch_queries(server: LocalAmberflo, client: httpx.Client) -> None:
    server.faults = FaultPlan(transient_rate=1.0, kinds=("500",))
    assert client.post("/usage", json=query()).status_code == 200
    assert client.get("/meters").status_code == 200
    assert server.stats().faults_injected == {}


def test_rejected_unique_ids_are_a_permanent_400_naming_them(server: LocalAmberflo, client: httpx.Client) -> None:
    server.faults = FaultPlan(reject_unique_ids=frozenset({"poison-1", "poison-2", "absent"}))
    response = client.post(
        "/ingest", json=[record(unique_id="ok"), record(unique_id="poison-2"), record(unique_id="poison-1")]
    )
    assert response.status_code == 400
    assert response.json()["rejectedUniqueIds"] == ["poison-1", "poison-2"]
    assert "poison-1" in response.json()["message"]
    assert server.records() == []
    assert server.stats().permanent_rejections == 1


def test_fault_plan_validation() -> None:
    with pytest.raises(ValueError, match="transient_rate"):
        FaultPlan(transient_rate=1.5)
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultPlan(kinds=("418",))  # type: ignore[arg-type]


# Interoperability and lifecycle


def test_amberflos_own_sdk_ingests_and_queries(server: LocalAmberflo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(IngestSession, "root_url", server.url)
    monkeypatch.setattr(ApiSession, "root_url", server.url)
    payloads = [
        create_ingest_payload("ApiCalls", 2, (T0 + 5) * 1000, "tenant-a", dimensions={"region": "eu"}),
        create_ingest_payload("ApiCalls", 3, (T0 + 6) * 1000, "tenant-a", unique_id="fixed"),
    ]
    assert IngestApiClient(KEY).send(payloads) == "2 records were ingested"
    assert IngestApiClient(KEY).send(payloads[1:]) == "1 records were ingested"  # a retry: deduplicated
    assert len(server.records()) == 2
    report = UsageApiClient(KEY).get(
        create_usage_query(
            AggregationType.SUM,
            "ApiCalls",
            TimeGroupingInterval.DAY,
            TimeRange(T0, T0 + DAY),
            group_by=["customerId"],
        )
    )
    assert report["clientMeters"][0]["groupValue"] == 5.0


def test_records_and_stats_reset(server: LocalAmberflo, client: httpx.Client) -> None:
    ingest(client, [record(unique_id="u1")])
    client.post("/meters", json=meter_body())
    server.reset()
    assert (server.records(), server.stats().ingest_requests, client.get("/meters").json()) == ([], 0, [])


def test_a_taken_port_is_a_clear_error(module_server: LocalAmberflo) -> None:
    with pytest.raises(PortInUseError, match=f"port {module_server.port}"):
        LocalAmberflo(port=module_server.port)


def test_the_command_line_entry_refuses_a_taken_port(
    module_server: LocalAmberflo, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--port", str(module_server.port)])
    assert exited.value.code == 1
    assert f"port {module_server.port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_the_command_line_entry_rejects_a_bad_fault_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SystemExit):
        main(["--port", str(port), "--kinds", "429,teapot"])
    assert "unknown fault kinds ['teapot']" in capsys.readouterr().err


def test_filtering_rules_are_kept_and_listed(client: httpx.Client) -> None:
    rule = {"id": "r1", "meterApiName": "ApiCalls", "type": "by_property_filter_out",
            "ingestionTimeRange": {"startTimeInSeconds": T0, "endTimeInSeconds": T0 + 60}}  # fmt: skip
    assert client.post("/ingest-snapshot/custom-filtering-rules", json=rule).json() == rule
    assert (
        client.post("/ingest-snapshot/custom-filtering-rules", json={**rule, "meterApiName": "Other"}).status_code
        == 200
    )
    assert client.get("/ingest-snapshot/custom-filtering-rules").json() == [{**rule, "meterApiName": "Other"}]
    assert client.post("/ingest-snapshot/custom-filtering-rules", json={"id": "r2"}).status_code == 400


def test_customers_are_looked_up_created_and_replaced_as_amberflo_does(
    server: LocalAmberflo, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.get("/customers", params={"customerId": "acme"}).json() == {}
    acme = {"customerId": "acme", "customerName": "Acme", "customerEmail": "ops@acme.test", "traits": {"tier": "gold"}}
    created = client.post("/customers", json=acme)
    assert created.status_code == 200
    assert created.json()["enabled"] is True
    assert client.post("/customers", json=acme).status_code == 409  # exists: PUT replaces it
    replaced = client.put("/customers/", json={"customerId": "acme", "customerName": "Acme Corp"}).json()
    assert (replaced["customerName"], replaced["traits"], "customerEmail" in replaced) == ("Acme Corp", {}, False)
    assert replaced["createTime"] == created.json()["createTime"]
    assert client.put("/customers", json={"customerId": "nobody", "customerName": "N"}).status_code == 404
    for bad in ({"customerName": "no id"}, {"customerId": "x"}, {**acme, "enabled": "yes"}, {**acme, "plan": "p"}):
        answer = client.post("/customers", json=bad)
        assert answer.status_code == 400, bad
    assert httpx.get(server.url + "/customers", headers={"X-API-KEY": "wrong"}).status_code == 401
    # Amberflo's own SDK: its add_or_update looks the customer up, then adds or updates it.
    from metering.customer import CustomerApiClient, create_customer_payload  # type: ignore[import-untyped]

    monkeypatch.setattr(ApiSession, "root_url", server.url)
    customers = CustomerApiClient(KEY)
    customers.add_or_update(create_customer_payload("globex", "Globex", customer_email="it@globex.test"))
    customers.add_or_update(create_customer_payload("globex", "Globex Inc"))
    assert customers.get("globex")["customerName"] == "Globex Inc"
    assert [c["customerId"] for c in customers.list()] == ["acme", "globex"]


def test_sigterm_stops_the_command_cleanly_even_where_sigint_is_ignored() -> None:
    """A script's background job ignores SIGINT, so Ctrl-C's signal cannot stop it there: SIGTERM does."""
    process = subprocess.Popen(
        [sys.executable, "-m", "meterlake.amberflo.server", "--port", "0", "--no-auth"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as bash starts `cmd &`
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert httpx.get(f"{url}/meters", timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
