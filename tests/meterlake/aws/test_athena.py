"""Usage SQL on Athena: what is sent (placeholders, bound values, table, workgroup) and what comes back (typed rows).

moto records each StartQueryExecution (QueryString, ExecutionParameters, context) and returns the rows queued through
its static results API; it cannot fail a query or page results, so those two cases use botocore's Stubber.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from botocore.stub import Stubber  # type: ignore[import-untyped]
from moto.moto_api import state_manager

from meterlake.aws.athena import (
    AthenaQueryFailed,
    AthenaRequestError,
    AthenaResultError,
    AthenaTimeout,
    TableBucketOutputError,
    deployed_table_bucket,
    run_athena_query,
)
from meterlake.config import Config, parse_config
from meterlake.lake.query import QueryParamError, QueryResult, TableBucketUnknownError, format_result, load_query
from tests.meterlake.aws.conftest import REGION, queue_athena_result

CONFIG = parse_config(
    {
        "data_firehose_configuration": {
            "destination_iceberg_table_configuration": {"database_name": "billing_lake", "table_name": "api_events"}
        }
    }
)
USAGE_COLUMNS = [
    ("tenant_id", "varchar"),
    ("usage_date", "date"),
    ("requests", "bigint"),
    ("billable_requests", "bigint"),
    ("bytes_out", "bigint"),
    ("errors_4xx", "bigint"),
    ("errors_5xx", "bigint"),
    ("p95_latency_ms", "integer"),
]
USAGE_ROWS: list[list[str | None]] = [
    ["acme", "2024-05-01", "120", "118", "40960", "3", "2", "87"],
    [None, "2024-05-01", "7", "0", "0", "7", "0", "3"],
]
USAGE_TYPED = [
    ("acme", date(2024, 5, 1), 120, 118, 40960, 3, 2, 87),
    (None, date(2024, 5, 1), 7, 0, 0, 7, 0, 3),
]
WINDOW = {"start": "2024-05-01T00:00:00Z", "end": "2024-05-02T00:00:00+00:00"}


def run_usage(athena: Any, params: dict[str, str], config: Config = CONFIG, **options: Any) -> QueryResult:
    return run_athena_query(
        load_query("usage_per_tenant_day"),
        params,
        config=config,
        athena_client=athena,
        workgroup="wg",
        poll_interval_s=0.01,
        **options,
    )


def only_execution(athena: Any) -> dict[str, Any]:
    """The one query started in workgroup ``wg``, as Athena recorded it."""
    ids = athena.list_query_executions(WorkGroup="wg")["QueryExecutionIds"]
    assert len(ids) == 1
    execution: dict[str, Any] = athena.get_query_execution(QueryExecutionId=ids[0])["QueryExecution"]
    return execution


def test_queued_usage_rows_come_back_typed_and_format_like_local(athena: Any) -> None:
    queue_athena_result(USAGE_COLUMNS, USAGE_ROWS)

    result = run_usage(athena, WINDOW)

    assert result.columns == [name for name, _ in USAGE_COLUMNS]
    assert result.rows == USAGE_TYPED
    assert format_result(result, "csv").splitlines() == [
        "tenant_id,usage_date,requests,billable_requests,bytes_out,errors_4xx,errors_5xx,p95_latency_ms",
        "acme,2024-05-01,120,118,40960,3,2,87",
        ",2024-05-01,7,0,0,7,0,3",
    ]
    assert result.to_arrow().num_rows == 2


def test_sql_names_the_configured_table_and_carries_only_placeholders(athena: Any) -> None:
    run_usage(athena, {**WINDOW, "tenant_id": "acme"})

    execution = only_execution(athena)
    sql = execution["Query"]
    assert 'FROM "billing_lake"."api_events" AS metering_events WHERE' in sql
    # The query binds start, end, then tenant_id twice (:tenant_id IS NULL OR tenant_id = :tenant_id).
    assert execution["ExecutionParameters"] == ["'2024-05-01T00:00:00Z'", "'2024-05-02T00:00:00Z'", "'acme'", "'acme'"]
    assert sql.count("?") == 4
    for value in ("2024-05-01T00:00:00Z", "2024-05-02", "acme"):
        assert value not in sql
    assert execution["QueryExecutionContext"] == {"Database": "billing_lake", "Catalog": "AwsDataCatalog"}
    assert execution["WorkGroup"] == "wg"
    assert not execution.get("ResultConfiguration")


def test_absent_optional_parameter_is_bound_as_null(athena: Any) -> None:
    run_usage(athena, WINDOW)

    assert only_execution(athena)["ExecutionParameters"][2:] == ["NULL", "NULL"]


def test_a_quote_in_a_value_never_reaches_the_sql_text(athena: Any) -> None:
    hostile = "x' OR 1=1 --"

    run_usage(athena, {**WINDOW, "tenant_id": hostile})

    execution = only_execution(athena)
    assert hostile not in execution["Query"]
    assert "1=1" not in execution["Query"]
    assert execution["ExecutionParameters"][2:] == ["'x'' OR 1=1 --'"] * 2


def test_output_location_is_sent_when_given(athena: Any) -> None:
    run_usage(athena, WINDOW, output_location="s3://usage-results/meterlake/")

    location = only_execution(athena)["ResultConfiguration"]["OutputLocation"]
    # moto, like Athena, appends <query id>.csv to the prefix.
    assert location.startswith("s3://usage-results/meterlake/")


def test_unknown_parameter_fails_before_any_aws_call(athena: Any) -> None:
    with pytest.raises(QueryParamError, match="bogus"):
        run_usage(athena, {**WINDOW, "bogus": "1"})

    assert athena.list_query_executions(WorkGroup="wg")["QueryExecutionIds"] == []


def test_unknown_workgroup_is_one_clear_error(athena: Any) -> None:
    with pytest.raises(AthenaRequestError, match=r"workgroup 'nope'.*WorkGroup does not exist"):
        run_athena_query(
            load_query("usage_per_tenant_day"), WINDOW, config=CONFIG, athena_client=athena, workgroup="nope"
        )


@pytest.fixture
def slow_athena(athena: Any) -> Iterator[Any]:
    """Athena whose queries stay in each state (QUEUED, RUNNING) for 3 polls before moving on."""
    state_manager.set_transition(model_name="athena::execution", transition={"progression": "manual", "times": 3})
    try:
        yield athena
    finally:
        state_manager.unset_transition("athena::execution")


def test_polls_through_queued_and_running_until_succeeded(slow_athena: Any) -> None:
    queue_athena_result(USAGE_COLUMNS, USAGE_ROWS)

    # Reading results before SUCCEEDED would raise (moto refuses it, as Athena does).
    assert run_usage(slow_athena, WINDOW).rows == USAGE_TYPED


def test_timeout_cancels_the_query(athena: Any) -> None:
    state_manager.set_transition(model_name="athena::execution", transition={"progression": "manual", "times": 10**6})
    try:
        with pytest.raises(AthenaTimeout, match=r"still QUEUED after 0\.2 s; cancelled it") as caught:
            run_usage(athena, WINDOW, timeout_s=0.2)
        state = athena.get_query_execution(QueryExecutionId=caught.value.query_execution_id)["QueryExecution"]
    finally:
        state_manager.unset_transition("athena::execution")
    assert state["Status"]["State"] == "CANCELLED"


def test_values_are_typed_by_column_type(athena: Any) -> None:
    columns = [
        ("n", "bigint"),
        ("small", "smallint"),
        ("ratio", "double"),
        ("amount", "decimal"),
        ("flag", "boolean"),
        ("day", "date"),
        ("at", "timestamp"),
        ("at_zoned", "timestamp with time zone"),
        ("at_offset", "timestamp with time zone"),
        ("tags", "array"),
        ("missing", "bigint"),
    ]
    queue_athena_result(
        columns,
        [
            [
                "9007199254740993",
                "-4",
                "0.25",
                "12.30",
                "true",
                "2024-02-29",
                "2024-05-01 12:34:56.789",
                "2024-05-01 14:34:56.789123456 Europe/Berlin",
                "2024-05-01 10:34:56.000 -02:00",
                "[a, b]",
                None,
            ]
        ],
    )

    (row,) = run_usage(athena, WINDOW).rows

    at = datetime(2024, 5, 1, 12, 34, 56, 789000, tzinfo=UTC)
    assert row == (
        9007199254740993,
        -4,
        0.25,
        Decimal("12.30"),
        True,
        date(2024, 2, 29),
        at,
        at.replace(microsecond=789123),
        at.replace(microsecond=0),
        "[a, b]",
        None,
    )
    assert [type(value) for value in row[:4]] == [int, int, float, Decimal]


def test_a_value_that_is_not_its_type_names_the_column(athena: Any) -> None:
    queue_athena_result([("requests", "bigint")], [["12 requests"]])

    with pytest.raises(AthenaResultError, match=r"'requests' \(bigint\): cannot read '12 requests'"):
        run_usage(athena, WINDOW)


@pytest.fixture
def stubbed(aws_env: None) -> Iterator[tuple[Any, Stubber]]:
    """A real Athena client whose responses come from botocore's Stubber, for what moto cannot produce."""
    client = boto3.client("athena", region_name=REGION)
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _stub_start_and_states(stubber: Stubber, *states: dict[str, Any]) -> None:
    stubber.add_response("start_query_execution", {"QueryExecutionId": "q-1"})
    for status in states:
        stubber.add_response(
            "get_query_execution",
            {"QueryExecution": {"QueryExecutionId": "q-1", "Status": status}},
            {"QueryExecutionId": "q-1"},
        )


