"""Config keys a newcomer gets wrong (issue 13, defect 7): a typo is refused, API Gateway's stage names are allowed,
the AWS sample's v3 context keeps its s3_tables section, CDK's own keys still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meterlake.config import ConfigError, load_config, parse_config

FIXTURES = Path(__file__).parents[1] / "cdk_stacks" / "fixtures"


def test_a_misspelt_section_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"meterlak: not a meterlake setting .*did you mean 'meterlake'\?"):
        parse_config({"meterlak": {"api_stage": "v1"}})


def test_the_cdks_own_keys_still_load() -> None:
    config = parse_config(
        {
            "@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy": True,
            "availability-zones:account=123456789012:region=us-east-1": ["us-east-1a"],
            "acknowledged-issue-numbers": [32775],
            "meterlake": {"api_stage": "v1"},
        }
    )
    assert config.meterlake.api_stage == "v1"


@pytest.mark.parametrize("stage", ["prod-eu", "v1_beta", "a" * 128])
def test_stage_names_api_gateway_allows(stage: str) -> None:
    assert parse_config({"meterlake": {"api_stage": stage}}).meterlake.api_stage == stage


@pytest.mark.parametrize("stage", ["prod.eu", "", "a" * 129, "v 1"])
def test_stage_names_api_gateway_refuses(stage: str) -> None:
    with pytest.raises(ConfigError, match=r"meterlake\.api_stage"):
        parse_config({"meterlake": {"api_stage": stage}})


def test_the_samples_v3_context_keeps_its_s3_tables_section() -> None:
    path = FIXTURES / "saas-metering-system-v3.cdk.context.json"
    raw = json.loads(path.read_text())
    config = load_config(path)
    assert config.s3_tables is not None
    assert config.s3_tables.namespace_name == raw["s3_tables"]["namespace_name"]
    assert config.table_name == raw["s3_tables"]["table_name"]
