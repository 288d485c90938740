"""Metering a REST API stage that was not made with this CDK app: set its access log through the API Gateway API.

``attach`` points the stage's access log at the pipeline's delivery stream, in the format rendered from the record
definition (what :func:`cdk_stacks.metering.meter_stage` does for a stage the app owns), replacing any destination it
had (a REST stage logs to one) and saying which; ``detach`` removes it. Both refuse what would not work, with one
line: an HTTP API (its access logs go to CloudWatch Logs only), a stage or a stream that does not exist; detach also
refuses a stage logging to some other destination.
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

#: The method authorization types that fill each tenant source's ``$context.authorizer`` variables: a Cognito
#: user-pool authorizer's claims, a Lambda (TOKEN or REQUEST) authorizer's context.
AUTHORIZATION_TYPES: Final[Mapping[TenantSourceKind, str]] = {
    TenantSourceKind.COGNITO_CLAIM: "COGNITO_USER_POOLS",
    TenantSourceKind.AUTHORIZER_CONTEXT: "CUSTOM",
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


#: How many of the methods that would log no tenant a warning names.
SHOWN_METHODS: Final = 5


def _methods(apigateway: Any, rest_api_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every method of the API: (HTTP method, resource path, method settings), all pages."""
    methods = []
    for page in apigateway.get_paginator("get_resources").paginate(restApiId=rest_api_id, embed=["methods"]):
        for resource in page.get("items", []):
            for verb, method in (resource.get("resourceMethods") or {}).items():
                methods.append((verb, str(resource.get("path", "")), method))
    return methods


def _covered_by_usage_plan(apigateway: Any, rest_api_id: str, stage: str) -> bool:
    """Whether a usage plan (any page of them) covers the stage: only then does API Gateway check API keys on it."""
    return any(
        (api_stage.get("apiId"), api_stage.get("stage")) == (rest_api_id, stage)
        for page in apigateway.get_paginator("get_usage_plans").paginate()
        for plan in page.get("items", [])
        for api_stage in plan.get("apiStages", [])
    )


def tenant_warnings(apigateway: Any, rest_api_id: str, stage: str, config: Config) -> list[str]:
    """Why requests to the stage may carry no tenant: methods that do not yield one from the configured source.

    A Cognito claim needs methods authorized by a Cognito user pool; a Lambda authorizer's context needs methods with
    a CUSTOM (Lambda) authorizer; an API key id needs methods that require a key, on a stage a usage plan covers.
    Methods the config does not meter (``unmetered_http_methods``) are left out.
    """
    source = config.meterlake.tenant_source
    kind = TenantSourceKind(source.kind)
    unmetered = set(config.meterlake.unmetered_http_methods)
    metered = [
        (verb, path, method) for verb, path, method in _methods(apigateway, rest_api_id) if verb not in unmetered
    ]
    variable = "$" + source.source().tenant_variable
    if kind is TenantSourceKind.API_KEY:
        yields = [m for m in metered if m[2].get("apiKeyRequired")]
        requirement = "require an API key"
    else:
        wanted = AUTHORIZATION_TYPES[kind]
        yields = [m for m in metered if m[2].get("authorizationType") == wanted]
        requirement = f"use a {wanted} authorizer"
    warnings = []
    if metered and not yields:
        warnings.append(
            f"no method of REST API {rest_api_id} would log a tenant: none {requirement}, and the access log takes "
            f"the tenant from {variable}, so its requests would be metered with no tenant, never billed"
        )
    elif len(yields) < len(metered):
        missing = [f"{verb} {path}" for verb, path, method in metered if (verb, path, method) not in yields]
        shown = ", ".join(missing[:SHOWN_METHODS]) + (
            f" and {len(missing) - SHOWN_METHODS} more" if len(missing) > SHOWN_METHODS else ""
        )
        warnings.append(
            f"{len(missing)} of {len(metered)} methods of REST API {rest_api_id} do not {requirement} ({shown}): "
            f"their requests would log no tenant ({variable}), never billed"
        )
    if kind is TenantSourceKind.API_KEY and not _covered_by_usage_plan(apigateway, rest_api_id, stage):
        warnings.append(
            f"no usage plan covers {rest_api_id}/{stage}: API Gateway checks no API key there, so its requests "
            f"would log no key id ({variable}) and be metered with no tenant, never billed"
        )
    return warnings


def attach_stage(
    config: Config, *, apigateway: Any, apigatewayv2: Any, firehose: Any, rest_api_id: str, stage: str
) -> StageChange:
    """Send ``stage``'s access log to the pipeline's stream in the rendered format.

    Raises:
        AttachError: an HTTP API, a missing API, stage or stream, or an update API Gateway refused.
    """
    api = _rest_api(apigateway, apigatewayv2, rest_api_id)
    previous = (_stage(apigateway, rest_api_id, stage).get("accessLogSettings") or {}).get("destinationArn")
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
        warnings=[
            *([f"replaced the stage's access-log destination {previous}"] if previous not in (None, arn) else []),
            *tenant_warnings(apigateway, rest_api_id, stage, config),
        ],
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
