"""Forwarding: committed metering events -> SQS -> Amberflo, by a scheduled stager and an SQS-driven forwarder.

The stager (``meterlake.aws.staging``) reads the Iceberg table through Glue and fills the queue; the forwarder
(``meterlake.aws.forwarding``) sends each message through the same Forwarder as the local runtime. Each has its own
asset: the forwarder's holds no Arrow, DuckDB or Iceberg, so it is a few MB and starts fast. Every alarm notifies one
KMS-encrypted SNS topic (with an e-mail subscription if the config names an address). Deployable on its own once the
Delivery stack (and so the table) exists.
"""

from __future__ import annotations

import re
from typing import Any, Final

from aws_cdk import ArnFormat, CfnOutput, CfnResource, Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from cdk_stacks.bundling import LAMBDA_LOCK_DIR, PythonBundle, PythonTarget, lambda_code, project_requirements
from cdk_stacks.delivery import UNSCOPABLE_ACTIONS, grant_table_access
from cdk_stacks.shared import (
    LAMBDA_PYTHON_VERSION,
    LAMBDA_RUNTIME_REASON,
    acknowledge,
    acknowledge_resources,
    lambda_role,
    python_function,
)
from cdk_stacks.storage import MeteringTable
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.aws.forwarding import (
    DEAD_LETTER_PREFIX,
    ENV_AMBERFLO,
    ENV_BUCKET,
    ENV_SECRET_JSON_KEY,
    ENV_SECRET_NAME,
    FORWARDER_SERVICE,
    METRICS_NAMESPACE,
    render_amberflo_settings,
)
from meterlake.aws.stacks import (
    FORWARDER_BATCH_SIZE,
    FORWARDER_MEMORY_MB,
    STAGER_MEMORY_MB,
    STAGER_SCHEDULE_MINUTES,
)
from meterlake.aws.staging import (
    CHECKPOINT_KEY,
    ENV_BATCH_SIZE,
    ENV_DATABASE,
    ENV_METERS,
    ENV_QUEUE_URL,
    ENV_TABLE,
    ENV_TABLE_BUCKET_ARN,
    LEASE_KEY,
    STAGER_SERVICE,
    STAGER_TIMEOUT_S,
    render_meters,
)
from meterlake.config import Config


def _as_is(*paths: str) -> tuple[tuple[str, str], ...]:
    """Sources copied to the same path inside a bundle."""
    return tuple((path, path) for path in paths)


