"""API: Cognito user pool, the REST API ``GET /random/strings`` and the stage whose access logs go to Firehose."""

from __future__ import annotations

from typing import Any, Final

from aws_cdk import Aws, CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_cognito as cognito
from constructs import Construct

from cdk_stacks.bundling import PythonBundle, PythonTarget, lambda_code
from cdk_stacks.delivery import AccessLogDelivery
from cdk_stacks.metering import meter_stage
from cdk_stacks.shared import LAMBDA_PYTHON_VERSION, LAMBDA_RUNTIME_REASON, acknowledge, lambda_role, python_function
from meterlake.config import Config
from meterlake.demo_api import RANDOM_STRINGS_RESOURCE
from meterlake.records import DEFAULT_TENANT_CLAIM, DEFAULT_TENANT_SOURCE

#: The Cognito custom attribute that carries a user's tenant; the access log reads its claim ``custom:<attribute>``.
TENANT_ATTRIBUTE: Final = DEFAULT_TENANT_CLAIM.removeprefix("custom:")
#: The demo Lambda is the stdlib-only demo API module; no third-party packages.
DEMO_SOURCES: Final = (
    ("meterlake/__init__.py", "meterlake/__init__.py"),
    ("meterlake/demo_api.py", "meterlake/demo_api.py"),
)
DEMO_HANDLER: Final = "meterlake.demo_api.lambda_handler"
#: The query-string parameters of the demo API, all optional.
DEMO_QUERY_PARAMETERS: Final = ("chars", "len", "num")


class DemoApiTenantSourceError(ValueError):
    """The demo API's tenants are its user pool's DEFAULT_TENANT_CLAIM; another tenant source would bill nobody."""

    def __init__(self, kind: str) -> None:
        super().__init__(
            f"the demo API authorizes with its Cognito user pool's {DEFAULT_TENANT_CLAIM} claim, but "
            f"meterlake.tenant_source is {kind!r} with other variables: its requests would carry no tenant. Meter your "
            "own APIs (meter_stage) or set demo_api=False"
        )


