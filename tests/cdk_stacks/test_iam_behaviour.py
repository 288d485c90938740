"""The synthesized IAM policies allow exactly the calls the code makes: the gate a live deploy would otherwise be.

Each Lambda's handler runs on an AWS-shaped event against moto's server, with the environment its template gives it
(resolved as CloudFormation would), and every request it sends is evaluated against its role's policies and the
target's resource policy. Calls made by AWS services on a role's behalf (Firehose writing the table, Lambda's event
source polling SQS, Glue's optimizers, the Lambda service writing logs) are declared from AWS's documentation and
evaluated the same way, trust policies included.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import boto3  # type: ignore[import-untyped]
import msgspec
import pytest
from aws_lambda_powertools.utilities.typing import LambdaContext

from cdk_stacks.api import DEMO_HANDLER
from cdk_stacks.forwarding import FORWARDER_HANDLER, STAGER_HANDLER
from cdk_stacks.transform import TRANSFORM_HANDLER
from meterlake import demo_api
from meterlake.amberflo.server import FaultPlan, LocalAmberflo
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.aws import forwarding, staging
from meterlake.config import Config
from meterlake.records import render_access_log_line
from meterlake.schema import METERING_EVENT_PARTITION_SPEC, METERING_EVENT_SCHEMA
from tests.cdk_stacks.aws_requests import RecordedRequest, RecordingMotoServer, authorizations
from tests.cdk_stacks.iam_evaluation import (
    ACCOUNT,
    PARTITION,
    REGION,
    AwsCall,
    Deployment,
    Policy,
    evaluate,
    principal_matches,
)
from tests.meterlake.amberflo.lake import make_events

FORWARDING = "MeterlakeForwarding"


@pytest.fixture
def moto_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingMotoServer]:
    """moto's server with fake credentials; every AWS SDK client of the test talks to it."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with RecordingMotoServer() as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        staging.reset_caches()
        forwarding.reset_caches()
        yield server
    staging.reset_caches()
    forwarding.reset_caches()


class FakeContext(LambdaContext):
    """What the handlers and Powertools read of a Lambda context."""

    def __init__(self, function_name: str) -> None:
        self._function_name = function_name
        self._memory_limit_in_mb = 1024
        self._invoked_function_arn = f"arn:{PARTITION}:lambda:{REGION}:{ACCOUNT}:function:{function_name}"
        self._aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:  # type: ignore[override]
        return 240_000


def _function(deployment: Deployment, stack: str, handler: str) -> tuple[str, dict[str, Any]]:
    """(logical id, properties) of the stack's Lambda with ``handler``."""
    (found,) = [
        (logical_id, dict(resource["Properties"]))
        for logical_id, resource in deployment.resources(stack, "AWS::Lambda::Function").items()
        if resource["Properties"].get("Handler") == handler
    ]
    return found


def _role_of(function: dict[str, Any]) -> str:
    role: str = function["Role"]["Fn::GetAtt"][0]
    return role


def _denied(deployment: Deployment, stack: str, role: str, calls: list[AwsCall]) -> list[tuple[str, str]]:
    """(what the code did, why AWS would refuse it) for every call the role's policies do not allow."""
    caller = str(deployment.attribute(stack, role, "Arn"))
    identity = deployment.role_policies(stack, role)
    refused = []
    for call in calls:
        resource = [p for arn in call.resources for p in deployment.resource_policies(arn, caller_arn=caller)]
        decision = evaluate(call, identity, resource)
        if not decision.allowed:
            refused.append((call.why, decision.reason))
    return refused


def _calls_of(requests: list[RecordedRequest], **kwargs: Any) -> list[AwsCall]:
    return [call for request in requests for call in authorizations(request, **kwargs)]


def _run_with_environment(
    monkeypatch: pytest.MonkeyPatch, deployment: Deployment, stack: str, function: dict[str, Any]
) -> dict[str, str]:
    """Set the function's environment exactly as its template resolves; returns it."""
    variables: dict[str, str] = deployment.resolve(stack, function.get("Environment", {}).get("Variables", {}))
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return variables