def test_failed_state_raises_with_athenas_reason(stubbed: tuple[Any, Stubber]) -> None:
    client, stubber = stubbed
    reason = "COLUMN_NOT_FOUND: line 4:5: Column 'tenant' cannot be resolved"
    _stub_start_and_states(stubber, {"State": "RUNNING"}, {"State": "FAILED", "StateChangeReason": reason})

    with pytest.raises(AthenaQueryFailed) as caught:
        run_usage(client, WINDOW)

    assert (caught.value.state, caught.value.reason, caught.value.query_execution_id) == ("FAILED", reason, "q-1")
    assert reason in str(caught.value)


def test_results_are_read_across_pages(stubbed: tuple[Any, Stubber]) -> None:
    client, stubber = stubbed
    _stub_start_and_states(stubber, {"State": "SUCCEEDED"})
    metadata = {"ColumnInfo": [{"Name": "tenant_id", "Type": "varchar"}, {"Name": "requests", "Type": "bigint"}]}

    def page(*rows: tuple[str, str]) -> dict[str, Any]:
        return {"Rows": [{"Data": [{"VarCharValue": v} for v in row]} for row in rows], "ResultSetMetadata": metadata}

    stubber.add_response(
        "get_query_results",
        {"ResultSet": page(("tenant_id", "requests"), ("a", "1"), ("b", "2")), "NextToken": "page-2"},
        {"QueryExecutionId": "q-1"},
    )
    stubber.add_response(
        "get_query_results",
        {"ResultSet": page(("c", "3"), ("d", "4"))},
        {"QueryExecutionId": "q-1", "NextToken": "page-2"},
    )

    result = run_usage(client, WINDOW)

    assert result.rows == [("a", 1), ("b", 2), ("c", 3), ("d", 4)]


