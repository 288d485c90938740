"""Ingested events reach Amberflo through the outbox with their own uniqueIds, once; meters and rules are mirrored."""

from __future__ import annotations

import gzip
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow as pa

from meterlake.amberflo.forwarder import encode_batch
from meterlake.amberflo.reconcile import Window, amberflo_usage, compare
from meterlake.amberflo.server import LocalAmberflo
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.config import Config
from meterlake.lake.home import DataDir
from meterlake.service.forwarding import (
    event_meter_usage,
    meter_event_records,
    meter_events_outbox,
    staged_event_usage,
)
from meterlake.service.local import LocalMeteringService

from .conftest import NOW_MS, record

KEY = "amberflo-key"
METER = {"label": "LLM tokens", "meterApiName": "llm-tokens", "meterType": "sum_of_all_usage", "dimensions": ["model"]}


def _settings(amberflo: LocalAmberflo) -> AmberfloSettings:
    return AmberfloSettings(base_url=amberflo.url, min_backoff_s=0.01, max_backoff_s=0.05, poll_interval_s=0.2)


def test_ingested_events_are_forwarded_once_with_their_uniqueids(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "home")
    with LocalAmberflo(api_key=KEY) as amberflo:
        for run in range(2):  # the second run re-reads the same lake: nothing is sent twice
            with LocalMeteringService(
                config=Config(), data_dir=data_dir, port=0, amberflo=_settings(amberflo), amberflo_api_key=KEY
            ) as service:
                _, admin = service.keys.create(role="admin")
                with httpx.Client(base_url=service.url, headers={"X-API-KEY": admin}) as client:
                    if run == 0:
                        assert client.post("/meters", json=METER).status_code == 200
                        batch = [
                            record(uniqueId="a", dimensions={"model": "m1"}),
                            record(uniqueId="b", customerId="globex", meterValue=2.5),
                            record(meterValue=7),  # no uniqueId: one from its content
                        ]
                        assert client.post("/ingest", json=batch).status_code == 200
                        assert client.post("/ingest", json=batch).status_code == 200  # a retry
                service.settle()
                with meter_events_outbox(data_dir, _settings(amberflo)) as outbox:
                    status = outbox.status()
        stored = sorted(amberflo.records(), key=lambda r: r.meter_value or 0)
        assert status is not None
        assert (status.sent_records, status.pending_records) == (3, 0)
        assert [(r.customer_id, r.meter_value, r.unique_id) for r in stored[:2]] == [
            ("globex", 2.5, "b"),
            ("acme", 7.0, stored[1].unique_id),
        ]
        assert stored[1].unique_id is not None
        assert stored[1].unique_id.startswith("sha256:")
        assert stored[2].unique_id == "a"
        assert dict(stored[2].dimensions) == {"model": "m1"}
        assert stored[2].meter_time_in_millis == NOW_MS
        assert amberflo.stats().records_received == 3  # the retry never left the lake twice


def test_meter_changes_and_rules_are_mirrored_in_amberflo(tmp_path: Path) -> None:
    with (
        LocalAmberflo(api_key=KEY) as amberflo,
        LocalMeteringService(
            config=Config(), data_dir=DataDir(tmp_path), port=0, amberflo=_settings(amberflo), amberflo_api_key=KEY
        ) as service,
    ):
        _, admin = service.keys.create(role="admin")
        with httpx.Client(base_url=service.url, headers={"X-API-KEY": admin}) as client:
            meter = client.post("/meters", json=METER).json()
            assert [m["meterApiName"] for m in amberflo.state.meters()] == ["llm-tokens"]
            client.put(f"/meters/{meter['id']}", json={**METER, "meterApiName": "llm-trial", "label": "Trial"})
            [mirrored] = amberflo.state.meters()
            assert (mirrored["meterApiName"], mirrored["label"]) == ("llm-trial", "Trial")
            now = int(time.time())
            rule = {"id": "r1", "meterApiName": "llm-trial",
                    "ingestionTimeRange": {"startTimeInSeconds": now - 60, "endTimeInSeconds": now}}  # fmt: skip
            assert client.post("/ingest-snapshot/custom-filtering-rules", json=rule).status_code == 200
            assert [r["id"] for r in amberflo.state.filtering_rules()] == ["r1"]
            client.delete(f"/meters/{meter['id']}")
            assert amberflo.state.meters() == []