#: What the forwarder imports: the forwarder, its settings and Amberflo's record shape (api.py), and the module with
#: its handler. Nothing heavier.
FORWARDER_SOURCES: Final = _as_is(
    "meterlake/__init__.py",
    "meterlake/structs.py",
    "meterlake/aws/__init__.py",
    "meterlake/aws/forwarding.py",
    "meterlake/amberflo/__init__.py",
    "meterlake/amberflo/api.py",
    "meterlake/amberflo/forwarder.py",
    "meterlake/amberflo/settings.py",
)
FORWARDER_REQUIREMENTS: Final = ("msgspec", "aws-lambda-powertools", "httpx", "isal")
#: The exact wheels the forwarder's asset installs (``make lock-lambdas`` writes it from the requirements).
FORWARDER_LOCK: Final = LAMBDA_LOCK_DIR / "forwarder.txt"
#: The AWS SDK comes with the Python runtime (should a requirement pull it in); pip's scripts are never run.
FORWARDER_PRUNE: Final = (
    "boto3",
    "boto3-*.dist-info",
    "botocore",
    "botocore-*.dist-info",
    "s3transfer",
    "s3transfer-*.dist-info",
    "bin",
)
#: What the stager imports besides: its module, the outbox's snapshot reader, the meters and the core they use.
STAGER_SOURCES: Final = FORWARDER_SOURCES + _as_is(
    "meterlake/aws/staging.py",
    "meterlake/amberflo/outbox.py",
    "meterlake/lake/__init__.py",
    "meterlake/lake/home.py",
    "meterlake/lake/files.py",
    "meterlake/meters.py",
    "meterlake/schema.py",
    "meterlake/records.py",
)
#: Third-party packages those modules import. Not DuckDB or sqlglot (~70 MB): meters.py imports them only in the
#: SQL functions reconciliation calls, never on the stager's path (the bundle-alone tests prove it).
STAGER_REQUIREMENTS: Final = (*FORWARDER_REQUIREMENTS, "pyiceberg", "pyarrow")
STAGER_LOCK: Final = LAMBDA_LOCK_DIR / "stager.txt"
#: Left out of the asset, which Lambda limits to 262,144,000 bytes unzipped (tests/cdk_stacks/test_asset_sizes.py
#: holds every asset to 75% of it): besides the forwarder's, Arrow Flight, Arrow's C++ headers, sources (Cython
#: and C++, for building against pyarrow) and tests, the unversioned copies of libraries loaded by their soname,
#: zstandard's cffi backend (its C backend is used), pyiceberg's CLI (rich, pygments, markdown-it) and the Thrift
#: bindings of its Hive catalog (the stager reads through Glue) are never imported. Arrow's other libraries
#: (dataset, acero, substrait, ...) stay: pyarrow's core module links them all.
STAGER_PRUNE: Final = (
    *FORWARDER_PRUNE,
    "pyarrow/include",
    "pyarrow/includes",
    "pyarrow/src",
    "pyarrow/*.pyx",
    "pyarrow/*.pxd",
    "pyarrow/*.pxi",
    "pyarrow/tests",
    "pyarrow/*flight*",
    "pyarrow/_pyarrow_cpp_tests*",
    "pyarrow/libarrow_python*.so",
    "pyarrow/libarrow_python*.so.*.*",
    "zstandard/_cffi.*",
    "rich",
    "pygments",
    "markdown_it",
    "mdurl",
    "hive_metastore",
    "fb303",
)
STAGER_HANDLER: Final = "meterlake.aws.staging.stager_handler"
FORWARDER_HANDLER: Final = "meterlake.aws.forwarding.forwarder_handler"

STAGER_TIMEOUT: Final = Duration.seconds(STAGER_TIMEOUT_S)
STAGER_SCHEDULE: Final = Duration.minutes(STAGER_SCHEDULE_MINUTES)
FORWARDER_TIMEOUT: Final = Duration.minutes(3)
#: Transient failures of one batch are retried this long per delivery (past Amberflo's advised 20 s); five
#: budgets plus request timeouts fit the timeout, and the handler stops retrying before the timeout anyway.
FORWARDER_RETRY_BUDGET_S: Final = 25.0
#: SQS hands a message over this often before it moves to the dead-letter queue (~3 h of an Amberflo outage).
MAX_RECEIVE_COUNT: Final = 10
#: Visibility timeout: more than six times the forwarder's timeout, as AWS advises for Lambda event sources.
QUEUE_VISIBILITY: Final = Duration.seconds(FORWARDER_TIMEOUT.to_seconds() * 6 + 60)
DEAD_LETTER_RETENTION: Final = Duration.days(14)
#: Alarm when a record has waited on the forward queue this long: four days before SQS's retention drops it.
MAX_QUEUE_AGE: Final = Duration.days(10)
#: Alarm when the oldest unforwarded commit is older than this (Firehose itself buffers up to 15 minutes).
MAX_FORWARD_LAG: Final = Duration.minutes(30)
#: Lambda's limit on the total size of a function's environment variables.
ENVIRONMENT_LIMIT_BYTES: Final = 4096
#: What the stager needs on the table: read its rows and its definition.
TABLE_READ_PERMISSIONS: Final = ("SELECT", "DESCRIBE")
#: What reading an S3 table through S3 Tables' Iceberg endpoint takes: the bucket, namespace, table, metadata, files.
S3_TABLES_READ_ACTIONS: Final = (
    "s3tables:GetTableBucket",
    "s3tables:GetNamespace",
    "s3tables:GetTable",
    "s3tables:GetTableMetadataLocation",
    "s3tables:GetTableData",
)


class EnvironmentTooLargeError(ValueError):
    """A Lambda's environment (e.g. many meters rendered as JSON) exceeds Lambda's 4 KB limit."""