S3_TABLES = parse_config({"s3_tables": {"namespace_name": "usage", "table_name": "events"}})


def test_an_s3_table_is_queried_in_its_table_buckets_catalog(athena: Any) -> None:
    run_usage(athena, WINDOW, config=S3_TABLES, table_bucket="meterlake-1a2b3c4d")

    execution = only_execution(athena)
    assert 'FROM "s3tablescatalog/meterlake-1a2b3c4d"."usage"."events" AS metering_events WHERE' in execution["Query"]
    assert execution["QueryExecutionContext"] == {"Database": "usage", "Catalog": "s3tablescatalog/meterlake-1a2b3c4d"}


def test_an_s3_table_without_its_bucket_is_refused_before_any_call(athena: Any) -> None:
    with pytest.raises(TableBucketUnknownError, match="table bucket's name is needed"):
        run_usage(athena, WINDOW, config=S3_TABLES)
    assert athena.list_query_executions(WorkGroup="wg")["QueryExecutionIds"] == []


def test_the_table_bucket_is_read_from_the_deployed_storage_stack(moto: None) -> None:
    cloudformation = boto3.client("cloudformation", region_name=REGION)
    with pytest.raises(TableBucketOutputError, match="give --table-bucket"):
        deployed_table_bucket(cloudformation)
    template = {
        "Resources": {"Topic": {"Type": "AWS::SNS::Topic"}},
        "Outputs": {"TableBucketName": {"Value": "meterlake-1a2b3c4d"}},
    }
    cloudformation.create_stack(StackName="MeterlakeStorage", TemplateBody=json.dumps(template))
    assert deployed_table_bucket(cloudformation) == "meterlake-1a2b3c4d"