def test_reconcile_compares_event_meters_with_amberflo_and_with_what_was_staged(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "home")
    config = Config()
    with LocalAmberflo(api_key=KEY) as amberflo:
        settings = _settings(amberflo)
        with LocalMeteringService(
            config=config, data_dir=data_dir, port=0, amberflo=settings, amberflo_api_key=KEY
        ) as service:
            _, admin = service.keys.create(role="admin")
            with httpx.Client(base_url=service.url, headers={"X-API-KEY": admin}) as client:
                client.post("/meters", json=METER)
                client.post("/ingest", json=[record(uniqueId=f"r{i}", meterValue=i) for i in range(1, 6)])
                service.settle()
        window = Window.covering(datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1))
        lake, meters = event_meter_usage(config, data_dir, window, apply_rules=True)
        assert sum(lake.values()) == 15.0
        with httpx.Client() as client:
            other = amberflo_usage(client, base_url=amberflo.url, api_key=KEY, meters=meters, window=window)
        assert compare(lake, other, against="Amberflo").differences == []
        staged = staged_event_usage(data_dir, settings, meters, window)
        assert compare(lake, staged, against="staged").differences == []
        amberflo.reset()  # Amberflo lost them: reconciliation says so, per customer, meter and hour
        with httpx.Client() as client:
            emptied = amberflo_usage(client, base_url=amberflo.url, api_key=KEY, meters=meters, window=window)
        [difference] = compare(lake, emptied, against="Amberflo").differences
        assert (difference.customer_id, difference.meter_api_name, difference.lake) == ("acme", "llm-tokens", 15.0)


def test_tenant_onboarding_creates_the_amberflo_customer_once(tmp_path: Path) -> None:
    with (
        LocalAmberflo(api_key=KEY) as amberflo,
        LocalMeteringService(
            config=Config(), data_dir=DataDir(tmp_path), port=0, amberflo=_settings(amberflo), amberflo_api_key=KEY
        ) as service,
    ):
        _, admin = service.keys.create(role="admin")
        _, tenant = service.keys.create(role="tenant", customer_id="acme")
        # The control plane's onboardingRequest, as sbt-aws's tenant registration puts it on the bus.
        detail = {"tenantId": "acme", "tenantName": "Acme", "email": "ops@acme.test", "tier": "basic",
                  "tenantRegistrationId": "reg-1", "registrationStatus": "In progress"}  # fmt: skip
        put_events = {"Entries": [{"DetailType": "onboardingRequest", "Source": "controlPlaneEventSource",
                                   "Detail": json.dumps(detail)}]}  # fmt: skip
        with httpx.Client(base_url=service.url, headers={"X-API-KEY": admin}) as client:
            first = client.post("/events", json=put_events)
            assert first.status_code == 200, first.text
            assert first.json()[0]["amberflo"] == "created"
            again = client.post("/events", json=put_events)  # EventBridge delivers at least once
            assert again.json()[0]["amberflo"] == "updated"
            renamed = client.post("/customers", json={"customerId": "acme", "customerName": "Acme Corp"})
            assert renamed.json()["amberflo"] == "updated"
            [customer] = amberflo.state.customers()
            assert (customer["customerId"], customer["customerName"]) == ("acme", "Acme Corp")
            assert client.post("/customers", json={"customerId": "globex", "customerName": "Globex"}).json() == {
                "customer": {"customerId": "globex", "customerName": "Globex", "enabled": True, "traits": {}},
                "amberflo": "created",
            }
            # A tenant may not onboard anyone; nothing reaches Amberflo.
            refused = client.post("/customers", json={"customerId": "evil", "customerName": "E"},
                                  headers={"X-API-KEY": tenant})  # fmt: skip
            assert refused.status_code == 403
            # Amberflo refusing the service's key is the caller's 502, naming Amberflo's answer.
            amberflo.api_key = "rotated"
            failed = client.post("/customers", json={"customerId": "initech", "customerName": "Initech"})
            assert failed.status_code == 502
            assert "401" in failed.json()["message"]
        assert sorted(c["customerId"] for c in amberflo.state.customers()) == ["acme", "globex"]
        first_customer = amberflo.state.customer("acme")
        assert first_customer["traits"] == {}  # PUT semantics: the latest onboarding's fields


