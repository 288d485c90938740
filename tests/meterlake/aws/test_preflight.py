"""`meterlake aws preflight`: what a deploy would trip on, found before it starts (against moto)."""

from __future__ import annotations

import json
import sys
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from meterlake.aws.account import Account, connect
from meterlake.aws.preflight import IAM_ALLOWED_PRINCIPALS, Check, Outcome, preflight
from meterlake.aws.stacks import CDK_QUALIFIER
from meterlake.cli import main
from meterlake.config import Config, parse_config
from tests.meterlake.aws.conftest import REGION

ACCOUNT = "123456789012"
CDK_ROLE = f"arn:aws:iam::{ACCOUNT}:role/cdk-{CDK_QUALIFIER}-cfn-exec-role-{ACCOUNT}-{REGION}"


def iam_governed(lakeformation: Any) -> None:
    """Lake Formation's settings of an account that never set it up: IAM decides for new databases and tables."""
    everything = [{"Principal": {"DataLakePrincipalIdentifier": IAM_ALLOWED_PRINCIPALS}, "Permissions": ["ALL"]}]
    lakeformation.put_data_lake_settings(
        DataLakeSettings={
            "DataLakeAdmins": [],
            "CreateDatabaseDefaultPermissions": everything,
            "CreateTableDefaultPermissions": everything,
        }
    )


class LambdaAccountSettings:
    """Lambda's GetAccountSettings, which moto does not implement: the account's concurrency quota."""

    def __init__(self, concurrent_executions: int) -> None:
        self.concurrent_executions = concurrent_executions

    def get_account_settings(self) -> dict[str, Any]:
        limit = self.concurrent_executions
        return {"AccountLimit": {"ConcurrentExecutions": limit, "UnreservedConcurrentExecutions": limit}}


@pytest.fixture
def lambda_settings() -> LambdaAccountSettings:
    return LambdaAccountSettings(1000)


@pytest.fixture
def account(moto: None, lambda_settings: LambdaAccountSettings) -> Account:
    """A bootstrapped account whose catalog IAM governs, and which holds the Amberflo secret."""
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name=f"/cdk-bootstrap/{CDK_QUALIFIER}/version", Value="27", Type="String"
    )
    iam_governed(boto3.client("lakeformation", region_name=REGION))
    boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name="AmberfloApiKey", SecretString=json.dumps({"apiKey": "k"})
    )
    connected = connect(profile=None, region=REGION)
    return Account(
        account_id=connected.account_id,
        region=connected.region,
        client=lambda service: lambda_settings if service == "lambda" else connected.client(service),
    )


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_a_ready_account_passes(account: Account) -> None:
    checks = preflight(Config(), account)
    assert [c.outcome for c in checks] == [Outcome.OK] * len(checks), checks
    assert [c.name for c in checks] == [
        "cdk bootstrap",
        "Lake Formation",
        "Glue database",
        "delivery stream",
        "Amberflo API key",
        "Lambda concurrency",
    ]


def test_an_account_not_bootstrapped_is_told_the_command(account: Account) -> None:
    boto3.client("ssm", region_name=REGION).delete_parameter(Name=f"/cdk-bootstrap/{CDK_QUALIFIER}/version")
    check = by_name(preflight(Config(), account))["cdk bootstrap"]
    assert check.outcome is Outcome.FAIL
    assert f"cdk bootstrap aws://{ACCOUNT}/{REGION}" in check.detail


def test_lake_formation_must_trust_the_cdk_execution_role(account: Account) -> None:
    lakeformation = boto3.client("lakeformation", region_name=REGION)
    lakeformation.put_data_lake_settings(
        DataLakeSettings={
            "DataLakeAdmins": [],
            "CreateDatabaseDefaultPermissions": [],
            "CreateTableDefaultPermissions": [],
        }
    )
    refused = by_name(preflight(Config(), account))["Lake Formation"]
    assert refused.outcome is Outcome.FAIL
    assert CDK_ROLE in refused.detail
    assert "data lake administrator" in refused.detail
    lakeformation.put_data_lake_settings(
        DataLakeSettings={"DataLakeAdmins": [{"DataLakePrincipalIdentifier": CDK_ROLE}]}
    )
    checks = by_name(preflight(Config(), account))
    assert checks["Lake Formation"].outcome is Outcome.OK
    # Nothing in the stacks grants the people who query: Lake Formation then lets no one read the table.
    assert checks["Athena queries"].outcome is Outcome.WARN
    assert f"SELECT and DESCRIBE on {Config().database_name}.{Config().table_name}" in checks["Athena queries"].detail


