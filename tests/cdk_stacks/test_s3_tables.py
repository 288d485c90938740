"""S3 Tables: the AWS sample's v3 context file synthesizes to an S3 table bucket, namespace and table generated from the
one schema, a stream writing it through Glue's s3tablescatalog federation, and readers that find it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App, Stack
from aws_cdk import aws_iam as iam
from aws_cdk.assertions import Template

from cdk_stacks.app import FEATURE_FLAGS, MeterlakeStacks
from cdk_stacks.delivery import grant_table_access
from cdk_stacks.forwarding import STAGER_HANDLER
from cdk_stacks.storage import MeteringTable
from meterlake.aws import staging
from meterlake.aws.stacks import STACK_NAMES
from meterlake.config import Config, parse_config
from meterlake.schema import METERING_EVENT_CREATION_SCHEMA, METERING_EVENT_PARTITION_SPEC
from tests.cdk_stacks.conftest import SAMPLE_V3_CONTEXT
from tests.cdk_stacks.iam_evaluation import ACCOUNT, PARTITION, REGION, AwsCall, Deployment
from tests.cdk_stacks.test_app import CFN_LINT
from tests.cdk_stacks.test_iam_behaviour import SECURE, _denied, _function, _role_of, _s3_table

STORAGE = "MeterlakeStorage"


def test_the_sample_v3_context_selects_s3_tables(s3_tables_config: Config) -> None:
    raw = json.loads(SAMPLE_V3_CONTEXT.read_text())
    assert s3_tables_config.s3_tables is not None
    assert (s3_tables_config.database_name, s3_tables_config.table_name) == (
        raw["s3_tables"]["namespace_name"],
        raw["s3_tables"]["table_name"],
    )
    assert s3_tables_config.s3_tables.access_control == "iam"


def test_the_table_is_the_schema_in_a_kept_table_bucket(s3_tables_deployment: Deployment) -> None:
    (bucket,) = s3_tables_deployment.resources(STORAGE, "AWS::S3Tables::TableBucket").values()
    (namespace,) = s3_tables_deployment.resources(STORAGE, "AWS::S3Tables::Namespace").values()
    (table,) = s3_tables_deployment.resources(STORAGE, "AWS::S3Tables::Table").values()
    # Deleting an S3 table deletes its data: all three are kept by `cdk destroy`.
    assert {r["DeletionPolicy"] for r in (bucket, namespace, table)} == {"Retain"}
    # Named after the stack's id, so a redeploy never meets the kept bucket's name.
    name = s3_tables_deployment.resolve(STORAGE, bucket["Properties"]["TableBucketName"])
    stack_uuid = s3_tables_deployment.stack_ids[STORAGE].rsplit("/", 1)[1]
    assert name == f"meterlake-{stack_uuid.split('-')[0]}"
    metadata = table["Properties"]["IcebergMetadata"]
    schema = metadata["IcebergSchemaV2"]
    assert [(f["Id"], f["Name"], f["Type"], f["Required"]) for f in schema["SchemaV2FieldList"]] == [
        (f.field_id, f.name, str(f.field_type), f.required) for f in METERING_EVENT_CREATION_SCHEMA.fields
    ]
    assert schema["IdentifierFieldIds"] == list(METERING_EVENT_CREATION_SCHEMA.identifier_field_ids)
    assert metadata["IcebergPartitionSpec"]["Fields"] == [
        {"Name": f.name, "SourceId": f.source_id, "Transform": "day", "FieldId": f.field_id}
        for f in METERING_EVENT_PARTITION_SPEC.fields
    ]
    assert table["Properties"]["Compaction"] == {"Status": "enabled"}
    # No Glue table or optimizers: S3 Tables keeps the table compacted and its snapshots expired itself.
    assert s3_tables_deployment.resources(STORAGE, "AWS::Glue::Table") == {}
    assert s3_tables_deployment.resources("MeterlakeAnalytics", "AWS::Glue::TableOptimizer") == {}


#: The S3 table's IcebergMetadata as deployed: CloudFormation treats it as create-only.
DEPLOYED_METADATA = Path(__file__).parent / "fixtures" / "s3-tables-iceberg-metadata.json"


def test_the_s3_tables_metadata_never_changes_under_a_deployed_table(s3_tables_deployment: Deployment) -> None:
    """AWS::S3Tables::Table's IcebergMetadata is create-only: any change (a field, a doc string) makes CloudFormation
    replace the table, and the replacement fails on the name of the retained one. So the template keeps the metadata
    tables were created with, and a changed record reaches deployed tables by schema evolution (README: "Schema
    evolution", `meterlake aws evolve`), never through this property."""
    (table,) = s3_tables_deployment.resources(STORAGE, "AWS::S3Tables::Table").values()
    deployed = json.loads(DEPLOYED_METADATA.read_text())
    synthesized = table["Properties"]["IcebergMetadata"]
    assert synthesized == deployed, (
        "the S3 table's IcebergMetadata changed: a deployed stack would try to replace its table and fail. Keep "
        f"the created metadata ({DEPLOYED_METADATA.name}) and evolve deployed tables instead; synthesized:\n"
        + json.dumps(synthesized, indent=2, sort_keys=True)
    )


def test_the_stream_writes_the_namespace_through_the_table_buckets_catalog(s3_tables_deployment: Deployment) -> None:
    (stream,) = s3_tables_deployment.resources("MeterlakeDelivery", "AWS::KinesisFirehose::DeliveryStream").values()
    iceberg = s3_tables_deployment.resolve("MeterlakeDelivery", stream["Properties"]["IcebergDestinationConfiguration"])
    bucket, _, _ = _s3_table(s3_tables_deployment)
    # No warehouse: S3 Tables decides where an S3 table's files go.
    assert iceberg["CatalogConfiguration"] == {
        "CatalogArn": f"arn:{PARTITION}:glue:{REGION}:{ACCOUNT}:catalog/s3tablescatalog/{bucket}"
    }
    (table,) = iceberg["DestinationTableConfigurationList"]
    assert (table["DestinationDatabaseName"], table["DestinationTableName"]) == (
        "restapi_access_log_namespace",
        "restapi_access_log_iceberg",
    )
    # IAM access control (the sample's and the console's default): no Lake Formation grants to make.
    assert s3_tables_deployment.resources("MeterlakeDelivery", "AWS::LakeFormation::Permissions") == {}
    assert s3_tables_deployment.resources("MeterlakeDelivery", "AWS::LakeFormation::PrincipalPermissions") == {}


def test_named_queries_name_the_table_in_its_catalog(s3_tables_deployment: Deployment) -> None:
    bucket, _, _ = _s3_table(s3_tables_deployment)
    queries = s3_tables_deployment.resources("MeterlakeAnalytics", "AWS::Athena::NamedQuery").values()
    assert queries
    for query in queries:
        sql = s3_tables_deployment.resolve("MeterlakeAnalytics", query["Properties"]["QueryString"])
        assert f'"s3tablescatalog/{bucket}"."restapi_access_log_namespace"."restapi_access_log_iceberg"' in sql


def test_the_stager_reads_the_s3_table_through_its_own_api(s3_tables_deployment: Deployment) -> None:
    """The stager reads S3 Tables' Iceberg endpoint: S3 Tables' read actions on the bucket and table authorize
    metadata and files; it needs no Glue or Lake Formation permission."""
    stack = "MeterlakeForwarding"
    _, function = _function(s3_tables_deployment, stack, STAGER_HANDLER)
    env = s3_tables_deployment.resolve(stack, function["Environment"]["Variables"])
    bucket, bucket_arn, table_arn = _s3_table(s3_tables_deployment)
    assert env[staging.ENV_TABLE_BUCKET_ARN] == bucket_arn
    settings = staging.StagerSettings.from_env(env)
    assert (settings.database, settings.table) == ("restapi_access_log_namespace", "restapi_access_log_iceberg")
    properties = staging.s3_tables_catalog_properties(bucket_arn, REGION)
    assert properties["uri"] == f"https://s3tables.{REGION}.amazonaws.com/iceberg"
    assert (properties["warehouse"], properties["rest.signing-name"]) == (bucket_arn, "s3tables")
    reads = [
        AwsCall(f"s3tables:{action}", (bucket_arn, table_arn), SECURE, "loads the table and reads its files")
        for action in ("GetTableBucket", "GetNamespace", "GetTable", "GetTableMetadataLocation", "GetTableData")
    ]
    assert _denied(s3_tables_deployment, stack, _role_of(function), reads) == []
    policies = json.dumps([p.document for p in s3_tables_deployment.role_policies(stack, _role_of(function))])
    assert "glue:" not in policies
    assert "lakeformation:" not in policies
    assert bucket in policies


def test_every_template_passes_cfn_lint(s3_tables_stacks: MeterlakeStacks) -> None:
    outdir = Path(s3_tables_stacks.app.outdir)
    paths = [str(outdir / f"{name}.template.json") for name in STACK_NAMES]
    result = subprocess.run(
        [str(CFN_LINT), "--ignore-checks", "W3005", "--", *paths], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_lake_formation_access_control_grants_the_table_in_the_buckets_catalog() -> None:
    """Where the account integrated its table buckets with Lake Formation, the roles get DESCRIBE on the namespace
    and their permissions on the table, in catalog ``<account>:s3tablescatalog/<bucket>``."""
    raw: dict[str, Any] = json.loads(SAMPLE_V3_CONTEXT.read_text())
    raw["s3_tables"] = {**raw["s3_tables"], "table_bucket_name": "metering-lake", "access_control": "lake_formation"}
    config = parse_config(raw)
    stack = Stack(App(context=FEATURE_FLAGS), "Grants")
    role = iam.Role(stack, "Role", assumed_by=iam.ServicePrincipal("firehose.amazonaws.com"))
    table = MeteringTable(
        database_name=config.database_name,
        table_name=config.table_name,
        table_bucket_name="metering-lake",
        table_arn="arn:aws:s3tables:us-east-1:123456789012:bucket/metering-lake/table/t-1",
    )
    grants = grant_table_access(stack, "Grant", role=role, table=table, config=config, permissions=("ALL",))
    assert len(grants) == 2
    template = Template.from_stack(stack).to_json()
    properties = [
        r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::LakeFormation::Permissions"
    ]
    catalog = {"Fn::Join": ["", [{"Ref": "AWS::AccountId"}, ":s3tablescatalog/metering-lake"]]}
    assert sorted(p["Permissions"] for p in properties) == [["ALL"], ["DESCRIBE"]]
    properties.sort(key=lambda p: p["Permissions"] != ["DESCRIBE"])
    assert properties[0]["Resource"]["DatabaseResource"] == {"CatalogId": catalog, "Name": config.database_name}
    assert properties[1]["Resource"]["TableResource"] == {
        "CatalogId": catalog,
        "DatabaseName": config.database_name,
        "Name": config.table_name,
    }
    iam_only = parse_config({**raw, "s3_tables": {**raw["s3_tables"], "access_control": "iam"}})
    assert grant_table_access(stack, "None", role=role, table=table, config=iam_only) == []


@pytest.mark.parametrize("name", ["aws_usage", "Upper", "with-hyphen", "_usage", "usage_"])
def test_s3_tables_names_follow_s3_tables_rules(name: str) -> None:
    from meterlake.config import ConfigError

    for key in ("namespace_name", "table_name"):
        with pytest.raises(ConfigError, match=rf"s3_tables\.{key}"):
            parse_config({"s3_tables": {key: name}})


@pytest.mark.parametrize(
    "name",
    ["xn--usage", "sthree-usage", "amzn-s3-demo-usage", "aws-usage", "usage-s3alias", "usage--ol-s3", "usage--x-s3",
     "usage--table-s3", "-usage", "usage-", "Usage", "us"],
)  # fmt: skip
def test_table_bucket_names_follow_s3_tables_rules(name: str) -> None:
    from meterlake.config import ConfigError

    with pytest.raises(ConfigError, match=r"s3_tables\.table_bucket_name"):
        parse_config({"s3_tables": {"table_bucket_name": name}})
    assert parse_config({"s3_tables": {"table_bucket_name": "usage-2026"}}).s3_tables is not None


@pytest.mark.parametrize("variant", ["glue", "s3_tables"])
def test_every_output_meterlake_aws_check_reads_is_synthesized(
    variant: str,
    deployment: Deployment,
    s3_tables_deployment: Deployment,
    test_config: Config,
    s3_tables_config: Config,
) -> None:
    """The check's list of outputs and the stacks' outputs are one fact: each output it needs exists, per variant."""
    from meterlake.aws.check import required_outputs

    built, config = (deployment, test_config) if variant == "glue" else (s3_tables_deployment, s3_tables_config)
    for stack, names in required_outputs(config).items():
        assert set(names) <= set(built.templates[stack].get("Outputs", {})), stack
