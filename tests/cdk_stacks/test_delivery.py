"""Delivery: the Firehose stream's name, processor, buffering, Iceberg destination and role come from the config."""

from __future__ import annotations

from typing import Any

from aws_cdk.assertions import Template

from cdk_stacks.delivery import DESTINATION_LOG_STREAM, TABLE_WRITE_PERMISSIONS
from meterlake.config import APIGATEWAY_STREAM_PREFIX, Config
from meterlake.schema import METERING_EVENT_SCHEMA
from tests.cdk_stacks.conftest import lake_bucket, only_resource, resources_of
from tests.cdk_stacks.iam_evaluation import Deployment


def _stream(templates: dict[str, Template]) -> dict[str, Any]:
    return only_resource(templates["MeterlakeDelivery"], "AWS::KinesisFirehose::DeliveryStream")


def _iceberg(templates: dict[str, Template]) -> dict[str, Any]:
    iceberg: dict[str, Any] = _stream(templates)["IcebergDestinationConfiguration"]
    return iceberg


def test_stream_name_has_the_api_gateway_prefix(templates: dict[str, Template]) -> None:
    stream = _stream(templates)
    assert stream["DeliveryStreamName"] == f"{APIGATEWAY_STREAM_PREFIX}metering-test"
    assert stream["DeliveryStreamType"] == "DirectPut"


def test_the_stream_is_encrypted_with_a_key_api_gateway_needs_no_permission_for(templates: dict[str, Template]) -> None:
    """SSE with an AWS-owned key: API Gateway's service-linked role puts the records, and since 2026-04-20 a stream
    encrypted with a customer-managed key requires its callers to hold kms:GenerateDataKey and kms:Decrypt."""
    assert _stream(templates)["DeliveryStreamEncryptionConfigurationInput"] == {"KeyType": "AWS_OWNED_CMK"}


def test_processor_parameters_come_from_config(templates: dict[str, Template]) -> None:
    (processor,) = _iceberg(templates)["ProcessingConfiguration"]["Processors"]
    assert processor["Type"] == "Lambda"
    parameters = {p["ParameterName"]: p["ParameterValue"] for p in processor["Parameters"]}
    assert parameters.pop("LambdaArn") == {
        "Fn::ImportValue": "MeterlakeTransform:ExportsOutputFnGetAttFunction76856677Arn23A30A4C"
    }
    assert parameters == {"BufferSizeInMBs": "0.5", "BufferIntervalInSeconds": "90", "NumberOfRetries": "7"}


def test_iceberg_destination_comes_from_config(
    templates: dict[str, Template], test_config: Config, deployment: Deployment
) -> None:
    iceberg = _iceberg(templates)
    assert iceberg["BufferingHints"] == {"IntervalInSeconds": 120, "SizeInMBs": 64}
    (table,) = iceberg["DestinationTableConfigurationList"]
    error_prefix = test_config.data_firehose_configuration.error_output_prefix
    assert table == {
        "DestinationDatabaseName": "usage_db",
        "DestinationTableName": "api_events",
        "UniqueKeys": ["request_id", "request_time"],
        "S3ErrorOutputPrefix": error_prefix,
    }
    assert sorted(table["UniqueKeys"]) == sorted(METERING_EVENT_SCHEMA.identifier_field_names())
    assert iceberg["S3Configuration"]["ErrorOutputPrefix"] == error_prefix
    bucket = lake_bucket(deployment)
    resolved = deployment.resolve("MeterlakeDelivery", iceberg)
    assert resolved["S3Configuration"]["BucketARN"] == f"arn:aws:s3:::{bucket}"
    assert resolved["CatalogConfiguration"]["WarehouseLocation"] == f"s3://{bucket}"
    # Upserts on request_id (dedup at write) need a stream that is not append-only.
    assert iceberg["AppendOnly"] is False
    assert iceberg["CloudWatchLoggingOptions"]["LogStreamName"] == DESTINATION_LOG_STREAM
    assert iceberg["RetryOptions"]["DurationInSeconds"] > 0


def test_role_is_granted_the_table_in_lake_formation_without_touching_admins(
    templates: dict[str, Template],
) -> None:
    template = templates["MeterlakeDelivery"]
    grant = only_resource(template, "AWS::LakeFormation::PrincipalPermissions")
    (role_id,) = resources_of(template, "AWS::IAM::Role")
    assert grant["Principal"] == {"DataLakePrincipalIdentifier": {"Fn::GetAtt": [role_id, "Arn"]}}
    assert grant["Resource"]["Table"] == {
        "CatalogId": {"Ref": "AWS::AccountId"},
        "DatabaseName": "usage_db",
        "Name": "api_events",
    }
    assert sorted(grant["Permissions"]) == sorted(TABLE_WRITE_PERMISSIONS)
    for name, found in templates.items():
        assert not resources_of(found, "AWS::LakeFormation::DataLakeSettings"), name


def test_role_names_exact_function_table_and_log_streams(templates: dict[str, Template]) -> None:
    role = only_resource(templates["MeterlakeDelivery"], "AWS::IAM::Role")
    statements = {s["Sid"]: s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]}
    assert statements["TransformLambda"]["Resource"] == {
        "Fn::ImportValue": "MeterlakeTransform:ExportsOutputFnGetAttFunction76856677Arn23A30A4C"
    }
    table_arns = [part["Fn::Join"][1][-1] for part in statements["MeteringTable"]["Resource"]]
    assert table_arns == [":catalog", ":database/usage_db", ":table/usage_db/api_events"]
    log_arns = [part["Fn::Join"][1][-1] for part in statements["DeliveryLogs"]["Resource"]]
    assert log_arns == [
        ":log-group:/aws/kinesisfirehose/amazon-apigateway-metering-test:log-stream:DestinationDelivery",
        ":log-group:/aws/kinesisfirehose/amazon-apigateway-metering-test:log-stream:BackupDelivery",
    ]
    log_group = only_resource(templates["MeterlakeDelivery"], "AWS::Logs::LogGroup")
    assert log_group == {"LogGroupName": "/aws/kinesisfirehose/amazon-apigateway-metering-test", "RetentionInDays": 90}
