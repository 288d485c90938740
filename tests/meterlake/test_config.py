"""The one config: the sample's context file loads, bad values fail naming their key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meterlake.config import Config, ConfigError, load_config, parse_config

SAMPLE_CONTEXT: dict[str, Any] = {
    "acknowledged-issue-numbers": [32775],
    "data_firehose_configuration": {
        "stream_name": "random-gen",
        "buffering_hints": {"interval_in_seconds": 60, "size_in_mbs": 128},
        "transform_records_with_aws_lambda": {
            "buffer_size": 3,
            "buffer_interval": 300,
            "number_of_retries": 3,
        },
        "destination_iceberg_table_configuration": {
            "database_name": "restapi_access_log_iceberg_db",
            "table_name": "restapi_access_log_iceberg",
        },
        "output_prefix": "restapi_access_log_iceberg_db/restapi_access_log_iceberg",
        "error_output_prefix": "error/year=!{timestamp:yyyy}/!{firehose:error-output-type}",
    },
}


def test_sample_context_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "cdk.context.json"
    path.write_text(json.dumps(SAMPLE_CONTEXT))
    config = load_config(path)
    assert config.data_firehose_configuration.delivery_stream_name == "amazon-apigateway-random-gen"
    assert config.database_name == "restapi_access_log_iceberg_db"
    assert config.data_firehose_configuration.transform_records_with_aws_lambda.number_of_retries == 3


def test_repository_context_file_loads() -> None:
    config = load_config(Path(__file__).parents[2] / "cdk.context.json")
    assert config.meterlake.unmetered_http_methods == ("OPTIONS",)


def test_prefixed_stream_name_is_kept() -> None:
    config = parse_config({"data_firehose_configuration": {"stream_name": "amazon-apigateway-x"}})
    assert config.data_firehose_configuration.delivery_stream_name == "amazon-apigateway-x"


@pytest.mark.parametrize(
    ("raw", "key", "detail"),
    [
        (
            {"data_firehose_configuration": {"buffering_hints": {"size_in_mbs": 500}}},
            "data_firehose_configuration.buffering_hints.size_in_mbs",
            "got 500",
        ),
        (
            {"data_firehose_configuration": {"destination_iceberg_table_configuration": {"table_name": "a-b"}}},
            "data_firehose_configuration.destination_iceberg_table_configuration.table_name",
            "got 'a-b'",
        ),
        (
            {"data_firehose_configuration": {"transform_records_with_aws_lambda": {"buffer_size": 10}}},
            "transform_records_with_aws_lambda.buffer_size",
            "<= 3",
        ),
        ({"data_firehose_configuration": {"stream_name": "bad name"}}, "stream_name", "letters, digits"),
        ({"data_firehose_configuration": {"stream_name": "x" * 50}}, "stream_name", "64"),
        ({"meterlake": {"local": {"host": "0.0.0.0"}}}, "meterlake.local", "loopback"),
        ({"meterlake": {"typo": 1}}, "meterlake", "unknown field `typo`"),
    ],
)
def test_bad_value_names_its_key(raw: dict[str, Any], key: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert key in message
    assert detail in message
    assert "\n" not in message


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METERLAKE_CONFIG", raising=False)
    assert load_config() == Config()


def test_repository_context_file_holds_the_aws_defaults() -> None:
    config = load_config(Path(__file__).parents[2] / "cdk.context.json")
    assert config.meterlake.aws == Config().meterlake.aws


@pytest.mark.parametrize(
    ("aws", "key", "detail"),
    [
        ({"log_retention_days": 8}, "meterlake.aws", "CloudWatch Logs allows only"),
        ({"lambda_architecture": "mips"}, "meterlake.aws.lambda_architecture", "'mips'"),
        (
            {"athena_bytes_scanned_cutoff_per_query": 5},
            "meterlake.aws.athena_bytes_scanned_cutoff_per_query",
            ">= 10000000",
        ),
        ({"api_throttling_burst_limit": -1}, "meterlake.aws.api_throttling_burst_limit", "got -1"),
        ({"transform_memory_mb": 64}, "meterlake.aws.transform_memory_mb", ">= 128"),
        ({"compaction": True}, "meterlake.aws", "unknown field `compaction`"),
    ],
)
def test_bad_aws_value_names_its_key(aws: dict[str, Any], key: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"meterlake": {"aws": aws}})
    assert key in str(info.value)
    assert detail in str(info.value)


def test_aws_values_are_read() -> None:
    config = parse_config({"meterlake": {"aws": {"log_retention_days": 90, "lambda_architecture": "x86_64"}}})
    assert config.meterlake.aws.log_retention_days == 90
    assert config.meterlake.aws.lambda_architecture == "x86_64"
