"""`meterlake aws check`: the reconciliation of answered, counted and forwarded requests, and the whole check against
a deployment made of moto, a stand-in REST API and the local Amberflo.

moto covers every AWS call the check makes: CloudFormation (stacks created from small templates that hold the real
stacks' outputs), Cognito (AdminCreateUser, AdminSetUserPassword, InitiateAuth, AdminDeleteUser; its ID tokens are
RS256-signed by the pool), Athena (rows queued through moto's static results API, one result per query, in the order
the check asks), SQS, S3 and Secrets Manager. Two things moto cannot produce are stood in by small fake clients, each
said where it is used: a stack in a failed state, and a Cognito that refuses to delete a user.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import httpx
import pytest
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from meterlake.amberflo.reconcile import Tally
from meterlake.amberflo.server import LocalAmberflo
from meterlake.aws import check
from meterlake.aws.account import connect
from meterlake.aws.check import (
    CheckFailed,
    CheckRequestError,
    CheckUserCleanupError,
    CheckUsers,
    DeploymentIncompleteError,
    TenantTraffic,
    forwarding_state,
    lake_settled,
    new_password,
    read_deployment,
    run_check,
)
from meterlake.aws.forwarding import DEAD_LETTER_PREFIX
from meterlake.aws.stacks import STACK_NAMES
from meterlake.cli import main
from meterlake.config import Config, parse_config
from tests.meterlake.aws.conftest import REGION, CognitoUser, queue_athena_result, verified_claims
from tests.meterlake.aws.test_athena import USAGE_COLUMNS

RUN_ID = "0badcafe"
TENANTS = [f"check-{RUN_ID}-1", f"check-{RUN_ID}-2"]
AMBERFLO_KEY = "check-amberflo-key"
TABLE_BUCKET = "meterlake-1a2b3c4d"
WORKGROUP = "meterlake-check"


def test_what_the_lake_should_count_leaves_out_refused_tokens_and_bills_no_server_error() -> None:
    traffic = TenantTraffic("acme")
    traffic.statuses.update({200: 15, 429: 1, 403: 2, 502: 2})
    traffic.transport_errors["ReadTimeout"] += 1
    # API Gateway logs a refused token without the tenant's claims, and bills no 5xx.
    assert traffic.tally == Tally(requests=18, billable=16)
    assert traffic.problems() == [
        "acme: 1 requests got no answer (ReadTimeout x1)",
        "acme: 2 requests answered 401/403 (the API refused the ID token)",
        "acme: 2 requests answered 5xx",
    ]


def test_waiting_stops_once_every_count_matches_or_one_is_over() -> None:
    answered = {"acme": Tally(20, 20), "globex": Tally(5, 5)}
    assert not lake_settled(answered, {"acme": Tally(20, 20)})
    assert lake_settled(answered, {"acme": Tally(20, 20), "globex": Tally(5, 5)})
    # Counts only grow: one above what was answered cannot come right by waiting.
    assert lake_settled(answered, {"acme": Tally(21, 21)})


def test_passwords_meet_the_user_pools_policy() -> None:
    passwords = {new_password() for _ in range(50)}
    assert len(passwords) == 50
    for password in passwords:
        assert len(password) >= 12
        assert any(c.islower() for c in password)
        assert any(c.isupper() for c in password)
        assert any(c.isdigit() for c in password)
        assert any(not c.isalnum() for c in password)


def test_the_default_timeout_covers_both_firehose_buffers() -> None:
    config = parse_config(
        {
            "data_firehose_configuration": {
                "buffering_hints": {"interval_in_seconds": 120},
                "transform_records_with_aws_lambda": {"buffer_interval": 60},
            }
        }
    )
    assert check.default_timeout_s(config) == 120 + 60 + check.TIMEOUT_MARGIN_S


# --- a deployment: moto, a stand-in API, the local Amberflo ----------------------------------------------------------


class StandInApi(ThreadingHTTPServer):
    """The deployed REST API on loopback: answers ``status`` with an ``x-amzn-RequestId``, as API Gateway does, and
    records each request's path, Authorization header and request id."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.status = 200
        self.seen: list[tuple[str, str | None, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/prod"


class _StandInHandler(BaseHTTPRequestHandler):
    server: StandInApi

    def do_GET(self) -> None:
        request_id = str(uuid.uuid4())
        with self.server.lock:
            self.server.seen.append((self.path, self.headers.get("Authorization"), request_id))
        body = b'["aBcDeFgH"]'
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", request_id)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""


@dataclass
class Deployed:
    """What the check finds in the account, and handles on it for the assertions."""

    api: StandInApi
    amberflo: LocalAmberflo
    cognito: Any
    athena: Any
    sqs: Any
    s3: Any
    user_pool_id: str
    client_id: str
    bucket: str
    queue_url: str
    dead_letter_queue_url: str
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)

    def deploy(self, *, skip: tuple[str, ...] = (), without: tuple[str, ...] = ()) -> None:
        """Create every stack but ``skip``, each with its outputs but those named in ``without``."""
        cloudformation = boto3.client("cloudformation", region_name=REGION)
        for name in STACK_NAMES:
            if name in skip:
                continue
            outputs = {key: value for key, value in self.outputs[name].items() if key not in without}
            template = {
                "Resources": {"Placeholder": {"Type": "AWS::SNS::Topic"}},
                "Outputs": {key: {"Value": value} for key, value in outputs.items()},
            }
            cloudformation.create_stack(StackName=name, TemplateBody=json.dumps(template))

    def cognito_user(self, tenant: str) -> CognitoUser:
        return CognitoUser(self.user_pool_id, self.client_id, f"meterlake-{tenant}", "", tenant)

    def users(self) -> list[dict[str, Any]]:
        users: list[dict[str, Any]] = self.cognito.list_users(UserPoolId=self.user_pool_id)["Users"]
        return users

    def forward(self, tenant: str, units: int) -> None:
        """Records of ``tenant`` reaching Amberflo as the forwarder sends them: one api-calls unit per request."""
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        records = [
            {
                "customerId": tenant,
                "meterApiName": "api-calls",
                "meterValue": 1,
                "meterTimeInMillis": now_ms,
                "uniqueId": f"api-calls:{uuid.uuid4()}",
            }
            for _ in range(units)
        ]
        answer = httpx.post(f"{self.amberflo.url}/ingest", json=records, headers={"X-API-KEY": AMBERFLO_KEY})
        assert answer.status_code == 200, answer.text


@pytest.fixture
def deployed(moto: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployed]:
    """The six stacks' outputs naming a moto user pool, workgroup, queues and lake bucket, the stand-in API and the
    Amberflo secret; each run's tenants are ``check-0badcafe-<n>``."""
    monkeypatch.setattr(check, "new_run_id", lambda: RUN_ID)
    cognito = boto3.client("cognito-idp", region_name=REGION)
    pool = cognito.create_user_pool(
        PoolName="meterlake",
        Schema=[{"Name": "tenant_id", "AttributeDataType": "String", "Mutable": True}],
    )["UserPool"]["Id"]
    client_id = cognito.create_user_pool_client(
        UserPoolId=pool, ClientName="app", ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"]
    )["UserPoolClient"]["ClientId"]
    athena = boto3.client("athena", region_name=REGION)
    athena.create_work_group(Name=WORKGROUP, Configuration={})
    sqs = boto3.client("sqs", region_name=REGION)
    queue_url = sqs.create_queue(QueueName="forward")["QueueUrl"]
    dead_letter_queue_url = sqs.create_queue(QueueName="forward-dlq")["QueueUrl"]
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="meterlake-lake")
    boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name="AmberfloApiKey", SecretString=json.dumps({"apiKey": AMBERFLO_KEY})
    )
    api = StandInApi()
    thread = threading.Thread(target=api.serve_forever, daemon=True)
    thread.start()
    with LocalAmberflo(api_key=AMBERFLO_KEY) as amberflo:
        deployment = Deployed(
            api, amberflo, cognito, athena, sqs, s3, pool, client_id, "meterlake-lake", queue_url, dead_letter_queue_url
        )
        deployment.outputs = {
            "MeterlakeStorage": {"BucketName": "meterlake-lake", "TableBucketName": TABLE_BUCKET},
            "MeterlakeTransform": {},
            "MeterlakeDelivery": {"DeliveryStreamName": "amazon-apigateway-random-gen"},
            "MeterlakeApi": {"UserPoolId": pool, "UserPoolClientId": client_id, "RestApiEndpoint": api.url},
            "MeterlakeAnalytics": {"AthenaWorkGroup": WORKGROUP},
            "MeterlakeForwarding": {
                "ForwardQueueUrl": queue_url,
                "ForwardDeadLetterQueueUrl": dead_letter_queue_url,
                "AlarmTopicArn": f"arn:aws:sns:{REGION}:123456789012:meterlake-alarms",
            },
        }
        try:
            yield deployment
        finally:
            api.shutdown()
            api.server_close()
            thread.join(timeout=5)


