"""The CDK app: every meterlake stack, built from the one config and wired with explicit typed arguments.

Deploy order (each stack depends on the ones before it): Storage, Transform, Delivery, Api, Analytics, Forwarding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aws_cdk import App, Environment, Validations
from cdk_nag import AwsSolutionsChecks

from cdk_stacks.analytics import AnalyticsStack, TableMaintenance, athena_named_queries
from cdk_stacks.api import ApiStack
from cdk_stacks.delivery import DeliveryStack
from cdk_stacks.forwarding import ForwardingStack
from cdk_stacks.storage import StorageStack
from cdk_stacks.transform import TransformStack
from meterlake.aws.stacks import STACK_NAMES
from meterlake.config import Config
from meterlake.schema import METERING_EVENT_SCHEMA

#: CDK feature flags the stacks rely on, from cdk.json (the cdk CLI passes them too; `python app.py` reads them here).
FEATURE_FLAGS: Final[dict[str, object]] = json.loads((Path(__file__).resolve().parents[1] / "cdk.json").read_text())[
    "context"
]


@dataclass(frozen=True, slots=True)
class MeterlakeStacks:
    """The app and its stacks, for app.py and the template tests."""

    app: App
    storage: StorageStack
    transform: TransformStack
    delivery: DeliveryStack
    api: ApiStack
    analytics: AnalyticsStack
    forwarding: ForwardingStack


def build_app(config: Config, *, outdir: str | None = None, env: Environment | None = None) -> MeterlakeStacks:
    """Build every stack from ``config`` and add cdk-nag's AwsSolutions checks (run when the app synthesizes).

    ``env`` defaults to CDK_DEFAULT_ACCOUNT/CDK_DEFAULT_REGION (unset: environment-agnostic templates).
    """
    app = App(outdir=outdir, context=FEATURE_FLAGS)
    env = env or Environment(account=os.environ.get("CDK_DEFAULT_ACCOUNT"), region=os.environ.get("CDK_DEFAULT_REGION"))
    firehose = config.data_firehose_configuration
    aws = config.meterlake.aws
    storage_name, transform_name, delivery_name, api_name, analytics_name, forwarding_name = STACK_NAMES

    storage = StorageStack(
        app,
        storage_name,
        env=env,
        description="meterlake: lake bucket, Glue database and the Iceberg metering-events table",
        bucket_name=firehose.s3_bucket,
        database_name=config.database_name,
        table_name=config.table_name,
        output_prefix=firehose.output_prefix,
        error_output_prefix=firehose.error_output_prefix,
        expiration_days=aws.error_output_expiration_days,
        log_retention_days=aws.log_retention_days,
    )
    transform = TransformStack(
        app,
        transform_name,
        env=env,
        description="meterlake: the Firehose transform Lambda",
        database_name=config.database_name,
        table_name=config.table_name,
        unmetered_http_methods=config.meterlake.unmetered_http_methods,
        architecture=aws.lambda_architecture,
        memory_mb=aws.transform_memory_mb,
        log_retention_days=aws.log_retention_days,
    )
    delivery = DeliveryStack(
        app,
        delivery_name,
        env=env,
        description="meterlake: the Firehose stream from API access logs to the Iceberg table",
        bucket_name=storage.bucket_name,
        database_name=storage.database_name,
        table_name=storage.table_name,
        unique_keys=sorted(METERING_EVENT_SCHEMA.identifier_field_names()),
        transform_function=transform.function,
        settings=firehose,
        log_retention_days=aws.log_retention_days,
    )
    api = ApiStack(
        app,
        api_name,
        env=env,
        description="meterlake: Cognito user pool and the metered REST API",
        delivery_stream=delivery.delivery_stream,
        stage_name=config.meterlake.api_stage,
        throttling_rate_limit=aws.api_throttling_rate_limit,
        throttling_burst_limit=aws.api_throttling_burst_limit,
        architecture=aws.lambda_architecture,
        log_retention_days=aws.log_retention_days,
    )
    analytics = AnalyticsStack(
        app,
        analytics_name,
        env=env,
        description="meterlake: Athena workgroup, usage queries and Iceberg table maintenance",
        bucket_name=storage.bucket_name,
        database_name=storage.database_name,
        table_name=storage.table_name,
        output_prefix=firehose.output_prefix,
        queries=athena_named_queries(config),
        bytes_scanned_cutoff_per_query=aws.athena_bytes_scanned_cutoff_per_query,
        maintenance=TableMaintenance(
            snapshot_retention_days=aws.snapshot_retention_days,
            snapshots_to_retain=aws.snapshots_to_retain,
            orphan_file_retention_days=aws.orphan_file_retention_days,
        ),
    )
    forwarding = ForwardingStack(
        app,
        forwarding_name,
        env=env,
        description="meterlake: forwards committed metering events to Amberflo (stager, SQS queue, forwarder)",
        bucket_name=storage.bucket_name,
        database_name=storage.database_name,
        table_name=storage.table_name,
        output_prefix=firehose.output_prefix,
        meters=config.meters,
        amberflo=config.amberflo,
        architecture=aws.lambda_architecture,
        log_retention_days=aws.log_retention_days,
        alarm_email=aws.alarm_email,
    )
    # Explicit, so `cdk deploy <Stack>` order is the documented one even where no token crosses stacks.
    delivery.add_stack_dependency(storage)
    delivery.add_stack_dependency(transform)
    api.add_stack_dependency(delivery)
    analytics.add_stack_dependency(storage)
    analytics.add_stack_dependency(delivery)
    # The stager reads the table Delivery's stream commits to; nothing else ties it to the other stacks.
    forwarding.add_stack_dependency(storage)
    forwarding.add_stack_dependency(delivery)

    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return MeterlakeStacks(
        app=app,
        storage=storage,
        transform=transform,
        delivery=delivery,
        api=api,
        analytics=analytics,
        forwarding=forwarding,
    )
