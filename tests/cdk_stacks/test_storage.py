"""Storage: the Glue Iceberg table is generated from meterlake.schema; the bucket is private, encrypted, expiring."""

from __future__ import annotations

from typing import Any

import pytest
from aws_cdk.assertions import Template
from pyiceberg.types import DecimalType, FixedType, ListType, StringType

from cdk_stacks.glue_iceberg import UnsupportedIcebergTypeError, glue_iceberg_type
from cdk_stacks.storage import ATHENA_RESULTS_PREFIX, StaticPrefixError, static_prefix
from meterlake.config import Config
from meterlake.schema import METERING_EVENT_PARTITION_SPEC, METERING_EVENT_SCHEMA, TABLE_PROPERTIES
from tests.cdk_stacks.conftest import only_resource, resources_of


def _iceberg_table_input(templates: dict[str, Template]) -> dict[str, Any]:
    table = only_resource(templates["MeterlakeStorage"], "AWS::Glue::Table")
    iceberg: dict[str, Any] = table["OpenTableFormatInput"]["IcebergInput"]
    assert iceberg["MetadataOperation"] == "CREATE"
    assert iceberg["Version"] == "2"
    table_input: dict[str, Any] = iceberg["IcebergTableInput"]
    return table_input


def test_table_columns_are_the_schema(templates: dict[str, Template]) -> None:
    schema = _iceberg_table_input(templates)["Schema"]
    expected = [
        {"Id": f.field_id, "Name": f.name, "Type": str(f.field_type), "Required": f.required}
        for f in METERING_EVENT_SCHEMA.fields
    ]
    actual = [{key: column[key] for key in ("Id", "Name", "Type", "Required")} for column in schema["Fields"]]
    assert actual == expected
    assert schema["IdentifierFieldIds"] == list(METERING_EVENT_SCHEMA.identifier_field_ids)


def test_table_partition_spec_is_the_schema_spec(templates: dict[str, Template]) -> None:
    spec = _iceberg_table_input(templates)["PartitionSpec"]
    expected = [
        {"Name": f.name, "SourceId": f.source_id, "Transform": "day", "FieldId": f.field_id}
        for f in METERING_EVENT_PARTITION_SPEC.fields
    ]
    assert spec["Fields"] == expected


def test_table_names_location_and_properties_come_from_config(
    templates: dict[str, Template], test_config: Config
) -> None:
    table = only_resource(templates["MeterlakeStorage"], "AWS::Glue::Table")
    assert (table["DatabaseName"], table["Name"]) == ("usage_db", "api_events")
    table_input = _iceberg_table_input(templates)
    assert table_input["Location"] == "s3://meterlake-test-lake/lake/usage_db/api_events"
    assert table_input["Properties"] == {k: v for k, v in TABLE_PROPERTIES.items() if k != "format-version"}
    database = only_resource(templates["MeterlakeStorage"], "AWS::Glue::Database")
    assert database["DatabaseInput"]["Name"] == test_config.database_name


def test_lake_bucket_is_private_encrypted_logged_and_expires_error_output(templates: dict[str, Template]) -> None:
    buckets = resources_of(templates["MeterlakeStorage"], "AWS::S3::Bucket")
    (lake,) = [b["Properties"] for b in buckets.values() if b["Properties"].get("BucketName") == "meterlake-test-lake"]
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
