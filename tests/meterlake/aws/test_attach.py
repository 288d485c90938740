"""`meterlake aws attach/detach`: metering a REST API stage made outside the CDK app, against moto."""

from __future__ import annotations

import sys
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest

from meterlake.aws.attach import AttachError, attach_stage, detach_stage
from meterlake.cli import main
from meterlake.config import Config
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


def rest_api(clients: dict[str, Any], *, cognito: bool) -> str:
    """A REST API with a deployed stage 'v1' (and a Cognito authorizer if asked)."""
    apigateway = clients["apigateway"]
    api_id: str = apigateway.create_rest_api(name="orders")["id"]
    root = apigateway.get_resources(restApiId=api_id)["items"][0]["id"]
    apigateway.put_method(restApiId=api_id, resourceId=root, httpMethod="GET", authorizationType="NONE")
    apigateway.put_integration(restApiId=api_id, resourceId=root, httpMethod="GET", type="MOCK")
    if cognito:
        apigateway.create_authorizer(
            restApiId=api_id,
            name="users",
            type="COGNITO_USER_POOLS",
            providerARNs=["arn:aws:cognito-idp:us-east-1:123456789012:userpool/us-east-1_abc"],
            identitySource="method.request.header.Authorization",
        )
    apigateway.create_deployment(restApiId=api_id, stageName="v1")
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


def test_an_api_without_a_tenant_yielding_authorizer_is_attached_with_a_warning(clients: dict[str, Any]) -> None:
    deploy_stream(clients)
    api_id = rest_api(clients, cognito=False)
    change = attach_stage(
        CONFIG,
        apigateway=clients["apigateway"],
        apigatewayv2=clients["apigatewayv2"],
        firehose=clients["firehose"],
        rest_api_id=api_id,
        stage="v1",
    )
    (warning,) = change.warnings
    assert "no Cognito user-pool authorizer" in warning
    assert "never billed" in warning


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
