"""The forwarding commands end to end: forward run/status/retry-dead, reconcile (+ repair), meters sync."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from meterlake.amberflo.server import FaultPlan, LocalAmberflo
from meterlake.cli import app
from meterlake.config import Config
from meterlake.lake.home import DataDir
from meterlake.meters import DEFAULT_METERS, meter_records
from meterlake.service.local import LocalMeteringService
from tests.conftest import FaultReport
from tests.meterlake.amberflo.conftest import API_KEY, quick_settings
from tests.meterlake.amberflo.lake import BASE_TIME_MS, commit_events, make_events, metering_table

WINDOW = ["--from", "2025-11-24T00:00:00Z", "--to", "2025-11-26T00:00:00Z"]


@pytest.fixture
def home(tmp_path: Path, server: LocalAmberflo) -> Path:
    (tmp_path / "cdk.context.json").write_text(json.dumps({"amberflo": {"base_url": server.url, "concurrency": 2}}))
    return tmp_path


def run(home: Path, *args: str, key: str | None = API_KEY) -> Result:
    env = {"METERLAKE_CONFIG": str(home / "cdk.context.json"), "AMBERFLO_API_KEY": key or ""}
    return CliRunner().invoke(app, ["--home", str(home / "data"), *args], env=env)


def expected_ids(start: int, count: int) -> set[str]:
    return set(meter_records(make_events(start, count), DEFAULT_METERS).unique_ids())


def test_forward_reconcile_and_repair(home: Path, server: LocalAmberflo) -> None:
    table = metering_table(home / "data")
    commit_events(table, make_events(0, 400), offset=1)

    dry = run(home, "forward", "run", key=None)
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output
    assert server.accepted_unique_ids() == set()
    assert run(home, "reconcile", *WINDOW, key=None).exit_code == 0  # lake == staged

    sent = run(home, "forward", "run")
    assert sent.exit_code == 0, sent.output
    assert server.accepted_unique_ids() == expected_ids(0, 400)
    clean = run(home, "reconcile", *WINDOW)
    assert clean.exit_code == 0, clean.output
    assert " 0 differ" in clean.output

    server.reset()  # Amberflo lost everything: reconciliation lists it, repair re-sends the same uniqueIds
    gaps = run(home, "reconcile", *WINDOW)
    assert gaps.exit_code == 1
    assert "lake" in gaps.output
    repaired = run(home, "reconcile", *WINDOW, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "queued again" in repaired.output
    assert run(home, "forward", "run").exit_code == 0
    assert server.accepted_unique_ids() == expected_ids(0, 400)
    assert run(home, "reconcile", *WINDOW).exit_code == 0

    status = run(home, "forward", "status")
    assert status.exit_code == 0
    assert "dead-lettered  0 records" in status.output


def test_dead_letters_are_kept_and_retried(home: Path, server: LocalAmberflo) -> None:
    table = metering_table(home / "data")
    commit_events(table, make_events(0, 50), offset=1)
    rejected = sorted(expected_ids(0, 50))[0]
    server.faults = FaultPlan(reject_unique_ids=frozenset({rejected}))
    assert run(home, "forward", "run").exit_code == 0
    assert rejected not in server.accepted_unique_ids()
    status = run(home, "forward", "status")
    assert "dead-lettered  0 records" not in status.output

    assert expected_ids(0, 50) - server.accepted_unique_ids() == {rejected}  # its batch's other records went

    server.faults = FaultPlan()
    retried = run(home, "forward", "retry-dead")
    assert retried.exit_code == 0
    assert rejected in retried.output  # Amberflo's answer names the refused uniqueId
    assert "1 records" in retried.output
    assert run(home, "forward", "run").exit_code == 0
    assert server.accepted_unique_ids() == expected_ids(0, 50)


def test_a_wrong_key_pauses_forwarding_and_the_next_run_with_the_right_key_resumes(
    home: Path, server: LocalAmberflo, fault_report: FaultReport
) -> None:
    """Issue 10 item 6: a wrong key dead-lettered the whole backlog; now it pauses, says so, dead-letters nothing."""
    commit_events(metering_table(home / "data"), make_events(0, 400), offset=1)
    refused = run(home, "forward", "run", key="a-revoked-key")
    assert refused.exit_code != 0
    assert "paused: Amberflo refused the API key (401), since " in str(refused.exception)
    assert server.accepted_unique_ids() == set()
    status = run(home, "forward", "status")
    assert status.exit_code == 0, status.output
    assert "paused: Amberflo refused the API key (401), since " in status.output
    assert "dead-lettered  0 records" in status.output
    assert f"backlog        {len(expected_ids(0, 400))} records" in status.output

    resumed = run(home, "forward", "run")
    expected, accepted = expected_ids(0, 400), server.accepted_unique_ids()
    fault_report(
        "wrong Amberflo key, then fixed (records)",
        answered=len(expected),
        committed=len(accepted & expected),
        lost=len(expected - accepted),
        duplicated=len(server.records()) - len(accepted),
    )
    assert resumed.exit_code == 0, resumed.output
    assert accepted == expected
    status = run(home, "forward", "status")
    assert "paused" not in status.output
    assert "dead-lettered  0 records" in status.output
    assert run(home, "reconcile", *WINDOW).exit_code == 0


def test_meters_sync_creates_then_leaves_alone(home: Path, server: LocalAmberflo) -> None:
    first = run(home, "meters", "sync")
    assert first.exit_code == 0, first.output
    assert first.output.count("created") == len(DEFAULT_METERS)
    second = run(home, "meters", "sync")
    assert second.output.count("unchanged") == len(DEFAULT_METERS)
    assert run(home, "meters", "sync", key=None).exit_code != 0
    listed = run(home, "meters", "list")
    assert all(m.meter_api_name in listed.output for m in DEFAULT_METERS)


def test_events_are_forwarded_with_their_own_time(home: Path, server: LocalAmberflo) -> None:
    commit_events(metering_table(home / "data"), make_events(0, 20), offset=1)
    assert run(home, "forward", "run").exit_code == 0
    times = {record.meter_time_in_millis for record in server.records()}
    assert min(times) >= BASE_TIME_MS
    assert max(times) < BASE_TIME_MS + 20 * 997


def test_reconcile_repair_resends_the_event_meter_buckets_amberflo_lost(home: Path, server: LocalAmberflo) -> None:
    now_ms = int(time.time() * 1000)
    batch = [
        {"customerId": customer, "meterApiName": "llm-tokens", "meterValue": value, "meterTimeInMillis": now_ms,
         "uniqueId": f"e{value}"}
        for customer, value in (("acme", 1), ("acme", 2), ("globex", 3))
    ]  # fmt: skip
    meter = {"label": "LLM tokens", "meterApiName": "llm-tokens", "meterType": "sum_of_all_usage"}
    with LocalMeteringService(
        config=Config(),
        data_dir=DataDir(home / "data"),
        port=0,
        amberflo=quick_settings(server),
        amberflo_api_key=API_KEY,
    ) as service:
        _, admin = service.keys.create(role="admin")
        with httpx.Client(base_url=service.url, headers={"X-API-KEY": admin}) as client:
            assert client.post("/meters", json=meter).status_code == 200
            assert client.post("/ingest", json=batch).status_code == 200
        service.settle()
    assert server.accepted_unique_ids() == {"e1", "e2", "e3"}
    hour = now_ms // 1000 // 3600 * 3600
    window = [
        "--from",
        str(datetime.fromtimestamp(hour - 3600, UTC)),
        "--to",
        str(datetime.fromtimestamp(hour + 7200, UTC)),
    ]
    assert run(home, "reconcile", *window).exit_code == 0

    server.reset()  # Amberflo lost the events: repair re-stages them from the meter-event outbox, same uniqueIds
    gaps = run(home, "reconcile", *window)
    assert gaps.exit_code == 1
    assert "llm-tokens" in gaps.output
    repaired = run(home, "reconcile", *window, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "repair: 3 records queued again" in repaired.output
    sent = run(home, "forward", "run")
    assert sent.exit_code == 0, sent.output
    assert "meter events: staged 0 records; sent 3 records" in sent.output
    assert server.accepted_unique_ids() == {"e1", "e2", "e3"}
    clean = run(home, "reconcile", *window)
    assert clean.exit_code == 0, clean.output
    assert " 0 differ" in clean.output
    # A second repair of the same loss queues each uniqueId once, however often it was staged.
    server.reset()
    assert "repair: 3 records queued again" in run(home, "reconcile", *window, "--repair").output
    assert run(home, "forward", "run").exit_code == 0
    assert len(server.records()) == 3
