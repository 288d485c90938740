"""`meterlake up`: prints the invoke URL first and the metering service's endpoint, serves both, and on SIGTERM
flushes everything (requests and ingested events) before it exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.service.auth import ApiKeys
from meterlake.service.store import ServiceStore


def test_up_serves_then_flushes_on_sigterm(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", "from meterlake.cli import main; main()", "--home", str(tmp_path), "up", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().split()
        assert first[0] == "RestApiEndpoint", first
        url = first[1]
        statuses = [
            httpx.get(f"{url}/random/strings", timeout=10).status_code,  # no token
            httpx.get(f"{url}/no/such/route", timeout=10).status_code,
            httpx.get(f"{url}/random/strings", headers={"Authorization": "garbage"}, timeout=10).status_code,
        ]
        assert statuses == [401, 403, 401]  # API Gateway answers a route that does not exist 403, not 404
        service = process.stdout.readline().split()
        assert service[0] == "MeteringServiceEndpoint", service
        with ServiceStore.in_data_dir(DataDir.resolve(tmp_path)) as store:
            _, key = ApiKeys(store).create(role="admin")
        with httpx.Client(base_url=service[1], headers={"X-API-KEY": key}, timeout=30) as client:
            meters = client.get("/meters")
            assert meters.status_code == 200, meters.text
            assert {"api-calls", "egress-bytes"} <= {m["meterApiName"] for m in meters.json()}
            meter = {"label": "LLM tokens", "meterApiName": "llm-tokens", "meterType": "sum_of_all_usage"}
            assert client.post("/meters", json=meter).status_code == 200
            now_ms = int(time.time() * 1000)
            events = [
                {"customerId": "acme", "meterApiName": "llm-tokens", "meterValue": value,
                 "meterTimeInMillis": now_ms, "uniqueId": f"up-{value}"}
                for value in (3, 4)
            ]  # fmt: skip
            assert client.post("/ingest", json=events).text == "2 records were ingested"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "stopped cleanly" in out
    # The default buffering interval (60 s) never fired: only the shutdown flush can have committed these.
    table = ensure_metering_table(open_catalog(DataDir.resolve(tmp_path)), Config())
    rows = table.scan().to_arrow().to_pylist()
    assert sorted(r["status"] for r in rows) == [401, 401, 403]
    assert all(r["tenant_id"] is None for r in rows)
    # The service's buffering interval (10 s) had not passed either: the events were committed on the way out.
    events_table = ensure_meter_events_table(open_catalog(DataDir.resolve(tmp_path)), Config())
    committed = events_table.scan().to_arrow().to_pylist()
    assert sorted((r["unique_id"], r["meter_value"]) for r in committed) == [("up-3", 3.0), ("up-4", 4.0)]
