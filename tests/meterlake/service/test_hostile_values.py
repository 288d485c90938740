"""Every value of a request reaches SQL bound: hostile strings (quotes, statement terminators, comments, placeholders'
spellings, unicode) as meter names, groupBy and filter keys and values and cancellation-rule filters, on event and
request meters, give the right numbers or a clean 4xx, never an error or a changed table."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
from meterlake.schema import metering_event_arrow_schema

from .conftest import NOW_MS, Served

HOSTILE = [
    "'); DROP TABLE meter_events; --",
    "o'brien",
    'say "hi"',
    "$meter",
    "$1 OR 1=1",
    "%s; select 1",
    "back\\slash",
    "Ωmega 😀 ü",
    "NULL",
    "",
]
KEY_A = "k'); DROP TABLE x; --"
KEY_B = 'q"uote ü'
DAY_S = 86400


def _span() -> dict[str, int]:
    return {"startTimeInSeconds": NOW_MS // 1000 - 5 * DAY_S, "endTimeInSeconds": NOW_MS // 1000 + 60}


def _usage(meter: str, **shape: Any) -> dict[str, Any]:
    return {"meterApiName": meter, "aggregation": "SUM", "timeGroupingInterval": "DAY", "timeRange": _span(), **shape}


def _groups(report: dict[str, Any]) -> dict[tuple[Any, ...], float]:
    return {tuple(m.get("group", {}).get("groupInfo", {}).values()): m["groupValue"] for m in report["clientMeters"]}


def test_hostile_strings_on_event_meters(served: Served) -> None:
    records: list[dict[str, Any]] = [
        {
            "customerId": HOSTILE[i % 9],  # every hostile string but the empty one is a customer
            "meterApiName": "tokens",
            "meterValue": i + 1,
            "meterTimeInMillis": NOW_MS - i * 3_600_000,
            "uniqueId": HOSTILE[i % len(HOSTILE)] + str(i),
            "dimensions": {KEY_A: HOSTILE[i % len(HOSTILE)], KEY_B: HOSTILE[(i + 3) % len(HOSTILE)]},
        }
        for i in range(40)
    ]
    with served.client(key=served.admin_key) as admin:
        meter = {"label": "T", "meterApiName": "tokens", "meterType": "sum_of_all_usage", "dimensions": [KEY_A, KEY_B]}
        assert admin.post("/meters", json=meter).status_code == 200
        answer = admin.post("/ingest", json=records)
        assert answer.status_code == 200, answer.text

        by_both: dict[tuple[Any, ...], float] = defaultdict(float)
        for item in records:
            by_both[(item["customerId"], item["dimensions"][KEY_A])] += item["meterValue"]
        report = admin.post("/usage", json=_usage("tokens", groupBy=["customerId", KEY_A])).json()
        assert _groups(report) == by_both

        kept_customers, kept_values = HOSTILE[:3], [HOSTILE[0], HOSTILE[7], HOSTILE[9]]
        filtered = admin.post(
            "/usage", json=_usage("tokens", groupBy=[KEY_B], filter={"customerId": kept_customers, KEY_A: kept_values})
        ).json()
        expected: dict[tuple[Any, ...], float] = defaultdict(float)
        for item in records:
            if item["customerId"] in kept_customers and item["dimensions"][KEY_A] in kept_values:
                expected[(item["dimensions"][KEY_B],)] += item["meterValue"]
        assert expected
        assert _groups(filtered) == expected

        distinct = admin.post("/usage", json=_usage("tokens", aggregation="UNIQUE_COUNT")).json()
        assert distinct["clientMeters"][0]["groupValue"] == len(HOSTILE)  # the first dimension's distinct values
        absent = admin.post("/usage", json=_usage("tokens", filter={"not'a key": ["x"]})).json()
        assert absent["clientMeters"][0]["groupValue"] == 0.0

        now = int(time.time())
        rule = {"id": "r'); DROP TABLE cancellation_rules; --", "meterApiName": "tokens",
                "filter": {KEY_B: [HOSTILE[0], HOSTILE[7]], "customerId": HOSTILE},
                "ingestionTimeRange": {"startTimeInSeconds": now - 600, "endTimeInSeconds": now + 600}}  # fmt: skip
        assert admin.post("/ingest-snapshot/custom-filtering-rules", json=rule).status_code == 200
        kept = sum(r["meterValue"] for r in records if r["dimensions"][KEY_B] not in (HOSTILE[0], HOSTILE[7]))
        after = admin.post("/usage", json=_usage("tokens")).json()
        assert after["clientMeters"][0]["groupValue"] == kept < sum(r["meterValue"] for r in records)
        assert [r["id"] for r in admin.get("/ingest-snapshot/custom-filtering-rules").json()] == [rule["id"]]

        # A hostile meterApiName is only a name that is not a meter.
        for name in HOSTILE[:4]:
            assert admin.post("/usage", json=_usage(name)).status_code in (400, 404)
            bad = admin.post("/ingest", json={**records[0], "meterApiName": name, "uniqueId": "x"})
            assert (bad.status_code, bad.json()["errors"][0]["field"]) == (400, "meterApiName")
            refused = admin.post("/ingest-snapshot/custom-filtering-rules", json={**rule, "meterApiName": name})
            assert refused.status_code == 400
        assert admin.post("/meters", json={**meter, "meterApiName": HOSTILE[0]}).status_code == 400

    table = ensure_meter_events_table(open_catalog(served.service.data_dir), served.service.config)
    assert table.scan().to_arrow().num_rows == len(records)


def _access_log(count: int) -> pa.Table:
    start = datetime.fromtimestamp(NOW_MS / 1000, UTC) - timedelta(days=2)
    rows = []
    for i in range(count):
        moment = start + timedelta(minutes=7 * i)
        rows.append(
            {
                "request_id": f"req-{i}",
                "request_time": moment,
                "ingested_at": moment + timedelta(seconds=1),
                "tenant_id": HOSTILE[i % 9],
                "http_method": "GET",
                "resource_path": HOSTILE[(i + 1) % len(HOSTILE)],
                "status": 200 if i % 5 else 503,
                "response_length": i,
            }
        )
    schema = metering_event_arrow_schema()
    return pa.table({f.name: [row.get(f.name) for row in rows] for f in schema}, schema=schema)


def test_hostile_strings_on_request_meters(served: Served) -> None:
    log = _access_log(300)
    ensure_metering_table(open_catalog(served.service.data_dir), served.service.config).append(log)
    rows = [row for row in log.to_pylist() if row["status"] < 500]
    with served.client(key=served.admin_key) as admin:
        by_route: dict[tuple[Any, ...], float] = defaultdict(float)
        for row in rows:
            by_route[(row["tenant_id"], row["resource_path"])] += 1
        report = admin.post("/usage", json=_usage("api-calls", groupBy=["customerId", "resource_path"])).json()
        assert _groups(report) == by_route

        customers, routes = [HOSTILE[0], HOSTILE[1], HOSTILE[7]], [HOSTILE[0], HOSTILE[3], HOSTILE[9]]
        egress = admin.post(
            "/usage", json=_usage("egress-bytes", filter={"customerId": customers, "resource_path": routes})
        ).json()
        expected = sum(
            r["response_length"] for r in rows if r["tenant_id"] in customers and r["resource_path"] in routes
        )
        assert expected
        assert egress["clientMeters"][0]["groupValue"] == expected

        # A key a request meter does not have is a 400 naming it, whatever it spells.
        for shape in ({"groupBy": [KEY_A]}, {"filter": {KEY_B: ["x"]}}):
            refused = admin.post("/usage", json=_usage("api-calls", **shape))
            assert refused.status_code == 400
            assert (KEY_A if "groupBy" in shape else KEY_B) in refused.json()["message"]
        window = {"startTimeInSeconds": 0, "endTimeInSeconds": NOW_MS // 1000 + 60}
        bad_rule = {"id": "bad", "meterApiName": "api-calls", "filter": {KEY_A: ["x"]}, "ingestionTimeRange": window}
        assert admin.post("/ingest-snapshot/custom-filtering-rules", json=bad_rule).status_code == 400

        rule = {**bad_rule, "id": "routes", "filter": {"resource_path": [HOSTILE[0], HOSTILE[7]]}}
        assert admin.post("/ingest-snapshot/custom-filtering-rules", json=rule).status_code == 200
        after = admin.post("/usage", json=_usage("api-calls")).json()
        assert after["clientMeters"][0]["groupValue"] == sum(
            1 for r in rows if r["resource_path"] not in (HOSTILE[0], HOSTILE[7])
        )
    table = ensure_metering_table(open_catalog(served.service.data_dir), served.service.config)
    assert table.scan().to_arrow().num_rows == len(log)