def _log_writes(deployment: Deployment, stack: str, function: dict[str, Any]) -> list[AwsCall]:
    """What the Lambda service does with the function's role for every invocation: write its log group."""
    group = deployment.resolve(stack, function["LoggingConfig"]["LogGroup"])
    stream = f"arn:{PARTITION}:logs:{REGION}:{ACCOUNT}:log-group:{group}:log-stream:2026/11/30/[$LATEST]0123abcd"
    why = f"the Lambda service writes the logs of {function['Handler']}"
    return [AwsCall(action, (stream,), {}, why) for action in ("logs:CreateLogStream", "logs:PutLogEvents")]


# -- the stager ----------------------------------------------------------------------------------------------------


def test_every_call_of_the_stager_is_allowed_by_its_role(
    deployment: Deployment, moto_server: RecordingMotoServer, test_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two scheduled runs: the first finds no checkpoint and no lease (missing keys), the second both."""
    from pyiceberg.catalog.glue import GlueCatalog

    stack = FORWARDING
    _, function = _function(deployment, stack, STAGER_HANDLER)
    env = _run_with_environment(monkeypatch, deployment, stack, function)
    bucket = env[forwarding.ENV_BUCKET]
    queue_name = env[staging.ENV_QUEUE_URL].rsplit("/", 1)[1]
    boto3.client("s3").create_bucket(Bucket=bucket)
    boto3.client("sqs").create_queue(QueueName=queue_name)
    catalog = GlueCatalog("glue", **{"glue.region": REGION, "s3.region": REGION, "s3.endpoint": moto_server.url})
    catalog.create_namespace(env[staging.ENV_DATABASE])
    prefix = test_config.data_firehose_configuration.output_prefix.strip("/")
    table = catalog.create_table(
        (env[staging.ENV_DATABASE], env[staging.ENV_TABLE]),
        schema=METERING_EVENT_SCHEMA,
        partition_spec=METERING_EVENT_PARTITION_SPEC,
        location=f"s3://{bucket}/{prefix}/{uuid.uuid4().hex}",
    )
    table.append(make_events(0, 300))
    moto_server.take()

    scheduled = {"version": "0", "detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}
    first = staging.stager_handler(scheduled, FakeContext("stager"))
    first_requests = moto_server.take()
    table.append(make_events(300, 100))
    moto_server.take()  # the commit is the test's doing, not the stager's
    second = staging.stager_handler(scheduled, FakeContext("stager"))
    requests = first_requests + moto_server.take()

    assert first["snapshots"] == second["snapshots"] == 1, (first, second)
    assert first["records"] > 0
    assert second["records"] > 0
    assert [r.path for r in first_requests if r.status == 404] == [
        f"/{bucket}/{key}" for key in (staging.LEASE_KEY, staging.CHECKPOINT_KEY)
    ]
    calls = _calls_of(requests) + _log_writes(deployment, stack, function)
    assert {c.action for c in calls} >= {"glue:GetTable", "s3:GetObject", "s3:PutObject", "sqs:SendMessage"}
    assert _denied(deployment, stack, _role_of(function), calls) == []


# -- the forwarder -------------------------------------------------------------------------------------------------


def test_every_call_of_the_forwarder_and_its_queue_subscription_is_allowed(
    deployment: Deployment, moto_server: RecordingMotoServer, test_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One SQS batch: one message Amberflo takes, one it refuses for good (dead-lettered to S3)."""
    stack = FORWARDING
    _, function = _function(deployment, stack, FORWARDER_HANDLER)
    env = _run_with_environment(monkeypatch, deployment, stack, function)
    boto3.client("s3").create_bucket(Bucket=env[forwarding.ENV_BUCKET])
    secret = boto3.client("secretsmanager").create_secret(
        Name=env[forwarding.ENV_SECRET_NAME], SecretString=json.dumps({env[forwarding.ENV_SECRET_JSON_KEY]: "key"})
    )
    (mapping,) = deployment.resources(stack, "AWS::Lambda::EventSourceMapping").values()
    queue_arn = str(deployment.resolve(stack, mapping["Properties"]["EventSourceArn"]))
    with LocalAmberflo(api_key="key") as amberflo:
        amberflo.faults = FaultPlan(reject_unique_ids=frozenset({"api-calls:r1"}))
        # The template's settings, but sending (the test config is a dry run) to the local Amberflo.
        settings = msgspec.json.decode(env[forwarding.ENV_AMBERFLO], type=AmberfloSettings)
        live = msgspec.structs.replace(settings, base_url=amberflo.url, dry_run=False)
        monkeypatch.setenv(forwarding.ENV_AMBERFLO, msgspec.json.encode(live).decode())
        moto_server.take()
        response = forwarding.forwarder_handler(_sqs_event(queue_arn), FakeContext("forwarder"))
    assert response == {"batchItemFailures": []}
    requests = moto_server.take()
    assert {r.describe().split(" ")[0] for r in requests} == {"secretsmanager", "s3"}

    # What Lambda's SQS event source does with the function's role (AWS Lambda developer guide, "Execution role
    # permissions" for Amazon SQS): poll, delete what was processed, change visibility, read the queue's attributes.
    polling = [
        AwsCall(f"sqs:{action}", (queue_arn,), {"aws:SecureTransport": "true"}, f"the event source {action}")
        for action in ("ReceiveMessage", "DeleteMessage", "ChangeMessageVisibility", "GetQueueAttributes")
    ]
    calls = _calls_of(requests, secret_arn=lambda _: str(secret["ARN"])) + polling
    calls += _log_writes(deployment, stack, function)
    assert _denied(deployment, stack, _role_of(function), calls) == []
    assert test_config.amberflo.api_key_secret_name == env[forwarding.ENV_SECRET_NAME]


def _sqs_event(queue_arn: str) -> dict[str, Any]:
    """An SQS event as Lambda's event source delivers it: two messages of one Amberflo record each."""
    records = []
    for n in range(2):
        body = [
            {
                "customerId": "acme",
                "meterApiName": "api-calls",
                "meterValue": 1,
                "meterTimeInMillis": 1_764_000_000_000 + n,
                "uniqueId": f"api-calls:r{n}",
            }
        ]
        records.append(
            {
                "messageId": f"m-{n}",
                "receiptHandle": f"rh-{n}",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1764000000000"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
        )
    return {"Records": records}


# -- what AWS services do with the app's roles ---------------------------------------------------------------------


def _trust_allows(deployment: Deployment, stack: str, role: str, service: str, context: dict[str, str]) -> bool:
    trust = deployment.trust_policy(stack, role)
    statements = [s for s in trust.statements() if principal_matches(s, service=service)]
    call = AwsCall("sts:AssumeRole", (str(deployment.attribute(stack, role, "Arn")),), context, f"{service} assumes")
    return evaluate(call, [Policy(trust.name, {"Statement": statements})]).allowed


def test_every_lambda_can_start_and_write_its_logs(deployment: Deployment) -> None:
    """Lambda assumes each function's role (no condition keys documented) and writes the function's log group."""
    functions = [
        (stack, logical_id, dict(resource["Properties"]))
        for stack in deployment.templates
        for logical_id, resource in deployment.resources(stack, "AWS::Lambda::Function").items()
    ]
    assert len(functions) >= 4
    for stack, logical_id, function in functions:
        role = _role_of(function)
        assert _trust_allows(deployment, stack, role, "lambda.amazonaws.com", {}), f"{stack}/{logical_id}"
        assert _denied(deployment, stack, role, _log_writes(deployment, stack, function)) == [], logical_id


def test_the_schedule_may_invoke_the_stager(deployment: Deployment) -> None:
    stack = FORWARDING
    stager_id, _ = _function(deployment, stack, STAGER_HANDLER)
    stager_arn = str(deployment.attribute(stack, stager_id, "Arn"))
    ((rule_id, rule),) = deployment.resources(stack, "AWS::Events::Rule").items()
    assert [deployment.resolve(stack, t["Arn"]) for t in rule["Properties"]["Targets"]] == [stager_arn]
    permissions = [
        deployment.resolve(stack, p["Properties"])
        for p in deployment.resources(stack, "AWS::Lambda::Permission").values()
    ]
    policy = Policy(
        "lambda permissions",
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": p["Principal"]},
                    "Action": p["Action"],
                    "Resource": p["FunctionName"],
                    **({"Condition": {"ArnLike": {"aws:SourceArn": p["SourceArn"]}}} if "SourceArn" in p else {}),
                }
                for p in permissions
                if p["Principal"] == "events.amazonaws.com"
            ]
        },
    )
    rule_arn = str(deployment.attribute(stack, rule_id, "Arn"))
    invoke = AwsCall("lambda:InvokeFunction", (stager_arn,), {"aws:SourceArn": rule_arn}, "the schedule fires")
    assert evaluate(invoke, [], [policy]).allowed


