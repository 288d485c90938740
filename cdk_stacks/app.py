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

from cdk_stacks.analytics import AnalyticsStack
from cdk_stacks.api import ApiStack
from cdk_stacks.delivery import DeliveryStack
from cdk_stacks.forwarding import ForwardingStack
from cdk_stacks.storage import StorageStack
from cdk_stacks.transform import TransformStack
from meterlake.aws.stacks import STACK_NAMES
from meterlake.config import Config
from meterlake.records import DEFAULT_TENANT_SOURCE

#: The CDK CLI's cdk.json: beside this package in an installed wheel (pyproject.toml ships it), else at the root.
CDK_JSON: Final = next(
    path
    for path in (Path(__file__).resolve().parent / "cdk.json", Path(__file__).resolve().parents[1] / "cdk.json")
    if path.is_file()
)
#: CDK feature flags the stacks rely on, from cdk.json (the cdk CLI passes them too; `python app.py` reads them here).
FEATURE_FLAGS: Final[dict[str, object]] = json.loads(CDK_JSON.read_text())["context"]


@dataclass(frozen=True, slots=True)
class MeterlakeStacks:
    """The app and its stacks, for app.py and the template tests."""

    app: App
    storage: StorageStack
    transform: TransformStack
    delivery: DeliveryStack
    #: The demo API's stack; None when the pipeline meters only a user's own APIs.
    api: ApiStack | None
    analytics: AnalyticsStack
    forwarding: ForwardingStack


def add_pipeline(
    app: App, config: Config, *, env: Environment | None = None, demo_api: bool | None = None
) -> MeterlakeStacks:
    """Add meterlake's stacks to ``app`` (a user's own CDK app, or :func:`build_app`'s), built from ``config``.

    ``demo_api`` adds the demo REST API (None: when tenants come from its Cognito claim, the default tenant
    source); a team metering its own APIs leaves it out and meters their stages with
    :func:`cdk_stacks.metering.meter_stage` and ``stacks.delivery.delivery``. ``env`` defaults to
    CDK_DEFAULT_ACCOUNT/CDK_DEFAULT_REGION (unset: environment-agnostic templates).
    """
    env = env or Environment(account=os.environ.get("CDK_DEFAULT_ACCOUNT"), region=os.environ.get("CDK_DEFAULT_REGION"))
    storage_name, transform_name, delivery_name, api_name, analytics_name, forwarding_name = STACK_NAMES
    storage = StorageStack(
        app,
        storage_name,
        env=env,
        description="meterlake: lake bucket, Glue database and the Iceberg metering-events table",
        config=config,
    )
    transform = TransformStack(
        app, transform_name, env=env, description="meterlake: the Firehose transform Lambda", config=config
    )
    delivery = DeliveryStack(
        app,
        delivery_name,
        env=env,
        description="meterlake: the Firehose stream from API access logs to the Iceberg table",
        config=config,
        bucket_name=storage.bucket_name,
        table=storage.table,
        transform_function=transform.function,
    )
    if demo_api is None:
        demo_api = config.meterlake.tenant_source.source() == DEFAULT_TENANT_SOURCE
    api = None
    if demo_api:
        api = ApiStack(
            app,
            api_name,
            env=env,
            description="meterlake: Cognito user pool and the metered REST API",
            config=config,
            pipeline=delivery.delivery,
        )
        api.add_stack_dependency(delivery)
    analytics = AnalyticsStack(
        app,
        analytics_name,
        env=env,
        description="meterlake: Athena workgroup, usage queries and Iceberg table maintenance",
        config=config,
        bucket_name=storage.bucket_name,
        table=storage.table,
    )
    forwarding = ForwardingStack(
        app,
        forwarding_name,
        env=env,
        description="meterlake: forwards committed metering events to Amberflo (stager, SQS queue, forwarder)",
        config=config,
        bucket_name=storage.bucket_name,
        table=storage.table,
    )
    # Explicit, so `cdk deploy <Stack>` order is the documented one even where no token crosses stacks.
    delivery.add_stack_dependency(storage)
    delivery.add_stack_dependency(transform)
    analytics.add_stack_dependency(storage)
    analytics.add_stack_dependency(delivery)
    # The stager reads the table Delivery's stream commits to; nothing else ties it to the other stacks.
    forwarding.add_stack_dependency(storage)
    forwarding.add_stack_dependency(delivery)
    return MeterlakeStacks(
        app=app,
        storage=storage,
        transform=transform,
        delivery=delivery,
        api=api,
        analytics=analytics,
        forwarding=forwarding,
    )


def build_app(config: Config, *, outdir: str | None = None, env: Environment | None = None) -> MeterlakeStacks:
    """meterlake's own app: every stack from ``config``, checked by cdk-nag's AwsSolutions pack when it synthesizes."""
    app = App(outdir=outdir, context=FEATURE_FLAGS)
    stacks = add_pipeline(app, config, env=env)
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return stacks
