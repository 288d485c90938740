"""Transform: the Firehose data-transformation Lambda (``transform_lambda/``), bundled without Docker."""

from __future__ import annotations

from typing import Any, Final

import msgspec
from aws_cdk import Duration, Stack
from constructs import Construct

from cdk_stacks.bundling import LAMBDA_LOCK_DIR, PythonBundle, PythonTarget, lambda_code, project_requirements
from cdk_stacks.shared import LAMBDA_PYTHON_VERSION, LAMBDA_RUNTIME_REASON, acknowledge, lambda_role, python_function
from meterlake.config import LAMBDA_ENVIRONMENT_LIMIT_BYTES, Config
from transform_lambda.handler import (
    ENV_DATABASE,
    ENV_OPERATION,
    ENV_TABLE,
    ENV_TENANTS_BY_API_KEY,
    ENV_UNMETERED_HTTP_METHODS,
    METRICS_NAMESPACE,
    SERVICE,
)

#: What the handler imports: itself, its pure logic and the stdlib-only record definition.
TRANSFORM_SOURCES: Final = (
    ("transform_lambda", "transform_lambda"),
    ("meterlake/__init__.py", "meterlake/__init__.py"),
    ("meterlake/records.py", "meterlake/records.py"),
)
#: Third-party packages the handler imports, pinned as pyproject.toml pins them.
TRANSFORM_REQUIREMENTS: Final = ("msgspec", "aws-lambda-powertools")
#: The exact wheels the asset installs (``make lock-lambdas`` writes it from the requirements).
TRANSFORM_LOCK: Final = LAMBDA_LOCK_DIR / "transform.txt"
TRANSFORM_HANDLER: Final = "transform_lambda.handler.lambda_handler"
#: Firehose upserts on the table's unique key, so a redelivered access-log line replaces its first copy.
OTF_OPERATION: Final = "update"


def transform_bundle(target: PythonTarget) -> PythonBundle:
    """The transform Lambda's asset for ``target``: the test builds the same bundle for this machine."""
    return PythonBundle(
        sources=TRANSFORM_SOURCES,
        requirements=project_requirements(TRANSFORM_REQUIREMENTS),
        target=target,
        lock=TRANSFORM_LOCK,
    )


class TransformFunction(Construct):
    """The transform Lambda, its role and its log group.

    Attributes:
        function: the Lambda Firehose invokes as its processor.
    """

    def __init__(self, scope: Construct, construct_id: str, *, config: Config) -> None:
        super().__init__(scope, construct_id)
        aws = config.meterlake.aws
        role = lambda_role(self, "Role", description="meterlake transform Lambda: writes its own logs, nothing else")
        target = PythonTarget.for_lambda(architecture=aws.lambda_architecture, python_version=LAMBDA_PYTHON_VERSION)
        self.function = python_function(
            self,
            "Function",
            role=role,
            architecture=aws.lambda_architecture,
            log_retention_days=aws.log_retention_days,
            log_group_id="LogGroup",
            description="meterlake: API Gateway access-log lines -> metering events for the Iceberg table",
            handler=TRANSFORM_HANDLER,
            code=lambda_code(transform_bundle(target)),
            memory_size=aws.transform_memory_mb,
            # Firehose waits at most 5 minutes for a processor; a full 6 MB batch takes well under a second.
            timeout=Duration.minutes(1),
            environment=transform_environment(config),
        )
        acknowledge(self.function, "AwsSolutions-L1", LAMBDA_RUNTIME_REASON)


def transform_environment(config: Config) -> dict[str, str]:
    """The transform Lambda's environment (what ``TransformSettings.from_env`` reads, and Powertools' names).

    Raises:
        ValueError: it exceeds Lambda's limit on a function's environment, which would fail the deployment.
    """
    environment = {
        ENV_DATABASE: config.database_name,
        ENV_TABLE: config.table_name,
        ENV_OPERATION: OTF_OPERATION,
        ENV_UNMETERED_HTTP_METHODS: ",".join(config.meterlake.unmetered_http_methods),
        "POWERTOOLS_SERVICE_NAME": SERVICE,
        "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
    }
    tenants = config.meterlake.tenant_source.api_key_tenants
    if tenants is not None:
        environment[ENV_TENANTS_BY_API_KEY] = msgspec.json.encode(tenants).decode()
    size = sum(len(name.encode()) + len(value.encode()) for name, value in environment.items())
    if size > LAMBDA_ENVIRONMENT_LIMIT_BYTES:
        raise ValueError(
            f"the transform Lambda's environment is {size} bytes, over Lambda's {LAMBDA_ENVIRONMENT_LIMIT_BYTES}: "
            "shorten meterlake.tenant_source.tenants_by_api_key"
        )
    return environment


class TransformStack(Stack):
    """The app's :class:`TransformFunction`.

    Attributes:
        function: the Lambda Firehose invokes as its processor.
    """

    def __init__(self, scope: Construct, construct_id: str, *, config: Config, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.function = TransformFunction(self, "Default", config=config).function
