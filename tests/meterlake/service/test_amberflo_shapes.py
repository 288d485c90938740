"""The service answers usage in Amberflo's exact shapes: the same records ingested into the service and into the local
Amberflo (which aggregates in Python) give identical JSON for every aggregation, interval and query shape."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from meterlake.amberflo.api import AMBERFLO_AGGREGATIONS, TIME_GROUPING_INTERVALS
from meterlake.amberflo.server import LocalAmberflo

from .conftest import Served

AMBERFLO_KEY = "shapes-key"
DAY_S = 86400
NOW_S = int(time.time())
#: Event meters as both sides create them: one with an event in most hours, one with a handful of events.
METERS = {
    "dense-tokens": {"label": "Dense", "meterApiName": "dense-tokens", "meterType": "sum_of_all_usage",
                     "dimensions": ["model", "region"]},
    "sparse-docs": {"label": "Sparse", "meterApiName": "sparse-docs", "meterType": "sum_of_all_usage",
                    "description": "a few events", "dimensions": ["model"]},
}  # fmt: skip
#: The query shapes asked of every meter, aggregation and interval (each on /usage, /usage/sparse and in a batch).
SHAPES: dict[str, dict[str, Any]] = {
    "plain": {},
    "by customer": {"groupBy": ["customerId"]},
    "by customer and model": {"groupBy": ["customerId", "model"]},
    "by a dimension some events lack": {"groupBy": ["region"]},
    "filtered": {"groupBy": ["model"], "filter": {"customerId": ["acme", "initech"], "model": ["m1", "nope"]}},
    "top 2": {"groupBy": ["customerId"], "take": {"limit": 2, "isAscending": False}},
    "bottom 2": {"groupBy": ["customerId"], "take": {"limit": 2, "isAscending": True}},
    "filtered to nobody": {"filter": {"customerId": ["nobody"]}},
}


def _records() -> list[dict[str, Any]]:
    """Events of the last 30 days; values are multiples of 0.25 (exact in binary, so any summing order agrees),
    some zero or negative, so percentageFromPrevious meets every case."""
    rng = random.Random(20261130)
    records = []
    for index in range(600):
        records.append(
            {
                "customerId": rng.choice(["acme", "globex", "initech"]),
                "meterApiName": "dense-tokens",
                "meterValue": rng.randint(-4, 400) / 4,
                "meterTimeInMillis": (NOW_S - rng.randint(60, 30 * DAY_S)) * 1000 + rng.randint(0, 999),
                "uniqueId": f"d{index}",
                "dimensions": {"model": rng.choice(["m1", "m2"])} | ({"region": "eu"} if index % 3 else {}),
            }
        )
    for index, (customer, days_ago) in enumerate([("acme", 29), ("acme", 3), ("globex", 3), ("initech", 0)]):
        records.append(
            {
                "customerId": customer,
                "meterApiName": "sparse-docs",
                "meterValue": 2.5 * (index + 1),
                "meterTimeInMillis": (NOW_S - days_ago * DAY_S - 120) * 1000,
                "uniqueId": f"s{index}",
                "dimensions": {"model": "m1"},
            }
        )
    return records


@pytest.fixture
def both(served: Served) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """The service and the local Amberflo, each holding the meters and the same records."""
    with (
        LocalAmberflo(api_key=AMBERFLO_KEY) as amberflo,
        served.client(key=served.admin_key) as service,
        httpx.Client(base_url=amberflo.url, headers={"X-API-KEY": AMBERFLO_KEY}, timeout=30) as stand_in,
    ):
        records = _records()
        for client in (service, stand_in):
            for meter in METERS.values():
                assert client.post("/meters", json=meter).status_code == 200
            for start in range(0, len(records), 100):
                answer = client.post("/ingest", json=records[start : start + 100])
                assert answer.status_code == 200, answer.text
        yield service, stand_in


def _query(meter: str, aggregation: str, interval: str, shape: dict[str, Any]) -> dict[str, Any]:
    return {
        "meterApiName": meter,
        "aggregation": aggregation,
        "timeGroupingInterval": interval,
        "timeRange": {"startTimeInSeconds": NOW_S - 32 * DAY_S, "endTimeInSeconds": NOW_S + 60},
        **shape,
    }


def test_usage_is_answered_exactly_as_amberflo_answers_it(both: tuple[httpx.Client, httpx.Client]) -> None:
    """Every aggregation x interval x shape of the dense meter, and every aggregation x interval of the sparse one in
    two shapes; each query on one of /usage, /usage/sparse and /usage/batch in turn, so each endpoint meets every
    aggregation, interval and shape (a query costs the service ~0.1 s of planning: the whole cube thrice would be
    minutes)."""
    service, stand_in = both
    endpoints = ("/usage", "/usage/sparse", "/usage/batch")
    asked: dict[str, list[dict[str, Any]]] = {endpoint: [] for endpoint in endpoints}
    turn = 0
    for meter, shapes in (("dense-tokens", list(SHAPES)), ("sparse-docs", ["plain", "by customer"])):
        for aggregation in AMBERFLO_AGGREGATIONS:
            for interval in TIME_GROUPING_INTERVALS:
                for shape in shapes:
                    asked[endpoints[turn % 3]].append(_query(meter, aggregation, interval, SHAPES[shape]))
                    turn += 1
    for path in ("/usage", "/usage/sparse"):
        for query in asked[path]:
            ours, theirs = service.post(path, json=query), stand_in.post(path, json=query)
            assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
            assert ours.json() == theirs.json(), (path, query)
    batch = asked["/usage/batch"]
    ours, theirs = service.post("/usage/batch", json=batch), stand_in.post("/usage/batch", json=batch)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    assert len(ours.json()) == len(batch)
    for query, mine, amberflos in zip(batch, ours.json(), theirs.json(), strict=True):
        assert mine == amberflos, ("/usage/batch", query)
    for endpoint, queries in asked.items():  # each endpoint met every aggregation, interval and shape
        assert {q["aggregation"] for q in queries} == set(AMBERFLO_AGGREGATIONS), endpoint
        assert {q["timeGroupingInterval"] for q in queries} == set(TIME_GROUPING_INTERVALS), endpoint
        assert len({str(sorted(q.items())) for q in queries if q["meterApiName"] == "dense-tokens"}) > len(SHAPES)

    # The workflow fixture's shape (top-level times, customerFilter) too.
    workflow = {key: value for key, value in _query("dense-tokens", "SUM", "DAY", {}).items() if key != "timeRange"}
    workflow.update(startTimeInSeconds=NOW_S - 7 * DAY_S, endTimeInSeconds=NOW_S, customerFilter=["globex"])
    assert service.post("/usage", json=workflow).json() == stand_in.post("/usage", json=workflow).json()

    # The reports hold what they should (not merely the same on both sides): every record, each bucket present.
    plain = service.post("/usage", json=_query("sparse-docs", "SUM", "DAY", {})).json()
    assert plain["clientMeters"][0]["groupValue"] == 2.5 + 5.0 + 7.5 + 10.0
    assert len(plain["clientMeters"][0]["values"]) == len(plain["secondsSinceEpochIntervals"]) >= 32


def test_usage_of_all_meters_and_the_meters_are_amberflos(both: tuple[httpx.Client, httpx.Client]) -> None:
    service, stand_in = both
    for interval in TIME_GROUPING_INTERVALS:
        params: dict[str, Any] = {
            "startTimeInSeconds": NOW_S - 31 * DAY_S,
            "endTimeInSeconds": NOW_S + 60,
            "timeGroupingInterval": interval,
            "groupBy": "customerId",
        }
        for customers in ([], ["acme", "globex"]):
            ours = service.get("/usage/all", params={**params, "customerId": customers}).json()
            theirs = stand_in.get("/usage/all", params={**params, "customerId": customers}).json()
            # The local Amberflo reports the meters that hold events; the service every meter, the config's request
            # meters (no requests here) too.
            by_name = {report["metadata"]["meterApiName"]: report for report in ours}
            assert [by_name[report["metadata"]["meterApiName"]] for report in theirs] == theirs
            assert sorted(by_name) == ["api-calls", "dense-tokens", "egress-bytes", "sparse-docs"]
            assert by_name["api-calls"]["clientMeters"] == by_name["egress-bytes"]["clientMeters"] == []

    def meters(client: httpx.Client) -> dict[str, dict[str, Any]]:
        listed: list[dict[str, Any]] = client.get("/meters").json()
        server_set = ("id", "createTime", "updateTime")
        return {m["meterApiName"]: {k: v for k, v in m.items() if k not in server_set} for m in listed}

    ours, theirs = meters(service), meters(stand_in)
    # The service's one addition: which kind of meter it is (fed by ingest, or counting access-log requests).
    assert {name: meter.pop("kind") for name, meter in ours.items()} == {
        "api-calls": "request",
        "egress-bytes": "request",
        "dense-tokens": "event",
        "sparse-docs": "event",
    }
    assert {name: ours[name] for name in METERS} == theirs