def _table_location(deployment: Deployment) -> str:
    (table,) = deployment.resources("MeterlakeStorage", "AWS::Glue::Table").values()
    iceberg = table["Properties"]["OpenTableFormatInput"]["IcebergInput"]["IcebergTableInput"]
    location: str = deployment.resolve("MeterlakeStorage", iceberg["Location"])
    return location


def _table_files(location: str) -> list[str]:
    """ARNs of files Firehose and the optimizers write, read and delete under the table's location."""
    bucket_and_key = location.removeprefix("s3://").rstrip("/")
    return [
        f"arn:{PARTITION}:s3:::{bucket_and_key}/{path}"
        for path in (
            "data/request_time_day=2026-11-30/00000-0-5f0e.parquet",
            "metadata/00042-5f0e.metadata.json",
            "metadata/snap-42-1-5f0e.avro",
        )
    ]


@pytest.mark.parametrize("destination", ["glue", "s3_tables"])
def test_firehose_may_assume_its_role_and_do_what_an_iceberg_destination_does(
    destination: str, request: pytest.FixtureRequest
) -> None:
    """The calls AWS documents for a Firehose stream with a Lambda processor writing an Iceberg table: a Glue table
    in the lake bucket, or an S3 table reached through Glue's ``s3tablescatalog`` federation."""
    deployment: Deployment = request.getfixturevalue("deployment" if destination == "glue" else "s3_tables_deployment")
    stack = "MeterlakeDelivery"
    (stream,) = deployment.resources(stack, "AWS::KinesisFirehose::DeliveryStream").values()
    raw = stream["Properties"]["IcebergDestinationConfiguration"]
    role = raw["RoleARN"]["Fn::GetAtt"][0]
    destination_config = deployment.resolve(stack, raw)
    # Firehose passes the stream's account as sts:ExternalId (AWS's documented trust condition for Firehose roles).
    assert _trust_allows(deployment, stack, role, "firehose.amazonaws.com", {"sts:ExternalId": ACCOUNT})
    secure = {"aws:SecureTransport": "true"}
    calls = _firehose_common_calls(destination_config) + (
        _glue_table_calls(deployment, destination_config)
        if destination == "glue"
        else _s3_table_calls(deployment, destination_config, writes=True)
    )
    calls.append(AwsCall("lakeformation:GetDataAccess", ("*",), secure, "gets Lake Formation data credentials"))
    assert _denied(deployment, stack, role, calls) == []


