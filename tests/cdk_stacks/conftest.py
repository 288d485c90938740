"""The app is built and synthesized once per session, from a non-default config, so values prove they are read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Template

from cdk_stacks.app import MeterlakeStacks, build_app
from meterlake.aws.stacks import STACK_NAMES
from meterlake.config import Config, load_config, parse_config
from tests.cdk_stacks.iam_evaluation import Deployment
from tests.cdk_stacks.user_apis import API_KEY_USER_API, USER_API_STACKS, add_api_key_user_api, add_user_api

#: Every value differs from the defaults in meterlake/config.py and cdk.context.json, but s3_bucket: the lake bucket
#: is named by CloudFormation, as by default (test_storage.py builds a named one on its own).
TEST_CONTEXT: dict[str, Any] = {
    "data_firehose_configuration": {
        "stream_name": "metering-test",
        "buffering_hints": {"interval_in_seconds": 120, "size_in_mbs": 64},
        "transform_records_with_aws_lambda": {"buffer_size": 0.5, "buffer_interval": 90, "number_of_retries": 7},
        "destination_iceberg_table_configuration": {"database_name": "usage_db", "table_name": "api_events"},
        "output_prefix": "lake/usage_db/api_events",
        "error_output_prefix": "failed/records/!{firehose:error-output-type}/!{timestamp:yyyy}",
    },
    "meterlake": {
        "unmetered_http_methods": ["OPTIONS", "HEAD"],
        "api_stage": "beta",
        "aws": {
            "log_retention_days": 90,
            "error_output_expiration_days": 9,
            "athena_bytes_scanned_cutoff_per_query": 123_000_000,
            "api_throttling_rate_limit": 17,
            "api_throttling_burst_limit": 23,
            "lambda_architecture": "arm64",
            "transform_memory_mb": 1536,
            "snapshot_retention_days": 4,
            "snapshots_to_retain": 6,
            "orphan_file_retention_days": 8,
            "alarm_email": "billing-oncall@example.com",
        },
    },
    "amberflo": {
        "base_url": "https://amberflo.example.test/v1",
        "concurrency": 6,
        "dry_run": True,
        "api_key_secret_name": "team/amberflo",
        "api_key_secret_json_key": "ingestKey",
    },
}


@pytest.fixture(scope="session")
def test_config() -> Config:
    config = parse_config(TEST_CONTEXT)
    assert config != Config()
    return config


@pytest.fixture(scope="session")
def cdk_outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cdk.out")


@pytest.fixture(scope="session")
def stacks(test_config: Config, cdk_outdir: Path) -> Iterator[MeterlakeStacks]:
    """The whole app, synthesized once; synthesis raises if cdk-nag has an unacknowledged finding."""
    previous = os.environ.get("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION")
    os.environ["JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION"] = "20"
    built = build_app(test_config, outdir=str(cdk_outdir))
    for name, stage_name in USER_API_STACKS:
        user_api = add_user_api(built.app, name, stage_name=stage_name, pipeline=built.delivery.delivery)
        user_api.add_dependency(built.delivery)
    built.app.synth()
    yield built
    if previous is None:
        os.environ.pop("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", None)


@pytest.fixture(scope="session")
def templates(stacks: MeterlakeStacks) -> dict[str, Template]:
    """Each stack's synthesized template, by stack name."""
    assembly = stacks.app.synth()
    return {name: Template.from_json(assembly.get_stack_by_name(name).template) for name in STACK_NAMES}


@pytest.fixture(scope="session")
def deployment(templates: dict[str, Template]) -> Deployment:
    """Every stack as deployed in one account and region: CloudFormation expressions resolve to physical names."""
    return Deployment({name: template.to_json() for name, template in templates.items()})


#: The AWS sample's v3 context file, as its repository ships it: its ``s3_tables`` section selects S3 Tables.
SAMPLE_V3_CONTEXT = Path(__file__).parent / "fixtures" / "saas-metering-system-v3.cdk.context.json"


@pytest.fixture(scope="session")
def s3_tables_config() -> Config:
    return load_config(SAMPLE_V3_CONTEXT)


@pytest.fixture(scope="session")
def s3_tables_stacks(
    s3_tables_config: Config, stacks: MeterlakeStacks, cdk_outdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> MeterlakeStacks:
    """The whole app from the sample's v3 context, synthesized once (cdk-nag raises on a finding). The Lambda
    assets are those of the session's first app (same bundles, same hashes), linked in so they are not rebuilt."""
    outdir = tmp_path_factory.mktemp("cdk.out.s3tables")
    for asset in cdk_outdir.glob("asset.*"):
        (outdir / asset.name).symlink_to(asset)
    built = build_app(s3_tables_config, outdir=str(outdir))
    built.app.synth()
    return built


@pytest.fixture(scope="session")
def s3_tables_deployment(s3_tables_stacks: MeterlakeStacks) -> Deployment:
    assembly = s3_tables_stacks.app.synth()
    return Deployment({name: assembly.get_stack_by_name(name).template for name in STACK_NAMES})


def lake_bucket(deployment: Deployment) -> str:
    """The lake bucket's name, as the Storage stack's deployment would have it."""
    (bucket_id,) = [
        logical_id
        for logical_id in deployment.resources("MeterlakeStorage", "AWS::S3::Bucket")
        if logical_id.startswith("LakeBucket")
    ]
    return str(deployment.attribute("MeterlakeStorage", bucket_id, "Ref"))


def resources_of(template: Template, resource_type: str) -> dict[str, dict[str, Any]]:
    """The template's resources of one type, by logical id."""
    return {logical_id: dict(resource) for logical_id, resource in template.find_resources(resource_type).items()}


def only_resource(template: Template, resource_type: str) -> dict[str, Any]:
    """The properties of the template's one resource of ``resource_type``."""
    (resource,) = resources_of(template, resource_type).values()
    properties: dict[str, Any] = resource["Properties"]
    return properties


#: The api_key tenant source: the session's config, its tenants taken from API keys through this mapping.
API_KEY_TENANTS: dict[str, str] = {"a1b2c3d4e5": "acme", "f6g7h8i9j0": "globex"}


@pytest.fixture(scope="session")
def api_key_stacks(
    stacks: MeterlakeStacks, cdk_outdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> MeterlakeStacks:
    """The app with tenants from API keys (so no demo API) and a user API requiring keys, synthesized once with
    cdk-nag; the Lambda assets are the session's first app's, linked in."""
    context = {**TEST_CONTEXT, "meterlake": {**TEST_CONTEXT["meterlake"], "tenant_source": {"kind": "api_key"}}}
    context["meterlake"]["tenant_source"]["tenants_by_api_key"] = API_KEY_TENANTS
    outdir = tmp_path_factory.mktemp("cdk.out.apikeys")
    for asset in cdk_outdir.glob("asset.*"):
        (outdir / asset.name).symlink_to(asset)
    built = build_app(parse_config(context), outdir=str(outdir))
    name, stage_name = API_KEY_USER_API
    add_api_key_user_api(built.app, name, stage_name=stage_name, pipeline=built.delivery.delivery).add_dependency(
        built.delivery
    )
    built.app.synth()
    return built


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the CDK tests in one xdist worker (``--dist loadgroup``), so the app is synthesized once a session."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.xdist_group("cdk"))
