"""Run the usage SQL of ``sql/`` on Amazon Athena, with the same parameter declarations and result type as locally.

The table reference becomes ``"<database>"."<table>"`` from the config and every parameter travels in
``ExecutionParameters`` behind a positional ``?``: a value never becomes part of the SQL text. Athena returns every
value as text; :func:`run_athena_query` types it by the column's declared type so
:func:`~meterlake.lake.query.format_result` prints an Athena result exactly as it prints a local one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from meterlake.aws import AwsError
from meterlake.aws.stacks import ATHENA_WORKGROUP, STORAGE_STACK
from meterlake.config import Config
from meterlake.lake.query import QueryFile, QueryResult, athena_catalog, athena_table, bind_params, prepare

#: The workgroup the Analytics stack creates and `meterlake query --athena` uses by default.
WORKGROUP = ATHENA_WORKGROUP
#: Each poll waits this much longer than the one before, up to :data:`MAX_POLL_INTERVAL_S`.
POLL_BACKOFF = 1.5
MAX_POLL_INTERVAL_S = 5.0

_SUCCEEDED = "SUCCEEDED"
_FINISHED_UNSUCCESSFULLY = ("FAILED", "CANCELLED")
_INTEGER_TYPES = frozenset({"tinyint", "smallint", "integer", "int", "bigint"})
_FLOAT_TYPES = frozenset({"double", "float", "real"})
_TIMESTAMP_TEXT = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[ T](?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d+))?(?:\s*(?P<zone>\S+))?$"
)
_UTC_NAMES = frozenset({"UTC", "Z", "Etc/UTC", "GMT"})


class AthenaError(AwsError):
    """Base of the failures to run a query on Athena."""


class AthenaRequestError(AthenaError):
    """Athena refused a request (unknown workgroup, access denied, throttled) or could not be reached at all."""

    def __init__(self, operation: str, detail: str) -> None:
        self.operation = operation
        self.detail = detail
        super().__init__(f"Athena {operation}: {detail}")


class AthenaQueryFailed(AthenaError):  # noqa: N818 - the name the CLI and callers agreed on
    """The query ran and ended FAILED or CANCELLED; ``reason`` is Athena's explanation."""

    def __init__(self, state: str, reason: str, query_execution_id: str) -> None:
        self.state = state
        self.reason = reason
        self.query_execution_id = query_execution_id
        super().__init__(f"Athena query {query_execution_id} {state}: {reason}")


class AthenaTimeout(AthenaError):  # noqa: N818 - the name the CLI and callers agreed on
    """The query did not finish within the timeout; it was cancelled (``cancel_error`` says if that failed)."""

    def __init__(self, query_execution_id: str, state: str, timeout_s: float, cancel_error: str | None) -> None:
        self.query_execution_id = query_execution_id
        self.state = state
        self.timeout_s = timeout_s
        self.cancel_error = cancel_error
        outcome = f"could not cancel it ({cancel_error})" if cancel_error else "cancelled it"
        super().__init__(f"Athena query {query_execution_id} still {state} after {timeout_s:g} s; {outcome}")


class AthenaResultError(AthenaError):
    """A result value is not what its column's declared type says it is."""

    def __init__(self, column: str, athena_type: str, value: str) -> None:
        self.column = column
        self.athena_type = athena_type
        self.value = value
        super().__init__(f"Athena result column {column!r} ({athena_type}): cannot read {value!r}")


class TableBucketOutputError(AthenaError):
    """The deployed Storage stack does not say which table bucket holds the S3 table."""


