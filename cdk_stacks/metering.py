"""Metering an API Gateway stage: its access log goes to the pipeline's stream, in the format the record renders.

A SaaS team's REST APIs live in their own stacks. One call meters a stage of any of them; several APIs may feed
one pipeline, and the access log's ``api_id`` tells them apart in the table.
"""

from __future__ import annotations

from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_kinesisfirehose as firehose

from cdk_stacks.delivery import AccessLogDelivery


class StageNotMeterableError(TypeError):
    """The stage has no CloudFormation stage underneath (an imported stage cannot be changed by this app)."""


def meter_stage(stage: apigateway.Stage | apigateway.CfnStage, pipeline: AccessLogDelivery) -> None:
    """Send ``stage``'s access log to ``pipeline``'s delivery stream, in the access-log format rendered for the
    pipeline's tenant source (``meterlake.tenant_source``: a Cognito claim, a Lambda authorizer's context, API keys).

    Replaces whatever access-log destination the stage had: a REST API stage logs to one destination (CloudWatch
    Logs or Firehose, not both). The stage may be in another stack than the pipeline: CDK then exports the stream's
    ARN to it.

    Raises:
        StageNotMeterableError: ``stage`` is not backed by an ``AWS::ApiGateway::Stage`` of this app.
    """
    cfn_stage = stage if isinstance(stage, apigateway.CfnStage) else stage.node.default_child
    if not isinstance(cfn_stage, apigateway.CfnStage):
        raise StageNotMeterableError(f"{stage.node.path} is not an AWS::ApiGateway::Stage of this app")
    stream: firehose.CfnDeliveryStream = pipeline.delivery_stream
    cfn_stage.access_log_setting = apigateway.CfnStage.AccessLogSettingProperty(
        destination_arn=stream.attr_arn, format=pipeline.access_log_format
    )
