"""Analytics: the Athena workgroup, the usage queries of ``sql/`` as named queries, and Glue table maintenance.

Maintenance uses Glue's managed table optimizers rather than a scheduled Athena ``OPTIMIZE``/``VACUUM``: Glue
compacts when small files accumulate (no schedule to tune, no query to fail unnoticed), needs no Lambda or
EventBridge rule of ours, and its retention and orphan-file optimizers expire the snapshots and unreferenced files
Firehose's frequent commits leave behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from aws_cdk import ArnFormat, CfnOutput, Stack
from aws_cdk import aws_athena as athena
from aws_cdk import aws_glue as glue
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from cdk_stacks.delivery import UNSCOPABLE_ACTIONS, grant_table_access
from cdk_stacks.shared import acknowledge, acknowledge_resources
from cdk_stacks.storage import ATHENA_RESULTS_PREFIX, MeteringTable
from meterlake.aws.athena import WORKGROUP
from meterlake.config import Config
from meterlake.lake.query import athena_table, list_queries, prepare

WORKGROUP_NAME: Final = WORKGROUP
ATHENA_ENGINE: Final = "Athena engine version 3"
#: Glue optimizer type -> the log group Glue writes its runs to (fixed by Glue, per account and region).
OPTIMIZER_LOG_GROUPS: Final = {
    "compaction": "/aws-glue/iceberg-compaction/logs",
    "retention": "/aws-glue/iceberg-retention/logs",
    "orphan_file_deletion": "/aws-glue/iceberg-orphan-file-deletion/logs",
}


@dataclass(frozen=True, slots=True)
class AthenaNamedQuery:
    """A ``sql/`` query as Athena runs it: real table name, positional ``?`` parameters in ``parameter_order``."""

    name: str
    description: str
    sql: str
    parameter_order: tuple[str, ...]


def athena_named_queries(config: Config, table: MeteringTable | None = None) -> list[AthenaNamedQuery]:
    """Every ``sql/*.sql`` query prepared for Athena against the metering table: ``"<database>"."<table>"`` of
    ``config``, or, for an S3 table, ``"s3tablescatalog/<bucket>"."<namespace>"."<table>"`` (a named query has no
    catalog of its own, so the catalog is in the SQL).

    Raises:
        QueryDefinitionError: a query file is malformed or cannot be translated.
    """
    target = athena_table(config, table_bucket=None if table is None else table.table_bucket_name)
    queries = []
    for query in list_queries():
        # Each parameter's own name as its value: the ExecutionParameters list then spells the ``?`` order.
        prepared = prepare(query.sql, dialect="athena", table=target, params={p.name: p.name for p in query.params})
        order = tuple(str(value).strip("'") for value in prepared.parameters)
        queries.append(
            AthenaNamedQuery(name=query.name, description=query.description, sql=prepared.sql, parameter_order=order)
        )
    return queries


class UsageAnalytics(Construct):
    """The workgroup, its named queries, and the table optimizers with their role.

    Attributes:
        workgroup: the Athena workgroup every usage query runs in.
    """

    def __init__(
        self, scope: Construct, construct_id: str, *, config: Config, bucket_name: str, table: MeteringTable
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        aws = config.meterlake.aws
        database_name, table_name = table.database_name, table.table_name
        bucket = s3.Bucket.from_bucket_name(self, "LakeBucket", bucket_name)
        self.workgroup = athena.CfnWorkGroup(
            self,
            "WorkGroup",
            name=WORKGROUP_NAME,
            description="meterlake usage queries",
            recursive_delete_option=True,
            work_group_configuration=athena.CfnWorkGroup.WorkGroupConfigurationProperty(
                enforce_work_group_configuration=True,
                publish_cloud_watch_metrics_enabled=True,
                bytes_scanned_cutoff_per_query=aws.athena_bytes_scanned_cutoff_per_query,
                engine_version=athena.CfnWorkGroup.EngineVersionProperty(selected_engine_version=ATHENA_ENGINE),
                result_configuration=athena.CfnWorkGroup.ResultConfigurationProperty(
                    output_location=f"s3://{bucket_name}/{ATHENA_RESULTS_PREFIX}",
                    encryption_configuration=athena.CfnWorkGroup.EncryptionConfigurationProperty(
                        encryption_option="SSE_S3"
                    ),
                ),
            ),
        )
        for query in athena_named_queries(config, table):
            order = ", ".join(query.parameter_order) or "none"
            named = athena.CfnNamedQuery(
                self,
                f"Query-{query.name}",
                name=query.name,
                description=f"{query.description} Parameters, in order: {order}."[:1024],
                database=database_name,
                query_string=query.sql,
                work_group=self.workgroup.ref,
            )
            named.add_resource_dependency(self.workgroup)
        CfnOutput(self, "AthenaWorkGroup", value=self.workgroup.ref, description="Athena workgroup of the queries")
        if table.in_table_bucket:
            # S3 Tables compacts the table and expires its snapshots itself (configured on the table).
            return

        table_objects = bucket.arn_for_objects(f"{config.data_firehose_configuration.output_prefix.strip('/')}/*")
        optimizer_logs = [
            stack.format_arn(
                service="logs",
                resource="log-group",
                resource_name=f"{log_group}:*",
                arn_format=ArnFormat.COLON_RESOURCE_NAME,
            )
            for log_group in OPTIMIZER_LOG_GROUPS.values()
        ]
        role = iam.Role(
            self,
            "OptimizerRole",
            # AWS documents the optimizer role's trust with no condition; Glue is not documented to send
            # aws:SourceAccount, and a condition it cannot satisfy would silently stop every optimizer run.
            assumed_by=iam.ServicePrincipal("glue.amazonaws.com"),
            description="Glue table optimizers of the metering-events table",
            inline_policies={
                "TableMaintenance": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            sid="MeteringTable",
                            actions=["glue:GetTable", "glue:UpdateTable"],
                            resources=table.glue_arns(stack),
                        ),
                        iam.PolicyStatement(
                            sid="TableData",
                            actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                            resources=[table_objects],
                        ),
                        iam.PolicyStatement(sid="LakeBucket", actions=["s3:ListBucket"], resources=[bucket.bucket_arn]),
                        iam.PolicyStatement(
                            sid="OptimizerLogs",
                            actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                            resources=optimizer_logs,
                        ),
                        iam.PolicyStatement(sid="LakeFormationData", actions=list(UNSCOPABLE_ACTIONS), resources=["*"]),
                    ]
                )
            },
        )
        acknowledge_resources(
            role,
            "AwsSolutions-IAM5",
            [table_objects],
            "Compaction, snapshot expiry and orphan-file deletion rewrite and delete files under the table's "
            "location only; their keys are chosen by Glue.",
        )
        acknowledge_resources(
            role,
            "AwsSolutions-IAM5",
            optimizer_logs,
            "Glue names these per-account log groups and its run log streams itself; the role may write no others.",
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "lakeformation:GetDataAccess supports no resource-level permissions; Lake Formation scopes the data "
            "itself through the table grant.",
        )
        grants = grant_table_access(self, "OptimizerTableGrant", role=role, table=table, config=config)
        configurations: dict[str, glue.CfnTableOptimizer.TableOptimizerConfigurationProperty] = {
            "compaction": glue.CfnTableOptimizer.TableOptimizerConfigurationProperty(
                enabled=True,
                role_arn=role.role_arn,
                compaction_configuration=glue.CfnTableOptimizer.CompactionConfigurationProperty(
                    iceberg_configuration=glue.CfnTableOptimizer.IcebergCompactionConfigurationProperty(
                        strategy="binpack"
                    )
                ),
            ),
            "retention": glue.CfnTableOptimizer.TableOptimizerConfigurationProperty(
                enabled=True,
                role_arn=role.role_arn,
                retention_configuration=glue.CfnTableOptimizer.RetentionConfigurationProperty(
                    iceberg_configuration=glue.CfnTableOptimizer.IcebergRetentionConfigurationProperty(
                        snapshot_retention_period_in_days=aws.snapshot_retention_days,
                        number_of_snapshots_to_retain=aws.snapshots_to_retain,
                        clean_expired_files=True,
                    )
                ),
            ),
            "orphan_file_deletion": glue.CfnTableOptimizer.TableOptimizerConfigurationProperty(
                enabled=True,
                role_arn=role.role_arn,
                orphan_file_deletion_configuration=glue.CfnTableOptimizer.OrphanFileDeletionConfigurationProperty(
                    # No location: Glue scans the table's own location, which no other table shares.
                    iceberg_configuration=glue.CfnTableOptimizer.IcebergConfigurationProperty(
                        orphan_file_retention_period_in_days=aws.orphan_file_retention_days,
                    )
                ),
            ),
        }
        for optimizer_type, configuration in configurations.items():
            optimizer = glue.CfnTableOptimizer(
                self,
                f"Optimizer-{optimizer_type}",
                catalog_id=stack.account,
                database_name=database_name,
                table_name=table_name,
                type=optimizer_type,
                table_optimizer_configuration=configuration,
            )
            optimizer.node.add_dependency(role, *grants)


class AnalyticsStack(Stack):
    """The app's :class:`UsageAnalytics`.

    Attributes:
        workgroup: the Athena workgroup every usage query runs in.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: Config,
        bucket_name: str,
        table: MeteringTable,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.workgroup = UsageAnalytics(self, "Default", config=config, bucket_name=bucket_name, table=table).workgroup
