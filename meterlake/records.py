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
#: The Cognito ID token claim holding the tenant, unless the config names another (a custom user-pool attribute).
DEFAULT_TENANT_CLAIM = "custom:tenant_id"
#: A tenant value matching this (RE2, as pyarrow and DuckDB use; its ``\s`` is ``[\t\n\f\r ]``) is no tenant:
#: blank, or API Gateway's ``-``. The transform stores such a value as null, and meters never bill it.
NO_TENANT_PATTERN = r"^\s*(?:" + MISSING + r")?\s*$"
#: NO_TENANT_PATTERN for Python's ``re``, whose ``\s`` also matches ``\v`` and Unicode spaces (tenants to the lake).
NO_TENANT_PATTERN_PYTHON = NO_TENANT_PATTERN.replace(r"\s", "[\t\n\f\r ]")


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
        f"context.authorizer.claims['{DEFAULT_TENANT_CLAIM}']",
        FieldType.STRING,
        False,
        "Whose usage it is (by default the Cognito claim custom:tenant_id); null when the request has none",
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

#: The field naming who made the request, beside the tenant.
USER_FIELD = "user"
#: The request header API Gateway reads a caller's API key from (its id is ``$context.identity.apiKeyId``).
API_KEY_HEADER = "x-api-key"


class TenantSourceKind(enum.Enum):
    """Where API Gateway finds a request's tenant: how the API authorizes its callers."""

    #: A claim of the Cognito user pool authorizer's ID token (DEFAULT_TENANT_CLAIM unless configured).
    COGNITO_CLAIM = "cognito_claim"
    #: A key of the context a Lambda authorizer returns (``$context.authorizer.<key>``).
    AUTHORIZER_CONTEXT = "authorizer_context"
    #: The API key the caller sent: its id is logged, and the transform maps it to the key's tenant.
    API_KEY = "api_key"


@dataclass(frozen=True, slots=True)
class TenantSource:
    """The ``$context`` variables (without ``$``) that fill the tenant and user fields for one kind of authorizer."""

    kind: TenantSourceKind
    tenant_variable: str
    user_variable: str

    @classmethod
    def cognito_claim(cls, claim: str = DEFAULT_TENANT_CLAIM) -> TenantSource:
        """A Cognito user pool authorizer: the tenant is a claim of the ID token, the user its username."""
        return cls(TenantSourceKind.COGNITO_CLAIM, f"context.authorizer.claims['{claim}']", _COGNITO_USER)

    @classmethod
    def authorizer_context(cls, key: str) -> TenantSource:
        """A Lambda authorizer: the tenant is a key of the context it returns, the user its principalId."""
        return cls(TenantSourceKind.AUTHORIZER_CONTEXT, f"context.authorizer.{key}", "context.authorizer.principalId")

    @classmethod
    def api_key(cls) -> TenantSource:
        """An API key: its id is logged as both tenant and user; the transform maps the tenant field to the key's
        tenant (an unmapped key is no tenant) and keeps the id as the user."""
        return cls(TenantSourceKind.API_KEY, "context.identity.apiKeyId", "context.identity.apiKeyId")


_COGNITO_USER = FIELDS_BY_NAME[USER_FIELD].context_variable
#: The record's own variables: a Cognito authorizer and its DEFAULT_TENANT_CLAIM.
DEFAULT_TENANT_SOURCE = TenantSource.cognito_claim()
if DEFAULT_TENANT_SOURCE.tenant_variable != FIELDS_BY_NAME[TENANT_FIELD].context_variable:
    raise ImportError("the record's tenant variable and the default tenant source disagree")


def render_access_log_format(source: TenantSource = DEFAULT_TENANT_SOURCE) -> str:
    """Render API Gateway's access-log format string: one JSON object, every value quoted.

    Quoting every value keeps the line valid JSON whatever API Gateway substitutes (``-`` for a missing number,
    for instance); typing is the transform's job, not the format's. ``source`` says which variables fill the tenant
    and user fields; every other field is the record's own.
    """
    variables = {TENANT_FIELD: source.tenant_variable, USER_FIELD: source.user_variable}
    members = ",".join(f'"{f.name}":"${variables.get(f.name, f.context_variable)}"' for f in ACCESS_LOG_FIELDS)
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
