"""A SaaS team's own APIs, in their own stacks, metered into the pipeline: what the README shows a user writing."""

from __future__ import annotations

from typing import Final

from aws_cdk import App, Stack
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_cognito as cognito

from cdk_stacks.delivery import AccessLogDelivery
from cdk_stacks.metering import meter_stage
from cdk_stacks.shared import acknowledge

#: The user APIs the session's app holds beside meterlake's own stacks: (stack name, stage name).
USER_API_STACKS: Final = (("CustomerOrdersApi", "v1"), ("CustomerInvoicesApi", "live"))


def add_user_api(app: App, name: str, *, stage_name: str, pipeline: AccessLogDelivery) -> Stack:
    """A REST API of the user's (Cognito-authorized GET /orders, a mock integration) whose stage is metered."""
    stack = Stack(app, name)
    pool = cognito.UserPool(stack, "Users", self_sign_up_enabled=False)
    api = apigateway.RestApi(
        stack, "Api", cloud_watch_role=False, deploy_options=apigateway.StageOptions(stage_name=stage_name)
    )
    authorizer = apigateway.CognitoUserPoolsAuthorizer(stack, "Authorizer", cognito_user_pools=[pool])
    api.root.add_resource("orders").add_method(
        "GET",
        apigateway.MockIntegration(
            integration_responses=[apigateway.IntegrationResponse(status_code="200")],
            request_templates={"application/json": '{"statusCode": 200}'},
        ),
        authorization_type=apigateway.AuthorizationType.COGNITO,
        authorizer=authorizer,
        method_responses=[apigateway.MethodResponse(status_code="200")],
    )
    meter_stage(api.deployment_stage, pipeline)
    # The user's own security choices are theirs; meterlake's checks of their stack are not the point here.
    for finding in ("APIG2", "APIG3", "APIG6", "COG1", "COG2", "COG3", "COG8"):
        acknowledge(stack, f"AwsSolutions-{finding}", "A user's own API stack in meterlake's tests.")
    return stack


#: The API-key-authorized user API of the api_key tenant-source app: (stack name, stage name).
API_KEY_USER_API: Final = ("PartnerFeedApi", "v2")


def add_api_key_user_api(app: App, name: str, *, stage_name: str, pipeline: AccessLogDelivery) -> Stack:
    """A REST API of the user's whose GET /feed requires an API key (a usage plan covers its stage), metered."""
    stack = Stack(app, name)
    api = apigateway.RestApi(
        stack, "Api", cloud_watch_role=False, deploy_options=apigateway.StageOptions(stage_name=stage_name)
    )
    api.root.add_resource("feed").add_method(
        "GET",
        apigateway.MockIntegration(
            integration_responses=[apigateway.IntegrationResponse(status_code="200")],
            request_templates={"application/json": '{"statusCode": 200}'},
        ),
        api_key_required=True,
        method_responses=[apigateway.MethodResponse(status_code="200")],
    )
    plan = api.add_usage_plan("Plan", api_stages=[apigateway.UsagePlanPerApiStage(api=api, stage=api.deployment_stage)])
    plan.add_api_key(api.add_api_key("AcmeKey"))
    meter_stage(api.deployment_stage, pipeline)
    for finding in ("APIG2", "APIG3", "APIG4", "APIG6", "COG4"):
        acknowledge(stack, f"AwsSolutions-{finding}", "A user's own API stack in meterlake's tests.")
    return stack
