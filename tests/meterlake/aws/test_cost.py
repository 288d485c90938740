"""The cost model: its arithmetic against figures worked out by hand for one config, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meterlake.aws.cost import (
    US_EAST_1_LIST_PRICES,
    Assumptions,
    CostModelError,
    estimate_cost,
    typical_record_bytes,
)
from meterlake.config import Config, parse_config
from tests.meterlake.cli_process import meterlake

#: Buffers chosen so the hand computation is short: a full vCPU for the transform, and intervals that decide.
CONTEXT = {
    "data_firehose_configuration": {
        "buffering_hints": {"interval_in_seconds": 900, "size_in_mbs": 64},
        "transform_records_with_aws_lambda": {"buffer_size": 1, "buffer_interval": 60},
    },
    "meterlake": {"aws": {"transform_memory_mb": 1769, "lambda_architecture": "arm64"}},
}
ASSUMPTIONS = Assumptions(
    transform_records_per_vcpu_s=100_000,
    invocation_overhead_s=0.05,
    stored_bytes_per_event=100,
    iceberg_puts_per_commit=4,
    iceberg_gets_per_commit=2,
    compaction_dpu_hours_per_gb=0.1,
    maintenance_dpu_hours_per_day=2 / 60,
    athena_queries_per_month=30,
    stager_run_s=1.0,
    forwarder_message_s=0.5,
    sqs_requests_per_message=3,
)

#: 2,000,000 requests of 600-byte records, worked out by hand (binary GB and TB, a 30-day month):
EXPECTED = {
    # each record billed as 5,120 B: 10,240,000,000 B = 9.5367431640625 GB at $0.029
    "Firehose ingestion": 9.5367431640625 * 0.029,
    # 1,200,000,000 B / 1 MiB = 1,145 fills < 2,592,000 s / 60 s = 43,200 intervals -> 43,200 invocations;
    # 43,200 x 0.05 s + 2,000,000 / 100,000 s = 2,180 s x 1769/1024 GB = 3,766.03515625 GB-s
    "Transform Lambda": 3766.03515625 * 0.0000133334 + 43_200 * 0.20 / 1e6,
    # 18 fills of 64 MiB < 2,592,000 / 900 = 2,880 intervals -> 2,880 commits: 11,520 PUT, 5,760 GET
    "S3 requests (Iceberg commits)": 11_520 * 0.005 / 1000 + 5_760 * 0.0004 / 1000,
    # 200,000,000 B = 0.1862645149230957 GB
    "S3 storage (a month of events, kept a month)": 0.1862645149230957 * 0.023,
    # a day is 6,666,667 B, under the 10 MiB minimum: 30 x 10,485,760 B = 0.000286102294921875 TB
    "Athena": 0.000286102294921875 * 5,
    # 0.1862645149230957 GB x 0.1 + 30 days x 2/60 = 1.0186264514923096 DPU-hours
    "Glue table optimizers": 1.0186264514923096 * 0.44,
    # 2 meters: 4,000,000 records = 40,000 messages = 8,000 forwarder invocations; 43,200 stager runs;
    # 43,200 x 1 s x 2 GB + 40,000 x 0.5 s x 0.25 GB = 91,400 GB-s
    "Forwarding Lambdas": 91_400 * 0.0000133334 + (43_200 + 8_000) * 0.20 / 1e6,
    # 40,000 messages x 3 requests
    "SQS": 120_000 * 0.40 / 1e6,
}


def test_the_estimate_matches_the_hand_computed_figures() -> None:
    config = parse_config(CONTEXT)
    estimate = estimate_cost(config, requests_per_month=2_000_000, record_bytes=600, assumptions=ASSUMPTIONS)
    assert {line.component: line.monthly_usd for line in estimate.lines} == pytest.approx(EXPECTED, rel=1e-12)
    assert estimate.total_monthly_usd == pytest.approx(sum(EXPECTED.values()), rel=1e-12)
    assert estimate.per_million_usd == pytest.approx(sum(EXPECTED.values()) / 2, rel=1e-12)
    for line in estimate.lines:
        assert line.per_million_usd == pytest.approx(line.monthly_usd / 2, rel=1e-12)


def test_the_prices_are_the_dated_list_prices() -> None:
    prices = US_EAST_1_LIST_PRICES
    assert (prices.firehose_per_gb, prices.lambda_arm64_per_gb_s, prices.athena_per_tb) == (0.029, 0.0000133334, 5.0)
    assert estimate_cost(Config(), requests_per_month=1).prices_as_of == "2026-11-30"


def test_x86_64_is_priced_per_gb_second_as_x86_64() -> None:
    context = {**CONTEXT, "meterlake": {"aws": {"transform_memory_mb": 1769, "lambda_architecture": "x86_64"}}}
    estimate = estimate_cost(
        parse_config(context), requests_per_month=2_000_000, record_bytes=600, assumptions=ASSUMPTIONS
    )
    transform = next(line for line in estimate.lines if line.component == "Transform Lambda")
    assert transform.monthly_usd == pytest.approx(3766.03515625 * 0.0000166667 + 43_200 * 0.20 / 1e6, rel=1e-12)


def test_the_record_size_follows_the_format_and_each_5_kb_started_is_billed() -> None:
    short = typical_record_bytes(Config())
    longer = typical_record_bytes(parse_config({"meterlake": {"api_stage": "production-eu"}}))
    assert longer - short == len("production-eu") - len("prod")
    assert 400 < short < 5 * 1024
    over = estimate_cost(Config(), requests_per_month=1_000_000, record_bytes=5 * 1024 + 1)
    assert over.lines[0].usage.endswith("billed as 10240 B)")


def test_out_of_range_inputs_are_refused_naming_the_value() -> None:
    with pytest.raises(CostModelError, match="got 0"):
        estimate_cost(Config(), requests_per_month=0)
    with pytest.raises(CostModelError, match="got -5"):
        estimate_cost(Config(), requests_per_month=1, record_bytes=-5)


def test_the_command_prints_text_and_json(tmp_path: Path) -> None:
    (tmp_path / "cdk.context.json").write_text(json.dumps(CONTEXT))
    text = meterlake("aws", "cost", "--requests-per-month", "2000000", "--record-bytes", "600", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "us-east-1 list prices as of 2026-11-30" in text.stdout
    assert "Firehose ingestion" in text.stdout
    assert "total (USD)" in text.stdout
    result = meterlake(
        "aws", "cost", "--requests-per-month", "2000000", "--record-bytes", "600", "--format", "json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("}\n")
    document = json.loads(result.stdout)
    assert document["record_bytes"] == 600
    assert document["total_monthly_usd"] == pytest.approx(sum(EXPECTED.values()), rel=1e-5)
    assert [line["component"] for line in document["lines"]] == list(EXPECTED)


def test_a_bad_value_is_one_error_line(tmp_path: Path) -> None:
    result = meterlake("aws", "cost", "--requests-per-month", "0", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_an_s3_tables_config_says_its_table_is_priced_otherwise() -> None:
    glue = estimate_cost(Config(), requests_per_month=1_000_000)
    s3_tables = estimate_cost(parse_config({"s3_tables": {}}), requests_per_month=1_000_000)
    assert not any("S3 Tables" in note for note in glue.notes)
    assert any("S3 Tables" in note for note in s3_tables.notes)