def deployed_table_bucket(cloudformation_client: Any) -> str:
    """The table bucket's name from the deployed ``MeterlakeStorage`` stack's ``TableBucketName`` output.

    Raises:
        TableBucketOutputError: the stack is not deployed here, or has no such output (a Glue table).
    """
    try:
        stacks = _call(cloudformation_client.describe_stacks, "DescribeStacks", StackName=STORAGE_STACK)["Stacks"]
    except AthenaRequestError as exc:
        raise TableBucketOutputError(
            f"cannot read {STORAGE_STACK}'s outputs to find the table bucket ({exc}); give --table-bucket"
        ) from None
    outputs = {o["OutputKey"]: o["OutputValue"] for stack in stacks for o in stack.get("Outputs", [])}
    if "TableBucketName" not in outputs:
        raise TableBucketOutputError(f"{STORAGE_STACK} has no TableBucketName output: is it deployed with s3_tables?")
    bucket: str = outputs["TableBucketName"]
    return bucket


def run_athena_query(
    query: QueryFile,
    params: Mapping[str, str],
    *,
    config: Config,
    athena_client: Any,
    workgroup: str,
    output_location: str | None = None,
    table_bucket: str | None = None,
    poll_interval_s: float = 0.5,
    timeout_s: float = 300,
) -> QueryResult:
    """Run ``query`` on Athena in ``workgroup`` and return its typed rows.

    ``params`` are the raw ``--param`` texts, validated against the query's declarations before any AWS call.
    ``output_location`` (``s3://...``) overrides the workgroup's result location; without it the workgroup's is used.
    ``table_bucket`` names the table bucket of an S3 table (``MeterlakeStorage``'s ``TableBucketName`` output).
    Polling starts every ``poll_interval_s`` and backs off; after ``timeout_s`` (or on Ctrl-C) the query is cancelled.

    Raises:
        QueryParamError: a parameter is unknown, missing or malformed (no AWS call was made).
        QueryDefinitionError: the query cannot be prepared for Athena.
        AthenaRequestError: Athena refused a request or could not be reached.
        AthenaQueryFailed: the query ended FAILED or CANCELLED.
        AthenaTimeout: the query was still running after ``timeout_s``.
        AthenaResultError: a returned value does not match its column type.
    """
    bound = bind_params(query, params)
    table = athena_table(config, table_bucket=table_bucket)
    prepared = prepare(query.sql, dialect="athena", table=table, params=bound)
    # prepare(dialect="athena") returns the values in placeholder order, as ExecutionParameters wants them.
    assert isinstance(prepared.parameters, list)
    request: dict[str, Any] = {
        "QueryString": prepared.sql,
        "WorkGroup": workgroup,
        "QueryExecutionContext": {
            "Database": config.database_name,
            "Catalog": athena_catalog(config, table_bucket=table_bucket),
        },
    }
    if prepared.parameters:
        request["ExecutionParameters"] = prepared.parameters
    if output_location is not None:
        request["ResultConfiguration"] = {"OutputLocation": output_location}
    started = _call(
        athena_client.start_query_execution,
        f"StartQueryExecution (workgroup {workgroup!r}, database {config.database_name!r})",
        **request,
    )
    execution_id: str = started["QueryExecutionId"]
    try:
        _wait_until_succeeded(athena_client, execution_id, poll_interval_s=poll_interval_s, timeout_s=timeout_s)
    except KeyboardInterrupt:
        # Leaving it running would keep scanning (and billing) data nobody will read.
        _cancel(athena_client, execution_id)
        raise
    return _fetch_results(athena_client, execution_id)


def _wait_until_succeeded(client: Any, execution_id: str, *, poll_interval_s: float, timeout_s: float) -> None:
    """Poll GetQueryExecution with backoff until SUCCEEDED; raise on FAILED/CANCELLED or after the timeout."""
    deadline = time.monotonic() + timeout_s
    interval = poll_interval_s
    while True:
        execution = _call(client.get_query_execution, "GetQueryExecution", QueryExecutionId=execution_id)
        status = execution["QueryExecution"]["Status"]
        state: str = status["State"]
        if state == _SUCCEEDED:
            return
        if state in _FINISHED_UNSUCCESSFULLY:
            raise AthenaQueryFailed(state, _failure_reason(status), execution_id)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AthenaTimeout(execution_id, state, timeout_s, _cancel(client, execution_id))
        time.sleep(min(interval, remaining))
        interval = min(interval * POLL_BACKOFF, MAX_POLL_INTERVAL_S)


