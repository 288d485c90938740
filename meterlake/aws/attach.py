"""Metering a REST API stage that was not made with this CDK app: set its access log through the API Gateway API.

``attach`` points the stage's access log at the pipeline's delivery stream, in the format rendered from the record
definition (what :func:`cdk_stacks.metering.meter_stage` does for a stage the app owns); ``detach`` removes it. Both
refuse what would not work, with one line: an HTTP API (its access logs go to CloudWatch Logs only), a stage or a
stream that does not exist, a stage logging to some other destination.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from meterlake.aws import AwsError
from meterlake.aws.stacks import DELIVERY_STACK
from meterlake.config import Config
from meterlake.records import TenantSourceKind

#: The authorizer types that fill each tenant source's ``$context.authorizer`` variables: a Cognito user-pool
#: authorizer's claims, a Lambda authorizer's (TOKEN or REQUEST) context.
AUTHORIZER_TYPES: Final[Mapping[TenantSourceKind, frozenset[str]]] = {
    TenantSourceKind.COGNITO_CLAIM: frozenset({"COGNITO_USER_POOLS"}),
    TenantSourceKind.AUTHORIZER_CONTEXT: frozenset({"TOKEN", "REQUEST"}),
}


class AttachError(AwsError):
    """The stage cannot be metered (or unmetered) as asked; nothing was changed."""


@dataclass(frozen=True, slots=True)
class StageChange:
    """What attach or detach did to a stage, and what the operator should know."""

    rest_api_id: str
    api_name: str
    stage: str
    stream_arn: str
    warnings: list[str] = field(default_factory=list)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _rest_api(apigateway: Any, apigatewayv2: Any, rest_api_id: str) -> dict[str, Any]:
    try:
        api: dict[str, Any] = apigateway.get_rest_api(restApiId=rest_api_id)
    except ClientError as exc:
        if _code(exc) != "NotFoundException":
            raise AttachError(f"cannot read REST API {rest_api_id}: {exc}") from None
    else:
        return api
    try:
        http_api = apigatewayv2.get_api(ApiId=rest_api_id)
    except ClientError:
        raise AttachError(f"no REST API {rest_api_id} in this account and region") from None
    raise AttachError(
        f"{rest_api_id} ({http_api.get('Name', '?')}) is an HTTP API ({http_api.get('ProtocolType', 'HTTP')}): "
        "API Gateway writes HTTP APIs' access logs to CloudWatch Logs only, never to Firehose; meter a REST API"
    )


def _stage(apigateway: Any, rest_api_id: str, stage: str) -> dict[str, Any]:
    try:
        found: dict[str, Any] = apigateway.get_stage(restApiId=rest_api_id, stageName=stage)
    except ClientError as exc:
        if _code(exc) == "NotFoundException":
            raise AttachError(f"REST API {rest_api_id} has no stage {stage!r}") from None
        raise AttachError(f"cannot read stage {stage!r} of {rest_api_id}: {exc}") from None
    return found


def stream_arn(firehose: Any, config: Config) -> str:
    """The ARN of the config's delivery stream, which must exist.

    Raises:
        AttachError: there is no such stream (MeterlakeDelivery not deployed in this account and region).
    """
    name = config.data_firehose_configuration.delivery_stream_name
    try:
        described = firehose.describe_delivery_stream(DeliveryStreamName=name)
    except ClientError as exc:
        if _code(exc) == "ResourceNotFoundException":
            raise AttachError(f"no delivery stream {name}: deploy {DELIVERY_STACK} first") from None
        raise AttachError(f"cannot read delivery stream {name}: {exc}") from None
    arn: str = described["DeliveryStreamDescription"]["DeliveryStreamARN"]
    return arn


def tenant_warnings(apigateway: Any, rest_api_id: str, stage: str, config: Config) -> list[str]:
    """Why requests to the stage may carry no tenant: nothing there yields one from the configured tenant source."""
    source = config.meterlake.tenant_source
    if source.kind == TenantSourceKind.API_KEY.value:
        plans = apigateway.get_usage_plans()
        covered = any(
            (api_stage.get("apiId"), api_stage.get("stage")) == (rest_api_id, stage)
            for plan in plans.get("items", [])
            for api_stage in plan.get("apiStages", [])
        )
        if covered:
            return []
        return [
            f"no usage plan covers {rest_api_id}/{stage}: API Gateway identifies no API key on its requests, so they "
            "would be metered with no tenant, never billed (tenant_source is 'api_key')"
        ]
    wanted = AUTHORIZER_TYPES[TenantSourceKind(source.kind)]
    authorizers = apigateway.get_authorizers(restApiId=rest_api_id).get("items", [])
    if any(authorizer.get("type") in wanted for authorizer in authorizers):
        return []
    kinds = ", ".join(sorted({str(a.get("type")) for a in authorizers})) or "none"
    variable = "$" + source.source().tenant_variable
    return [
        f"REST API {rest_api_id} has no {' or '.join(sorted(wanted))} authorizer (authorizers: {kinds}): the access "
        f"log takes the tenant from {variable}, so its requests would be metered with no tenant, never billed"
    ]


def attach_stage(
    config: Config, *, apigateway: Any, apigatewayv2: Any, firehose: Any, rest_api_id: str, stage: str
) -> StageChange:
    """Send ``stage``'s access log to the pipeline's stream in the rendered format.

    Raises:
        AttachError: an HTTP API, a missing API, stage or stream, or an update API Gateway refused.
    """
    api = _rest_api(apigateway, apigatewayv2, rest_api_id)
    _stage(apigateway, rest_api_id, stage)
    arn = stream_arn(firehose, config)
    operations = [
        {"op": "replace", "path": "/accessLogSettings/destinationArn", "value": arn},
        {
            "op": "replace",
            "path": "/accessLogSettings/format",
            "value": config.meterlake.tenant_source.access_log_format(),
        },
    ]
    try:
        apigateway.update_stage(restApiId=rest_api_id, stageName=stage, patchOperations=operations)
    except ClientError as exc:
        raise AttachError(f"API Gateway refused the access-log settings of {rest_api_id}/{stage}: {exc}") from None
    return StageChange(
        rest_api_id=rest_api_id,
        api_name=str(api.get("name", "")),
        stage=stage,
        stream_arn=arn,
        warnings=tenant_warnings(apigateway, rest_api_id, stage, config),
    )


def detach_stage(config: Config, *, apigateway: Any, firehose: Any, rest_api_id: str, stage: str) -> StageChange:
    """Stop ``stage``'s access log, if it goes to the pipeline's stream (another destination is left alone).

    Raises:
        AttachError: a missing API or stage, a stage that logs elsewhere or nowhere, or a refused update.
    """
    found = _stage(apigateway, rest_api_id, stage)
    arn = stream_arn(firehose, config)
    destination = (found.get("accessLogSettings") or {}).get("destinationArn")
    if destination != arn:
        where = destination or "nowhere"
        raise AttachError(f"{rest_api_id}/{stage} logs to {where}, not to {arn}: nothing to detach, nothing changed")
    try:
        apigateway.update_stage(
            restApiId=rest_api_id, stageName=stage, patchOperations=[{"op": "remove", "path": "/accessLogSettings"}]
        )
    except ClientError as exc:
        raise AttachError(f"API Gateway refused to remove the access log of {rest_api_id}/{stage}: {exc}") from None
    api = apigateway.get_rest_api(restApiId=rest_api_id)
    return StageChange(rest_api_id=rest_api_id, api_name=str(api.get("name", "")), stage=stage, stream_arn=arn)
