"""The stager Lambda against moto (S3, SQS) and a real local Iceberg table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pyiceberg.table import Table

from meterlake.aws.staging import (
    CHECKPOINT_KEY,
    Checkpoint,
    CheckpointConflictError,
    S3Checkpoint,
    StagerSettings,
    stage,
)
from meterlake.meters import DEFAULT_METERS, meter_records
from tests.meterlake.amberflo.lake import commit_events, make_events, metering_table
from tests.meterlake.aws.conftest import LAKE_BUCKET as BUCKET


@pytest.fixture
def table(tmp_path: Path) -> Table:
    return metering_table(tmp_path / "home")


@pytest.fixture
def queue_url(aws: tuple[Any, Any]) -> str:
    url: str = aws[1].create_queue(QueueName="forward")["QueueUrl"]
    return url


def settings(queue_url: str) -> StagerSettings:
    return StagerSettings(
        database="db", table="t", bucket=BUCKET, queue_url=queue_url, meters=DEFAULT_METERS, batch_size=100
    )


def drain_queue(sqs: Any, url: str) -> list[list[dict[str, Any]]]:
    bodies: list[list[dict[str, Any]]] = []
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            return bodies
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def test_stager_sends_each_commit_once_and_checkpoints(aws: tuple[Any, Any], table: Table, queue_url: str) -> None:
    s3, sqs = aws
    first = commit_events(table, make_events(0, 450), offset=1)
    commit_events(table, make_events(450, 300), offset=2)

    def load() -> Table:
        table.refresh()
        return table

    report = stage(settings(queue_url), load_table=load, s3=s3, sqs=sqs)
    bodies = drain_queue(sqs, queue_url)
    expected = meter_records(table.scan().to_arrow(), DEFAULT_METERS)
    assert sorted(r["uniqueId"] for body in bodies for r in body) == sorted(expected.unique_ids())
    assert all(len(body) <= 100 for body in bodies)
    assert (report.snapshots, report.records, report.messages) == (2, len(expected), len(bodies))
    assert report.untenanted == expected.untenanted > 0
    checkpoint = json.loads(s3.get_object(Bucket=BUCKET, Key=CHECKPOINT_KEY)["Body"].read())
    assert checkpoint["snapshot_id"] == report.checkpoint_snapshot_id != first

    again = stage(settings(queue_url), load_table=load, s3=s3, sqs=sqs)
    assert (again.snapshots, again.messages, again.lag_seconds) == (0, 0, 0.0)
    assert drain_queue(sqs, queue_url) == []

    commit_events(table, make_events(750, 20), offset=3)
    third = stage(settings(queue_url), load_table=load, s3=s3, sqs=sqs)
    new = {r["uniqueId"] for body in drain_queue(sqs, queue_url) for r in body}
    assert new == set(meter_records(make_events(750, 20), DEFAULT_METERS).unique_ids())
    assert third.snapshots == 1
    assert third.lag_seconds > 0


def test_stager_refuses_to_move_a_checkpoint_another_stager_moved(
    aws: tuple[Any, Any], table: Table, queue_url: str
) -> None:
    s3, sqs = aws
    commit_events(table, make_events(0, 50), offset=1)

    def load() -> Table:
        table.refresh()
        return table

    stage(settings(queue_url), load_table=load, s3=s3, sqs=sqs)
    stale = S3Checkpoint(s3, bucket=BUCKET).read()
    commit_events(table, make_events(50, 50), offset=2)
    stage(settings(queue_url), load_table=load, s3=s3, sqs=sqs)
    moved = s3.get_object(Bucket=BUCKET, Key=CHECKPOINT_KEY)["Body"].read()
    snapshot = table.current_snapshot()
    assert snapshot is not None
    with pytest.raises(CheckpointConflictError):
        S3Checkpoint(s3, bucket=BUCKET).advance(stale, table_uuid="x", snapshot=snapshot)
    assert s3.get_object(Bucket=BUCKET, Key=CHECKPOINT_KEY)["Body"].read() == moved
    assert msgspec.json.decode(moved)["snapshot_id"] == snapshot.snapshot_id


def test_a_first_checkpoint_is_not_written_over_one_that_appeared(aws: tuple[Any, Any], table: Table) -> None:
    s3, _ = aws
    snapshot_id = commit_events(table, make_events(0, 5), offset=1)
    snapshot = table.snapshot_by_id(snapshot_id)
    assert snapshot is not None
    s3.put_object(Bucket=BUCKET, Key=CHECKPOINT_KEY, Body=b"{}")
    with pytest.raises(CheckpointConflictError, match="not to exist"):
        S3Checkpoint(s3, bucket=BUCKET).advance(
            Checkpoint(), table_uuid=str(table.metadata.table_uuid), snapshot=snapshot
        )