def test_a_low_lambda_concurrency_quota_is_a_warning(account: Account, lambda_settings: LambdaAccountSettings) -> None:
    assert by_name(preflight(Config(), account))["Lambda concurrency"].outcome is Outcome.OK
    lambda_settings.concurrent_executions = 10
    check = by_name(preflight(Config(), account))["Lambda concurrency"]
    assert check.outcome is Outcome.WARN
    assert "at most 10 Lambda invocations" in check.detail
    assert "error prefix unmetered" in check.detail


def test_names_kept_or_taken_outside_the_stacks_fail_early(account: Account) -> None:
    config = parse_config({"data_firehose_configuration": {"s3_bucket": "kept-lake"}})
    assert by_name(preflight(config, account))["lake bucket"].outcome is Outcome.OK
    boto3.client("s3", region_name=REGION).create_bucket(Bucket="kept-lake")
    glue = boto3.client("glue", region_name=REGION)
    glue.create_database(DatabaseInput={"Name": config.database_name})
    checks = by_name(preflight(config, account))
    assert checks["lake bucket"].outcome is Outcome.FAIL
    assert "aws s3 rb s3://BUCKET --force" in checks["lake bucket"].detail
    assert checks["Glue database"].outcome is Outcome.FAIL
    assert config.database_name in checks["Glue database"].detail


def test_a_missing_amberflo_secret_is_a_warning_with_the_command(account: Account) -> None:
    boto3.client("secretsmanager", region_name=REGION).delete_secret(
        SecretId="AmberfloApiKey", ForceDeleteWithoutRecovery=True
    )
    check = by_name(preflight(Config(), account))["Amberflo API key"]
    assert check.outcome is Outcome.WARN
    assert "aws secretsmanager create-secret --name AmberfloApiKey" in check.detail
    assert '{"apiKey": "YOUR-AMBERFLO-KEY"}' in check.detail


