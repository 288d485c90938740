"""Storage: the Glue Iceberg table is generated from meterlake.schema; the bucket is private, encrypted, expiring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Template
from pyiceberg.types import DecimalType, FixedType, ListType, StringType

from cdk_stacks.glue_iceberg import UnsupportedIcebergTypeError, glue_iceberg_type
from cdk_stacks.storage import ATHENA_RESULTS_PREFIX, StaticPrefixError, static_prefix
from meterlake.config import Config, parse_config
from meterlake.schema import METERING_EVENT_CREATION_SCHEMA, METERING_EVENT_PARTITION_SPEC, TABLE_PROPERTIES
from tests.cdk_stacks.conftest import TEST_CONTEXT, lake_bucket, only_resource, resources_of
from tests.cdk_stacks.iam_evaluation import Deployment


def _iceberg_table_input(templates: dict[str, Template]) -> dict[str, Any]:
    table = only_resource(templates["MeterlakeStorage"], "AWS::Glue::Table")
    iceberg: dict[str, Any] = table["OpenTableFormatInput"]["IcebergInput"]
    assert iceberg["MetadataOperation"] == "CREATE"
    assert iceberg["Version"] == "2"
    table_input: dict[str, Any] = iceberg["IcebergTableInput"]
    return table_input


def test_table_columns_are_the_schema_as_created(templates: dict[str, Template]) -> None:
    schema = _iceberg_table_input(templates)["Schema"]
    expected = [
        {"Id": f.field_id, "Name": f.name, "Type": str(f.field_type), "Required": f.required}
        for f in METERING_EVENT_CREATION_SCHEMA.fields
    ]
    actual = [{key: column[key] for key in ("Id", "Name", "Type", "Required")} for column in schema["Fields"]]
    assert actual == expected
    assert schema["IdentifierFieldIds"] == list(METERING_EVENT_CREATION_SCHEMA.identifier_field_ids)


#: The Glue table's schema, partition spec and properties as deployed tables were created with them.
DEPLOYED_TABLE_INPUT = Path(__file__).parent / "fixtures" / "glue-iceberg-table-input.json"


def test_the_glue_table_input_never_changes_under_a_deployed_table(templates: dict[str, Template]) -> None:
    """CloudFormation updates a changed AWS::Glue::Table through Glue's UpdateTable, which drops the table's Iceberg
    parameters (table_type, metadata_location): Athena and Firehose then no longer see an Iceberg table
    (aws-cloudformation/cloudformation-coverage-roadmap#1919 and #2495, both open). So the template keeps the input
    tables were created with, and a field added to the record reaches deployed tables by `meterlake aws evolve`."""
    table_input = _iceberg_table_input(templates)
    synthesized = {key: table_input[key] for key in ("Schema", "PartitionSpec", "Properties")}
    assert synthesized == json.loads(DEPLOYED_TABLE_INPUT.read_text()), (
        "the Glue table's Iceberg input changed: a deployed stack's update would break its table. Keep the created "
        f"input ({DEPLOYED_TABLE_INPUT.name}) and evolve deployed tables instead; synthesized:\n"
        + json.dumps(synthesized, indent=2, sort_keys=True)
    )


def test_table_partition_spec_is_the_schema_spec(templates: dict[str, Template]) -> None:
    spec = _iceberg_table_input(templates)["PartitionSpec"]
    expected = [
        {"Name": f.name, "SourceId": f.source_id, "Transform": "day", "FieldId": f.field_id}
        for f in METERING_EVENT_PARTITION_SPEC.fields
    ]
    assert spec["Fields"] == expected


def test_table_names_location_and_properties_come_from_config(
    templates: dict[str, Template], test_config: Config, deployment: Deployment
) -> None:
    table = only_resource(templates["MeterlakeStorage"], "AWS::Glue::Table")
    assert (table["DatabaseName"], table["Name"]) == ("usage_db", "api_events")
    table_input = _iceberg_table_input(templates)
    # Under the output prefix, in a folder of this stack's own: a table redeployed after `cdk destroy` never shares
    # its location with the retained files of the earlier one (which Glue's orphan-file optimizer would delete).
    stack_uuid = deployment.stack_ids["MeterlakeStorage"].rsplit("/", 1)[1]
    location = deployment.resolve("MeterlakeStorage", table_input["Location"])
    assert location == f"s3://{lake_bucket(deployment)}/lake/usage_db/api_events/{stack_uuid}"
    assert table_input["Properties"] == {k: v for k, v in TABLE_PROPERTIES.items() if k != "format-version"}
    database = only_resource(templates["MeterlakeStorage"], "AWS::Glue::Database")
    assert database["DatabaseInput"]["Name"] == test_config.database_name


def test_the_table_is_created_after_the_bucket_it_writes_its_metadata_to(templates: dict[str, Template]) -> None:
    """Glue writes the table's first metadata file under its location on creation: the bucket must exist first."""
    template = templates["MeterlakeStorage"]
    (bucket_id,) = [lid for lid in resources_of(template, "AWS::S3::Bucket") if lid.startswith("LakeBucket")]
    (table,) = resources_of(template, "AWS::Glue::Table").values()
    assert bucket_id in table["DependsOn"]
    location = table["Properties"]["OpenTableFormatInput"]["IcebergInput"]["IcebergTableInput"]["Location"]
    assert {"Ref": bucket_id} in location["Fn::Join"][1]


def test_lake_bucket_is_private_encrypted_logged_and_expires_error_output(templates: dict[str, Template]) -> None:
    buckets = resources_of(templates["MeterlakeStorage"], "AWS::S3::Bucket")
    (lake,) = [b["Properties"] for lid, b in buckets.items() if lid.startswith("LakeBucket")]
    assert lake["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "AES256"
    }
    assert lake["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert "DestinationBucketName" in lake["LoggingConfiguration"]
    expiring = {rule.get("Prefix"): rule.get("ExpirationInDays") for rule in lake["LifecycleConfiguration"]["Rules"]}
    assert expiring["failed/records/"] == 9
    assert expiring[ATHENA_RESULTS_PREFIX] == 9
    policies = resources_of(templates["MeterlakeStorage"], "AWS::S3::BucketPolicy")
    denies_insecure = [
        statement
        for policy in policies.values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if statement["Effect"] == "Deny" and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    ]
    assert len(denies_insecure) == len(buckets)


@pytest.mark.parametrize(
    ("prefix", "static"),
    [
        ("error/year=!{timestamp:yyyy}/!{firehose:error-output-type}", "error/"),
        ("a/b/c!{timestamp:yyyy}/", "a/b/"),
        ("errors/", "errors/"),
    ],
)
def test_static_prefix(prefix: str, static: str) -> None:
    assert static_prefix(prefix) == static


@pytest.mark.parametrize("prefix", ["!{firehose:error-output-type}/", "err!{timestamp:yyyy}"])
def test_prefix_without_static_folder_is_refused(prefix: str) -> None:
    with pytest.raises(StaticPrefixError, match="no static folder"):
        static_prefix(prefix)


def test_glue_type_names() -> None:
    assert glue_iceberg_type(StringType()) == "string"
    assert glue_iceberg_type(DecimalType(9, 2)) == "decimal(9,2)"
    assert glue_iceberg_type(FixedType(16)) == "fixed[16]"
    with pytest.raises(UnsupportedIcebergTypeError):
        glue_iceberg_type(ListType(element_id=1, element_type=StringType()))


FIREHOSE: dict[str, object] = TEST_CONTEXT["data_firehose_configuration"]

#: Properties that give a resource a fixed physical name; a retained resource with one blocks the next deploy.
NAME_PROPERTIES = (
    "BucketName",
    "LogGroupName",
    "LogStreamName",
    "QueueName",
    "TopicName",
    "FunctionName",
    "RoleName",
    "DeliveryStreamName",
    "Name",
)
#: What `cdk destroy` must leave behind: usage data, the policies that keep it TLS-only and access-logged, and the
#: users who own it (README, "What survives cdk destroy").
RETAINED = {"AWS::S3::Bucket", "AWS::S3::BucketPolicy", "AWS::Cognito::UserPool"}


def test_destroy_keeps_the_data_and_nothing_retained_blocks_a_redeploy(templates: dict[str, Template]) -> None:
    retained = []
    for stack, template in templates.items():
        for logical_id, resource in template.to_json()["Resources"].items():
            kept = resource.get("DeletionPolicy", "Delete") != "Delete"
            assert kept == (resource["Type"] in RETAINED), f"{stack}/{logical_id} ({resource['Type']})"
            if kept:
                named = [p for p in NAME_PROPERTIES if p in resource.get("Properties", {})]
                assert named == [], f"{stack}/{logical_id} is retained with a fixed name: {named}"
                retained.append(resource["Type"])
    assert sorted(retained) == ["AWS::Cognito::UserPool", *["AWS::S3::Bucket"] * 2, *["AWS::S3::BucketPolicy"] * 2]


def test_a_lake_bucket_named_in_the_config_is_that_name_everywhere() -> None:
    """``s3_bucket`` names the bucket (the one retained resource with a name: the README says how to redeploy)."""
    from aws_cdk import App

    from cdk_stacks.app import FEATURE_FLAGS
    from cdk_stacks.storage import StorageStack

    app = App(context=FEATURE_FLAGS)
    named = parse_config({**TEST_CONTEXT, "data_firehose_configuration": {**FIREHOSE, "s3_bucket": "my-metering-lake"}})
    stack = StorageStack(app, "Named", config=named)
    template = Template.from_stack(stack).to_json()
    deployment = Deployment({"Named": template})
    ((bucket_id, bucket),) = [
        (lid, b) for lid, b in deployment.resources("Named", "AWS::S3::Bucket").items() if lid.startswith("LakeBucket")
    ]
    assert bucket["Properties"]["BucketName"] == "my-metering-lake"
    assert deployment.attribute("Named", bucket_id, "Ref") == "my-metering-lake"
    (table,) = deployment.resources("Named", "AWS::Glue::Table").values()
    location = table["Properties"]["OpenTableFormatInput"]["IcebergInput"]["IcebergTableInput"]["Location"]
    assert deployment.resolve("Named", location).startswith("s3://my-metering-lake/lake/usage_db/api_events/")
