"""Region and profile resolution (issue 13, defect 2): as boto3 and the AWS CLI resolve them, and said aloud.

`--athena` and `--cognito-client-id` used to refuse a region that only the profile's config file names.
"""

from __future__ import annotations

from pathlib import Path

import boto3  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner

from meterlake.aws import MissingRegionError, aws_session, resolve_region
from meterlake.cli import app
from tests.meterlake.aws.test_cli_aws import RecordingServer, api  # noqa: F401 - the stand-in API fixture

runner = CliRunner()
PROFILE_REGION = "eu-west-3"


@pytest.fixture
def profile_config(aws_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file whose profile ``dev`` names a region, and no region in the environment."""
    path = tmp_path / "aws-config"
    path.write_text(
        f"[default]\noutput = json\n\n[profile dev]\nregion = {PROFILE_REGION}\n"
        "aws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(path))
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    return path


@pytest.mark.parametrize("how", ["--profile", "AWS_PROFILE"])
def test_query_on_athena_takes_the_profiles_region(
    profile_config: Path, moto: None, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    athena = boto3.client("athena", region_name=PROFILE_REGION)
    athena.create_work_group(Name="wg", Configuration={})
    args = ["query", "usage_per_tenant_day", "--athena", "--workgroup", "wg", "--format", "json"]
    if how == "--profile":
        args += ["--profile", "dev"]
    else:
        monkeypatch.setenv("AWS_PROFILE", "dev")

    result = runner.invoke(app, args)

    assert result.exit_code == 0, (result.output, result.exception)
    assert len(athena.list_query_executions(WorkGroup="wg")["QueryExecutionIds"]) == 1
    assert f"AWS region {PROFILE_REGION} (from profile dev in {profile_config}), profile dev" in result.stderr


def test_the_environment_wins_over_the_profile_and_the_option_over_both(
    profile_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert aws_session(profile="dev", region=None, option="--region").region.name == PROFILE_REGION
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert aws_session(profile="dev", region=None, option="--region").region.source == "$AWS_DEFAULT_REGION"
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    session = aws_session(profile="dev", region=None, option="--region")
    assert (session.region.name, session.region.source) == ("us-west-2", "$AWS_REGION")
    assert aws_session(profile="dev", region="sa-east-1", option="--region").region.name == "sa-east-1"


def test_no_region_anywhere_names_every_place_to_set_one() -> None:
    with pytest.raises(MissingRegionError, match="give --region, set AWS_REGION or AWS_DEFAULT_REGION, or set region"):
        resolve_region(None, option="--region", environ={})


def test_the_cognito_sign_in_takes_the_profiles_region(
    profile_config: Path,
    moto: None,
    api: RecordingServer,  # noqa: F811
) -> None:
    cognito = boto3.client("cognito-idp", region_name=PROFILE_REGION)
    pool = cognito.create_user_pool(PoolName="p")["UserPool"]["Id"]
    client_id = cognito.create_user_pool_client(
        UserPoolId=pool, ClientName="c", ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"]
    )["UserPoolClient"]["ClientId"]
    cognito.admin_create_user(UserPoolId=pool, Username="alice", MessageAction="SUPPRESS")
    cognito.admin_set_user_password(UserPoolId=pool, Username="alice", Password="Pa55word!long", Permanent=True)

    result = runner.invoke(
        app,
        [
            *("load-test", "--apigw-invoke-url", api.url, "--cognito-client-id", client_id, "--user", "alice"),
            *("--password", "Pa55word!long", "--profile", "dev", "--max-count", "2"),
        ],
    )

    assert result.exit_code == 0, (result.output, result.exception)
    assert f"AWS region {PROFILE_REGION} (from profile dev" in result.stderr