def stager_bundle(target: PythonTarget) -> PythonBundle:
    """The stager Lambda's asset, for ``target``."""
    pins = project_requirements(STAGER_REQUIREMENTS)
    # pyproject pins pyiceberg with the local runtime's extras (SQLite catalog); the Lambdas use Glue through the
    # runtime's boto3, so the same version range without extras.
    requirements = tuple(re.sub(r"\[[^\]]*\]", "", pin) for pin in pins)
    return PythonBundle(
        sources=STAGER_SOURCES, requirements=requirements, target=target, prune=STAGER_PRUNE, lock=STAGER_LOCK
    )


def forwarder_bundle(target: PythonTarget) -> PythonBundle:
    """The forwarder Lambda's asset, for ``target``."""
    requirements = project_requirements(FORWARDER_REQUIREMENTS)
    return PythonBundle(
        sources=FORWARDER_SOURCES, requirements=requirements, target=target, prune=FORWARDER_PRUNE, lock=FORWARDER_LOCK
    )


def _checked_environment(name: str, environment: dict[str, str]) -> dict[str, str]:
    size = sum(len(key.encode()) + len(value.encode()) for key, value in environment.items())
    if size > ENVIRONMENT_LIMIT_BYTES:
        raise EnvironmentTooLargeError(
            f"the {name} Lambda's environment would be {size} bytes; Lambda allows {ENVIRONMENT_LIMIT_BYTES} "
            "(fewer or shorter meter definitions)"
        )
    return environment