def test_the_command_prints_each_check_and_fails_on_a_missing_prerequisite(
    account: Account, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from meterlake.aws import account as module

    monkeypatch.setattr(module, "connect", lambda **_: account)
    monkeypatch.setattr(sys, "argv", ["meterlake", "aws", "preflight", "--region", REGION])
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"account {ACCOUNT}, region {REGION}" in out
    assert "ok    Lake Formation:" in out
    boto3.client("lakeformation", region_name=REGION).put_data_lake_settings(
        DataLakeSettings={"DataLakeAdmins": [], "CreateDatabaseDefaultPermissions": []}
    )
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert "fail  Lake Formation:" in captured.out
    assert captured.err.splitlines() == ["error: 1 prerequisite(s) missing: Lake Formation"]


def test_no_region_is_one_line(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setattr(sys, "argv", ["meterlake", "aws", "preflight"])
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("error: no AWS region")


class GlueWithCatalogs:
    """moto's Glue client plus GetCatalog (moto lacks it), answering for the federated catalogs given."""

    def __init__(self, glue: Any, catalogs: dict[str, dict[str, Any]]) -> None:
        self._glue = glue
        self.catalogs = catalogs
        self.exceptions = glue.exceptions

    def get_catalog(self, CatalogId: str) -> dict[str, Any]:  # noqa: N803 - boto3's parameter name
        if CatalogId not in self.catalogs:
            error = {"Error": {"Code": "EntityNotFoundException", "Message": f"Catalog {CatalogId} not found"}}
            raise ClientError(error, "GetCatalog")
        return {"Catalog": self.catalogs[CatalogId]}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._glue, name)


def s3_tables_catalog(access_control: str) -> dict[str, Any]:
    """The ``s3tablescatalog`` catalog as the integration creates it in each access-control mode."""
    principal = IAM_ALLOWED_PRINCIPALS if access_control == "iam" else "arn:aws:iam::123456789012:role/admin"
    return {
        "Name": "s3tablescatalog",
        "CreateTableDefaultPermissions": [
            {"Principal": {"DataLakePrincipalIdentifier": principal}, "Permissions": ["ALL"]}
        ]
        if access_control == "iam"
        else [],
    }


@pytest.mark.parametrize(
    ("integrated", "configured", "outcome"),
    [
        (None, "iam", Outcome.FAIL),
        ("iam", "iam", Outcome.OK),
        ("lake_formation", "lake_formation", Outcome.OK),
        ("iam", "lake_formation", Outcome.FAIL),
        ("lake_formation", "iam", Outcome.FAIL),
    ],
)
def test_s3_tables_need_the_regions_integration_in_the_configured_mode(
    account: Account, integrated: str | None, configured: str, outcome: Outcome
) -> None:
    catalogs = {} if integrated is None else {"s3tablescatalog": s3_tables_catalog(integrated)}
    glue = GlueWithCatalogs(boto3.client("glue", region_name=REGION), catalogs)
    with_glue = Account(
        account_id=account.account_id,
        region=account.region,
        client=lambda service: glue if service == "glue" else account.client(service),
    )
    config = parse_config({"s3_tables": {"namespace_name": "usage", "access_control": configured}})
    checks = by_name(preflight(config, with_glue))
    assert "Glue database" not in checks
    check = checks["S3 Tables integration"]
    assert check.outcome is outcome, check
    if integrated is None:
        assert "not integrated with AWS analytics services" in check.detail
    elif outcome is Outcome.FAIL:
        assert f"s3_tables.access_control is {configured!r}" in check.detail


def test_s3_tables_under_lake_formation_need_the_cdk_role_as_administrator(account: Account) -> None:
    """The default catalog may still leave new databases to IAM (the moto account does): S3 Tables creates the table
    in its own catalog, so only a data lake administrator can grant on it."""
    glue = GlueWithCatalogs(
        boto3.client("glue", region_name=REGION), {"s3tablescatalog": s3_tables_catalog("lake_formation")}
    )
    with_glue = Account(
        account_id=account.account_id,
        region=account.region,
        client=lambda service: glue if service == "glue" else account.client(service),
    )
    config = parse_config({"s3_tables": {"namespace_name": "usage", "access_control": "lake_formation"}})
    checks = by_name(preflight(config, with_glue))
    assert checks["Lake Formation"].outcome is Outcome.FAIL
    assert "s3tablescatalog" in checks["Lake Formation"].detail
    assert checks["Athena queries"].outcome is Outcome.WARN
    assert (
        by_name(preflight(parse_config({"s3_tables": {"access_control": "iam"}}), with_glue))["Lake Formation"].outcome
        is Outcome.OK
    )
    boto3.client("lakeformation", region_name=REGION).put_data_lake_settings(
        DataLakeSettings={"DataLakeAdmins": [{"DataLakePrincipalIdentifier": CDK_ROLE}]}
    )
    assert by_name(preflight(config, with_glue))["Lake Formation"].outcome is Outcome.OK


def test_a_named_table_bucket_kept_by_an_earlier_deployment_fails_early(account: Account) -> None:
    glue = GlueWithCatalogs(boto3.client("glue", region_name=REGION), {"s3tablescatalog": s3_tables_catalog("iam")})
    with_glue = Account(
        account_id=account.account_id,
        region=account.region,
        client=lambda service: glue if service == "glue" else account.client(service),
    )
    config = parse_config({"s3_tables": {"table_bucket_name": "kept-metering"}})
    assert by_name(preflight(config, with_glue))["table bucket"].outcome is Outcome.OK
    boto3.client("s3tables", region_name=REGION).create_table_bucket(name="kept-metering")
    check = by_name(preflight(config, with_glue))["table bucket"]
    assert check.outcome is Outcome.FAIL
    assert "s3_tables.table_bucket_name" in check.detail
