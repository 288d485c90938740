"""Storage: the S3 bucket of the lake, the Glue database and the Iceberg metering-events table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from aws_cdk import Aws, CfnOutput, Duration, Fn, RemovalPolicy, Stack
from aws_cdk import aws_glue as glue
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3tables as s3tables
from constructs import Construct

from cdk_stacks.glue_iceberg import open_table_format_input, s3_tables_iceberg_metadata
from cdk_stacks.shared import acknowledge
from meterlake.aws.stacks import S3_TABLES_CATALOG
from meterlake.config import Config, S3TablesDestination

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


@dataclass(frozen=True, slots=True)
class MeteringTable:
    """Where the metering table is, as Firehose, Athena, the optimizers and the stager address it.

    A Glue Iceberg table in the account's default catalog, or a table of an S3 table bucket, which Glue federates as
    catalog ``s3tablescatalog/<bucket>`` (its namespace a database) and S3 Tables serves over its own API.

    Attributes:
        database_name / table_name: the database (the S3 Tables namespace) and table.
        table_bucket_name / table_arn: the table bucket and the S3 table's ARN; None for a Glue table.
    """

    database_name: str
    table_name: str
    table_bucket_name: str | None = None
    table_arn: str | None = None

    @property
    def in_table_bucket(self) -> bool:
        """Whether the table is an S3 table."""
        return self.table_bucket_name is not None

    def glue_catalog_path(self) -> str:
        """The catalog below the account's root one, as Glue ARNs and catalog ids spell it ('' for the root)."""
        return "" if self.table_bucket_name is None else f"{S3_TABLES_CATALOG}/{self.table_bucket_name}"

    def glue_arns(self, stack: Stack) -> list[str]:
        """The Glue ARNs a table operation is authorized on: every catalog above the table, its database, the table.

        Federated S3 Tables resources are ``catalog/s3tablescatalog/<bucket>``,
        ``database/s3tablescatalog/<bucket>/<namespace>`` and ``table/s3tablescatalog/<bucket>/<namespace>/<table>``
        (AWS Glue, "Specifying AWS Glue resource ARNs"); the root catalog is needed to resolve them.
        """
        prefix = f"arn:{Aws.PARTITION}:glue:{stack.region}:{stack.account}"
        path = self.glue_catalog_path()
        catalogs = [f"{prefix}:catalog"]
        if path:
            catalogs += [f"{prefix}:catalog/{S3_TABLES_CATALOG}", f"{prefix}:catalog/{path}"]
        under = f"{path}/" if path else ""
        database = f"{prefix}:database/{under}{self.database_name}"
        table = f"{prefix}:table/{under}{self.database_name}/{self.table_name}"
        return [*catalogs, database, table]

    def catalog_arn(self, stack: Stack) -> str:
        """The Glue catalog holding the table's database: Firehose's ``CatalogConfiguration.CatalogArn``."""
        path = self.glue_catalog_path()
        return f"arn:{Aws.PARTITION}:glue:{stack.region}:{stack.account}:catalog" + (f"/{path}" if path else "")

    def lake_formation_catalog_id(self, stack: Stack) -> str:
        """The catalog id Lake Formation grants on the table take: the account, or ``<account>:s3tablescatalog/<b>``."""
        path = self.glue_catalog_path()
        return f"{stack.account}:{path}" if path else stack.account

    def table_bucket_arn(self, stack: Stack) -> str:
        """The S3 table bucket's ARN.

        Raises:
            ValueError: the table is a Glue table.
        """
        if self.table_bucket_name is None:
            raise ValueError(f"{self.database_name}.{self.table_name} is a Glue table, in no table bucket")
        return f"arn:{Aws.PARTITION}:s3tables:{stack.region}:{stack.account}:bucket/{self.table_bucket_name}"


