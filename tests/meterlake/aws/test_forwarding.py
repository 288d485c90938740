"""The forwarder Lambda against moto (S3, Secrets Manager) and the local Amberflo."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from aws_lambda_powertools.utilities.typing import LambdaContext

from meterlake.amberflo.server import FaultPlan, LocalAmberflo
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.aws import forwarding
from meterlake.aws.forwarding import DEAD_LETTER_PREFIX, render_amberflo_settings
from tests.meterlake.aws.conftest import LAKE_BUCKET as BUCKET
from tests.meterlake.aws.conftest import REGION

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
def server(request: pytest.FixtureRequest) -> Iterator[LocalAmberflo]:
    """The local Amberflo, refusing a wrong key with 401 (or the status a test passes indirectly)."""
    amberflo = LocalAmberflo(api_key=API_KEY, key_refusal_status=getattr(request, "param", 401))
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


def test_forwarder_sends_good_records_and_dead_letters_only_the_refused_ones(
    aws: tuple[Any, Any], server: LocalAmberflo, forwarder_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    s3, _ = aws
    server.faults = FaultPlan(reject_unique_ids=frozenset({"api-calls:r105"}))
    invalid = batch(200, 100)
    invalid[42]["customerId"] = ""  # refused by Amberflo without naming the record's uniqueId: found by halving
    event = sqs_event([batch(0, 100), batch(100, 50), invalid])
    response = forwarding.forwarder_handler(event, FakeContext())
    assert response == {"batchItemFailures": []}
    sent = {f"api-calls:r{n}" for n in [*range(150), *range(200, 300)]}
    assert server.accepted_unique_ids() == sent - {"api-calls:r105", "api-calls:r242"}
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=DEAD_LETTER_PREFIX)["Contents"])
    assert [key.rsplit("/", 1)[1] for key in keys] == ["msg-1-5.json", "msg-2-42.json"]
    named, unnamed = (json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()) for key in keys)
    assert (named["messageId"], named["status"], [r["uniqueId"] for r in named["records"]]) == (
        "msg-1",
        400,
        ["api-calls:r105"],
    )
    assert "api-calls:r105" in named["answer"]
    assert (unnamed["messageId"], unnamed["status"], unnamed["records"]) == ("msg-2", 400, [invalid[42]])
    assert "customerId must be a non-empty string" in unnamed["answer"]
    metrics = emitted_metrics(capsys.readouterr().out)
    assert (metrics["RecordsSent"], metrics["RecordsDeadLettered"], metrics["BatchesRetried"]) == ([248], [2], [0])
    assert metrics["ApiKeyRefused"] == [0]


@pytest.mark.parametrize("server", [401, 403], indirect=True)
def test_a_refused_key_hands_every_message_back_alarms_and_resumes_once_the_secret_is_fixed(
    aws: tuple[Any, Any], server: LocalAmberflo, forwarder_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10 item 6: a wrong key dead-lettered every message; now they wait on the queue for a working key."""
    s3, _ = aws
    server.api_key = "the-rotated-key"  # Amberflo no longer accepts the key in the secret
    event = sqs_event([batch(0, 100), batch(100, 50), batch(200, 3)])
    response = forwarding.forwarder_handler(event, FakeContext())
    assert response == {"batchItemFailures": [{"itemIdentifier": f"msg-{i}"} for i in range(3)]}
    assert server.accepted_unique_ids() == set()
    assert server.stats().unauthorized_requests == 1  # the other messages went back untried
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=DEAD_LETTER_PREFIX)
    metrics = emitted_metrics(capsys.readouterr().out)
    assert (metrics["ApiKeyRefused"], metrics["RecordsDeadLettered"], metrics["RecordsSent"]) == ([1], [0], [0])

    # The secret is fixed: the next invocation reads it again (not the copy cached for SECRET_MAX_AGE_S) and sends.
    secrets = boto3.client("secretsmanager", region_name=REGION)
    secrets.put_secret_value(SecretId=SECRET, SecretString=json.dumps({JSON_KEY: "the-rotated-key"}))
    response = forwarding.forwarder_handler(event, FakeContext())
    assert response == {"batchItemFailures": []}
    assert len(server.accepted_unique_ids()) == 153
    metrics = emitted_metrics(capsys.readouterr().out)
    assert (metrics["ApiKeyRefused"], metrics["RecordsSent"]) == ([0], [153])


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


def test_a_dry_run_sends_nothing_and_keeps_every_message_on_the_queue(
    aws: tuple[Any, Any], server: LocalAmberflo, forwarder_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = AmberfloSettings(base_url=server.url, dry_run=True)
    monkeypatch.setenv(forwarding.ENV_AMBERFLO, render_amberflo_settings(settings, retry_budget_s=0.3))
    response = forwarding.forwarder_handler(sqs_event([batch(0, 5), batch(5, 5)]), FakeContext())
    assert response == {"batchItemFailures": [{"itemIdentifier": "msg-0"}, {"itemIdentifier": "msg-1"}]}
    assert server.stats().ingest_requests == 0
