"""Delivery: the Firehose stream that receives the API's access logs and upserts metering events into Iceberg."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from aws_cdk import ArnFormat, CfnOutput, CfnResource, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kinesisfirehose as firehose
from aws_cdk import aws_lakeformation as lakeformation
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from cdk_stacks.shared import acknowledge, acknowledge_resources, log_retention
from cdk_stacks.storage import MeteringTable
from meterlake.config import Config
from meterlake.schema import METERING_EVENT_SCHEMA

#: How long Firehose retries a failed Iceberg commit before the records go to the error output prefix.
RETRY_DURATION_SECONDS: Final = 300
#: What a principal needs on the table to write it: Glue reads the table, Firehose commits (insert/update/delete).
TABLE_WRITE_PERMISSIONS: Final = ("SELECT", "INSERT", "DELETE", "DESCRIBE", "ALTER")
#: What Firehose needs on an S3 table Lake Formation governs ("Caller is required to have ALL permissions").
S3_TABLE_WRITE_PERMISSIONS: Final = ("ALL",)
#: What Firehose does with an S3 table through S3 Tables' own API: read its metadata, commit new metadata and data.
S3_TABLES_WRITE_ACTIONS: Final = (
    "s3tables:GetTableBucket",
    "s3tables:GetNamespace",
    "s3tables:GetTable",
    "s3tables:GetTableMetadataLocation",
    "s3tables:UpdateTableMetadataLocation",
    "s3tables:GetTableData",
    "s3tables:PutTableData",
)
#: The log streams of the delivery stream's destination (Iceberg) and S3 backup (failed records) logs.
DESTINATION_LOG_STREAM: Final = "DestinationDelivery"
BACKUP_LOG_STREAM: Final = "BackupDelivery"
#: lakeformation:GetDataAccess has no resource-level permissions: AWS only accepts "*" for it.
UNSCOPABLE_ACTIONS: Final = ("lakeformation:GetDataAccess",)


def grant_table_access(
    scope: Construct,
    construct_id: str,
    *,
    role: iam.IRole,
    table: MeteringTable,
    config: Config,
    permissions: Sequence[str] = TABLE_WRITE_PERMISSIONS,
) -> list[CfnResource]:
    """Lake Formation permissions on the table for ``role``, where Lake Formation governs it; the grants made.

    A Glue table gets one grant, leaving the account's LF admins untouched; CloudFormation's role created the table
    and so may grant on it. An S3 table is governed by Lake Formation only where the account integrated its table
    buckets with Lake Formation (``s3_tables.access_control``); it then takes DESCRIBE on the namespace and the
    permissions on the table, in the bucket's federated catalog. ``AWS::LakeFormation::Permissions`` is used there:
    ``PrincipalPermissions`` refuses a catalog id longer than an account id.
    """
    stack = Stack.of(scope)
    if not table.in_table_bucket:
        return [
            lakeformation.CfnPrincipalPermissions(
                scope,
                construct_id,
                principal=lakeformation.CfnPrincipalPermissions.DataLakePrincipalProperty(
                    data_lake_principal_identifier=role.role_arn
                ),
                resource=lakeformation.CfnPrincipalPermissions.ResourceProperty(
                    table=lakeformation.CfnPrincipalPermissions.TableResourceProperty(
                        catalog_id=stack.account, database_name=table.database_name, name=table.table_name
                    )
                ),
                permissions=list(permissions),
                permissions_with_grant_option=[],
            )
        ]
    if config.s3_tables is None or config.s3_tables.access_control != "lake_formation":
        return []
    catalog_id = table.lake_formation_catalog_id(stack)
    principal = lakeformation.CfnPermissions.DataLakePrincipalProperty(data_lake_principal_identifier=role.role_arn)
    namespace = lakeformation.CfnPermissions(
        scope,
        f"{construct_id}Namespace",
        data_lake_principal=principal,
        resource=lakeformation.CfnPermissions.ResourceProperty(
            database_resource=lakeformation.CfnPermissions.DatabaseResourceProperty(
                catalog_id=catalog_id, name=table.database_name
            )
        ),
        permissions=["DESCRIBE"],
    )
    on_table = lakeformation.CfnPermissions(
        scope,
        construct_id,
        data_lake_principal=principal,
        resource=lakeformation.CfnPermissions.ResourceProperty(
            table_resource=lakeformation.CfnPermissions.TableResourceProperty(
                catalog_id=catalog_id, database_name=table.database_name, name=table.table_name
            )
        ),
        permissions=list(permissions),
    )
    return [namespace, on_table]


def _mb(value: float) -> str:
    """A size as Firehose's processor parameters take it: ``3``, ``0.2``."""
    return f"{value:g}"