class DemoApi(Construct):
    """The demo API, metered: user pool + app client, demo Lambda, REST API with a Cognito authorizer, and its stage
    metered into ``pipeline`` (:func:`meter_stage`, as a user's own API would be).

    Attributes:
        rest_api: the REST API; its stage is ``rest_api.deployment_stage``.
        user_pool / user_pool_client: where API users sign in.
    """

    def __init__(self, scope: Construct, construct_id: str, *, config: Config, pipeline: AccessLogDelivery) -> None:
        """Build the demo API and meter its stage into ``pipeline``.

        Raises:
            DemoApiTenantSourceError: the config takes tenants from elsewhere than the demo pool's claim.
        """
        if config.meterlake.tenant_source.source() != DEFAULT_TENANT_SOURCE:
            raise DemoApiTenantSourceError(config.meterlake.tenant_source.kind)
        super().__init__(scope, construct_id)
        aws = config.meterlake.aws
        stage_name = config.meterlake.api_stage
        self.user_pool = cognito.UserPool(
            self,
            "UserPool",
            # Tenants' users are created by the operator (AdminCreateUser with custom:tenant_id), never by themselves.
            self_sign_up_enabled=False,
            sign_in_aliases=cognito.SignInAliases(username=True, email=True),
            password_policy=cognito.PasswordPolicy(
                min_length=12,
                require_lowercase=True,
                require_uppercase=True,
                require_digits=True,
                require_symbols=True,
                temp_password_validity=Duration.days(3),
            ),
            custom_attributes={
                TENANT_ATTRIBUTE: cognito.StringAttribute(min_len=1, max_len=64, mutable=True),
            },
            feature_plan=cognito.FeaturePlan.PLUS,
            standard_threat_protection_mode=cognito.StandardThreatProtectionMode.FULL_FUNCTION,
            account_recovery=cognito.AccountRecovery.EMAIL_ONLY,
            removal_policy=RemovalPolicy.RETAIN,
        )
        acknowledge(
            self.user_pool,
            "AwsSolutions-COG2",
            "API clients sign in non-interactively (USER_PASSWORD_AUTH, e.g. `meterlake load-test`); MFA would "
            "block them. Threat protection (Plus plan, full function) guards the sign-ins instead.",
        )
        self.user_pool_client = self.user_pool.add_client(
            "AppClient",
            auth_flows=cognito.AuthFlow(user_password=True, user_srp=True),
            generate_secret=False,
            # Clients sign in with the Cognito API (USER_PASSWORD_AUTH / SRP); no hosted UI, no OAuth redirects.
            disable_o_auth=True,
            prevent_user_existence_errors=True,
            read_attributes=cognito.ClientAttributes()
            .with_standard_attributes(email=True, email_verified=True, preferred_username=True)
            .with_custom_attributes(TENANT_ATTRIBUTE),
            # The tenant is what usage is billed to: users can read it (it is in their ID token) but never change it.
            write_attributes=cognito.ClientAttributes().with_standard_attributes(email=True, preferred_username=True),
        )

        demo_role = lambda_role(
            self, "DemoRole", description="meterlake demo API Lambda: writes its own logs, nothing else"
        )
        demo_function = python_function(
            self,
            "DemoFunction",
            role=demo_role,
            architecture=aws.lambda_architecture,
            log_retention_days=aws.log_retention_days,
            log_group_id="DemoLogGroup",
            description="meterlake demo API: GET /random/strings",
            handler=DEMO_HANDLER,
            code=lambda_code(
                PythonBundle(
                    sources=DEMO_SOURCES,
                    requirements=(),
                    target=PythonTarget.for_lambda(
                        architecture=aws.lambda_architecture, python_version=LAMBDA_PYTHON_VERSION
                    ),
                )
            ),
            memory_size=256,
            timeout=Duration.seconds(10),
        )

        acknowledge(demo_function, "AwsSolutions-L1", LAMBDA_RUNTIME_REASON)
        self.rest_api = apigateway.RestApi(
            self,
            "RestApi",
            rest_api_name="meterlake-random-strings",
            description="meterlake demo API: every request is access-logged to Firehose and metered",
            endpoint_types=[apigateway.EndpointType.REGIONAL],
            # The account-wide API Gateway CloudWatch role (AWS::ApiGateway::Account) is not this app's to own.
            cloud_watch_role=False,
            deploy_options=apigateway.StageOptions(
                stage_name=stage_name,
                throttling_rate_limit=aws.api_throttling_rate_limit,
                throttling_burst_limit=aws.api_throttling_burst_limit,
                metrics_enabled=True,
                tracing_enabled=True,
            ),
        )
        authorizer = apigateway.CognitoUserPoolsAuthorizer(
            self, "Authorizer", cognito_user_pools=[self.user_pool], results_cache_ttl=Duration.minutes(5)
        )
        validator = self.rest_api.add_request_validator(
            "RequestValidator", validate_request_parameters=True, validate_request_body=True
        )
        resource = self.rest_api.root.resource_for_path(RANDOM_STRINGS_RESOURCE)
        resource.add_method(
            "GET",
            apigateway.LambdaIntegration(demo_function),
            authorization_type=apigateway.AuthorizationType.COGNITO,
            authorizer=authorizer,
            request_validator=validator,
            request_parameters={f"method.request.querystring.{name}": False for name in DEMO_QUERY_PARAMETERS},
        )
        # RestApi adds its own URL output; the stack's RestApiEndpoint output below replaces it.
        self.rest_api.node.try_remove_child("Endpoint")
        stage = self.rest_api.deployment_stage
        meter_stage(stage, pipeline)
        acknowledge(
            stage,
            "AwsSolutions-APIG3",
            "A WAF web ACL is an account-level cost and policy decision; the demo stage is throttled "
            "(meterlake.aws.api_throttling_*) and every method requires a Cognito ID token.",
        )
        acknowledge(
            stage,
            "AwsSolutions-APIG6",
            "Execution logging needs the account-wide API Gateway CloudWatch role (AWS::ApiGateway::Account), a "
            "singleton this app must not take over; every request is access-logged to Firehose instead.",
        )

        CfnOutput(self, "UserPoolId", value=self.user_pool.user_pool_id)
        CfnOutput(self, "UserPoolClientId", value=self.user_pool_client.user_pool_client_id)
        CfnOutput(
            self,
            "RestApiEndpoint",
            value=f"https://{self.rest_api.rest_api_id}.execute-api.{Aws.REGION}.{Aws.URL_SUFFIX}/{stage_name}",
        )


class ApiStack(Stack):
    """The app's :class:`DemoApi`.

    Attributes:
        api: the user pool, demo Lambda and REST API.
    """

    def __init__(
        self, scope: Construct, construct_id: str, *, config: Config, pipeline: AccessLogDelivery, **kwargs: Any
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.api = DemoApi(self, "Default", config=config, pipeline=pipeline)
