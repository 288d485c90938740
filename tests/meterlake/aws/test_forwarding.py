"""The forwarding Lambdas against moto (S3, SQS, Secrets Manager), a real local Iceberg table and the local Amberflo."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import msgspec
import pytest
from aws_lambda_powertools.utilities.typing import LambdaContext
from pyiceberg.table import Table

from meterlake.amberflo.server import FaultPlan, LocalAmberflo
from meterlake.aws import forwarding
from meterlake.aws.forwarding import (
    CHECKPOINT_KEY,
    DEAD_LETTER_PREFIX,
    CheckpointConflictError,
    StagerSettings,
    render_amberflo_settings,
    stage,
)
from meterlake.meters import DEFAULT_METERS, AmberfloSettings, meter_records
from tests.meterlake.amberflo.lake import commit_events, make_events, metering_table
from tests.meterlake.aws.conftest import REGION

BUCKET = "meterlake-test-lake"
SECRET = "team/amberflo-key"
JSON_KEY = "ingestKey"
API_KEY = "moto-api-key"


class FakeContext(LambdaContext):
    """The bits of a LambdaContext the handlers and Powertools read."""

    _function_name = "forwarder"
    _memory_limit_in_mb = 512
    _invoked_function_arn = f"arn:aws:lambda:{REGION}:123456789012:function:forwarder"
    _aws_request_id = "req-1"

    def get_remaining_time_in_millis(self) -> int:  # type: ignore[override]
        return 60_000


@pytest.fixture
def aws(moto: None) -> Iterator[tuple[Any, Any]]:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET)
    forwarding.reset_caches()
    yield s3, boto3.client("sqs", region_name=REGION)
    forwarding.reset_caches()


@pytest.fixture
def server() -> Iterator[LocalAmberflo]:
    amberflo = LocalAmberflo(api_key=API_KEY)
    yield amberflo
    amberflo.close()


def sqs_event(bodies: list[list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"msg-{i}",
                "receiptHandle": f"rh-{i}",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:123456789012:forward",
                "awsRegion": REGION,
            }
            for i, body in enumerate(bodies)
        ]
    }


def batch(start: int, count: int) -> list[dict[str, Any]]:
    return [
        {
            "customerId": "tenant-1",
            "meterApiName": "api-calls",
            "meterValue": 1,
            "meterTimeInMillis": 1_764_000_000_000 + n,
            "uniqueId": f"api-calls:r{n}",
        }
        for n in range(start, start + count)
    ]


@pytest.fixture
def forwarder_env(aws: tuple[Any, Any], server: LocalAmberflo, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name=SECRET, SecretString=json.dumps({JSON_KEY: API_KEY, "other": "x"})
    )
    settings = AmberfloSettings(base_url=server.url, min_backoff_s=0.01, max_backoff_s=0.05, read_timeout_s=2.0)
    monkeypatch.setenv(forwarding.ENV_AMBERFLO, render_amberflo_settings(settings, retry_budget_s=0.3))
    monkeypatch.setenv(forwarding.ENV_BUCKET, BUCKET)
    monkeypatch.setenv(forwarding.ENV_SECRET_NAME, SECRET)
    monkeypatch.setenv(forwarding.ENV_SECRET_JSON_KEY, JSON_KEY)
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", forwarding.METRICS_NAMESPACE)


def emitted_metrics(output: str) -> dict[str, list[float]]:
    """Metric values (Powertools prints each as a list) of the EMF documents on stdout."""
    values: dict[str, list[float]] = {}
    for line in output.splitlines():
        if line.startswith("{") and "_aws" in line:
            document = json.loads(line)
            for metric in document["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
                values[metric["Name"]] = document[metric["Name"]]
    return values


def test_forwarder_sends_good_batches_and_dead_letters_a_refused_one(
    aws: tuple[Any, Any], server: LocalAmberflo, forwarder_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    s3, _ = aws
    server.faults = FaultPlan(reject_unique_ids=frozenset({"api-calls:r105"}))
    response = forwarding.forwarder_handler(sqs_event([batch(0, 100), batch(100, 50), batch(200, 3)]), FakeContext())
    assert response == {"batchItemFailures": []}
    assert server.accepted_unique_ids() == {f"api-calls:r{n}" for n in [*range(100), *range(200, 203)]}
    (key,) = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=DEAD_LETTER_PREFIX)["Contents"]]
    assert key.endswith("/msg-1.json")
    letter = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert letter["status"] == 400
    assert "api-calls:r105" in letter["answer"]
    assert [r["uniqueId"] for r in letter["records"]] == [f"api-calls:r{n}" for n in range(100, 150)]
    metrics = emitted_metrics(capsys.readouterr().out)
    assert (metrics["RecordsSent"], metrics["RecordsDeadLettered"], metrics["BatchesRetried"]) == ([103], [50], [0])


def test_forwarder_hands_batches_back_to_sqs_while_amberflo_fails(
    aws: tuple[Any, Any], server: LocalAmberflo, forwarder_env: None
) -> None:
    s3, _ = aws
    server.faults = FaultPlan(transient_rate=1.0, kinds=("503",))
    response = forwarding.forwarder_handler(sqs_event([batch(0, 5), batch(5, 5), batch(10, 5)]), FakeContext())
    assert response == {"batchItemFailures": [{"itemIdentifier": f"msg-{i}"} for i in range(3)]}
    assert server.accepted_unique_ids() == set()
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=DEAD_LETTER_PREFIX)


def test_forwarder_fails_without_the_api_key_in_the_secret(
    aws: tuple[Any, Any], server: LocalAmberflo, forwarder_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(forwarding.ENV_SECRET_JSON_KEY, "apiKey")
    with pytest.raises(forwarding.ApiKeyMissingError, match="apiKey"):
        forwarding.forwarder_handler(sqs_event([batch(0, 1)]), FakeContext())
    assert server.accepted_unique_ids() == set()


# -- the stager -------------------------------------------------------------------------------------------------


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
    stale = forwarding.S3Checkpoint(s3, bucket=BUCKET).read()
    commit_events(table, make_events(50, 50), offset=2)
    stage(settings(queue_url), load_table=load, s3=s3, sqs=sqs)
    moved = s3.get_object(Bucket=BUCKET, Key=CHECKPOINT_KEY)["Body"].read()
    snapshot = table.current_snapshot()
    assert snapshot is not None
    with pytest.raises(CheckpointConflictError):
        forwarding.S3Checkpoint(s3, bucket=BUCKET).advance(stale, table_uuid="x", snapshot=snapshot)
    assert s3.get_object(Bucket=BUCKET, Key=CHECKPOINT_KEY)["Body"].read() == moved
    assert msgspec.json.decode(moved)["snapshot_id"] == snapshot.snapshot_id


def test_a_first_checkpoint_is_not_written_over_one_that_appeared(aws: tuple[Any, Any], table: Table) -> None:
    s3, _ = aws
    snapshot_id = commit_events(table, make_events(0, 5), offset=1)
    snapshot = table.snapshot_by_id(snapshot_id)
    assert snapshot is not None
    s3.put_object(Bucket=BUCKET, Key=CHECKPOINT_KEY, Body=b"{}")
    with pytest.raises(CheckpointConflictError, match="not to exist"):
        forwarding.S3Checkpoint(s3, bucket=BUCKET).advance(
            forwarding.Checkpoint(), table_uuid=str(table.metadata.table_uuid), snapshot=snapshot
        )
