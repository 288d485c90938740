"""What the service keeps across a restart on the same data dir: event meters, cancellation rules, keys, and dedup (a
uniqueId re-sent after the restart counts once)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.service.local import LocalMeteringService

from .conftest import NOW_MS, record

METER = {"label": "LLM tokens", "meterApiName": "llm-tokens", "meterType": "sum_of_all_usage", "dimensions": ["model"]}
USAGE = {
    "meterApiName": "llm-tokens",
    "aggregation": "SUM",
    "timeGroupingInterval": "DAY",
    "timeRange": {"startTimeInSeconds": NOW_MS // 1000 - 86400, "endTimeInSeconds": NOW_MS // 1000 + 60},
    "groupBy": ["customerId"],
}


def _totals(client: httpx.Client) -> dict[str, float]:
    report: dict[str, Any] = client.post("/usage", json=USAGE).json()
    return {m["group"]["groupInfo"]["customerId"]: m["groupValue"] for m in report["clientMeters"]}


def test_meters_rules_keys_and_dedup_survive_a_restart(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "home")
    batch = [
        record(uniqueId="u1", meterValue=10, dimensions={"model": "m1"}),
        record(uniqueId="u2", meterValue=5, customerId="globex"),
        record(meterValue=7),  # no uniqueId: one from its content
    ]
    with LocalMeteringService(config=Config(), data_dir=data_dir, port=0) as first:
        _, admin_key = first.keys.create(role="admin")
        with httpx.Client(base_url=first.url, headers={"X-API-KEY": admin_key}) as client:
            meter = client.post("/meters", json=METER).json()
            assert client.post("/ingest", json=batch).status_code == 200
            now = int(time.time())
            rule = {"id": "no-globex", "meterApiName": "llm-tokens", "filter": {"customerId": ["globex"]},
                    "ingestionTimeRange": {"startTimeInSeconds": now - 60, "endTimeInSeconds": now + 3600}}  # fmt: skip
            assert client.post("/ingest-snapshot/custom-filtering-rules", json=rule).status_code == 200
            before = _totals(client)
            assert before == {"acme": 17.0}
            rules_before = client.get("/ingest-snapshot/custom-filtering-rules").json()
    # Closed with the events acknowledged, perhaps not committed yet: the next start has them, once.

    with (
        LocalMeteringService(config=Config(), data_dir=data_dir, port=0) as second,
        httpx.Client(base_url=second.url, headers={"X-API-KEY": admin_key}) as client,  # the key survived
    ):
        assert client.get(f"/meters/{meter['id']}").json() == meter
        assert [m["meterApiName"] for m in client.get("/meters").json() if m["kind"] == "event"] == ["llm-tokens"]
        assert client.get("/ingest-snapshot/custom-filtering-rules").json() == rules_before
        assert _totals(client) == before  # the rule still cancels globex's event
        assert client.post("/ingest", json=batch).status_code == 200  # every event again, after the restart
        assert client.post("/ingest", json=record(uniqueId="u1", meterValue=999)).status_code == 200
        assert _totals(client) == before
        assert client.post("/ingest", json=record(uniqueId="u3", meterValue=1)).status_code == 200
        assert _totals(client) == {"acme": 18.0}
    table = ensure_meter_events_table(open_catalog(data_dir), Config())
    assert sorted(table.scan(selected_fields=("meter_value",)).to_arrow().column(0).to_pylist()) == [1, 5, 7, 10]
