"""Forwarding: schedule -> stager, encrypted queue with redrive and alarms, forwarder with partial batch responses,
and environments rendered from the config (the session's non-default one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aws_cdk.assertions import Template

from cdk_stacks.app import MeterlakeStacks
from cdk_stacks.forwarding import (
    FORWARDER_HANDLER,
    FORWARDER_TIMEOUT,
    MAX_RECEIVE_COUNT,
    STAGER_HANDLER,
    forwarder_bundle,
    stager_bundle,
)
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.aws.forwarding import ENV_AMBERFLO, ENV_SECRET_JSON_KEY, ENV_SECRET_NAME, FORWARDER_SERVICE
from meterlake.aws.staging import ENV_METERS, STAGER_SERVICE
from meterlake.config import Config
from meterlake.meters import DEFAULT_METERS, meter_records, parse_meters
from tests.cdk_stacks.conftest import lake_bucket, resources_of
from tests.cdk_stacks.iam_evaluation import Deployment
from tests.cdk_stacks.local_bundles import HEAVY_MODULES, build_for_this_machine, lambda_runtime, run_alone
from tests.meterlake.amberflo.lake import commit_events, make_events, metering_table

STACK = "MeterlakeForwarding"


def _function(template: Template, handler: str) -> tuple[str, dict[str, Any]]:
    (found,) = [
        (lid, r) for lid, r in resources_of(template, "AWS::Lambda::Function").items() if _handler(r) == handler
    ]
    return found[0], found[1]["Properties"]


def _handler(resource: dict[str, Any]) -> str | None:
    handler: str | None = resource["Properties"].get("Handler")
    return handler


def _roles(deployment: Deployment) -> list[str]:
    return list(deployment.resources(STACK, "AWS::IAM::Role"))


def _queues(template: Template) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(forward queue properties, dead-letter queue properties, dead-letter queue logical id)."""
    queues = resources_of(template, "AWS::SQS::Queue")
    (main_id,) = [lid for lid, q in queues.items() if "RedrivePolicy" in q["Properties"]]
    (dlq_id,) = [lid for lid in queues if lid != main_id]
    return queues[main_id]["Properties"], queues[dlq_id]["Properties"], dlq_id


def test_stack_is_in_the_app_after_storage_and_delivery(stacks: MeterlakeStacks, cdk_outdir: Path) -> None:
    manifest = json.loads((cdk_outdir / "manifest.json").read_text())
    assert {"MeterlakeStorage", "MeterlakeDelivery"} <= set(manifest["artifacts"][STACK]["dependencies"])


def test_schedule_invokes_the_stager_without_reserving_concurrency(templates: dict[str, Template]) -> None:
    """Reserved concurrency fails in accounts with a low concurrency quota; the stager's S3 lease serializes runs."""
    template = templates[STACK]
    stager_id, stager = _function(template, STAGER_HANDLER)
    (rule,) = resources_of(template, "AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    assert [t["Arn"] for t in rule["Properties"]["Targets"]] == [{"Fn::GetAtt": [stager_id, "Arn"]}]
    assert "ReservedConcurrentExecutions" not in stager


def test_queue_is_encrypted_tls_only_and_redrives_to_an_alarmed_dlq(templates: dict[str, Template]) -> None:
    template = templates[STACK]
    queue, dlq, dlq_id = _queues(template)
    for properties in (queue, dlq):
        assert properties["SqsManagedSseEnabled"] is True
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]},
        "maxReceiveCount": MAX_RECEIVE_COUNT,
    }
    assert queue["VisibilityTimeout"] > 6 * FORWARDER_TIMEOUT.to_seconds()
    policies = resources_of(template, "AWS::SQS::QueuePolicy").values()
    denials = [
        s
        for p in policies
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    ]
    assert len(denials) == 2
    alarms = [a["Properties"] for a in resources_of(template, "AWS::CloudWatch::Alarm").values()]
    dlq_alarms = [a for a in alarms if a.get("MetricName") == "ApproximateNumberOfMessagesVisible"]
    assert len(dlq_alarms) == 1
    assert dlq_alarms[0]["Dimensions"][0]["Value"] == {"Fn::GetAtt": [dlq_id, "QueueName"]}
    assert (dlq_alarms[0]["Threshold"], dlq_alarms[0]["ComparisonOperator"]) == (0, "GreaterThanThreshold")
    by_metric = {(a.get("Namespace"), a.get("MetricName")): a for a in alarms}
    lag = by_metric[("meterlake", "ForwardLagSeconds")]
    assert lag["Dimensions"] == [{"Name": "service", "Value": STAGER_SERVICE}]
    assert lag["TreatMissingData"] == "breaching"
    assert ("AWS/Lambda", "Errors") in by_metric
    assert by_metric[("meterlake", "RecordsDeadLettered")]["Dimensions"][0]["Value"] == FORWARDER_SERVICE


