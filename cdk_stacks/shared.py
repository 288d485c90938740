"""Small pieces every stack uses: log retention, Lambda runtime/architecture, cdk-nag acknowledgments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from aws_cdk import Acknowledgment, RemovalPolicy, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct, IConstruct

from meterlake.config import LOG_RETENTION_DAYS

#: The Lambdas' runtime; the bundler picks wheels for the same CPython version.
LAMBDA_RUNTIME: Final = lambda_.Runtime.PYTHON_3_13
LAMBDA_PYTHON_VERSION: Final = "3.13"
LAMBDA_RUNTIME_REASON: Final = (
    "Python 3.13 is the runtime the transform is built, bundled (cp313 wheels) and measured for; a runtime "
    "upgrade is a deliberate change of LAMBDA_RUNTIME and LAMBDA_PYTHON_VERSION together, not a silent default."
)

#: CloudWatch Logs retention periods (days) -> CDK's enum, which has no numeric values in Python.
_RETENTION: Final[dict[int, logs.RetentionDays]] = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    2192: logs.RetentionDays.SIX_YEARS,
    2557: logs.RetentionDays.SEVEN_YEARS,
    2922: logs.RetentionDays.EIGHT_YEARS,
    3288: logs.RetentionDays.NINE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}
assert _RETENTION.keys() == LOG_RETENTION_DAYS, "the config's retention periods and CDK's enum disagree"


def log_retention(days: int) -> logs.RetentionDays:
    """CDK's retention enum member for a number of days the config accepted."""
    return _RETENTION[days]


def lambda_architecture(name: str) -> lambda_.Architecture:
    """CDK's architecture for the config's ``arm64`` / ``x86_64``."""
    return {"arm64": lambda_.Architecture.ARM_64, "x86_64": lambda_.Architecture.X86_64}[name]


def lambda_role(
    scope: Construct, construct_id: str, *, description: str, policy: tuple[str, iam.PolicyDocument] | None = None
) -> iam.Role:
    """A role only Lambda may assume, with ``policy`` (name, document) inline; nothing else is granted here."""
    return iam.Role(
        scope,
        construct_id,
        assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
        description=description,
        inline_policies=None if policy is None else {policy[0]: policy[1]},
    )


def python_function(
    scope: Construct,
    construct_id: str,
    *,
    role: iam.IRole,
    architecture: str,
    log_retention_days: int,
    log_group_id: str,
    **props: Any,
) -> lambda_.Function:
    """A Lambda on the project's Python runtime with its own log group (retention from the config) that only its
    role may write: every function of the app is built this way. The log group goes with the stack: logs are not
    the product's data, and a retained one would linger after ``cdk destroy``."""
    log_group = logs.LogGroup(
        scope, log_group_id, retention=log_retention(log_retention_days), removal_policy=RemovalPolicy.DESTROY
    )
    log_group.grant_write(role)
    return lambda_.Function(
        scope,
        construct_id,
        runtime=LAMBDA_RUNTIME,
        architecture=lambda_architecture(architecture),
        role=role,
        log_group=log_group,
        **props,
    )


def acknowledge(scope: IConstruct, finding: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding on ``scope`` (and its children) with the reason it is accepted."""
    Validations.of(scope).acknowledge(Acknowledgment(id=finding, reason=reason))


def acknowledge_resources(scope: IConstruct, finding: str, resources: Sequence[str], reason: str) -> None:
    """Acknowledge ``finding`` (e.g. ``AwsSolutions-IAM5``) for each resource ARN, named as cdk-nag names it.

    cdk-nag identifies a wildcard resource by its rendered ARN (``<AWS::Region>`` for a pseudo parameter,
    ``<Logical.Arn>`` for an attribute); rendering it here keeps each acknowledgment tied to one exact ARN.
    """
    stack = Stack.of(scope)
    for resource in resources:
        acknowledge(scope, f"{finding}[Resource::{_nag_rendering(stack.resolve(resource))}]", reason)


def _nag_rendering(node: object) -> str:
    """Render a resolved CloudFormation string expression as cdk-nag prints it in finding ids."""
    if isinstance(node, str):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((function, argument),) = node.items()
        if function == "Ref":
            return f"<{argument}>"
        if function == "Fn::GetAtt":
            return f"<{argument[0]}.{argument[1]}>"
        if function == "Fn::Join":
            separator, parts = argument
            return str(separator).join(_nag_rendering(part) for part in parts)
        if function == "Fn::ImportValue":
            return _nag_rendering(argument)
    raise ValueError(f"cannot render {node!r} as cdk-nag does")