def config_for(deployed: Deployed, **sections: Any) -> dict[str, Any]:
    return {"amberflo": {"base_url": deployed.amberflo.url, **sections.pop("amberflo", {})}, **sections}


def queue_counts(counts: list[tuple[str, int]]) -> None:
    """One Athena result per tenant, in the order the check counts them: ``requests`` rows, all billable."""
    today = datetime.now(UTC).date().isoformat()
    for tenant, requests in counts:
        queue_athena_result(USAGE_COLUMNS, [[tenant, today, str(requests), str(requests), "160", "0", "0", "40"]])


def run_cli(
    tmp_path: Path, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """``meterlake --config <config> aws check --region us-east-1 --timeout 0``: exit code, stdout, stderr."""
    path = tmp_path / "cdk.context.json"
    path.write_text(json.dumps(config))
    argv = ["meterlake", "--config", str(path), "aws", "check", "--region", REGION, "--timeout", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as caught:
        main()
    captured = capsys.readouterr()
    code = caught.value.code or 0
    assert isinstance(code, int)
    return code, captured.out, captured.err


def athena_executions(deployed: Deployed) -> list[dict[str, Any]]:
    ids = deployed.athena.list_query_executions(WorkGroup=WORKGROUP)["QueryExecutionIds"]
    return [deployed.athena.get_query_execution(QueryExecutionId=i)["QueryExecution"] for i in ids]


@pytest.mark.parametrize("destination", ["glue", "s3_tables"])
def test_a_deployment_that_meters_every_request_passes(
    deployed: Deployed,
    destination: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    deployed.deploy()
    queue_counts([(TENANTS[0], 20), (TENANTS[1], 20)])
    for tenant in TENANTS:
        deployed.forward(tenant, 20)
    config = config_for(deployed)
    if destination == "s3_tables":
        config["s3_tables"] = {}

    code, out, err = run_cli(tmp_path, config, monkeypatch, capsys)

    assert (code, err) == (0, "")
    for tenant in TENANTS:
        line = (
            f"{tenant}: answered    20 == counted in Athena    20  billable    20 == api-calls units in Amberflo    20"
        )
        assert f"{line}  OK" in out
    assert "deleted the check's 2 Cognito users" in out
    assert "forward queue: 0 messages waiting, 0 in flight; dead-letter queue: 0" in out
    # The API saw 20 requests per tenant, each with that tenant's user's ID token, signed by the pool.
    assert len(deployed.api.seen) == 40
    assert {path for path, _, _ in deployed.api.seen} == {"/prod/random/strings?len=8"}
    tokens = {token for _, token, _ in deployed.api.seen}
    assert len(tokens) == 2
    claims = []
    for token in tokens:
        assert token is not None
        unverified = verified_claims(token, deployed.cognito_user("any"))
        tenant = unverified["custom:tenant_id"]
        claims.append((unverified["token_use"], tenant, unverified["cognito:username"]))
        assert sum(1 for _, seen, _ in deployed.api.seen if seen == token) == 20
    assert sorted(claims) == [("id", tenant, f"meterlake-{tenant}") for tenant in TENANTS]
    # ... and the users are gone again.
    assert deployed.users() == []
    # Athena counted each tenant with the sql/ file, in the deployed workgroup and the destination's catalog.
    executions = athena_executions(deployed)
    assert sorted(e["ExecutionParameters"][-1] for e in executions) == [f"'{t}'" for t in TENANTS]
    catalog = f"s3tablescatalog/{TABLE_BUCKET}" if destination == "s3_tables" else "AwsDataCatalog"
    assert {e["QueryExecutionContext"]["Catalog"] for e in executions} == {catalog}


def test_athena_short_of_the_answered_requests_fails_naming_the_difference(
    deployed: Deployed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deployed.deploy()
    queue_counts([(TENANTS[0], 20), (TENANTS[1], 17)])
    for tenant in TENANTS:
        deployed.forward(tenant, 20)

    code, out, err = run_cli(tmp_path, config_for(deployed), monkeypatch, capsys)

    assert code != 0
    assert err.splitlines() == [
        f"error: deployment check failed: timed out after 0 s waiting for Athena; "
        f"{TENANTS[1]}: answered 20, counted in Athena 17; {TENANTS[1]}: billable 20, billable in Athena 17"
    ]
    assert (
        f"{TENANTS[1]}: answered    20 != counted in Athena    17  billable    20 != billable in Athena    17 "
        "== api-calls units in Amberflo    20  MISMATCH" in out
    )
    assert f"{TENANTS[0]}: answered    20 == counted in Athena    20" in out
    # The short tenant's request ids are printed, to find in the access log.
    tenant_of = {token: verified_tenant(deployed, token) for _, token, _ in deployed.api.seen if token}
    short_ids = [rid for _, token, rid in deployed.api.seen if token and tenant_of[token] == TENANTS[1]]
    assert f"{TENANTS[1]} request ids: {', '.join(short_ids[:10])} and 10 more" in out
    assert deployed.users() == []


def verified_tenant(deployed: Deployed, token: str) -> str:
    tenant: str = verified_claims(token, deployed.cognito_user("any"))["custom:tenant_id"]
    return tenant


def test_a_dry_run_needs_no_secret_and_leaves_amberflo_out(
    deployed: Deployed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    boto3.client("secretsmanager", region_name=REGION).delete_secret(
        SecretId="AmberfloApiKey", ForceDeleteWithoutRecovery=True
    )
    deployed.deploy()
    queue_counts([(TENANTS[0], 20), (TENANTS[1], 20)])

    code, out, err = run_cli(tmp_path, config_for(deployed, amberflo={"dry_run": True}), monkeypatch, capsys)

    assert (code, err) == (0, "")
    assert "forwarding is a dry run (amberflo.dry_run): Amberflo is not compared" in out
    assert (
        f"{TENANTS[0]}: answered    20 == counted in Athena    20  billable    20  (forwarding is a dry run)  OK" in out
    )


def test_the_count_is_polled_until_the_pipeline_delivered(deployed: Deployed) -> None:
    deployed.deploy()
    queue_counts([(TENANTS[0], 0), (TENANTS[1], 0), (TENANTS[0], 20), (TENANTS[1], 20)])
    for tenant in TENANTS:
        deployed.forward(tenant, 20)
    said: list[str] = []

    report = run_check(
        parse_config(config_for(deployed)),
        connect(profile=None, region=REGION),
        timeout_s=60,
        poll_interval_s=0.01,
        say=said.append,
    )

    assert report.ok, report.problems
    counts = [line for line in said if line.startswith("Athena after")]
    assert [line.split(": ", 1)[1] for line in counts] == [
        "0 of 40 answered requests counted",
        "40 of 40 answered requests counted",
    ]
    assert len(athena_executions(deployed)) == 4


def test_a_missing_stack_or_output_is_one_line_before_anything_is_created(
    deployed: Deployed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deployed.deploy(skip=("MeterlakeForwarding",), without=("RestApiEndpoint",))

    code, _, err = run_cli(tmp_path, config_for(deployed), monkeypatch, capsys)

    assert code != 0
    assert err.splitlines() == [
        f"error: the deployment in {REGION} is incomplete: MeterlakeApi has no output RestApiEndpoint; "
        "MeterlakeForwarding is not deployed"
    ]
    assert deployed.users() == []
    assert deployed.api.seen == []


def test_a_tenant_source_the_demo_api_cannot_fill_is_refused_before_anything_is_created(
    deployed: Deployed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deployed.deploy()
    config = config_for(deployed, meterlake={"tenant_source": {"kind": "authorizer_context"}})

    code, _, err = run_cli(tmp_path, config, monkeypatch, capsys)

    assert code != 0
    (line,) = err.splitlines()
    assert "the check drives the demo API (MeterlakeApi)" in line
    assert "'authorizer_context'" in line
    assert deployed.users() == []
    assert deployed.api.seen == []


def test_s3_tables_need_the_table_bucket_output(deployed: Deployed) -> None:
    deployed.deploy(without=("TableBucketName",))
    cloudformation = boto3.client("cloudformation", region_name=REGION)
    assert read_deployment(cloudformation, Config(), region=REGION).table_bucket_name is None
    with pytest.raises(DeploymentIncompleteError, match=r"MeterlakeStorage has no output TableBucketName$"):
        read_deployment(cloudformation, parse_config({"s3_tables": {}}), region=REGION)


class FailedStacks:
    """CloudFormation's DescribeStacks answer for stacks whose creation rolled back (moto cannot fail a stack)."""

    def describe_stacks(self, StackName: str) -> dict[str, Any]:  # noqa: N803 - boto3's parameter name
        return {"Stacks": [{"StackName": StackName, "StackStatus": "ROLLBACK_COMPLETE", "Outputs": []}]}


def test_a_stack_that_rolled_back_is_named_with_its_status() -> None:
    with pytest.raises(DeploymentIncompleteError) as caught:
        read_deployment(FailedStacks(), Config(), region=REGION)
    assert caught.value.problems == [f"{name} is ROLLBACK_COMPLETE" for name in STACK_NAMES]


def test_a_missing_amberflo_secret_stops_the_check_before_any_user_exists(deployed: Deployed) -> None:
    boto3.client("secretsmanager", region_name=REGION).delete_secret(
        SecretId="AmberfloApiKey", ForceDeleteWithoutRecovery=True
    )
    deployed.deploy()
    with pytest.raises(CheckRequestError, match=r"^Secrets Manager GetSecretValue AmberfloApiKey: ResourceNotFound"):
        run_check(parse_config(config_for(deployed)), connect(profile=None, region=REGION), say=lambda _: None)
    assert deployed.users() == []
    assert deployed.api.seen == []


def test_users_are_deleted_when_no_request_is_answered(deployed: Deployed) -> None:
    deployed.outputs["MeterlakeApi"]["RestApiEndpoint"] = "http://127.0.0.1:9/prod"  # discard: nothing listens
    deployed.deploy()
    with pytest.raises(CheckFailed) as caught:
        run_check(
            parse_config(config_for(deployed)),
            connect(profile=None, region=REGION),
            requests_per_tenant=2,
            say=lambda _: None,
        )
    assert str(caught.value) == (
        f"deployment check failed: {TENANTS[0]}: 2 requests got no answer (ConnectError x2); "
        f"{TENANTS[1]}: 2 requests got no answer (ConnectError x2)"
    )
    assert deployed.users() == []


def test_a_refused_token_is_named_and_the_users_are_deleted(deployed: Deployed) -> None:
    deployed.deploy()
    deployed.api.status = 401

    report = run_check(
        parse_config(config_for(deployed)),
        connect(profile=None, region=REGION),
        requests_per_tenant=3,
        timeout_s=0,
        say=lambda _: None,
    )

    assert not report.ok
    assert report.problems == [
        f"{TENANTS[0]}: 3 requests answered 401/403 (the API refused the ID token)",
        f"{TENANTS[1]}: 3 requests answered 401/403 (the API refused the ID token)",
    ]
    assert deployed.users() == []


class UndeletableUsers:
    """moto's Cognito, except that AdminDeleteUser is refused (moto always deletes)."""

    def __init__(self, cognito: Any) -> None:
        self._cognito = cognito

    def admin_delete_user(self, **_: Any) -> None:
        error = {"Error": {"Code": "AccessDeniedException", "Message": "not allowed"}}
        raise ClientError(error, "AdminDeleteUser")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cognito, name)


def test_a_user_left_behind_is_an_error_or_a_warning_beside_the_first_failure(deployed: Deployed) -> None:
    warnings: list[str] = []
    users = CheckUsers(
        UndeletableUsers(deployed.cognito),
        user_pool_id=deployed.user_pool_id,
        client_id=deployed.client_id,
        region=REGION,
        on_warning=warnings.append,
    )
    with pytest.raises(CheckUserCleanupError, match="meterlake-t1 \\(AccessDeniedException: not allowed\\)"), users:
        users.create("t1")
    assert warnings == []

    def create_then_fail() -> None:
        with users:
            users.create("t2")
            raise RuntimeError("traffic failed")

    with pytest.raises(RuntimeError, match="traffic failed"):
        create_then_fail()
    assert len(warnings) == 1
    assert "could not delete the check's Cognito user(s)" in warnings[0]
    assert "meterlake-t2" in warnings[0]


def test_users_are_deleted_whatever_ends_the_block(deployed: Deployed) -> None:
    users = CheckUsers(
        deployed.cognito,
        user_pool_id=deployed.user_pool_id,
        client_id=deployed.client_id,
        region=REGION,
        on_warning=lambda _: None,
    )

    def create_then_interrupt() -> None:
        with users:
            created = users.create("t1")
            assert [u["Username"] for u in deployed.users()] == ["meterlake-t1"]
            assert verified_claims(created.id_token, deployed.cognito_user("t1"))["custom:tenant_id"] == "t1"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_then_interrupt()
    assert deployed.users() == []


def test_dead_letters_and_the_dead_letter_queue_are_named(deployed: Deployed) -> None:
    started = datetime.now(UTC)
    old = (started - timedelta(days=3)).strftime("%Y-%m-%d")
    deployed.s3.put_object(Bucket=deployed.bucket, Key=f"{DEAD_LETTER_PREFIX}{old}/m-0.json", Body=b"{}")
    state = forwarding_state(
        deployed.sqs,
        deployed.s3,
        queue_url=deployed.queue_url,
        dead_letter_queue_url=deployed.dead_letter_queue_url,
        bucket=deployed.bucket,
        since=started - timedelta(minutes=5),
    )
    assert state.problems() == []

    key = f"{DEAD_LETTER_PREFIX}{started:%Y-%m-%d}/m-1.json"
    deployed.s3.put_object(Bucket=deployed.bucket, Key=key, Body=b"{}")
    deployed.sqs.send_message(QueueUrl=deployed.dead_letter_queue_url, MessageBody="[]")
    deployed.sqs.send_message(QueueUrl=deployed.queue_url, MessageBody="[]")
    state = forwarding_state(
        deployed.sqs,
        deployed.s3,
        queue_url=deployed.queue_url,
        dead_letter_queue_url=deployed.dead_letter_queue_url,
        bucket=deployed.bucket,
        since=started - timedelta(minutes=5),
    )
    assert (state.queued, state.dead_letter_queue, state.dead_letters) == (1, 1, (key,))
    assert state.problems() == [
        "the forward dead-letter queue holds 1 messages (redrive them)",
        f"1 dead letters written since the check started (s3://{deployed.bucket}/{key} ...)",
    ]


def test_a_message_in_the_dead_letter_queue_fails_a_check_whose_counts_match(deployed: Deployed) -> None:
    deployed.deploy()
    queue_counts([(TENANTS[0], 2), (TENANTS[1], 2)])
    for tenant in TENANTS:
        deployed.forward(tenant, 2)
    deployed.sqs.send_message(QueueUrl=deployed.dead_letter_queue_url, MessageBody="[]")

    report = run_check(
        parse_config(config_for(deployed)),
        connect(profile=None, region=REGION),
        requests_per_tenant=2,
        timeout_s=0,
        say=lambda _: None,
    )

    assert report.reconciliation.ok
    assert not report.ok
    assert report.problems == ["the forward dead-letter queue holds 1 messages (redrive them)"]
