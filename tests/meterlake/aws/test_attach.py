"""`meterlake aws attach/detach`: metering a REST API stage made outside the CDK app, against moto."""

from __future__ import annotations

import sys
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest

from meterlake.aws.attach import AttachError, StageChange, attach_stage, detach_stage
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


#: The method authorization type each kind of authorizer gives the methods it guards.
AUTHORIZATION_TYPE = {"COGNITO_USER_POOLS": "COGNITO_USER_POOLS", "TOKEN": "CUSTOM", "REQUEST": "CUSTOM"}


def rest_api(
    clients: dict[str, Any], *, cognito: bool = False, authorizer: str | None = None, unguarded: int = 0
) -> str:
    """A REST API with a deployed stage 'v1' whose GET / is guarded by an authorizer of that type
    ('COGNITO_USER_POOLS', 'TOKEN', 'REQUEST') or, with 'USAGE_PLAN', requires an API key on a stage a usage plan
    covers; plus ``unguarded`` GET methods that are not, and an OPTIONS method (not metered by default)."""
    apigateway = clients["apigateway"]
    api_id: str = apigateway.create_rest_api(name="orders")["id"]
    root = apigateway.get_resources(restApiId=api_id)["items"][0]["id"]
    authorizer = "COGNITO_USER_POOLS" if cognito else authorizer
    method: dict[str, Any] = {"authorizationType": "NONE"}
    if authorizer == "COGNITO_USER_POOLS":
        created = apigateway.create_authorizer(
            restApiId=api_id,
            name="users",
            type="COGNITO_USER_POOLS",
            providerARNs=["arn:aws:cognito-idp:us-east-1:123456789012:userpool/us-east-1_abc"],
            identitySource="method.request.header.Authorization",
        )
        method = {"authorizationType": "COGNITO_USER_POOLS", "authorizerId": created["id"]}
    elif authorizer in ("TOKEN", "REQUEST"):
        created = apigateway.create_authorizer(
            restApiId=api_id,
            name="tenants",
            type=authorizer,
            authorizerUri=(
                "arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/"
                "arn:aws:lambda:us-east-1:123456789012:function:authorizer/invocations"
            ),
            identitySource="method.request.header.Authorization",
        )
        method = {"authorizationType": "CUSTOM", "authorizerId": created["id"]}
    elif authorizer == "USAGE_PLAN":
        method = {"authorizationType": "NONE", "apiKeyRequired": True}
    apigateway.put_method(restApiId=api_id, resourceId=root, httpMethod="GET", **method)
    apigateway.put_integration(restApiId=api_id, resourceId=root, httpMethod="GET", type="MOCK")
    apigateway.put_method(restApiId=api_id, resourceId=root, httpMethod="OPTIONS", authorizationType="NONE")
    for i in range(unguarded):
        resource = apigateway.create_resource(restApiId=api_id, parentId=root, pathPart=f"open{i}")["id"]
        apigateway.put_method(restApiId=api_id, resourceId=resource, httpMethod="GET", authorizationType="NONE")
    apigateway.create_deployment(restApiId=api_id, stageName="v1")
    if authorizer == "USAGE_PLAN":
        apigateway.create_usage_plan(name="tenants", apiStages=[{"apiId": api_id, "stage": "v1"}])
    return api_id


def attach(clients: dict[str, Any], api_id: str, config: Config = CONFIG, stage: str = "v1") -> StageChange:
    """``meterlake aws attach`` of the stage, with the test's clients."""
    return attach_stage(
        config,
        apigateway=clients["apigateway"],
        apigatewayv2=clients["apigatewayv2"],
        firehose=clients["firehose"],
        rest_api_id=api_id,
        stage=stage,
    )


def test_attach_sets_the_stage_access_log_and_detach_removes_it(clients: dict[str, Any]) -> None:
    arn = deploy_stream(clients)
    api_id = rest_api(clients, cognito=True)
    change = attach(clients, api_id)
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
        ("cognito_claim", "COGNITO_USER_POOLS", "TOKEN", "none use a COGNITO_USER_POOLS authorizer"),
        ("authorizer_context", "TOKEN", "COGNITO_USER_POOLS", "none use a CUSTOM authorizer"),
        ("authorizer_context", "REQUEST", None, "none use a CUSTOM authorizer"),
        ("api_key", "USAGE_PLAN", "COGNITO_USER_POOLS", "none require an API key"),
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
        changes[authorizer] = attach(clients, api_id, config)
        stage = clients["apigateway"].get_stage(restApiId=api_id, stageName="v1")
        assert stage["accessLogSettings"] == {
            "destinationArn": arn,
            "format": render_access_log_format(config.meterlake.tenant_source.source()),
        }
    assert changes[yields].warnings == []
    warning, *more = changes[other].warnings
    assert expected in warning
    assert "never billed" in warning
    assert "$" + config.meterlake.tenant_source.source().tenant_variable in warning
    # With API keys, a stage no usage plan covers is said too: API Gateway checks no key there.
    assert [("no usage plan covers" in w) for w in more] == ([True] if kind == "api_key" else [])


def test_methods_that_would_log_no_tenant_are_named(clients: dict[str, Any]) -> None:
    deploy_stream(clients)
    api_id = rest_api(clients, cognito=True, unguarded=7)
    change = attach(clients, api_id)
    (warning,) = change.warnings
    assert warning.startswith(f"7 of 8 methods of REST API {api_id} do not use a COGNITO_USER_POOLS authorizer (")
    assert "GET /open0" in warning
    assert "and 2 more" in warning
    assert "OPTIONS" not in warning  # not metered


def test_attach_says_which_destination_it_replaced(clients: dict[str, Any]) -> None:
    arn = deploy_stream(clients)
    api_id = rest_api(clients, cognito=True)
    other = "arn:aws:logs:us-east-1:123456789012:log-group:api-logs"
    clients["apigateway"].update_stage(
        restApiId=api_id,
        stageName="v1",
        patchOperations=[
            {"op": "replace", "path": "/accessLogSettings/destinationArn", "value": other},
            {"op": "replace", "path": "/accessLogSettings/format", "value": "$context.requestId"},
        ],
    )
    change = attach(clients, api_id)
    assert change.warnings == [f"replaced the stage's access-log destination {other}"]
    assert change.stream_arn == arn


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
        attach(clients, api_id, stage=stage)


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
    assert err.startswith("warning: no method of REST API")
    http_api = clients["apigatewayv2"].create_api(Name="events", ProtocolType="HTTP")["ApiId"]
    monkeypatch.setattr(sys, "argv", ["meterlake", "aws", "detach", "--rest-api-id", http_api, "--stage", "v1"])
    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: REST API {http_api} has no stage 'v1'"]