class UsageForwarding(Construct):
    """The forward queue and its dead-letter queue, the stager and forwarder Lambdas, their schedule and alarms.

    With ``amberflo.dry_run`` the forwarder's queue subscription is created disabled: the stager still queues every
    committed record (kept 14 days), nothing is sent, and switching the flag off and redeploying drains the backlog.

    Attributes:
        queue / dead_letter_queue: the records on their way to Amberflo, and those SQS gave up redelivering.
        stager / forwarder: the two Lambdas.
        alarm_topic: the SNS topic every alarm notifies.
    """

    def __init__(
        self, scope: Construct, construct_id: str, *, config: Config, bucket_name: str, table: MeteringTable
    ) -> None:
        super().__init__(scope, construct_id)
        aws = config.meterlake.aws
        amberflo = config.amberflo
        architecture, log_retention_days = aws.lambda_architecture, aws.log_retention_days
        bucket = s3.Bucket.from_bucket_name(self, "LakeBucket", bucket_name)
        target = PythonTarget.for_lambda(
            architecture=architecture, python_version=LAMBDA_PYTHON_VERSION, glibc_2_28=True
        )

        self.dead_letter_queue = sqs.Queue(
            self,
            "DeadLetterQueue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=DEAD_LETTER_RETENTION,
        )
        acknowledge(
            self.dead_letter_queue,
            "AwsSolutions-SQS3",
            "This is the forward queue's dead-letter queue; its messages are alarmed on and redriven by hand.",
        )
        self.queue = sqs.Queue(
            self,
            "ForwardQueue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            visibility_timeout=QUEUE_VISIBILITY,
            retention_period=DEAD_LETTER_RETENTION,
            dead_letter_queue=sqs.DeadLetterQueue(max_receive_count=MAX_RECEIVE_COUNT, queue=self.dead_letter_queue),
        )

        self.stager = self._stager(
            lambda_code(stager_bundle(target)),
            bucket=bucket,
            table=table,
            config=config,
            architecture=architecture,
            log_retention_days=log_retention_days,
        )
        self.forwarder = self._forwarder(
            lambda_code(forwarder_bundle(target)),
            bucket=bucket,
            amberflo=amberflo,
            architecture=architecture,
            log_retention_days=log_retention_days,
        )
        events.Rule(
            self,
            "StagerSchedule",
            description="meterlake: stage newly committed metering events for Amberflo",
            schedule=events.Schedule.rate(STAGER_SCHEDULE),
            targets=[targets.LambdaFunction(self.stager, retry_attempts=0)],
        )
        self.alarm_topic = self._alarm_topic(aws.alarm_email)
        self._alarms()

        CfnOutput(self, "ForwardQueueUrl", value=self.queue.queue_url, description="Records on their way to Amberflo")
        CfnOutput(
            self,
            "ForwardDeadLetterQueueUrl",
            value=self.dead_letter_queue.queue_url,
            description="Batches SQS stopped redelivering (Amberflo unreachable); redrive once it answers",
        )

    def _stager(
        self,
        code: lambda_.Code,
        *,
        bucket: s3.IBucket,
        table: MeteringTable,
        config: Config,
        architecture: str,
        log_retention_days: int,
    ) -> lambda_.Function:
        stack = Stack.of(self)
        table_objects = bucket.arn_for_objects(f"{config.data_firehose_configuration.output_prefix.strip('/')}/*")
        stager_state = [bucket.arn_for_objects(key) for key in (CHECKPOINT_KEY, LEASE_KEY)]
        if table.in_table_bucket:
            assert table.table_arn is not None
            # Read through S3 Tables' Iceberg endpoint: its own actions authorize metadata and files alike.
            reads = [
                iam.PolicyStatement(
                    sid="S3Table",
                    actions=list(S3_TABLES_READ_ACTIONS),
                    resources=[table.table_bucket_arn(stack), table.table_arn],
                )
            ]
        else:
            reads = [
                iam.PolicyStatement(
                    sid="MeteringTable", actions=["glue:GetTable", "glue:GetDatabase"], resources=table.glue_arns(stack)
                ),
                iam.PolicyStatement(sid="LakeFormationData", actions=list(UNSCOPABLE_ACTIONS), resources=["*"]),
                iam.PolicyStatement(sid="TableFiles", actions=["s3:GetObject"], resources=[table_objects]),
            ]
        policy = iam.PolicyDocument(
            statements=[
                *reads,
                iam.PolicyStatement(
                    sid="CheckpointAndLease", actions=["s3:GetObject", "s3:PutObject"], resources=stager_state
                ),
                # S3 answers a GET of a missing key (the first checkpoint, the first lease) 404 only to a caller
                # allowed s3:ListBucket on the bucket, 403 to anyone else. A grant narrowed by an s3:prefix
                # condition does not count (a GET carries no prefix), so it is the bucket's, unconditioned: it
                # reveals key names of the lake bucket, never content.
                iam.PolicyStatement(
                    sid="MissingKeysAreNotFound", actions=["s3:ListBucket"], resources=[bucket.bucket_arn]
                ),
                iam.PolicyStatement(sid="ForwardQueue", actions=["sqs:SendMessage"], resources=[self.queue.queue_arn]),
            ]
        )
        role = lambda_role(
            self,
            "StagerRole",
            description="meterlake Amberflo stager: reads the metering table, queues its records, keeps a checkpoint",
            policy=("Stage", policy),
        )
        grants: list[CfnResource] = []
        if not table.in_table_bucket:
            acknowledge(
                role,
                "AwsSolutions-IAM5[Resource::*]",
                "lakeformation:GetDataAccess supports no resource-level permissions; Lake Formation scopes the data "
                "itself through the SELECT/DESCRIBE grant on the table.",
            )
            acknowledge_resources(
                role,
                "AwsSolutions-IAM5",
                [table_objects],
                "Iceberg data and metadata files have generated names under the table location; the stager may only "
                "read objects there.",
            )
            grants = grant_table_access(
                self, "StagerTableGrant", role=role, table=table, config=config, permissions=TABLE_READ_PERMISSIONS
            )
        environment = {
            ENV_DATABASE: table.database_name,
            ENV_TABLE: table.table_name,
            ENV_BUCKET: bucket.bucket_name,
            ENV_QUEUE_URL: self.queue.queue_url,
            ENV_METERS: render_meters(config.meters),
            ENV_BATCH_SIZE: str(config.amberflo.batch_size),
            "POWERTOOLS_SERVICE_NAME": STAGER_SERVICE,
            "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
        }
        if table.in_table_bucket:
            environment[ENV_TABLE_BUCKET_ARN] = table.table_bucket_arn(stack)
        function = python_function(
            self,
            "Stager",
            role=role,
            architecture=architecture,
            log_retention_days=log_retention_days,
            log_group_id="StagerLogGroup",
            description="meterlake: committed metering events -> Amberflo records on the forward queue",
            handler=STAGER_HANDLER,
            code=code,
            memory_size=STAGER_MEMORY_MB,
            timeout=STAGER_TIMEOUT,
            # No reserved concurrency (it fails in accounts with a low concurrency quota): runs are kept one at a
            # time by the stager's S3 lease, and a missed tick is caught up by the next.
            retry_attempts=0,
            max_event_age=Duration.minutes(2),
            environment=_checked_environment("stager", environment),
        )
        function.node.add_dependency(*grants)
        acknowledge(function, "AwsSolutions-L1", LAMBDA_RUNTIME_REASON)
        return function

    def _forwarder(
        self,
        code: lambda_.Code,
        *,
        bucket: s3.IBucket,
        amberflo: AmberfloSettings,
        architecture: str,
        log_retention_days: int,
    ) -> lambda_.Function:
        dead_letters = bucket.arn_for_objects(f"{DEAD_LETTER_PREFIX}*")
        # A secret's ARN ends in "-" and six random characters, unknown until it exists: match them, nothing more.
        secret = Stack.of(self).format_arn(
            service="secretsmanager",
            resource="secret",
            resource_name=f"{amberflo.api_key_secret_name}-??????",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        policy = iam.PolicyDocument(
            statements=[
                iam.PolicyStatement(sid="ApiKey", actions=["secretsmanager:GetSecretValue"], resources=[secret]),
                iam.PolicyStatement(sid="DeadLetters", actions=["s3:PutObject"], resources=[dead_letters]),
            ]
        )
        role = lambda_role(
            self,
            "ForwarderRole",
            description="meterlake Amberflo forwarder: reads the API key, consumes the queue, stores refused batches",
            policy=("Forward", policy),
        )
        acknowledge_resources(
            role,
            "AwsSolutions-IAM5",
            [secret],
            "Secrets Manager appends '-' and six random characters to a secret's name in its ARN; '??????' matches "
            "exactly those six, so only the configured secret (not one whose name merely starts the same) is read.",
        )
        acknowledge_resources(
            role,
            "AwsSolutions-IAM5",
            [dead_letters],
            "Each refused batch is written under the dead-letter prefix as <date>/<messageId>.json, names known "
            "only at run time; the forwarder may write nowhere else.",
        )
        function = python_function(
            self,
            "Forwarder",
            role=role,
            architecture=architecture,
            log_retention_days=log_retention_days,
            log_group_id="ForwarderLogGroup",
            description="meterlake: sends queued meter records to Amberflo",
            handler=FORWARDER_HANDLER,
            code=code,
            memory_size=FORWARDER_MEMORY_MB,
            timeout=FORWARDER_TIMEOUT,
            environment=_checked_environment(
                "forwarder",
                {
                    ENV_AMBERFLO: render_amberflo_settings(amberflo, retry_budget_s=FORWARDER_RETRY_BUDGET_S),
                    ENV_BUCKET: bucket.bucket_name,
                    ENV_SECRET_NAME: amberflo.api_key_secret_name,
                    ENV_SECRET_JSON_KEY: amberflo.api_key_secret_json_key,
                    "POWERTOOLS_SERVICE_NAME": FORWARDER_SERVICE,
                    "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
                },
            ),
        )
        function.add_event_source(
            event_sources.SqsEventSource(
                self.queue,
                batch_size=FORWARDER_BATCH_SIZE,
                report_batch_item_failures=True,
                enabled=not amberflo.dry_run,
                # The config's requests in flight to Amberflo (SQS's minimum is 2).
                max_concurrency=max(2, amberflo.concurrency),
            )
        )
        acknowledge(function, "AwsSolutions-L1", LAMBDA_RUNTIME_REASON)
        return function

    def _alarm_topic(self, email: str | None) -> sns.Topic:
        """The topic the alarms notify, encrypted with a key CloudWatch may use (SNS's AWS-managed key it may not)."""
        key = kms.Key(
            self,
            "AlarmTopicKey",
            description="meterlake: encrypts the forwarding alarms' SNS topic",
            enable_key_rotation=True,
            # It encrypts alarm notifications in flight, nothing kept: scheduled for deletion with the stack.
            removal_policy=RemovalPolicy.DESTROY,
            pending_window=Duration.days(7),
        )
        key.grant(iam.ServicePrincipal("cloudwatch.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*")
        topic = sns.Topic(
            self,
            "AlarmTopic",
            display_name="meterlake forwarding alarms",
            master_key=key,
            enforce_ssl=True,
        )
        # enforce_ssl gives the topic a policy of its own, which replaces SNS's default one: CloudWatch may then
        # publish only if a statement says so, and only for this account's alarms.
        topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["sns:Publish"],
                resources=[topic.topic_arn],
                conditions={
                    "ArnLike": {
                        "aws:SourceArn": Stack.of(self).format_arn(
                            service="cloudwatch",
                            resource="alarm",
                            resource_name="*",
                            arn_format=ArnFormat.COLON_RESOURCE_NAME,
                        )
                    },
                    "StringEquals": {"aws:SourceAccount": Stack.of(self).account},
                },
            )
        )
        if email is not None:
            topic.add_subscription(subscriptions.EmailSubscription(email))
        CfnOutput(self, "AlarmTopicArn", value=topic.topic_arn, description="Subscribe here to the forwarding alarms")
        return topic

    def _alarms(self) -> None:
        period = Duration.minutes(5)
        cloudwatch.Alarm(
            self,
            "DeadLetterQueueAlarm",
            alarm_description="Batches left the forward queue undelivered: Amberflo was unreachable; redrive them",
            metric=self.dead_letter_queue.metric_approximate_number_of_messages_visible(
                period=period, statistic="Maximum"
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        cloudwatch.Alarm(
            self,
            "ForwardQueueAgeAlarm",
            alarm_description="Records wait on the forward queue for days (forwarder down, or a dry run left on); SQS "
            "drops them after 14 days",
            metric=self.queue.metric_approximate_age_of_oldest_message(period=period, statistic="Maximum"),
            threshold=MAX_QUEUE_AGE.to_seconds(),
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        cloudwatch.Alarm(
            self,
            "ForwardLagAlarm",
            alarm_description="Committed metering events wait too long for the stager (or the stager stopped)",
            metric=cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name="ForwardLagSeconds",
                dimensions_map={"service": STAGER_SERVICE},
                statistic="Maximum",
                period=period,
            ),
            threshold=MAX_FORWARD_LAG.to_seconds(),
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            # The stager reports every minute, 0 when it is caught up: silence means it is not running.
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )
        cloudwatch.Alarm(
            self,
            "ForwarderErrorsAlarm",
            alarm_description="The forwarder Lambda failed (e.g. the API key secret is unreadable)",
            metric=self.forwarder.metric_errors(period=period, statistic="Sum"),
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        cloudwatch.Alarm(
            self,
            "DeadLetteredRecordsAlarm",
            alarm_description=f"Amberflo refused records for good; see s3://<lake bucket>/{DEAD_LETTER_PREFIX}",
            metric=cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name="RecordsDeadLettered",
                dimensions_map={"service": FORWARDER_SERVICE},
                statistic="Sum",
                period=period,
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        cloudwatch.Alarm(
            self,
            "ApiKeyRefusedAlarm",
            alarm_description="Amberflo refuses the API key (401/403): forwarding is paused and every message goes "
            "back to the queue; fix the secret (the next invocation reads it again)",
            metric=cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name="ApiKeyRefused",
                dimensions_map={"service": FORWARDER_SERVICE},
                statistic="Maximum",
                period=period,
            ),
            threshold=0,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        # Every alarm of the stack, this one's and any added later, notifies the topic when it fires and clears.
        action = cloudwatch_actions.SnsAction(self.alarm_topic)
        for child in self.node.children:
            if isinstance(child, cloudwatch.Alarm):
                child.add_alarm_action(action)
                child.add_ok_action(action)


class ForwardingStack(Stack):
    """The app's :class:`UsageForwarding`.

    Attributes:
        forwarding: the queues, Lambdas, schedule and alarms.
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
        self.forwarding = UsageForwarding(self, "Default", config=config, bucket_name=bucket_name, table=table)