SECURE = {"aws:SecureTransport": "true"}


def _firehose_common_calls(destination: dict[str, Any]) -> list[AwsCall]:
    """What Firehose does whatever the table: run the processor, write error output, log."""
    bucket_arn = destination["S3Configuration"]["BucketARN"]
    error_object = f"{bucket_arn}/{_rendered(destination['S3Configuration']['ErrorOutputPrefix'])}file-1"
    lambda_arn = next(
        p["ParameterValue"]
        for processor in destination["ProcessingConfiguration"]["Processors"]
        for p in processor["Parameters"]
        if p["ParameterName"] == "LambdaArn"
    )
    logging = [destination["CloudWatchLoggingOptions"], destination["S3Configuration"]["CloudWatchLoggingOptions"]]
    return [
        *(
            AwsCall(action, (error_object,), SECURE, "writes error output")
            for action in ("s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload")
        ),
        *(
            AwsCall(action, (bucket_arn,), SECURE, "lists the bucket")
            for action in ("s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads")
        ),
        *(
            AwsCall(a, (lambda_arn,), SECURE, "runs the processor")
            for a in ("lambda:InvokeFunction", "lambda:GetFunctionConfiguration")
        ),
        *(
            AwsCall(
                "logs:PutLogEvents",
                (
                    f"arn:{PARTITION}:logs:{REGION}:{ACCOUNT}:log-group:{o['LogGroupName']}:log-stream:{o['LogStreamName']}",
                ),
                SECURE,
                "logs delivery errors",
            )
            for o in logging
        ),
    ]