def _failure_reason(status: Mapping[str, Any]) -> str:
    """Athena's explanation of a FAILED or CANCELLED state."""
    reason = status.get("StateChangeReason") or status.get("AthenaError", {}).get("ErrorMessage")
    return str(reason) if reason else "(Athena gave no reason)"


def _cancel(client: Any, execution_id: str) -> str | None:
    """Stop a running query; the error text if Athena would not, else None."""
    try:
        _call(client.stop_query_execution, "StopQueryExecution", QueryExecutionId=execution_id)
    except AthenaRequestError as exc:
        return exc.detail
    return None


def _fetch_results(client: Any, execution_id: str) -> QueryResult:
    """Read every page of GetQueryResults and type the values by the result set's column types."""
    columns: list[tuple[str, str]] | None = None
    rows: list[tuple[Any, ...]] = []
    token: str | None = None
    while True:
        page_request: dict[str, Any] = {"QueryExecutionId": execution_id}
        if token:
            page_request["NextToken"] = token
        page = _call(client.get_query_results, "GetQueryResults", **page_request)
        result_set = page["ResultSet"]
        page_rows = result_set.get("Rows", [])
        if columns is None:
            columns = [(c["Name"], c["Type"]) for c in result_set["ResultSetMetadata"]["ColumnInfo"]]
            # A SELECT's first row on the first page repeats the column labels.
            page_rows = page_rows[1:]
        for row in page_rows:
            cells = [cell.get("VarCharValue") for cell in row["Data"]]
            rows.append(tuple(_typed(text, kind, name) for text, (name, kind) in zip(cells, columns, strict=True)))
        token = page.get("NextToken")
        if not token:
            return QueryResult(columns=[name for name, _ in columns], rows=rows)


def _typed(text: str | None, athena_type: str, column: str) -> Any:
    """One value as Python: ints, floats, Decimal, bool, date, UTC datetime; other types stay text; NULL is None."""
    if text is None:
        return None
    base = athena_type.split("(", 1)[0].strip().lower()
    try:
        if base in _INTEGER_TYPES:
            return int(text)
        if base in _FLOAT_TYPES:
            return float(text)
        if base == "decimal":
            return Decimal(text)
        if base == "boolean":
            return {"true": True, "false": False}[text.lower()]
        if base == "date":
            return date.fromisoformat(text)
        if base.startswith("timestamp"):
            return _timestamp(text)
    except (ValueError, KeyError, InvalidOperation, ZoneInfoNotFoundError):
        raise AthenaResultError(column, athena_type, text) from None
    return text


def _timestamp(text: str) -> datetime:
    """Athena's ``2024-05-01 12:00:00.000[ zone]`` as a UTC datetime; a value without a zone is UTC."""
    match = _TIMESTAMP_TEXT.match(text.strip())
    if not match:
        raise ValueError(text)
    # Trino prints up to 12 fractional digits; Python keeps microseconds.
    fraction = (match.group("fraction") or "0")[:6].ljust(6, "0")
    moment = datetime.fromisoformat(f"{match.group('date')}T{match.group('time')}.{fraction}")
    zone = match.group("zone")
    if zone is None or zone in _UTC_NAMES:
        return moment.replace(tzinfo=UTC)
    if zone[0] in "+-":
        return datetime.fromisoformat(moment.isoformat() + zone).astimezone(UTC)
    return moment.replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)


def _call(operation: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    """Call one Athena API operation, turning botocore's errors into :class:`AthenaRequestError`."""
    try:
        return operation(**kwargs)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise AthenaRequestError(name, f"{error.get('Code', 'error')}: {error.get('Message', exc)}") from exc
    except BotoCoreError as exc:
        raise AthenaRequestError(name, str(exc)) from exc
