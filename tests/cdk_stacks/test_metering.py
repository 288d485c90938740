"""A user's own API stages, in their own stacks, send their access logs to the pipeline's stream in the rendered
format: several APIs feed one pipeline (the access log's api_id tells them apart)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from aws_cdk import App, Stack
from aws_cdk import aws_apigateway as apigateway

from cdk_stacks.app import FEATURE_FLAGS, MeterlakeStacks
from cdk_stacks.metering import StageNotMeterableError, meter_stage
from meterlake.records import FIELDS_BY_NAME, render_access_log_format
from tests.cdk_stacks.iam_evaluation import Deployment
from tests.cdk_stacks.test_app import CFN_LINT
from tests.cdk_stacks.user_apis import USER_API_STACKS


def _user_templates(cdk_outdir: Path) -> dict[str, dict[str, object]]:
    return {name: json.loads((cdk_outdir / f"{name}.template.json").read_text()) for name, _ in USER_API_STACKS}


def test_each_user_stage_logs_to_the_pipelines_stream_in_the_rendered_format(
    stacks: MeterlakeStacks, cdk_outdir: Path, deployment: Deployment
) -> None:
    (stream_id,) = deployment.resources("MeterlakeDelivery", "AWS::KinesisFirehose::DeliveryStream")
    stream_arn = deployment.attribute("MeterlakeDelivery", stream_id, "Arn")
    user_deployment = Deployment({**deployment.templates, **_user_templates(cdk_outdir)})
    for name, stage_name in USER_API_STACKS:
        (stage,) = user_deployment.resources(name, "AWS::ApiGateway::Stage").values()
        properties = user_deployment.resolve(name, stage["Properties"])
        assert properties["StageName"] == stage_name
        assert properties["AccessLogSetting"] == {"DestinationArn": stream_arn, "Format": render_access_log_format()}
    assert "api_id" in FIELDS_BY_NAME  # what tells the APIs apart in the table


def test_user_stacks_deploy_after_the_pipeline_and_pass_cfn_lint(stacks: MeterlakeStacks, cdk_outdir: Path) -> None:
    manifest = json.loads((cdk_outdir / "manifest.json").read_text())
    for name, _ in USER_API_STACKS:
        assert "MeterlakeDelivery" in manifest["artifacts"][name]["dependencies"]
    paths = [str(cdk_outdir / f"{name}.template.json") for name, _ in USER_API_STACKS]
    result = subprocess.run(
        [str(CFN_LINT), "--ignore-checks", "W3005", "--", *paths], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_stage_this_app_does_not_own_cannot_be_metered(stacks: MeterlakeStacks) -> None:
    app = App(context=FEATURE_FLAGS)
    stack = Stack(app, "Imported")
    api = apigateway.RestApi.from_rest_api_id(stack, "Api", "a1b2c3d4e5")
    imported = apigateway.Stage.from_stage_attributes(stack, "Stage", rest_api=api, stage_name="prod")
    with pytest.raises(StageNotMeterableError, match="not an AWS::ApiGateway::Stage of this app"):
        meter_stage(imported, stacks.delivery.delivery)  # type: ignore[arg-type]