def _glue_table_calls(deployment: Deployment, destination: dict[str, Any]) -> list[AwsCall]:
    """A Glue table: commit through the default catalog, write its files under the table's location."""
    catalog = destination["CatalogConfiguration"]["CatalogArn"]
    (table,) = destination["DestinationTableConfigurationList"]
    database, name = table["DestinationDatabaseName"], table["DestinationTableName"]
    glue = (
        catalog,
        catalog.replace(":catalog", f":database/{database}"),
        catalog.replace(":catalog", f":table/{database}/{name}"),
    )
    return [
        *(
            AwsCall(f"glue:{a}", glue, SECURE, "commits to the table")
            for a in ("GetTable", "GetDatabase", "UpdateTable")
        ),
        *(
            AwsCall(action, (obj,), SECURE, "writes the table's files")
            for obj in _table_files(_table_location(deployment))
            for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload")
        ),
    ]


def _s3_table(deployment: Deployment) -> tuple[str, str, str]:
    """(table bucket name, its ARN, the S3 table's ARN) as the Storage stack's deployment has them."""
    storage = "MeterlakeStorage"
    ((bucket_id, _),) = deployment.resources(storage, "AWS::S3Tables::TableBucket").items()
    ((table_id, _),) = deployment.resources(storage, "AWS::S3Tables::Table").items()
    bucket_arn = str(deployment.attribute(storage, bucket_id, "TableBucketARN"))
    return bucket_arn.rsplit("/", 1)[1], bucket_arn, str(deployment.attribute(storage, table_id, "TableARN"))


def _s3_table_calls(deployment: Deployment, destination: dict[str, Any], *, writes: bool) -> list[AwsCall]:
    """An S3 table through Glue's federation (AWS Glue, "Specifying AWS Glue resource ARNs"; the S3 Tables catalog
    prerequisites): Glue on every catalog above the table, its database and table; S3 Tables on the bucket and table."""
    bucket, bucket_arn, table_arn = _s3_table(deployment)
    (table,) = destination["DestinationTableConfigurationList"]
    namespace, name = table["DestinationDatabaseName"], table["DestinationTableName"]
    root = f"arn:{PARTITION}:glue:{REGION}:{ACCOUNT}"
    assert destination["CatalogConfiguration"]["CatalogArn"] == f"{root}:catalog/s3tablescatalog/{bucket}"
    glue = (
        f"{root}:catalog",
        f"{root}:catalog/s3tablescatalog",
        f"{root}:catalog/s3tablescatalog/{bucket}",
        f"{root}:database/s3tablescatalog/{bucket}/{namespace}",
        f"{root}:table/s3tablescatalog/{bucket}/{namespace}/{name}",
    )
    glue_actions = ("GetTable", "GetDatabase", "UpdateTable") if writes else ("GetTable", "GetDatabase")
    s3tables_actions = ["GetTableBucket", "GetNamespace", "GetTable", "GetTableMetadataLocation", "GetTableData"]
    if writes:
        s3tables_actions += ["UpdateTableMetadataLocation", "PutTableData"]
    return [
        *(AwsCall(f"glue:{a}", glue, SECURE, "commits through Glue's federation") for a in glue_actions),
        *(
            AwsCall(f"s3tables:{a}", (bucket_arn, table_arn), SECURE, "reads and writes the S3 table")
            for a in s3tables_actions
        ),
    ]


