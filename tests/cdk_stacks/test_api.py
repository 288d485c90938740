"""API: the stage logs exactly the rendered access-log format to the stream; Cognito guards the tenant claim."""

from __future__ import annotations

from aws_cdk.assertions import Template

from meterlake.records import render_access_log_format
from tests.cdk_stacks.conftest import only_resource


def test_stage_access_log_is_the_rendered_format_sent_to_the_stream(templates: dict[str, Template]) -> None:
    stage = only_resource(templates["MeterlakeApi"], "AWS::ApiGateway::Stage")
    assert stage["AccessLogSetting"]["Format"] == render_access_log_format()
    assert stage["AccessLogSetting"]["DestinationArn"] == {
        "Fn::ImportValue": "MeterlakeDelivery:ExportsOutputFnGetAttDeliveryStreamArnA1E60171"
    }
    assert stage["StageName"] == "beta"
    (settings,) = stage["MethodSettings"]
    assert (settings["ThrottlingRateLimit"], settings["ThrottlingBurstLimit"]) == (17, 23)
    assert stage["TracingEnabled"] is True


def test_get_random_strings_requires_a_cognito_token_and_validates(templates: dict[str, Template]) -> None:
    template = templates["MeterlakeApi"]
    (method,) = template.find_resources("AWS::ApiGateway::Method").values()
    properties = method["Properties"]
    assert properties["HttpMethod"] == "GET"
    assert properties["AuthorizationType"] == "COGNITO_USER_POOLS"
    assert "RequestValidatorId" in properties
    authorizer = only_resource(template, "AWS::ApiGateway::Authorizer")
    assert authorizer["Type"] == "COGNITO_USER_POOLS"
    paths = {r["Properties"]["PathPart"] for r in template.find_resources("AWS::ApiGateway::Resource").values()}
    assert paths == {"random", "strings"}
    function = only_resource(template, "AWS::Lambda::Function")
    assert function["Handler"] == "meterlake.demo_api.lambda_handler"


def test_user_pool_password_policy_and_tenant_attribute(templates: dict[str, Template]) -> None:
    pool = only_resource(templates["MeterlakeApi"], "AWS::Cognito::UserPool")
    policy = pool["Policies"]["PasswordPolicy"]
    assert policy["MinimumLength"] >= 12
    assert all(policy[key] for key in ("RequireLowercase", "RequireUppercase", "RequireNumbers", "RequireSymbols"))
    (tenant,) = [a for a in pool["Schema"] if a["Name"] == "tenant_id"]
    assert tenant["AttributeDataType"] == "String"
    assert pool["UserPoolAddOns"] == {"AdvancedSecurityMode": "ENFORCED"}
    assert pool["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is True


def test_app_client_reads_but_cannot_write_the_tenant(templates: dict[str, Template]) -> None:
    client = only_resource(templates["MeterlakeApi"], "AWS::Cognito::UserPoolClient")
    assert "custom:tenant_id" in client["ReadAttributes"]
    assert "custom:tenant_id" not in client["WriteAttributes"]
    assert {"ALLOW_USER_PASSWORD_AUTH", "ALLOW_USER_SRP_AUTH"} <= set(client["ExplicitAuthFlows"])
    assert client["GenerateSecret"] is False


def test_outputs_live_with_their_resources(templates: dict[str, Template]) -> None:
    outputs = {name: set(template.to_json().get("Outputs", {})) for name, template in templates.items()}
    assert outputs["MeterlakeApi"] == {"UserPoolId", "UserPoolClientId", "RestApiEndpoint"}
    assert "DeliveryStreamName" in outputs["MeterlakeDelivery"]
    assert "BucketName" in outputs["MeterlakeStorage"]
    assert "AthenaWorkGroup" in outputs["MeterlakeAnalytics"]
    endpoint = templates["MeterlakeApi"].to_json()["Outputs"]["RestApiEndpoint"]["Value"]["Fn::Join"][1]
    assert endpoint[0] == "https://"
    assert endpoint[-1] == "/beta"