class AccessLogDelivery(Construct):
    """The Firehose service role, its Lake Formation grant, its log group and the delivery stream.

    Args:
        config: the stream's name, buffering, processor and destination settings.
        bucket_name: the lake bucket (error output, and a Glue table's warehouse).
        table: the metering table (a Glue table, or an S3 table).
        transform_function: the Lambda processor.

    Attributes:
        delivery_stream: the stream the API stages' access logs go to (:func:`cdk_stacks.metering.meter_stage`).
        access_log_format: the format those stages write, rendered for the configured tenant source.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: Config,
        bucket_name: str,
        table: MeteringTable,
        transform_function: lambda_.IFunction,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        settings = config.data_firehose_configuration
        self.access_log_format = config.meterlake.tenant_source.access_log_format()
        unique_keys = sorted(METERING_EVENT_SCHEMA.identifier_field_names())
        log_retention_days = config.meterlake.aws.log_retention_days
        bucket = s3.Bucket.from_bucket_name(self, "LakeBucket", bucket_name)
        stream_name = settings.delivery_stream_name
        log_group_name = f"/aws/kinesisfirehose/{stream_name}"
        log_group = logs.LogGroup(
            self,
            "LogGroup",
            log_group_name=log_group_name,
            retention=log_retention(log_retention_days),
            # Named by Firehose's convention: retained, it would make a redeploy after `cdk destroy` fail.
            removal_policy=RemovalPolicy.DESTROY,
        )
        for construct_id, log_stream in (("DestinationLog", DESTINATION_LOG_STREAM), ("BackupLog", BACKUP_LOG_STREAM)):
            logs.LogStream(
                self,
                construct_id,
                log_group=log_group,
                log_stream_name=log_stream,
                removal_policy=RemovalPolicy.DESTROY,
            )

        policy = iam.PolicyDocument(
            statements=[
                iam.PolicyStatement(
                    sid="LakeBucket",
                    actions=[
                        "s3:AbortMultipartUpload",
                        "s3:GetBucketLocation",
                        "s3:GetObject",
                        "s3:ListBucket",
                        "s3:ListBucketMultipartUploads",
                        "s3:PutObject",
                        "s3:DeleteObject",
                    ],
                    resources=[bucket.bucket_arn, bucket.arn_for_objects("*")],
                ),
                iam.PolicyStatement(
                    sid="MeteringTable",
                    actions=["glue:GetTable", "glue:GetDatabase", "glue:UpdateTable"],
                    resources=table.glue_arns(stack),
                ),
                iam.PolicyStatement(
                    sid="TransformLambda",
                    actions=["lambda:InvokeFunction", "lambda:GetFunctionConfiguration"],
                    resources=[transform_function.function_arn],
                ),
                iam.PolicyStatement(
                    sid="DeliveryLogs",
                    actions=["logs:PutLogEvents"],
                    resources=[
                        stack.format_arn(
                            service="logs",
                            resource="log-group",
                            resource_name=f"{log_group_name}:log-stream:{log_stream}",
                            arn_format=ArnFormat.COLON_RESOURCE_NAME,
                        )
                        for log_stream in (DESTINATION_LOG_STREAM, BACKUP_LOG_STREAM)
                    ],
                ),
                iam.PolicyStatement(sid="LakeFormationData", actions=list(UNSCOPABLE_ACTIONS), resources=["*"]),
            ]
        )
        if table.in_table_bucket:
            assert table.table_arn is not None
            policy.add_statements(
                iam.PolicyStatement(
                    sid="S3Table",
                    actions=list(S3_TABLES_WRITE_ACTIONS),
                    resources=[table.table_bucket_arn(stack), table.table_arn],
                )
            )
        role = iam.Role(
            self,
            "Role",
            # AWS documents sts:ExternalId = the account for Firehose roles (it is what Firehose passes); whether it
            # sends aws:SourceAccount is not documented, and a condition it cannot satisfy would stop delivery.
            assumed_by=iam.ServicePrincipal(
                "firehose.amazonaws.com", conditions={"StringEquals": {"sts:ExternalId": stack.account}}
            ),
            description=f"Firehose stream {stream_name}: writes the metering-events Iceberg table",
            inline_policies={"Delivery": policy},
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "lakeformation:GetDataAccess supports no resource-level permissions; Lake Formation scopes the data "
            "itself through the table grant.",
        )
        acknowledge_resources(
            role,
            "AwsSolutions-IAM5",
            [bucket.arn_for_objects("*")],
            "Firehose writes Iceberg data, metadata and error output under object keys it chooses in the lake bucket "
            "(table location and error prefix); the role may touch no other bucket.",
        )
        grants = grant_table_access(
            self,
            "TableGrant",
            role=role,
            table=table,
            config=config,
            permissions=S3_TABLE_WRITE_PERMISSIONS if table.in_table_bucket else TABLE_WRITE_PERMISSIONS,
        )

        lambda_processor = firehose.CfnDeliveryStream.ProcessorProperty(
            type="Lambda",
            parameters=[
                firehose.CfnDeliveryStream.ProcessorParameterProperty(parameter_name=name, parameter_value=value)
                for name, value in (
                    ("LambdaArn", transform_function.function_arn),
                    ("BufferSizeInMBs", _mb(settings.transform_records_with_aws_lambda.effective_buffer_size)),
                    ("BufferIntervalInSeconds", str(settings.transform_records_with_aws_lambda.buffer_interval)),
                    ("NumberOfRetries", str(settings.transform_records_with_aws_lambda.number_of_retries)),
                )
            ],
        )
        self.delivery_stream = firehose.CfnDeliveryStream(
            self,
            "DeliveryStream",
            delivery_stream_name=stream_name,
            delivery_stream_type="DirectPut",
            delivery_stream_encryption_configuration_input=(
                firehose.CfnDeliveryStream.DeliveryStreamEncryptionConfigurationInputProperty(key_type="AWS_OWNED_CMK")
            ),
            iceberg_destination_configuration=firehose.CfnDeliveryStream.IcebergDestinationConfigurationProperty(
                # A Glue table's files go to the lake bucket; S3 Tables chooses where an S3 table's go.
                catalog_configuration=firehose.CfnDeliveryStream.CatalogConfigurationProperty(
                    catalog_arn=table.catalog_arn(stack),
                    warehouse_location=None if table.in_table_bucket else f"s3://{bucket_name}",
                ),
                role_arn=role.role_arn,
                s3_configuration=firehose.CfnDeliveryStream.S3DestinationConfigurationProperty(
                    bucket_arn=bucket.bucket_arn,
                    role_arn=role.role_arn,
                    error_output_prefix=settings.error_output_prefix,
                    cloud_watch_logging_options=firehose.CfnDeliveryStream.CloudWatchLoggingOptionsProperty(
                        enabled=True,
                        log_group_name=log_group.log_group_name,
                        log_stream_name=BACKUP_LOG_STREAM,
                    ),
                ),
                s3_backup_mode="FailedDataOnly",
                destination_table_configuration_list=[
                    firehose.CfnDeliveryStream.DestinationTableConfigurationProperty(
                        destination_database_name=table.database_name,
                        destination_table_name=table.table_name,
                        unique_keys=list(unique_keys),
                        s3_error_output_prefix=settings.error_output_prefix,
                    )
                ],
                processing_configuration=firehose.CfnDeliveryStream.ProcessingConfigurationProperty(
                    enabled=True, processors=[lambda_processor]
                ),
                buffering_hints=firehose.CfnDeliveryStream.BufferingHintsProperty(
                    interval_in_seconds=settings.buffering_hints.interval_in_seconds,
                    size_in_m_bs=settings.buffering_hints.size_in_mbs,
                ),
                retry_options=firehose.CfnDeliveryStream.RetryOptionsProperty(
                    duration_in_seconds=RETRY_DURATION_SECONDS
                ),
                cloud_watch_logging_options=firehose.CfnDeliveryStream.CloudWatchLoggingOptionsProperty(
                    enabled=True, log_group_name=log_group.log_group_name, log_stream_name=DESTINATION_LOG_STREAM
                ),
                # Not append-only: the design dedups at write. The transform asks for "update" (an upsert on the
                # unique key request_id), so a redelivered access-log line replaces its first copy instead of adding
                # a row, and no query has to deduplicate (README: "Duplicates are removed at write"). AppendOnly
                # would forbid update/delete operations and keys.
                append_only=False,
            ),
        )
        # The stream must not start writing before its role may read and write the table.
        self.delivery_stream.node.add_dependency(role, *grants)

        CfnOutput(self, "DeliveryStreamName", value=stream_name, description="Firehose stream of the access logs")


class DeliveryStack(Stack):
    """The app's :class:`AccessLogDelivery`.

    Attributes:
        delivery: the stream, its role and grant.
        delivery_stream: the stream the API stages' access logs go to.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: Config,
        bucket_name: str,
        table: MeteringTable,
        transform_function: lambda_.IFunction,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.delivery = AccessLogDelivery(
            self,
            "Default",
            config=config,
            bucket_name=bucket_name,
            table=table,
            transform_function=transform_function,
        )
        self.delivery_stream = self.delivery.delivery_stream
