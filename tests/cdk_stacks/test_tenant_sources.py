"""The tenant source reaches AWS: stages log the variables of the configured source, and with API keys the transform
Lambda (configured from its synthesized environment) bills each key id to its tenant."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from aws_cdk import App, Stack

from cdk_stacks.api import DemoApi, DemoApiTenantSourceError
from cdk_stacks.app import FEATURE_FLAGS, MeterlakeStacks
from cdk_stacks.transform import transform_environment
from meterlake.aws.stacks import API_STACK
from meterlake.config import LAMBDA_ENVIRONMENT_LIMIT_BYTES, ConfigError, parse_config
from meterlake.records import MISSING, TenantSource, render_access_log_format, render_access_log_line
from tests.cdk_stacks.conftest import API_KEY_TENANTS, TEST_CONTEXT
from tests.cdk_stacks.iam_evaluation import Deployment
from tests.cdk_stacks.user_apis import API_KEY_USER_API
from transform_lambda.handler import TransformSettings, make_handler


def _template(stacks: MeterlakeStacks, name: str) -> dict[str, Any]:
    template: dict[str, Any] = stacks.app.synth().get_stack_by_name(name).template
    return template


def test_an_api_key_stage_logs_the_key_id_into_the_pipeline(api_key_stacks: MeterlakeStacks) -> None:
    name, stage_name = API_KEY_USER_API
    deployment = Deployment({n: _template(api_key_stacks, n) for n in ("MeterlakeDelivery", name)})
    (stream_id,) = deployment.resources("MeterlakeDelivery", "AWS::KinesisFirehose::DeliveryStream")
    (stage,) = deployment.resources(name, "AWS::ApiGateway::Stage").values()
    properties = deployment.resolve(name, stage["Properties"])
    assert properties["StageName"] == stage_name
    assert properties["AccessLogSetting"] == {
        "DestinationArn": deployment.attribute("MeterlakeDelivery", stream_id, "Arn"),
        "Format": render_access_log_format(TenantSource.api_key()),
    }
    assert '"tenant_id":"$context.identity.apiKeyId"' in properties["AccessLogSetting"]["Format"]
    # The demo API authorizes with Cognito: with tenants from API keys it would bill nobody, so it is left out.
    assert api_key_stacks.api is None
    assert API_STACK not in {artifact.stack_name for artifact in api_key_stacks.app.synth().stacks}


def test_the_transform_built_from_its_template_environment_bills_key_ids_to_tenants(
    api_key_stacks: MeterlakeStacks,
) -> None:
    """The line API Gateway writes for that format (the key id in the tenant field), through the handler as the
    synthesized Lambda's environment configures it."""
    template = _template(api_key_stacks, "MeterlakeTransform")
    (function,) = (r for r in template["Resources"].values() if r["Type"] == "AWS::Lambda::Function")
    environment: dict[str, str] = function["Properties"]["Environment"]["Variables"]
    assert json.loads(environment["TENANTS_BY_API_KEY"]) == API_KEY_TENANTS
    handler = make_handler(TransformSettings.from_env(environment), emit_metrics=False)
    key_ids = [*API_KEY_TENANTS, "zzzzzzzzzz", MISSING]
    lines = [
        render_access_log_line(
            {
                "request_id": f"r-{i}",
                "tenant_id": key_id,
                "user": key_id,
                "request_time": 1_764_000_000_000 + i,
                "http_method": "GET",
                "status": 200 if key_id != MISSING else 403,
            }
        )
        for i, key_id in enumerate(key_ids)
    ]
    event = {
        "invocationId": "inv-1",
        "deliveryStreamArn": "arn:aws:firehose:eu-west-1:111122223333:deliverystream/amazon-apigateway-metering-test",
        "region": "eu-west-1",
        "records": [
            {
                "recordId": f"rec-{i}",
                "approximateArrivalTimestamp": 1_764_000_000_500,
                "data": base64.b64encode(x).decode(),
            }
            for i, x in enumerate(lines)
        ],
    }
    answer = handler(event, None)
    documents = [json.loads(base64.b64decode(record["data"])) for record in answer["records"]]
    assert [(d["tenant_id"], d["user"]) for d in documents] == [
        ("acme", "a1b2c3d4e5"),
        ("globex", "f6g7h8i9j0"),
        (None, "zzzzzzzzzz"),  # a key the mapping does not name: metered, never billed
        (None, None),
    ]


def test_the_demo_api_refuses_a_tenant_source_it_cannot_fill() -> None:
    context = {**TEST_CONTEXT, "meterlake": {**TEST_CONTEXT["meterlake"], "tenant_source": {"kind": "api_key"}}}
    stack = Stack(App(context=FEATURE_FLAGS), "Demo")
    with pytest.raises(DemoApiTenantSourceError, match="'api_key'"):
        DemoApi(stack, "Api", config=parse_config(context), pipeline=None)  # type: ignore[arg-type]


def test_the_transform_environment_stays_within_lambdas_limit() -> None:
    largest = {f"k{i:09d}": f"tenant-{i:05d}" for i in range(300)}
    with pytest.raises(ConfigError, match="over 3072: the transform Lambda reads it from its environment"):
        parse_config({"meterlake": {"tenant_source": {"kind": "api_key", "tenants_by_api_key": largest}}})
    fits = dict(list(largest.items())[:105])
    config = parse_config({"meterlake": {"tenant_source": {"kind": "api_key", "tenants_by_api_key": fits}}})
    environment = transform_environment(config)
    assert sum(len(k) + len(v) for k, v in environment.items()) <= LAMBDA_ENVIRONMENT_LIMIT_BYTES
    crowded = parse_config(
        {
            "meterlake": {
                "unmetered_http_methods": ["PROPFIND"] * 120,
                "tenant_source": {"kind": "api_key", "tenants_by_api_key": fits},
            }
        }
    )
    with pytest.raises(ValueError, match="over Lambda's 4096"):
        transform_environment(crowded)
