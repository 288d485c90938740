"""The access-log record and the table schema generated from it."""

from __future__ import annotations

import json

import pytest

from meterlake.records import ACCESS_LOG_FIELDS, INGESTED_AT, render_access_log_format, render_access_log_line
from meterlake.schema import METERING_EVENT_PARTITION_SPEC, METERING_EVENT_SCHEMA

REQUIRED_FIELDS = {
    "request_id", "api_id", "stage", "tenant_id", "user", "client_id", "ip", "user_agent", "request_time",
    "http_method", "resource_path", "path", "status", "protocol", "response_length", "response_latency_ms",
    "integration_latency_ms",
}  # fmt: skip


def test_record_has_every_field_the_product_needs() -> None:
    assert {f.name for f in ACCESS_LOG_FIELDS} >= REQUIRED_FIELDS


def test_format_is_json_with_every_value_quoted_even_after_substitution() -> None:
    rendered = render_access_log_format()
    parsed = json.loads(rendered)
    assert list(parsed) == [f.name for f in ACCESS_LOG_FIELDS]
    assert parsed["tenant_id"] == "$context.authorizer.claims['custom:tenant_id']"
    # API Gateway substitutes '-' for missing values: the line must stay valid JSON.
    substituted = rendered
    for field in ACCESS_LOG_FIELDS:
        substituted = substituted.replace(f"${field.context_variable}", "-")
    assert set(json.loads(substituted).values()) == {"-"}


def test_rendered_line_escapes_quotes_and_marks_missing() -> None:
    line = render_access_log_line({"request_id": "r1", "user_agent": 'say "hi"', "status": 200})
    parsed = json.loads(line)
    assert parsed["user_agent"] == 'say "hi"'
    assert parsed["status"] == "200"
    assert parsed["tenant_id"] == "-"
    with pytest.raises(KeyError):
        render_access_log_line({"not_a_field": 1})


def test_schema_is_generated_from_the_record() -> None:
    names = [f.name for f in METERING_EVENT_SCHEMA.fields]
    assert names == [f.name for f in ACCESS_LOG_FIELDS] + [INGESTED_AT]
    assert str(METERING_EVENT_SCHEMA.find_field("request_time").field_type) == "timestamptz"
    assert METERING_EVENT_SCHEMA.identifier_field_names() == {"request_id", "request_time"}
    assert METERING_EVENT_SCHEMA.find_field("request_id").required
    (partition,) = METERING_EVENT_PARTITION_SPEC.fields
    assert str(partition.transform) == "day"
    assert partition.source_id == METERING_EVENT_SCHEMA.find_field("request_time").field_id
    # Equality deletes (Firehose's upserts) only reach their own partition: the keys must fix it.
    assert partition.source_id in METERING_EVENT_SCHEMA.identifier_field_ids