def test_meterlake_customers_onboard_creates_then_updates_the_amberflo_customer(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from meterlake.cli import app

    with LocalAmberflo(api_key=KEY) as amberflo:
        context = tmp_path / "cdk.context.json"
        context.write_text(json.dumps({"amberflo": {"base_url": amberflo.url}}))

        def onboard(*args: str, key: str = KEY) -> tuple[int, str]:
            env = {"METERLAKE_CONFIG": str(context), "AMBERFLO_API_KEY": key}
            result = CliRunner().invoke(app, ["--home", str(tmp_path / "data"), "customers", "onboard", *args], env=env)
            # A refusal is a UsageError, which meterlake's main() prints as one line (CliRunner keeps it raised).
            return result.exit_code, result.stdout + str(result.exception or "")

        assert onboard("acme", "--name", "Acme", "--trait", "tier=gold") == (0, "created customer acme in Amberflo\n")
        assert onboard("acme", "--name", "Acme Corp", "--email", "ops@acme.test")[1].startswith("updated")
        [customer] = amberflo.state.customers()
        assert (customer["customerName"], customer["customerEmail"], customer["traits"]) == (
            "Acme Corp",
            "ops@acme.test",
            {},
        )
        code, output = onboard("globex", key="wrong")
        assert code != 0
        assert "401" in output
        code, output = onboard("globex", key="")
        assert code != 0
        assert "AMBERFLO_API_KEY" in output
        assert [c["customerId"] for c in amberflo.state.customers()] == ["acme"]


def test_forwarded_records_carry_each_event_s_own_dimensions_only() -> None:
    """Rows with different dimension keys (or none) become records with exactly their own dimensions, encoded as
    Amberflo takes them: no ``dimensions`` member for a row without any, no null values."""
    dims: list[list[tuple[str, str]] | None] = [[("model", "m1")], [("model", "m2"), ("region", "eu")], None, []]
    events = pa.table(
        {
            "unique_id": [f"u{i}" for i in range(4)],
            "meter_api_name": ["llm-tokens"] * 4,
            "customer_id": ["acme", "acme", "globex", "globex"],
            "meter_value": [1.0, 2.5, 3.0, 4.0],
            "meter_time": pa.array([1_700_000_000_000_000 + i * 1000 for i in range(4)], pa.timestamp("us", "UTC")),
            "dimensions": pa.array(dims, pa.map_(pa.string(), pa.string())),
        }
    )
    batch = meter_event_records(events)
    expected = [
        {"customerId": "acme", "meterApiName": "llm-tokens", "meterValue": 1.0, "meterTimeInMillis": 1_700_000_000_000,
         "uniqueId": "u0", "dimensions": {"model": "m1"}},
        {"customerId": "acme", "meterApiName": "llm-tokens", "meterValue": 2.5, "meterTimeInMillis": 1_700_000_000_001,
         "uniqueId": "u1", "dimensions": {"model": "m2", "region": "eu"}},
        {"customerId": "globex", "meterApiName": "llm-tokens", "meterValue": 3.0,
         "meterTimeInMillis": 1_700_000_000_002, "uniqueId": "u2"},
        {"customerId": "globex", "meterApiName": "llm-tokens", "meterValue": 4.0,
         "meterTimeInMillis": 1_700_000_000_003, "uniqueId": "u3"},
    ]  # fmt: skip
    assert batch.records() == expected
    assert json.loads(gzip.decompress(encode_batch(batch.ingest_records()).body)) == expected