class LakeStorage(Construct):
    """The lake's bucket (plus its access-log bucket) and the metering table: a Glue database and Iceberg table in
    the lake bucket, or, with the config's ``s3_tables`` section, an S3 table bucket, namespace and table.

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
        if config.s3_tables is not None:
            self.table = self._s3_table(config.s3_tables, stack_uuid=stack_uuid, config=config)
            return

        database = glue.CfnDatabase(
            self,
            "Database",
            catalog_id=account,
            database_input=glue.CfnDatabase.DatabaseInputProperty(
                name=config.database_name, description="meterlake: per-tenant metering events"
            ),
        )
        glue_table = glue.CfnTable(
            self,
            "MeteringEventsTable",
            catalog_id=account,
            database_name=config.database_name,
            name=config.table_name,
            open_table_format_input=open_table_format_input(self.table_location),
        )
        glue_table.add_resource_dependency(database)
        # Glue writes the table's first metadata file under its location when it creates the table: the bucket must
        # exist first (the location's reference to it already says so; this keeps it so whatever the location holds).
        glue_table.node.add_dependency(self.bucket)
        self.table = MeteringTable(database_name=config.database_name, table_name=config.table_name)

    def _s3_table(self, destination: S3TablesDestination, *, stack_uuid: str, config: Config) -> MeteringTable:
        """The table bucket, its namespace and the metering table, all kept by `cdk destroy` (deleting an S3 table
        deletes its data). Unnamed in the config, the bucket is named after this stack's id, so a redeploy never
        meets the kept one's name. S3 Tables compacts the table and expires its snapshots itself, as configured."""
        aws = config.meterlake.aws
        bucket_name = destination.table_bucket_name or f"meterlake-{Fn.select(0, Fn.split('-', stack_uuid))}"
        table_bucket = s3tables.CfnTableBucket(
            self,
            "TableBucket",
            table_bucket_name=bucket_name,
            unreferenced_file_removal=s3tables.CfnTableBucket.UnreferencedFileRemovalProperty(
                status="Enabled", unreferenced_days=aws.orphan_file_retention_days
            ),
        )
        namespace = s3tables.CfnNamespace(
            self, "Namespace", namespace=destination.namespace_name, table_bucket_arn=table_bucket.attr_table_bucket_arn
        )
        table = s3tables.CfnTable(
            self,
            "MeteringEventsTable",
            table_bucket_arn=table_bucket.attr_table_bucket_arn,
            namespace=destination.namespace_name,
            table_name=destination.table_name,
            open_table_format="ICEBERG",
            iceberg_metadata=s3_tables_iceberg_metadata(),
            compaction=s3tables.CfnTable.CompactionProperty(status="enabled"),
            snapshot_management=s3tables.CfnTable.SnapshotManagementProperty(
                status="enabled",
                max_snapshot_age_hours=aws.snapshot_retention_days * 24,
                min_snapshots_to_keep=aws.snapshots_to_retain,
            ),
        )
        table.add_resource_dependency(namespace)
        for kept in (table_bucket, namespace, table):
            kept.apply_removal_policy(RemovalPolicy.RETAIN)
        return MeteringTable(
            database_name=destination.namespace_name,
            table_name=destination.table_name,
            table_bucket_name=bucket_name,
            table_arn=table.attr_table_arn,
        )


class StorageStack(Stack):
    """The :class:`LakeStorage` of the app, exporting its bucket's name for the other stacks.

    Attributes:
        storage: the lake's bucket, database and table.
        bucket_name: the bucket's name as other stacks import it (``Fn::ImportValue`` of the ``BucketName``
            output's export, named explicitly so their policies, and cdk-nag's acknowledgments of them, can name it).
        table: where the metering table is, as other stacks address it (an S3 table's names imported likewise).
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
        self.table = self.storage.table
        if self.table.table_bucket_name is not None and self.table.table_arn is not None:
            imported = {}
            for name, value, description in (
                ("TableBucketName", self.table.table_bucket_name, "The S3 table bucket of the metering table"),
                ("TableArn", self.table.table_arn, "The S3 table of metering events"),
            ):
                CfnOutput(self, name, value=value, description=description, export_name=f"{self.stack_name}-{name}")
                imported[name] = Fn.import_value(f"{self.stack_name}-{name}")
            self.table = MeteringTable(
                database_name=self.table.database_name,
                table_name=self.table.table_name,
                table_bucket_name=imported["TableBucketName"],
                table_arn=imported["TableArn"],
            )
