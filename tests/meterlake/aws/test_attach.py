"""`meterlake aws attach/detach`: metering a REST API stage made outside the CDK app, against moto."""

from __future__ import annotations

import sys
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest

from meterlake.aws.attach import AttachError, attach_stage, detach_stage
from meterlake.cli import main
from meterlake.config import Config, parse_config
from meterlake.records import render_access_log_format
from tests.meterlake.aws.conftest import REGION

CONFIG = Config()
STREAM = CONFIG.data_firehose_configuration.delivery_stream_name


@pytest.fixture
def clients(moto: None) -> dict[str, Any]:
    return {name: boto3.client(name, region_name=REGION) for name in ("apigateway", "apigatewayv2", "firehose", "s3")}


def deploy_stream(clients: dict[str, Any]) -> str:
    """The pipeline's delivery stream, as MeterlakeDelivery would have created it."""
    clients["s3"].create_bucket(Bucket="lake")
    clients["firehose"].create_delivery_stream(
        DeliveryStreamName=STREAM,
        ExtendedS3DestinationConfiguration={
            "RoleARN": "arn:aws:iam::123456789012:role/firehose",
            "BucketARN": "arn:aws:s3:::lake",
        },
    )
    arn: str = clients["firehose"].describe_delivery_stream(DeliveryStreamName=STREAM)["DeliveryStreamDescription"][
        "DeliveryStreamARN"
    ]
    return arn


def rest_api(clients: dict[str, Any], *, cognito: bool = False, authorizer: str | None = None) -> str:
    """A REST API with a deployed stage 'v1' and, if asked, an authorizer of that type ('COGNITO_USER_POOLS',
    'TOKEN', 'REQUEST') or, with 'USAGE_PLAN', a usage plan covering the stage (so API Gateway identifies keys)."""
    apigateway = clients["apigateway"]
    api_id: str = apigateway.create_rest_api(name="orders")["id"]
    root = apigateway.get_resources(restApiId=api_id)["items"][0]["id"]
    apigateway.put_method(restApiId=api_id, resourceId=root, httpMethod="GET", authorizationType="NONE")
    apigateway.put_integration(restApiId=api_id, resourceId=root, httpMethod="GET", type="MOCK")
    authorizer = "COGNITO_USER_POOLS" if cognito else authorizer
    if authorizer == "COGNITO_USER_POOLS":
        apigateway.create_authorizer(
            restApiId=api_id,
            name="users",
            type="COGNITO_USER_POOLS",
            providerARNs=["arn:aws:cognito-idp:us-east-1:123456789012:userpool/us-east-1_abc"],
            identitySource="method.request.header.Authorization",
        )
    elif authorizer in ("TOKEN", "REQUEST"):
        apigateway.create_authorizer(
            restApiId=api_id,
            name="tenants",
            type=authorizer,
            authorizerUri=(
                "arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/"
                "arn:aws:lambda:us-east-1:123456789012:function:authorizer/invocations"
            ),
            identitySource="method.request.header.Authorization",
        )
    apigateway.create_deployment(restApiId=api_id, stageName="v1")
    if authorizer == "USAGE_PLAN":
        apigateway.create_usage_plan(name="tenants", apiStages=[{"apiId": api_id, "stage": "v1"}])
    return api_id


def test_attach_sets_the_stage_access_log_and_detach_removes_it(clients: dict[str, Any]) -> None:
    arn = deploy_stream(clients)
    api_id = rest_api(clients, cognito=True)
    change = attach_stage(
        CONFIG,
        apigateway=clients["apigateway"],
        apigatewayv2=clients["apigatewayv2"],
        firehose=clients["firehose"],
        rest_api_id=api_id,
        stage="v1",
    )
    assert (change.api_name, change.stream_arn, change.warnings) == ("orders", arn, [])
    stage = clients["apigateway"].get_stage(restApiId=api_id, stageName="v1")
    assert stage["accessLogSettings"] == {"destinationArn": arn, "format": render_access_log_format()}
    detach_stage(CONFIG, apigateway=clients["apigateway"], firehose=clients["firehose"], rest_api_id=api_id, stage="v1")
    assert "accessLogSettings" not in clients["apigateway"].get_stage(restApiId=api_id, stageName="v1")
    with pytest.raises(AttachError, match="logs to nowhere"):
        detach_stage(
            CONFIG, apigateway=clients["apigateway"], firehose=clients["firehose"], rest_api_id=api_id, stage="v1"
        )


