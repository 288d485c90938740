"""The outbox over a real Iceberg table and the local Amberflo: the lake's records reach Amberflo, exactly once.

The expected set of uniqueIds is always computed from the lake (a full scan through meter_records), never from what
the outbox staged.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
from pyiceberg.table import Table

from meterlake.amberflo.forwarder import EncodedBatch, Forwarder
from meterlake.amberflo.outbox import (
    ForwardingWorker,
    LakeHistoryGapError,
    Outbox,
    OutboxTableMismatchError,
)
from meterlake.amberflo.reconcile import Window, amberflo_usage, compare, lake_usage
from meterlake.amberflo.server import FaultPlan, LocalAmberflo
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.config import Config
from meterlake.lake.home import DataDir
from meterlake.meters import DEFAULT_METERS, UsageKey, expected_usage, meter_records, usage_of
from meterlake.schema import METERING_EVENT_PARTITION_SPEC, METERING_EVENT_SCHEMA
from tests.conftest import FaultReport
from tests.meterlake.amberflo.conftest import API_KEY, quick_settings
from tests.meterlake.amberflo.lake import BASE_TIME_MS, commit_events, make_events, metering_table

REPO = Path(__file__).parents[3]


def lake_unique_ids(table: Table) -> set[str]:
    """What the lake says must reach Amberflo: the records of every committed event."""
    table.refresh()
    return set(meter_records(table.scan().to_arrow(), DEFAULT_METERS).unique_ids())


#: How the outbox tests' settings differ from quick_settings': more in flight, slower backoff, the default retry budget.
OUTBOX_SETTINGS: dict[str, Any] = {
    "concurrency": 8,
    "max_backoff_s": 0.2,
    "read_timeout_s": 0.5,
    "poll_interval_s": 0.2,
    "give_up_after_s": AmberfloSettings().give_up_after_s,
}


#: For tests that count requests or duplicates: a slow answer on a loaded machine past the outbox tests' 0.5 s read
#: timeout is retried, and the resent batch counts as another request and its records as duplicates (CI saw 88
#: requests for 80 batches), which is the forwarder working, not what those tests check.
PATIENT_READ_TIMEOUT_S = 30.0


def settings_for(server: LocalAmberflo, **overrides: Any) -> AmberfloSettings:
    return quick_settings(server, **(OUTBOX_SETTINGS | overrides))


#: Whole hours around every event make_events numbers below 100,000.
WINDOW = Window(BASE_TIME_MS // 3_600_000 * 3600, (BASE_TIME_MS // 3_600_000 + 30) * 3600)


def staged_batches(outbox: Outbox) -> list[list[dict[str, Any]]]:
    """The records of every batch the outbox staged, batch by batch (read straight from its database)."""
    with sqlite3.connect(outbox.path) as db:
        rows = db.execute("SELECT records, body FROM batches ORDER BY id").fetchall()
    return [EncodedBatch(bytes(body), int(records)).decode() for records, body in rows]


def usage_of_records(records: Iterable[Mapping[str, Any]]) -> dict[UsageKey, float]:
    """Usage per (customer, meter, hour) of records (every default meter sums)."""
    usage: dict[UsageKey, float] = defaultdict(float)
    for record in records:
        usage[(record["customerId"], record["meterApiName"], record["meterTimeInMillis"] // 3_600_000 * 3600)] += (
            record["meterValue"]
        )
    return dict(usage)


def amberflo_side(server: LocalAmberflo) -> dict[UsageKey, float]:
    with httpx.Client() as client:
        return amberflo_usage(client, base_url=server.url, api_key=API_KEY, meters=DEFAULT_METERS, window=WINDOW)


@pytest.fixture
def table(tmp_path: Path) -> Table:
    return metering_table(tmp_path)


def test_stage_and_drain_deliver_the_lake_and_pick_up_new_commits(
    tmp_path: Path, table: Table, server: LocalAmberflo
) -> None:
    for i in range(3):
        commit_events(table, make_events(i * 1000, 1000), offset=i)
    settings = settings_for(server, read_timeout_s=PATIENT_READ_TIMEOUT_S)
    with Outbox.in_data_dir(DataDir(tmp_path), settings=settings) as outbox, Forwarder(settings) as forwarder:
        staged = outbox.stage_committed(table)
        assert staged == len(lake_unique_ids(table))
        assert outbox.stage_committed(table) == 0
        before = outbox.status()
        assert before.pending_records == staged
        assert before.untenanted_events == 300
        assert before.staged_snapshots == 3
        assert before.lag_seconds > 0

        report = outbox.drain(forwarder, api_key=API_KEY)
        assert (report.dry_run, report.sent_records, report.pending_batches) == (False, staged, 0)
        assert server.accepted_unique_ids() == lake_unique_ids(table)

        commit_events(table, make_events(3000, 500), offset=3)
        assert outbox.stage_committed(table) > 0
        outbox.drain(forwarder, api_key=API_KEY)
        after = outbox.status()
    assert server.accepted_unique_ids() == lake_unique_ids(table)
    assert (after.pending_batches, after.dead_batches, after.sent_records) == (0, 0, len(lake_unique_ids(table)))
    assert after.lag_seconds == 0.0
    assert server.stats().duplicates_dropped == 0


def test_batches_hold_at_most_batch_size_records(tmp_path: Path, table: Table, server: LocalAmberflo) -> None:
    commit_events(table, make_events(0, 500), offset=0)
    settings = settings_for(server, batch_size=7, read_timeout_s=PATIENT_READ_TIMEOUT_S)
    with Outbox.in_data_dir(DataDir(tmp_path), settings=settings) as outbox, Forwarder(settings) as forwarder:
        staged = outbox.stage_committed(table)
        outbox.drain(forwarder, api_key=API_KEY)
    assert server.stats().ingest_requests == -(-staged // 7)
    assert server.accepted_unique_ids() == lake_unique_ids(table)


def test_dry_run_stages_and_sends_nothing(tmp_path: Path, table: Table, server: LocalAmberflo) -> None:
    events = make_events(0, 2000)
    commit_events(table, events, offset=0)
    settings = settings_for(server)
    with Outbox.in_data_dir(DataDir(tmp_path), settings=settings) as outbox, Forwarder(settings) as forwarder:
        outbox.stage_committed(table)
        report = outbox.drain(forwarder, api_key=None)
        assert report.dry_run
        assert report.pending_batches == outbox.status().pending_batches > 0
        staged = outbox.staged_records()
        window = outbox.staged_records(make_events(0, 1).column("request_time")[0].value // 1000, None)
    with Outbox(tmp_path / "other.db", settings=AmberfloSettings(dry_run=True)) as flagged:
        flagged.stage_committed(table)
        assert flagged.drain(forwarder, api_key=API_KEY).dry_run
    assert server.stats().ingest_requests == 0
    assert {r["uniqueId"] for r in staged} == lake_unique_ids(table)
    assert len(window) == len(staged)
    # Dry reconciliation: the staged records aggregate to what the lake says.
    totals: dict[tuple[str, str, int], int] = {}
    for record in staged:
        key = (record["customerId"], record["meterApiName"], record["meterTimeInMillis"] // 3_600_000 * 3600)
        totals[key] = totals.get(key, 0) + record["meterValue"]
    assert totals == expected_usage(events, DEFAULT_METERS)
    assert usage_of(meter_records(events, DEFAULT_METERS), DEFAULT_METERS) == totals


def test_retry_dead_redrives_after_the_server_stops_rejecting(
    tmp_path: Path, table: Table, server: LocalAmberflo
) -> None:
    commit_events(table, make_events(0, 1000), offset=0)
    expected = lake_unique_ids(table)
    rejected = sorted(expected)[17]
    server.faults = FaultPlan(reject_unique_ids=frozenset({rejected}))
    settings = settings_for(server)
    with Outbox.in_data_dir(DataDir(tmp_path), settings=settings) as outbox, Forwarder(settings) as forwarder:
        outbox.stage_committed(table)
        report = outbox.drain(forwarder, api_key=API_KEY)
        assert report.dead_batches == 1
        (dead,) = outbox.dead_letters()
        assert dead.http_status == 400
        assert dead.answer is not None
        assert rejected in dead.answer
        assert rejected in dead.unique_ids
        assert server.accepted_unique_ids() == expected - set(dead.unique_ids)
        assert outbox.status().last_error is not None

        server.faults = FaultPlan()
        assert outbox.retry_dead() == 1
        outbox.drain(forwarder, api_key=API_KEY)
        assert outbox.dead_letters() == []
    assert server.accepted_unique_ids() == expected


def test_one_refused_record_per_batch_dead_letters_only_it_and_the_rest_reconciles(
    tmp_path: Path, table: Table, server: LocalAmberflo, fault_report: FaultReport
) -> None:
    for i in range(3):
        commit_events(table, make_events(i * 1000, 1000), offset=i)
    expected = lake_unique_ids(table)
    settings = settings_for(server)
    with Outbox.in_data_dir(DataDir(tmp_path), settings=settings) as outbox, Forwarder(settings) as forwarder:
        outbox.stage_committed(table)
        batches = staged_batches(outbox)
        # One record per batch, at a different place in each, that Amberflo refuses (naming it, as it may or not).
        refused = {
            batch[(7 * n) % len(batch)]["uniqueId"]: batch[(7 * n) % len(batch)] for n, batch in enumerate(batches)
        }
        server.faults = FaultPlan(reject_unique_ids=frozenset(refused))
        report = outbox.drain(forwarder, api_key=API_KEY)
        dead = outbox.dead_letters()
        status = outbox.status()
        staged = outbox.staged_records()
    good = expected - set(refused)
    accepted = server.accepted_unique_ids()
    fault_report(
        "Amberflo refuses 1 record per batch (good records)",
        answered=len(good),
        committed=len(accepted & good),
        lost=len(good - accepted),
        duplicated=len(server.records()) - len(accepted),
    )
    assert len(batches) > 20
    assert (report.dead_batches, report.dead_records, report.gave_up_batches) == (len(refused), len(refused), 0)
    # Nothing good was dead-lettered, and exactly the refused records were: each alone, with Amberflo's answer.
    assert sorted(uid for entry in dead for uid in entry.unique_ids) == sorted(refused)
    assert all(entry.records == 1 and entry.http_status == 400 for entry in dead)
    assert all(entry.unique_ids[0] in (entry.answer or "") for entry in dead)
    assert server.accepted_unique_ids() == expected - set(refused)
    assert (status.pending_batches, status.dead_records) == (0, len(refused))
    assert status.sent_records == len(expected) - len(refused)
    # The outbox still holds every staged record exactly once (sent or dead): what was staged still reconciles.
    assert sorted(record["uniqueId"] for record in staged) == sorted(expected)
    # Reconciliation: every difference is a dead-lettered record's; without them, 0 differences.
    lake = lake_usage(Config(), DataDir(tmp_path), WINDOW)
    amberflo = amberflo_side(server)
    dead_usage = usage_of_records(refused.values())
    assert {
        (d.customer_id, d.meter_api_name, d.hour_s) for d in compare(lake, amberflo, against="x").differences
    } == set(dead_usage)
    good_lake = {key: value - dead_usage.get(key, 0.0) for key, value in lake.items()}
    assert compare({k: v for k, v in good_lake.items() if v}, amberflo, against="Amberflo").differences == []


def test_empty_and_sentinel_tenants_are_not_forwarded_and_dead_letter_nothing(
    tmp_path: Path, table: Table, server: LocalAmberflo
) -> None:
    """Issue 10 item 5: a tenant claim "" was forwarded as customerId "" and a 400 dead-lettered its 100 records."""
    events = make_events(0, 3000)
    no_tenant = {3: "", 7: "-", 8: " "}
    tenants = [no_tenant.get(n % 10, tenant) for n, tenant in enumerate(events.column("tenant_id").to_pylist())]
    events = events.set_column(events.schema.get_field_index("tenant_id"), "tenant_id", pa.array(tenants, pa.string()))
    commit_events(table, events, offset=0)
    real_tenants = {f"tenant-{n}" for n in range(4)}
    settings = settings_for(server)
    with Outbox.in_data_dir(DataDir(tmp_path), settings=settings) as outbox, Forwarder(settings) as forwarder:
        outbox.stage_committed(table)
        report = outbox.drain(forwarder, api_key=API_KEY)
        status = outbox.status()
    assert (report.dead_batches, status.dead_records, status.pending_batches) == (0, 0, 0)
    assert status.untenanted_events == sum(tenant not in real_tenants for tenant in tenants)
    assert server.stats().permanent_rejections == 0
    assert {record.customer_id for record in server.records()} == real_tenants
    # The lake side of reconciliation applies the same rule: no differences.
    reconciled = compare(lake_usage(Config(), DataDir(tmp_path), WINDOW), amberflo_side(server), against="Amberflo")
    assert reconciled.buckets > 0
    assert reconciled.differences == []


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_pauses_forwarding_logs_once_and_resumes_when_the_key_is_fixed(
    tmp_path: Path, table: Table, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meterlake.amberflo")
    with LocalAmberflo(api_key="the-key-amberflo-has", key_refusal_status=status) as server:  # type: ignore[arg-type]
        settings = settings_for(server, concurrency=2, poll_interval_s=0.5, key_refused_retry_max_s=1.0)
        with Outbox.in_data_dir(DataDir(tmp_path), settings=settings) as outbox, Forwarder(settings) as forwarder:
            worker = ForwardingWorker(
                outbox, load_table=lambda: metering_table(tmp_path), forwarder=forwarder, api_key=API_KEY
            )
            commit_events(table, make_events(0, 2000), offset=0)
            before_ms = time.time() * 1000
            worker.start()
            assert worker.wait_for_cycle(10)
            # Commits keep coming while paused: each wakes the worker, which stages them but does not hammer Amberflo.
            started = time.monotonic()
            for i in range(1, 11):
                commit_events(table, make_events(2000 + i * 100, 100), offset=i)
                assert worker.wait_for_cycle(10)
            elapsed = time.monotonic() - started
            paused = outbox.status()
            refusals = server.stats().unauthorized_requests
            assert paused.paused is not None
            assert paused.paused.status == status
            assert before_ms - 1000 <= paused.paused.since_ms <= time.time() * 1000
            assert paused.paused.describe().startswith(f"Amberflo refused the API key ({status}), since ")
            seen_by_worker = worker.paused
            assert seen_by_worker == paused.paused
            assert (paused.dead_batches, paused.sent_records) == (0, 0)
            assert paused.pending_records == len(lake_unique_ids(table))
            # A first drain, then one per retry interval (0.5 s, then 1 s), each refused in at most 2 requests.
            assert refusals <= settings.concurrency * (2 + elapsed / settings.poll_interval_s)
            assert server.accepted_unique_ids() == set()

            server.api_key = API_KEY  # the key is fixed in Amberflo: forwarding resumes by itself
            deadline = time.monotonic() + 15
            while server.accepted_unique_ids() != lake_unique_ids(table) and time.monotonic() < deadline:
                worker.wake()
                time.sleep(0.05)
            assert worker.wait_for_cycle(10)
            worker.stop()
            resumed = outbox.status()
    assert server.accepted_unique_ids() == lake_unique_ids(table)
    assert (resumed.paused, worker.paused, resumed.pending_batches, resumed.dead_batches) == (None, None, 0, 0)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"Amberflo refused the API key ({status}), since ")
    assert "forwarding is paused; nothing is dead-lettered" in errors[0]
    assert any("accepts the API key again" in record.getMessage() for record in caplog.records)


def test_outbox_refuses_another_table_and_a_rewound_history(tmp_path: Path, table: Table) -> None:
    first = commit_events(table, make_events(0, 10), offset=0)
    commit_events(table, make_events(10, 10), offset=1)
    with Outbox.in_data_dir(DataDir(tmp_path)) as outbox:
        outbox.stage_committed(table)
        table.manage_snapshots().set_current_snapshot(first).commit()
        with pytest.raises(LakeHistoryGapError, match="is not an ancestor"):
            outbox.stage_committed(table)
        catalog = table.catalog
        other = catalog.create_table(
            ("restapi_access_log_iceberg_db", "other"),
            schema=METERING_EVENT_SCHEMA,
            partition_spec=METERING_EVENT_PARTITION_SPEC,
        )
        with pytest.raises(OutboxTableMismatchError, match="move it aside"):
            outbox.stage_committed(other)


def test_worker_forwards_after_wake_and_stops_in_bounded_time(
    tmp_path: Path, table: Table, server: LocalAmberflo
) -> None:
    settings = settings_for(server)
    home = DataDir(tmp_path)
    with Outbox.in_data_dir(home, settings=settings) as outbox, Forwarder(settings) as forwarder:
        worker = ForwardingWorker(
            outbox, load_table=lambda: metering_table(tmp_path), forwarder=forwarder, api_key=API_KEY
        )
        worker.start()
        commit_events(table, make_events(0, 800), offset=0)
        worker.wake()
        assert worker.wait_for_cycle(10)
        assert server.accepted_unique_ids() == lake_unique_ids(table)
        assert worker.last_error is None

        # Amberflo down: the final drain retries until stop's timeout, then the batches stay pending.
        server.faults = FaultPlan(transient_rate=1.0, kinds=("503",))
        commit_events(table, make_events(800, 200), offset=1)
        started = time.monotonic()
        worker.stop(timeout=0.5)
        assert time.monotonic() - started < 0.5 + settings.read_timeout_s + 1.0
        status = outbox.status()
    assert status.pending_batches > 0
    assert status.dead_batches == 0


def test_acceptance_100k_records_with_20_percent_transient_faults(
    tmp_path: Path, table: Table, server: LocalAmberflo
) -> None:
    for i in range(9):
        commit_events(table, make_events(i * 10_000, 10_000), offset=i)
    expected = lake_unique_ids(table)
    assert len(expected) >= 100_000
    rejected = sorted(expected)[len(expected) // 2]
    server.faults = FaultPlan(
        transient_rate=0.2, retry_after_s=1, slow_s=1.0, reject_unique_ids=frozenset({rejected}), seed=7
    )
    settings = settings_for(server, concurrency=16)
    with Outbox.in_data_dir(DataDir(tmp_path), settings=settings) as outbox, Forwarder(settings) as forwarder:
        started = time.monotonic()
        outbox.stage_committed(table)
        staged_s = time.monotonic() - started
        report = outbox.drain(forwarder, api_key=API_KEY)
        elapsed = time.monotonic() - started
        (dead,) = outbox.dead_letters()
        status = outbox.status()
        stats = forwarder.stats()
        staged = outbox.staged_records()
    faults = server.stats().faults_injected
    print(
        f"\n{len(expected)} records: staged in {staged_s:.2f} s, delivered in {elapsed:.2f} s; "
        f"faults {dict(faults)}; retries {stats.retries}"
    )
    assert set(faults) == {"429", "500", "503", "slow", "reset"}
    assert report.gave_up_batches == 0
    assert dead.http_status == 400
    assert dead.answer is not None
    assert rejected in dead.answer
    assert dead.unique_ids == [rejected]  # only the refused record: its batch's 99 others were accepted
    assert server.accepted_unique_ids() == expected - {rejected}
    assert (status.pending_batches, status.dead_batches, status.dead_records) == (0, 1, 1)
    assert len(staged) == len(expected)


def test_acceptance_sigkill_mid_drain_then_restart_delivers_everything(
    tmp_path: Path, table: Table, server: LocalAmberflo
) -> None:
    for i in range(3):
        commit_events(table, make_events(i * 10_000, 10_000), offset=i)
    expected = lake_unique_ids(table)
    server.faults = FaultPlan(transient_rate=0.1, kinds=("500", "reset", "slow"), slow_s=1.0, seed=3)
    env = {**os.environ, "AMBERFLO_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "tests.meterlake.amberflo.forward_process", str(tmp_path), server.url]
    kill_at = random.uniform(0.1, 0.6) * len(expected)

    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while server.stats().records_accepted < kill_at and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert process.poll() is None, "the forwarder finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    accepted_at_kill = len(server.accepted_unique_ids())
    assert 0 < accepted_at_kill < len(expected)

    restarted = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert restarted.returncode == 0, restarted.stderr
    assert "staged 0" in restarted.stdout  # everything was staged before the kill, and nothing is staged twice
    assert server.accepted_unique_ids() == expected
    with Outbox.in_data_dir(DataDir(tmp_path)) as outbox:
        staged_ids = [record["uniqueId"] for record in outbox.staged_records()]
        assert outbox.status().pending_batches == 0
    assert sorted(staged_ids) == sorted(expected)


def test_rows_added_by_an_overwrite_snapshot_are_staged(tmp_path: Path) -> None:
    """Firehose's upserts commit overwrite snapshots: the rows they add are staged (again, under the same uniqueIds)."""
    table = metering_table(tmp_path)
    first, later = make_events(0, 30), make_events(30, 30)
    commit_events(table, first, offset=1)
    # A partial overwrite rewrites the file without one row: an `overwrite` snapshot re-adding the other 29.
    table.overwrite(later, overwrite_filter=f"request_id == '{first.column('request_id')[0].as_py()}'")
    assert [s.summary.operation.value for s in table.snapshots() if s.summary is not None] == [
        "append",
        "overwrite",
        "append",
    ]
    with Outbox(tmp_path / "outbox.db") as outbox:
        outbox.stage_committed(table)
        staged = [record["uniqueId"] for record in outbox.staged_records()]
    expected = set(meter_records(pa.concat_tables([first, later]), DEFAULT_METERS).unique_ids())
    assert set(staged) == expected
    assert len(staged) > len(expected)  # the overwrite's re-added rows were read, with their original uniqueIds
