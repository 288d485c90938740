"""Storage: the S3 bucket of the lake, the Glue database and the Iceberg metering-events table."""

from __future__ import annotations

from typing import Any, Final

from aws_cdk import Aws, CfnOutput, Duration, Fn, RemovalPolicy, Stack
from aws_cdk import aws_glue as glue
from aws_cdk import aws_s3 as s3
from constructs import Construct

from cdk_stacks.glue_iceberg import open_table_format_input
from cdk_stacks.shared import acknowledge
from meterlake.config import Config

#: Where the Athena workgroup writes query results; expired like error output.
ATHENA_RESULTS_PREFIX: Final = "athena-results/"


class StaticPrefixError(ValueError):
    """An S3 prefix that starts with a Firehose expression has no static part a lifecycle rule could match."""


def static_prefix(prefix: str) -> str:
    """The part of a Firehose prefix before its first ``!{...}`` expression, cut after the last ``/``.

    ``error/year=!{timestamp:yyyy}/...`` -> ``error/``.

    Raises:
        StaticPrefixError: the prefix has no static folder before its first expression.
    """
    head = prefix.split("!{", 1)[0]
    folder = head[: head.rfind("/") + 1]
    if not folder.strip("/"):
        raise StaticPrefixError(f"error_output_prefix {prefix!r}: no static folder (e.g. 'error/') to expire")
    return folder


class LakeStorage(Construct):
    """The lake's bucket (plus its access-log bucket), the Glue database and the Iceberg table.

    What ``cdk destroy`` leaves: both buckets (the data; RETAIN) with their policies, nothing else of this stack.
    The buckets are named by CloudFormation unless the config's ``s3_bucket`` names the lake bucket, so a redeploy
    creates new ones beside the retained ones instead of failing on a name that exists (a named bucket must be
    emptied and deleted, or renamed, before a redeploy). The table's location ends in this stack's id, so a
    redeployed table never shares a folder with an earlier one: Glue's orphan-file optimizer would delete an
    earlier table's files as orphans of the new one.

    Attributes:
        bucket: the lake's bucket: table data, Firehose error output, Athena results.
        bucket_name: its name (a reference to the bucket).
        database_name / table_name: the Glue names of the table.
        table_location: ``s3://<bucket>/<output_prefix>/<stack uuid>``, the table's Iceberg location.
    """

    def __init__(self, scope: Construct, construct_id: str, *, config: Config) -> None:
        super().__init__(scope, construct_id)
        account = Stack.of(self).account
        firehose = config.data_firehose_configuration
        aws = config.meterlake.aws
        access_logs = s3.Bucket(
            self,
            "AccessLogBucket",
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(aws.log_retention_days))],
            removal_policy=RemovalPolicy.RETAIN,
        )
        acknowledge(
            access_logs,
            "AwsSolutions-S1",
            "This bucket is the target of the lake bucket's server access logs; logging it would log its own logs.",
        )
        self.bucket = s3.Bucket(
            self,
            "LakeBucket",
            bucket_name=firehose.s3_bucket,
            # SSE-S3: Firehose, Glue's optimizers and Athena read and write it without a KMS key policy to maintain.
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=access_logs,
            server_access_logs_prefix="lake/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="ExpireErrorOutput",
                    prefix=static_prefix(firehose.error_output_prefix),
                    expiration=Duration.days(aws.error_output_expiration_days),
                ),
                s3.LifecycleRule(
                    id="ExpireAthenaResults",
                    prefix=ATHENA_RESULTS_PREFIX,
                    expiration=Duration.days(aws.error_output_expiration_days),
                ),
                s3.LifecycleRule(id="AbortIncompleteUploads", abort_incomplete_multipart_upload_after=Duration.days(1)),
            ],
            removal_policy=RemovalPolicy.RETAIN,
        )
        # A kept bucket keeps its policy (TLS only; the access-log bucket's grant to S3's log delivery), or it would
        # be left open to plain HTTP and its server access logging would stop.
        for kept in (access_logs, self.bucket):
            assert kept.policy is not None  # enforce_ssl gave each bucket a policy
            kept.policy.apply_removal_policy(RemovalPolicy.RETAIN)
        self.bucket_name = self.bucket.bucket_name
        self.database_name = config.database_name
        self.table_name = config.table_name
        stack_uuid = Fn.select(2, Fn.split("/", Aws.STACK_ID))
        self.table_location = f"s3://{self.bucket.bucket_name}/{firehose.output_prefix.strip('/')}/{stack_uuid}"

        database = glue.CfnDatabase(
            self,
            "Database",
            catalog_id=account,
            database_input=glue.CfnDatabase.DatabaseInputProperty(
                name=config.database_name, description="meterlake: per-tenant metering events"
            ),
        )
        self.table = glue.CfnTable(
            self,
            "MeteringEventsTable",
            catalog_id=account,
            database_name=config.database_name,
            name=config.table_name,
            open_table_format_input=open_table_format_input(self.table_location),
        )
        self.table.add_resource_dependency(database)
        # Glue writes the table's first metadata file under its location when it creates the table: the bucket must
        # exist first (the location's reference to it already says so; this keeps it so whatever the location holds).
        self.table.node.add_dependency(self.bucket)


class StorageStack(Stack):
    """The :class:`LakeStorage` of the app, exporting its bucket's name for the other stacks.

    Attributes:
        storage: the lake's bucket, database and table.
        bucket_name: the bucket's name as other stacks import it (``Fn::ImportValue`` of the ``BucketName``
            output's export, named explicitly so their policies, and cdk-nag's acknowledgments of them, can name it).
    """

    def __init__(self, scope: Construct, construct_id: str, *, config: Config, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        # "Default" keeps the construct out of the resources' logical ids.
        self.storage = LakeStorage(self, "Default", config=config)
        export = f"{self.stack_name}-BucketName"
        CfnOutput(
            self,
            "BucketName",
            value=self.storage.bucket.bucket_name,
            description="The lake's S3 bucket",
            export_name=export,
        )
        self.bucket_name = Fn.import_value(export)