SOURCES: dict[str, dict[str, Any]] = {
    "cognito_claim": {"kind": "cognito_claim", "claim": "custom:org"},
    "authorizer_context": {"kind": "authorizer_context", "context_key": "org"},
    "api_key": {"kind": "api_key", "tenants_by_api_key": {"k1": "acme"}},
}


@pytest.mark.parametrize(
    ("kind", "yields", "other", "expected"),
    [
        ("cognito_claim", "COGNITO_USER_POOLS", "TOKEN", "no COGNITO_USER_POOLS authorizer (authorizers: TOKEN)"),
        ("authorizer_context", "TOKEN", "COGNITO_USER_POOLS", "no REQUEST or TOKEN authorizer"),
        ("authorizer_context", "REQUEST", None, "no REQUEST or TOKEN authorizer (authorizers: none)"),
        ("api_key", "USAGE_PLAN", "COGNITO_USER_POOLS", "no usage plan covers"),
    ],
)
def test_the_format_and_the_tenant_warning_follow_the_configured_tenant_source(
    clients: dict[str, Any], kind: str, yields: str, other: str | None, expected: str
) -> None:
    """The stage gets the format rendered for the source; a warning names what the API lacks to yield a tenant."""
    config = parse_config({"meterlake": {"tenant_source": SOURCES[kind]}})
    arn = deploy_stream(clients)
    changes = {}
    for authorizer in (yields, other):
        api_id = rest_api(clients, authorizer=authorizer)
        changes[authorizer] = attach_stage(
            config,
            apigateway=clients["apigateway"],
            apigatewayv2=clients["apigatewayv2"],
            firehose=clients["firehose"],
            rest_api_id=api_id,
            stage="v1",
        )
        stage = clients["apigateway"].get_stage(restApiId=api_id, stageName="v1")
        assert stage["accessLogSettings"] == {
            "destinationArn": arn,
            "format": render_access_log_format(config.meterlake.tenant_source.source()),
        }
    assert changes[yields].warnings == []
    (warning,) = changes[other].warnings
    assert expected in warning
    assert "never billed" in warning
    if kind != "api_key":
        assert "$" + config.meterlake.tenant_source.source().tenant_variable in warning


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("http_api", "is an HTTP API"),
        ("no_stream", f"no delivery stream {STREAM}: deploy MeterlakeDelivery first"),
        ("no_stage", "has no stage 'v9'"),
        ("no_api", "no REST API nope"),
    ],
)
def test_what_cannot_be_metered_is_refused_and_nothing_changes(
    clients: dict[str, Any], setup: str, message: str
) -> None:
    if setup != "no_stream":
        deploy_stream(clients)
    api_id, stage = rest_api(clients, cognito=True), "v1"
    if setup == "http_api":
        api_id = clients["apigatewayv2"].create_api(Name="events", ProtocolType="HTTP")["ApiId"]
    elif setup == "no_stage":
        stage = "v9"
    elif setup == "no_api":
        api_id = "nope"
    with pytest.raises(AttachError, match=message):
        attach_stage(
            CONFIG,
            apigateway=clients["apigateway"],
            apigatewayv2=clients["apigatewayv2"],
            firehose=clients["firehose"],
            rest_api_id=api_id,
            stage=stage,
        )


def test_the_commands_print_one_line_each(
    clients: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_stream(clients)
    api_id = rest_api(clients, cognito=False)
    monkeypatch.setattr(sys, "argv", ["meterlake", "aws", "attach", "--rest-api-id", api_id, "--stage", "v1"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    out, err = capsys.readouterr()
    assert out.startswith(f"metered: orders ({api_id}) stage v1 logs every request to arn:aws:firehose:")
    assert err.startswith("warning: REST API")
    http_api = clients["apigatewayv2"].create_api(Name="events", ProtocolType="HTTP")["ApiId"]
    monkeypatch.setattr(sys, "argv", ["meterlake", "aws", "detach", "--rest-api-id", http_api, "--stage", "v1"])
    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: REST API {http_api} has no stage 'v1'"]
