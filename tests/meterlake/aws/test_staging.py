"""The stager Lambda against moto (S3, SQS) and a real local Iceberg table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from pyiceberg.table import Table

from meterlake.aws import staging
from meterlake.aws.forwarding import ENV_BUCKET
from meterlake.aws.staging import (
    CHECKPOINT_KEY,
    ENV_DATABASE,
    ENV_METERS,
    ENV_QUEUE_URL,
    ENV_TABLE,
    Checkpoint,
    CheckpointConflictError,
    CheckpointUnreadableError,
    S3Checkpoint,
    StagerLease,
    StagerSettings,
    render_meters,
    stage,
)
from meterlake.meters import DEFAULT_METERS, meter_records
from tests.meterlake.amberflo.lake import commit_events, make_events, metering_table
from tests.meterlake.aws.conftest import LAKE_BUCKET as BUCKET
from tests.meterlake.aws.test_forwarding import FakeContext


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


class WithoutListBucket:
    """An S3 client as a caller without s3:ListBucket sees S3: a GET of a missing key is 403 AccessDenied, not 404.

    ``may_list`` says whether ListObjectsV2 itself is allowed (a grant narrowed to the key's prefix allows it).
    """

    def __init__(self, s3: Any, *, may_list: bool) -> None:
        self._s3 = s3
        self._may_list = may_list
        self.exceptions = s3.exceptions

    def get_object(self, **kwargs: Any) -> Any:
        try:
            return self._s3.get_object(**kwargs)
        except self._s3.exceptions.NoSuchKey:
            raise self._denied("GetObject") from None

    def list_objects_v2(self, **kwargs: Any) -> Any:
        if not self._may_list:
            raise self._denied("ListObjectsV2")
        return self._s3.list_objects_v2(**kwargs)

    def put_object(self, **kwargs: Any) -> Any:
        return self._s3.put_object(**kwargs)

    def _denied(self, operation: str) -> Exception:
        error = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
        return cast(Exception, ClientError(error, operation))


def test_a_missing_checkpoint_is_absent_even_when_s3_answers_403(aws: tuple[Any, Any], table: Table) -> None:
    s3, _ = aws
    denied = WithoutListBucket(s3, may_list=True)
    assert S3Checkpoint(denied, bucket=BUCKET).read() == Checkpoint()
    s3.put_object(Bucket=BUCKET, Key=CHECKPOINT_KEY + ".old", Body=b"{}")  # a key that only starts the same
    assert S3Checkpoint(denied, bucket=BUCKET).read() == Checkpoint()


def test_a_checkpoint_that_cannot_be_told_absent_fails_with_what_to_grant(aws: tuple[Any, Any]) -> None:
    s3, _ = aws
    with pytest.raises(CheckpointUnreadableError, match=r"s3:ListBucket on the bucket"):
        S3Checkpoint(WithoutListBucket(s3, may_list=False), bucket=BUCKET).read()


def test_the_lease_keeps_runs_one_at_a_time_and_frees_itself(aws: tuple[Any, Any]) -> None:
    s3, _ = aws
    clock = [1_000.0]
    leases = StagerLease(s3, bucket=BUCKET, duration_s=360)
    first = leases.acquire("run-1", now=lambda: clock[0])
    assert first is not None
    assert first.expires_ms == 1_360_000
    assert leases.acquire("run-2", now=lambda: clock[0]) is None
    clock[0] += 359
    assert leases.acquire("run-2", now=lambda: clock[0]) is None
    clock[0] += 2  # run-1 crashed: its lease expired
    second = leases.acquire("run-2", now=lambda: clock[0])
    assert second is not None
    leases.release(first)  # a late release by run-1 must not free run-2's lease
    assert leases.acquire("run-3", now=lambda: clock[0]) is None
    leases.release(second)
    assert leases.acquire("run-3", now=lambda: clock[0]) is not None


def test_two_runs_racing_for_an_expired_lease_cannot_both_win(aws: tuple[Any, Any]) -> None:
    s3, _ = aws
    leases = StagerLease(s3, bucket=BUCKET, duration_s=10)
    stale = leases.acquire("crashed", now=lambda: 0.0)
    assert stale is not None
    # Both runs read the expired lease; the first to write it wins, the other's conditional put is refused.
    winner = leases._put("run-a", 99_000, {"IfMatch": stale.etag})
    loser = leases._put("run-b", 99_000, {"IfMatch": stale.etag})
    assert winner is not None
    assert loser is None


def test_a_run_that_finds_the_lease_held_stages_nothing(
    aws: tuple[Any, Any], table: Table, queue_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3, sqs = aws
    commit_events(table, make_events(0, 20), offset=1)
    StagerLease(s3, bucket=BUCKET).acquire("a-running-stager")
    for name, value in {
        ENV_DATABASE: "db",
        ENV_TABLE: "t",
        ENV_BUCKET: BUCKET,
        ENV_QUEUE_URL: queue_url,
        ENV_METERS: render_meters(DEFAULT_METERS),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(staging, "load_glue_table", lambda *_: pytest.fail("a skipped run must not read the table"))
    answer = staging.stager_handler({}, FakeContext())
    assert answer == {"skipped": "another stager run holds the lease"}
    assert drain_queue(sqs, queue_url) == []