def _rendered(prefix: str) -> str:
    """A Firehose S3 prefix with its !{...} expressions replaced by values Firehose could write."""
    return re.sub(r"!\{[^}]*\}", "x", prefix)


def test_glue_may_assume_the_optimizer_role_and_maintain_the_table(deployment: Deployment, test_config: Config) -> None:
    """The calls AWS documents for Glue's compaction, snapshot-retention and orphan-file-deletion optimizers."""
    stack = "MeterlakeAnalytics"
    optimizers = deployment.resources(stack, "AWS::Glue::TableOptimizer")
    roles = {o["Properties"]["TableOptimizerConfiguration"]["RoleArn"]["Fn::GetAtt"][0] for o in optimizers.values()}
    (role,) = roles
    # AWS documents the optimizer role's trust without condition keys: Glue is not known to send any.
    assert _trust_allows(deployment, stack, role, "glue.amazonaws.com", {})
    location = _table_location(deployment)
    bucket = location.removeprefix("s3://").split("/", 1)[0]
    prefix = f"arn:{PARTITION}:glue:{REGION}:{ACCOUNT}"
    database, name = test_config.database_name, test_config.table_name
    glue = (f"{prefix}:catalog", f"{prefix}:database/{database}", f"{prefix}:table/{database}/{name}")
    secure = {"aws:SecureTransport": "true"}
    logs = [
        f"arn:{PARTITION}:logs:{REGION}:{ACCOUNT}:log-group:/aws-glue/iceberg-{kind}/logs:{suffix}"
        for kind in ("compaction", "retention", "orphan-file-deletion")
        for suffix in ("*", "log-stream:run-1")
    ]
    calls = [
        *(AwsCall(f"glue:{a}", glue, secure, "reads and commits the table") for a in ("GetTable", "UpdateTable")),
        *(
            AwsCall(action, (obj,), secure, "rewrites and expires files")
            for obj in _table_files(location)
            for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject")
        ),
        AwsCall("s3:ListBucket", (f"arn:{PARTITION}:s3:::{bucket}",), secure, "finds orphan files"),
        *(
            AwsCall(a, (arn,), secure, "logs its runs")
            for arn in logs
            for a in ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents")
        ),
        AwsCall("lakeformation:GetDataAccess", ("*",), secure, "gets Lake Formation data credentials"),
    ]
    assert _denied(deployment, stack, role, calls) == []


def test_the_transform_and_the_demo_api_call_no_aws_api(
    deployment: Deployment, moto_server: RecordingMotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their roles grant nothing but logs: run on the events Firehose and API Gateway send, they must need nothing."""
    from transform_lambda import handler as transform

    _, function = _function(deployment, "MeterlakeTransform", TRANSFORM_HANDLER)
    _run_with_environment(monkeypatch, deployment, "MeterlakeTransform", function)
    transform._aws_handler.cache_clear()
    line = render_access_log_line(
        {"request_id": "r-1", "request_time": 1_764_000_000_000, "http_method": "GET", "status": 200}
    )
    event = {
        "invocationId": "i-1",
        "deliveryStreamArn": f"arn:{PARTITION}:firehose:{REGION}:{ACCOUNT}:deliverystream/s",
        "region": REGION,
        "records": [{"recordId": "1", "approximateArrivalTimestamp": 1, "data": base64.b64encode(line).decode()}],
    }
    try:
        answer = transform.lambda_handler(event, FakeContext("transform"))
    finally:
        transform._aws_handler.cache_clear()
    assert [r["result"] for r in json.loads(answer)["records"]] == ["Ok"]

    _, demo = _function(deployment, "MeterlakeApi", DEMO_HANDLER)
    _run_with_environment(monkeypatch, deployment, "MeterlakeApi", demo)
    proxy_event = {"resource": "/random/strings", "httpMethod": "GET", "queryStringParameters": {"len": "4"}}
    assert demo_api.lambda_handler(proxy_event, FakeContext("demo"))["statusCode"] == 200
    assert moto_server.take() == []