def test_forwarder_consumes_the_queue_with_partial_batch_responses(templates: dict[str, Template]) -> None:
    template = templates[STACK]
    forwarder_id, _ = _function(template, FORWARDER_HANDLER)
    queue_id = next(
        lid for lid, q in resources_of(template, "AWS::SQS::Queue").items() if "RedrivePolicy" in q["Properties"]
    )
    (mapping,) = resources_of(template, "AWS::Lambda::EventSourceMapping").values()
    properties = mapping["Properties"]
    assert properties["FunctionName"] == {"Ref": forwarder_id}
    assert properties["EventSourceArn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert properties["BatchSize"] <= 10


def test_environments_carry_the_configs_meters_and_secret(templates: dict[str, Template], test_config: Config) -> None:
    template = templates[STACK]
    _, stager = _function(template, STAGER_HANDLER)
    _, forwarder = _function(template, FORWARDER_HANDLER)
    meters_json = stager["Environment"]["Variables"][ENV_METERS]
    assert parse_meters(json.loads(meters_json)) == test_config.meters
    variables = forwarder["Environment"]["Variables"]
    assert variables[ENV_SECRET_NAME] == test_config.amberflo.api_key_secret_name
    assert variables[ENV_SECRET_JSON_KEY] == test_config.amberflo.api_key_secret_json_key
    amberflo = msgspec.json.decode(variables[ENV_AMBERFLO], type=AmberfloSettings)
    assert amberflo.base_url == test_config.amberflo.base_url
    # The retry budget of one delivery fits the forwarder's timeout, whatever the local runtime's budget is.
    assert amberflo.give_up_after_s < FORWARDER_TIMEOUT.to_seconds()


def test_policies_name_the_table_queue_checkpoint_secret_and_dead_letter_prefix(
    templates: dict[str, Template], test_config: Config, deployment: Deployment
) -> None:
    policies = [p.document for role in _roles(deployment) for p in deployment.role_policies(STACK, role)]
    text = json.dumps(policies)
    bucket = lake_bucket(deployment)
    prefix = test_config.data_firehose_configuration.output_prefix
    assert f"arn:aws:s3:::{bucket}/{prefix}/*" in text
    assert f"{bucket}/amberflo/checkpoint.json" in text
    assert f"{bucket}/amberflo/dead-letters/*" in text
    assert f":secret:{test_config.amberflo.api_key_secret_name}-??????" in text
    grants = resources_of(templates[STACK], "AWS::LakeFormation::PrincipalPermissions").values()
    assert [sorted(g["Properties"]["Permissions"]) for g in grants] == [["DESCRIBE", "SELECT"]]


#: Imports a handler (argv[1]) and prints which of the modules named after it the import loaded.
_IMPORT_HANDLER = """
import importlib
module, _, function = sys.argv[1].rpartition(".")
assert callable(getattr(importlib.import_module(module), function))
print(",".join(name for name in sys.argv[2:] if name in sys.modules))
"""
#: The stager's read path on a table (metadata file argv[1]) with meters (JSON argv[2]): each snapshot's committed
#: events, their meter records and the SQS message bodies, as the handler's stage() computes them. Its Glue catalog
#: and Arrow's S3 filesystem (what it reads through on AWS) load too.
_READ_COMMITTED = """
import json
from pyiceberg.catalog.glue import GlueCatalog
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.table import StaticTable
GlueCatalog("glue", **{"glue.region": "eu-west-1"})
PyArrowFileIO({"s3.region": "eu-west-1"}).fs_by_scheme("s3", "lake")
from meterlake.amberflo.outbox import columns_read, committed_since
from meterlake.aws.staging import record_messages
from meterlake.meters import meter_records, parse_meters
meters = parse_meters(json.loads(sys.argv[2]))
snapshots = []
for committed in committed_since(StaticTable.from_metadata(sys.argv[1]), None, columns=columns_read(meters)):
    batch = meter_records(committed.events, meters)
    sent = sum(len(json.loads(body)) for body in record_messages(batch.records()))
    snapshots.append([committed.snapshot.snapshot_id, len(batch), batch.untenanted, sent])
print(json.dumps({"snapshots": snapshots, "loaded": [name for name in sys.argv[3:] if name in sys.modules]}))
"""


@pytest.fixture(scope="module")
def stager_alone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The stager's bundle built once for this machine, and a directory of what Lambda's runtime adds."""
    root = tmp_path_factory.mktemp("stager-alone")
    return build_for_this_machine(stager_bundle, root / "bundle"), lambda_runtime(root / "runtime")


def _size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 1e6


def test_stager_bundle_alone_imports_its_handler(stager_alone: tuple[Path, Path]) -> None:
    """The stager's bundle (and pruning) imports its handler with nothing else on sys.path; neither DuckDB nor
    sqlglot is in the bundle, nor imported on the handler's path."""
    bundle_dir, runtime_dir = stager_alone
    loaded = run_alone(_IMPORT_HANDLER, STAGER_HANDLER, *HEAVY_MODULES, bundle_dir=bundle_dir, runtime_dir=runtime_dir)
    assert loaded.strip().split(",") == ["pyarrow", "pyiceberg"]
    assert [path.name for path in bundle_dir.iterdir() if path.name.startswith(("duckdb", "_duckdb", "sqlglot"))] == []
    assert not any((bundle_dir / pruned).exists() for pruned in ("botocore", "hive_metastore", "rich", "pyarrow/src"))


def test_stager_bundle_alone_reads_committed_events(stager_alone: tuple[Path, Path], tmp_path: Path) -> None:
    """With only its bundle, the stager reads what two snapshots committed and meters it as the full install does."""
    table = metering_table(tmp_path / "home")
    expected = []
    for offset, events in enumerate((make_events(0, 400), make_events(400, 250)), start=1):
        snapshot_id = commit_events(table, events, offset=offset)
        batch = meter_records(events, DEFAULT_METERS)
        expected.append([snapshot_id, len(batch), batch.untenanted, len(batch)])
    bundle_dir, runtime_dir = stager_alone
    meters = msgspec.json.encode(list(DEFAULT_METERS)).decode()
    output = run_alone(
        _READ_COMMITTED, table.metadata_location, meters, *HEAVY_MODULES, bundle_dir=bundle_dir, runtime_dir=runtime_dir
    )
    result = json.loads(output)
    assert result["snapshots"] == expected
    assert result["loaded"] == ["pyarrow", "pyiceberg"]


def test_forwarder_bundle_is_small_and_imports_no_arrow_or_iceberg(tmp_path: Path) -> None:
    """The forwarder's own bundle holds no Arrow, DuckDB or Iceberg, and its handler imports without them."""
    bundle_dir = build_for_this_machine(forwarder_bundle, tmp_path / "bundle")
    runtime_dir = lambda_runtime(tmp_path / "runtime")
    loaded = run_alone(
        _IMPORT_HANDLER, FORWARDER_HANDLER, *HEAVY_MODULES, bundle_dir=bundle_dir, runtime_dir=runtime_dir
    )
    assert loaded.strip() == ""
    assert not any((bundle_dir / name).exists() for name in ("pyarrow", "duckdb", "pyiceberg", "botocore"))
    assert _size_mb(bundle_dir) < 30


def test_a_dry_run_config_leaves_the_forwarder_unsubscribed(
    templates: dict[str, Template], test_config: Config
) -> None:
    assert test_config.amberflo.dry_run
    (mapping,) = resources_of(templates[STACK], "AWS::Lambda::EventSourceMapping").values()
    assert mapping["Properties"]["Enabled"] is False
    (queue, _, _) = _queues(templates[STACK])
    assert queue["MessageRetentionPeriod"] == 14 * 24 * 3600
    # A dry run left on too long is alarmed before SQS drops what it kept.
    ages = [
        a["Properties"]
        for a in resources_of(templates[STACK], "AWS::CloudWatch::Alarm").values()
        if a["Properties"].get("MetricName") == "ApproximateAgeOfOldestMessage"
    ]
    (age,) = ages
    assert age["Threshold"] < queue["MessageRetentionPeriod"]


def test_every_alarm_notifies_the_encrypted_topic_and_its_subscriber(
    templates: dict[str, Template], test_config: Config
) -> None:
    template = templates[STACK]
    ((topic_id, topic),) = resources_of(template, "AWS::SNS::Topic").items()
    ((key_id, key),) = resources_of(template, "AWS::KMS::Key").items()
    assert topic["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    assert key["Properties"]["EnableKeyRotation"] is True
    cloudwatch_grants = [
        statement
        for statement in key["Properties"]["KeyPolicy"]["Statement"]
        if statement["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    ]
    (grant,) = cloudwatch_grants
    assert set(grant["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    (policy,) = resources_of(template, "AWS::SNS::TopicPolicy").values()
    (publish,) = [
        statement
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if statement["Effect"] == "Allow" and statement["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert publish["Action"] == "sns:Publish"
    assert publish["Resource"] == {"Ref": topic_id}
    assert set(publish["Condition"]) == {"ArnLike", "StringEquals"}
    assert ":alarm:*" in json.dumps(publish["Condition"]["ArnLike"]["aws:SourceArn"])
    alarms = resources_of(template, "AWS::CloudWatch::Alarm").values()
    assert len(alarms) == 6
    assert "ApiKeyRefused" in {a["Properties"].get("MetricName") for a in alarms}
    for alarm in alarms:
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic_id}]
        assert alarm["Properties"]["OKActions"] == [{"Ref": topic_id}]
    (subscription,) = resources_of(template, "AWS::SNS::Subscription").values()
    assert subscription["Properties"]["Protocol"] == "email"
    assert subscription["Properties"]["Endpoint"] == test_config.meterlake.aws.alarm_email
