"""Analytics: the workgroup's guards come from config; every sql/ query is registered against the real table."""

from __future__ import annotations

from aws_cdk.assertions import Template

from cdk_stacks.analytics import OPTIMIZER_LOG_GROUPS, athena_named_queries
from meterlake.config import Config
from meterlake.lake.query import TABLE_PLACEHOLDER, list_queries
from tests.cdk_stacks.conftest import lake_bucket, only_resource, resources_of
from tests.cdk_stacks.iam_evaluation import Deployment


def test_workgroup_is_enforced_encrypted_and_capped(templates: dict[str, Template], deployment: Deployment) -> None:
    workgroup = only_resource(templates["MeterlakeAnalytics"], "AWS::Athena::WorkGroup")
    configuration = deployment.resolve("MeterlakeAnalytics", workgroup["WorkGroupConfiguration"])
    assert configuration["EnforceWorkGroupConfiguration"] is True
    assert configuration["BytesScannedCutoffPerQuery"] == 123_000_000
    assert configuration["EngineVersion"] == {"SelectedEngineVersion": "Athena engine version 3"}
    assert configuration["ResultConfiguration"] == {
        "OutputLocation": f"s3://{lake_bucket(deployment)}/athena-results/",
        "EncryptionConfiguration": {"EncryptionOption": "SSE_S3"},
    }


def test_every_query_is_registered_against_the_configured_table(
    templates: dict[str, Template], test_config: Config
) -> None:
    named = {
        q["Properties"]["Name"]: q["Properties"]
        for q in resources_of(templates["MeterlakeAnalytics"], "AWS::Athena::NamedQuery").values()
    }
    assert set(named) == {query.name for query in list_queries()}
    for query in list_queries():
        registered = named[query.name]
        assert registered["Database"] == "usage_db"
        assert registered["Description"].startswith(query.description)
        # The bare table name survives only as the alias the SQL's qualified columns resolve through.
        assert f'"usage_db"."api_events" AS {TABLE_PLACEHOLDER}' in registered["QueryString"]
        assert f"FROM {TABLE_PLACEHOLDER}" not in registered["QueryString"]
    for prepared in athena_named_queries(test_config):
        assert named[prepared.name]["QueryString"] == prepared.sql


def test_parameter_order_matches_the_placeholders(test_config: Config) -> None:
    for query in athena_named_queries(test_config):
        assert query.sql.count("?") == len(query.parameter_order)
        assert ":" not in "".join(query.parameter_order)
    (hour,) = [q for q in athena_named_queries(test_config) if q.name == "usage_per_tenant_hour"]
    assert hour.parameter_order[:2] == ("start", "end")


def test_table_optimizers_cover_compaction_retention_and_orphans(templates: dict[str, Template]) -> None:
    template = templates["MeterlakeAnalytics"]
    optimizers = {
        o["Properties"]["Type"]: o["Properties"] for o in resources_of(template, "AWS::Glue::TableOptimizer").values()
    }
    assert set(optimizers) == set(OPTIMIZER_LOG_GROUPS)
    for optimizer in optimizers.values():
        assert (optimizer["DatabaseName"], optimizer["TableName"]) == ("usage_db", "api_events")
    retention = optimizers["retention"]["TableOptimizerConfiguration"]["RetentionConfiguration"]["IcebergConfiguration"]
    assert (retention["SnapshotRetentionPeriodInDays"], retention["NumberOfSnapshotsToRetain"]) == (4, 6)
    orphans = optimizers["orphan_file_deletion"]["TableOptimizerConfiguration"]["OrphanFileDeletionConfiguration"]
    # No location: Glue then scans the table's own, which ends in the Storage stack's id and no other table shares.
    assert orphans["IcebergConfiguration"] == {"OrphanFileRetentionPeriodInDays": 8}
