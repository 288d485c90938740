"""Schema evolution on AWS: a field appended to the record changes nothing CloudFormation creates the table from,
and `meterlake aws evolve` prints the Athena DDL that adds it to the deployed table."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, TimestamptzType

from meterlake import schema as schema_module
from meterlake.aws.evolve import AthenaTypeError, evolution
from meterlake.config import Config, parse_config
from meterlake.lake.catalog import IncompatibleSchemaError
from meterlake.records import ACCESS_LOG_FIELDS, AccessLogField, FieldType
from meterlake.schema import (
    INGESTED_AT_FIELD_ID,
    METERING_EVENT_CREATION_SCHEMA,
    METERING_EVENT_SCHEMA,
    creation_schema,
)
from tests.meterlake.cli_process import meterlake

#: A field a later meterlake appends to the record.
WAF_ACTION = AccessLogField("waf_action", "context.waf.status", FieldType.STRING, False, "AWS WAF's verdict")


def _record_with(monkeypatch: pytest.MonkeyPatch, *added: AccessLogField) -> Schema:
    monkeypatch.setattr(schema_module, "ACCESS_LOG_FIELDS", (*ACCESS_LOG_FIELDS, *added))
    return schema_module._build_schema()


def test_an_appended_field_takes_a_new_id_and_leaves_the_created_table_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grown = _record_with(monkeypatch, WAF_ACTION)
    # Every existing field keeps its id (ingested_at too); the new one takes the next.
    assert [(f.field_id, f.name) for f in grown.fields][:-1] == [
        (f.field_id, f.name) for f in METERING_EVENT_SCHEMA.fields
    ]
    assert (grown.find_field("waf_action").field_id, grown.find_field("ingested_at").field_id) == (
        INGESTED_AT_FIELD_ID + 1,
        INGESTED_AT_FIELD_ID,
    )
    # What CloudFormation creates the table from does not change: a deployed stack's table is left alone.
    assert creation_schema(grown) == METERING_EVENT_CREATION_SCHEMA
    plan = evolution(Config(), schema=grown)
    assert plan.columns == ["waf_action"]
    assert plan.statement == (
        "ALTER TABLE `restapi_access_log_iceberg_db`.`restapi_access_log_iceberg` ADD COLUMNS (`waf_action` string)"
    )
    assert plan.catalog == "AwsDataCatalog"


def test_today_the_created_table_has_every_field() -> None:
    assert evolution(Config()).statement is None
    assert METERING_EVENT_CREATION_SCHEMA == METERING_EVENT_SCHEMA


def test_an_s3_table_is_altered_in_its_buckets_catalog() -> None:
    grown = Schema(
        *METERING_EVENT_SCHEMA.fields,
        NestedField(19, "bytes_in", LongType()),
        identifier_field_ids=METERING_EVENT_SCHEMA.identifier_field_ids,
    )
    plan = evolution(parse_config({"s3_tables": {}}), table_bucket="meterlake-1a2b3c4d", schema=grown)
    assert plan.catalog == "s3tablescatalog/meterlake-1a2b3c4d"
    assert plan.statement is not None
    assert plan.statement.endswith("ADD COLUMNS (`bytes_in` bigint)")


def test_what_athena_cannot_add_or_what_is_not_an_addition_is_refused() -> None:
    ids = METERING_EVENT_SCHEMA.identifier_field_ids
    with_timestamptz = Schema(
        *METERING_EVENT_SCHEMA.fields, NestedField(19, "seen_at", TimestamptzType()), identifier_field_ids=ids
    )
    with pytest.raises(AthenaTypeError, match="cannot add a timestamptz column"):
        evolution(Config(), schema=with_timestamptz)
    retyped = Schema(
        *(
            NestedField(f.field_id, f.name, LongType(), f.required) if f.name == "status" else f
            for f in METERING_EVENT_SCHEMA.fields
        ),
        identifier_field_ids=ids,
    )
    with pytest.raises(IncompatibleSchemaError, match="status: the table has int, the code long"):
        evolution(Config(), schema=retyped)


def test_the_command_says_there_is_nothing_to_add(tmp_path: Path) -> None:
    result = meterlake("aws", "evolve", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the table as created has every field of the record: nothing to add\n"
