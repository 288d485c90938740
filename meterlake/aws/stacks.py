"""The CDK app's stacks as an account sees them: their names and the CDK bootstrap they deploy with.

Defined here, not in ``cdk_stacks``, so the commands that inspect a deployment need not load the CDK.
"""

from __future__ import annotations

from typing import Final

#: The stacks' names, in deployment order.
STACK_NAMES: Final = (
    "MeterlakeStorage",
    "MeterlakeTransform",
    "MeterlakeDelivery",
    "MeterlakeApi",
    "MeterlakeAnalytics",
    "MeterlakeForwarding",
)
STORAGE_STACK, TRANSFORM_STACK, DELIVERY_STACK, API_STACK, ANALYTICS_STACK, FORWARDING_STACK = STACK_NAMES
#: ``cdk bootstrap``'s default qualifier: its roles and its version parameter are named after it.
CDK_QUALIFIER: Final = "hnb659fds"
#: Glue's federated catalog of a region's S3 table buckets (``s3tablescatalog/<bucket>`` is one bucket's).
S3_TABLES_CATALOG: Final = "s3tablescatalog"
#: Glue's own catalog, as Athena names it.
ATHENA_DEFAULT_CATALOG: Final = "AwsDataCatalog"
#: The workgroup the Analytics stack creates and `meterlake query --athena` uses by default.
ATHENA_WORKGROUP: Final = "meterlake"

# -- the forwarding Lambdas' sizing: deployed by cdk_stacks.forwarding, priced by meterlake.aws.cost -----------------

#: The stager reads whole snapshots' data files into Arrow: memory is its limit, CPU scales with it.
STAGER_MEMORY_MB: Final = 2048
#: How often the stager runs (an EventBridge schedule), in minutes.
STAGER_SCHEDULE_MINUTES: Final = 1
#: The forwarder waits on Amberflo; its CPU work per batch (an HTTPS request) is small.
FORWARDER_MEMORY_MB: Final = 256
#: Messages per forwarder invocation: five batches of <= 100 records, each with its own retry budget.
FORWARDER_BATCH_SIZE: Final = 5
