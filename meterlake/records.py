"""The API Gateway access-log record, defined once.

Each field names the metering-event column it becomes, the API Gateway ``$context`` variable that fills it, and
its type. The CDK stack renders the stage's access-log format from this table, the local gateway fills the same
fields, the transform Lambda types them and the Iceberg schema (``meterlake.schema``) is generated from them.

This module is stdlib-only on purpose: it is bundled into the transform Lambda's asset.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass

#: What API Gateway writes for a ``$context`` variable that has no value.
MISSING = "-"

#: The column the transform adds to every metering event: when the pipeline processed it (UTC microseconds).
INGESTED_AT = "ingested_at"

#: The field that says whose usage a request is.
TENANT_FIELD = "tenant_id"
#: A tenant value matching this (RE2, as pyarrow and DuckDB use; its ``\s`` is ``[\t\n\f\r ]``) is no tenant:
#: blank, or API Gateway's ``-``. The transform stores such a value as null, and meters never bill it.
NO_TENANT_PATTERN = r"^\s*(?:" + MISSING + r")?\s*$"


class FieldType(enum.Enum):
    """How a field's text in the access log is typed by the transform."""

    STRING = "string"
    INT = "int"
    LONG = "long"
    #: Epoch milliseconds in the log; a UTC timestamp in microseconds in the table.
    EPOCH_MILLIS = "epoch_millis"


@dataclass(frozen=True, slots=True)
class AccessLogField:
    """One field of the access-log record: column name, ``$context`` variable (without ``$``), type."""

    name: str
    context_variable: str
    type: FieldType
    required: bool
    doc: str


ACCESS_LOG_FIELDS: tuple[AccessLogField, ...] = (
    AccessLogField("request_id", "context.requestId", FieldType.STRING, True, "API Gateway request id"),
    AccessLogField("api_id", "context.apiId", FieldType.STRING, False, "REST API id"),
    AccessLogField("stage", "context.stage", FieldType.STRING, False, "Deployment stage"),
    AccessLogField(
        "tenant_id",
        "context.authorizer.claims['custom:tenant_id']",
        FieldType.STRING,
        False,
        "Cognito claim custom:tenant_id; null for unauthenticated requests",
    ),
    AccessLogField(
        "user", "context.authorizer.claims['cognito:username']", FieldType.STRING, False, "Cognito user name"
    ),
    AccessLogField(
        "client_id", "context.authorizer.claims.aud", FieldType.STRING, False, "Cognito app client id (aud)"
    ),
    AccessLogField("ip", "context.identity.sourceIp", FieldType.STRING, False, "Caller's source IP"),
    AccessLogField("user_agent", "context.identity.userAgent", FieldType.STRING, False, "User-Agent header"),
    AccessLogField(
        "request_time", "context.requestTimeEpoch", FieldType.EPOCH_MILLIS, True, "When the request arrived"
    ),
    AccessLogField("http_method", "context.httpMethod", FieldType.STRING, True, "HTTP method"),
    AccessLogField(
        "resource_path",
        "context.resourcePath",
        FieldType.STRING,
        False,
        "Route template, e.g. /random/strings",
    ),
    AccessLogField("path", "context.path", FieldType.STRING, False, "Request path as sent"),
    AccessLogField("status", "context.status", FieldType.INT, True, "HTTP status of the response"),
    AccessLogField("protocol", "context.protocol", FieldType.STRING, False, "HTTP protocol"),
    AccessLogField("response_length", "context.responseLength", FieldType.LONG, False, "Response body size in bytes"),
    AccessLogField("response_latency_ms", "context.responseLatency", FieldType.INT, False, "Total latency in ms"),
    AccessLogField(
        "integration_latency_ms",
        "context.integrationLatency",
        FieldType.INT,
        False,
        "Backend integration latency in ms",
    ),
)

FIELDS_BY_NAME: Mapping[str, AccessLogField] = {f.name: f for f in ACCESS_LOG_FIELDS}


def render_access_log_format() -> str:
    """Render API Gateway's access-log format string: one JSON object, every value quoted.

    Quoting every value keeps the line valid JSON whatever API Gateway substitutes (``-`` for a missing number,
    for instance); typing is the transform's job, not the format's.
    """
    members = ",".join(f'"{f.name}":"${f.context_variable}"' for f in ACCESS_LOG_FIELDS)
    return "{" + members + "}"


def render_access_log_line(values: Mapping[str, object | None]) -> bytes:
    """Render one access-log line the way API Gateway fills the format: every value a string, ``-`` if absent.

    Raises:
        KeyError: if ``values`` names a field the record does not define.
    """
    unknown = set(values) - FIELDS_BY_NAME.keys()
    if unknown:
        raise KeyError(f"not access-log fields: {sorted(unknown)}")
    line = {f.name: MISSING if values.get(f.name) is None else str(values[f.name]) for f in ACCESS_LOG_FIELDS}
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode()
