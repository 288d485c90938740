"""cdk.context.json -> one typed, validated config object, used by app.py, the CDK stacks and the local runtime.

Keys are those of the AWS sample this project succeeds (``data_firehose_configuration`` ...), so a context file
written for it loads unchanged; meterlake's own settings live under ``meterlake``. Ranges are Firehose's own, so a
value Firehose would refuse fails here, with one message naming the key.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from meterlake.amberflo.settings import AmberfloSettings
from meterlake.meters import DEFAULT_METERS, Meter, check_meters
from meterlake.records import (
    DEFAULT_TENANT_CLAIM,
    NO_TENANT_PATTERN_PYTHON,
    TenantSource,
    TenantSourceKind,
    render_access_log_format,
)
from meterlake.service.settings import ServiceSettings
from meterlake.structs import ConfigSection

#: Firehose requires this prefix on a delivery stream that receives API Gateway access logs.
APIGATEWAY_STREAM_PREFIX = "amazon-apigateway-"
_STREAM_NAME = re.compile(r"^[a-zA-Z0-9_.-]+$")
_STREAM_NAME_MAX = 64

#: Glue database and table names: lower case letters, digits, underscore (no hyphens: Firehose rejects them).
GlueName = Annotated[str, Meta(pattern=r"^[a-z0-9_]+$", min_length=1, max_length=255)]

CONFIG_ENV = "METERLAKE_CONFIG"
DEFAULT_CONFIG_FILE = "cdk.context.json"


class ConfigError(Exception):
    """The configuration file is missing, unreadable or holds a value that is not allowed."""


class BufferingHints(ConfigSection, frozen=True):
    """Firehose delivery buffering: flush when either limit is reached."""

    interval_in_seconds: Annotated[int, Meta(ge=0, le=900)] = 60
    size_in_mbs: Annotated[int, Meta(ge=1, le=128)] = 128


#: Lambda's limit on a synchronous invocation's response (its JSON, as the function's runtime sends it).
LAMBDA_PAYLOAD_LIMIT_BYTES = 6_291_556
#: Lambda's limit on a synchronous invocation's request, as its RequestTooLargeException states it.
LAMBDA_REQUEST_LIMIT_BYTES = 6_291_456
#: The largest Lambda processor buffer (MB of raw records, as Firehose's BufferSizeInMBs counts) the transform's
#: answer is proven to fit in LAMBDA_PAYLOAD_LIMIT_BYTES for: the answer holds each typed event in base64 plus
#: Iceberg routing metadata, up to 2.25x the raw lines for the shortest lines API Gateway writes, so a 3 MB buffer
#: of them would answer ~7 MB and every invocation would fail (tests/transform_lambda/test_answer_limits.py).
TRANSFORM_BUFFER_CAP_MB = 2.5


class LambdaProcessing(ConfigSection, frozen=True):
    """Firehose's Lambda processor settings (BufferSizeInMBs, BufferIntervalInSeconds, NumberOfRetries).

    ``buffer_size`` takes Firehose's own range, so the AWS sample's 3 loads; above :data:`TRANSFORM_BUFFER_CAP_MB`
    it is capped (:attr:`effective_buffer_size`) and :attr:`buffer_size_note` says so.
    """

    buffer_size: Annotated[float, Meta(ge=0.2, le=3)] = TRANSFORM_BUFFER_CAP_MB
    buffer_interval: Annotated[int, Meta(ge=0, le=900)] = 300
    number_of_retries: Annotated[int, Meta(ge=0, le=300)] = 3

    @property
    def effective_buffer_size(self) -> float:
        """The processor buffer deployed and run locally: ``buffer_size``, at most the cap."""
        return min(self.buffer_size, TRANSFORM_BUFFER_CAP_MB)

    @property
    def buffer_size_note(self) -> str | None:
        """Why the buffer in use differs from the configured one; None when it does not."""
        if self.buffer_size <= TRANSFORM_BUFFER_CAP_MB:
            return None
        return (
            f"data_firehose_configuration.transform_records_with_aws_lambda.buffer_size {self.buffer_size:g} MB is "
            f"capped to {TRANSFORM_BUFFER_CAP_MB:g} MB: the transform's answer to a fuller buffer of short "
            f"access-log lines would exceed Lambda's {LAMBDA_PAYLOAD_LIMIT_BYTES:,}-byte response limit"
        )


class IcebergDestination(ConfigSection, frozen=True):
    """Where metering events land: the Glue (or local SQLite) database and Iceberg table."""

    database_name: GlueName = "restapi_access_log_iceberg_db"
    table_name: GlueName = "restapi_access_log_iceberg"


class DataFirehoseConfiguration(ConfigSection, frozen=True):
    """The sample-compatible ``data_firehose_configuration`` section."""

    stream_name: str = "random-gen"
    buffering_hints: BufferingHints = msgspec.field(default_factory=BufferingHints)
    transform_records_with_aws_lambda: LambdaProcessing = msgspec.field(default_factory=LambdaProcessing)
    destination_iceberg_table_configuration: IcebergDestination = msgspec.field(default_factory=IcebergDestination)
    output_prefix: str = "restapi_access_log_iceberg_db/restapi_access_log_iceberg"
    error_output_prefix: str = (
        "error/year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/hour=!{timestamp:HH}"
        "/!{firehose:error-output-type}"
    )
    s3_bucket: str | None = None

    def __post_init__(self) -> None:
        name = self.delivery_stream_name
        if not _STREAM_NAME.match(self.stream_name):
            raise ValueError(
                f"stream_name {self.stream_name!r}: Firehose allows only letters, digits, '_', '.' and '-'"
            )
        if len(name) > _STREAM_NAME_MAX:
            raise ValueError(
                f"stream_name {self.stream_name!r}: the delivery stream name {name!r} would be {len(name)} "
                f"characters; Firehose allows {_STREAM_NAME_MAX}"
            )

    @property
    def delivery_stream_name(self) -> str:
        """The Firehose stream name: ``amazon-apigateway-<stream_name>`` unless it already has the prefix."""
        if self.stream_name.startswith(APIGATEWAY_STREAM_PREFIX):
            return self.stream_name
        return APIGATEWAY_STREAM_PREFIX + self.stream_name


class LocalRuntime(ConfigSection, frozen=True):
    """The embedded runtime's gateway and its stand-in Cognito user pool."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8850
    user_pool_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+$")] = "local_pool"
    client_id: Annotated[str, Meta(min_length=1)] = "meterlake-local-client"
    token_ttl_seconds: Annotated[int, Meta(ge=1, le=86400)] = 3600

    def __post_init__(self) -> None:
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host {self.host!r}: the local gateway only listens on loopback")


#: The retention periods CloudWatch Logs accepts, in days.
LOG_RETENTION_DAYS: frozenset[int] = frozenset(
    {1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653}
)


class AwsDeployment(ConfigSection, frozen=True):
    """Settings the CDK app uses: retention, cost guards, throttling, Lambda sizing, table maintenance (whose
    retention the local runtime's maintenance uses too)."""

    #: CloudWatch Logs retention of every log group the app creates.
    log_retention_days: int = 30
    #: Days before objects under the error output prefix's static part (e.g. ``error/``) and Athena results expire.
    error_output_expiration_days: Annotated[int, Meta(ge=1, le=3650)] = 30
    #: Athena refuses a query of the workgroup once it would scan more than this (Athena's minimum is 10 MB).
    athena_bytes_scanned_cutoff_per_query: Annotated[int, Meta(ge=10_000_000)] = 10_000_000_000
    #: Steady-state requests per second the API stage admits before answering 429.
    api_throttling_rate_limit: Annotated[float, Meta(ge=0)] = 100.0
    #: Burst of requests the API stage admits above the steady rate.
    api_throttling_burst_limit: Annotated[int, Meta(ge=0)] = 200
    #: Lambda architecture; arm64 wheels of msgspec and Powertools exist and Graviton is cheaper per GB-second.
    lambda_architecture: Literal["arm64", "x86_64"] = "arm64"
    #: Memory of the transform Lambda; CPU scales with it, and decoding a 6 MB batch is CPU-bound.
    transform_memory_mb: Annotated[int, Meta(ge=128, le=10240)] = 1024
    #: Snapshots younger than this are kept by the Glue retention optimizer (time travel, in-flight readers), and
    #: locally by ``meterlake compact`` and the running stack's maintenance (meterlake.lake.compact).
    snapshot_retention_days: Annotated[int, Meta(ge=1, le=3650)] = 5
    #: Snapshots always kept by the Glue retention optimizer (and locally), whatever their age.
    snapshots_to_retain: Annotated[int, Meta(ge=1, le=1000)] = 1
    #: Files no snapshot references are deleted by the Glue orphan-file optimizer (and locally) after this many days.
    orphan_file_retention_days: Annotated[int, Meta(ge=1, le=3650)] = 3
    #: Where the forwarding alarms' SNS topic sends e-mail (the address confirms the subscription); None: no e-mail.
    alarm_email: Annotated[str, Meta(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = None

    def __post_init__(self) -> None:
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            allowed = ", ".join(str(days) for days in sorted(LOG_RETENTION_DAYS))
            raise ValueError(f"log_retention_days {self.log_retention_days}: CloudWatch Logs allows only {allowed}")


#: Lambda's limit on a function's environment variables, names and values together.
LAMBDA_ENVIRONMENT_LIMIT_BYTES = 4096
#: The share of that limit the API-key-to-tenant mapping may take (as JSON); the transform's other variables and
#: Powertools' need the rest.
TENANTS_BY_API_KEY_LIMIT_BYTES = 3072


class TenantSourceSettings(ConfigSection, frozen=True):
    """Where API Gateway finds each request's tenant, i.e. how the metered APIs authorize their callers.

    ``cognito_claim``: a Cognito user-pool authorizer; the tenant is the ID token's ``claim``.
    ``authorizer_context``: a Lambda authorizer; the tenant is ``context_key`` of the context it returns.
    ``api_key``: API keys; the access log records the key's id and the transform bills it to
    ``tenants_by_api_key[id]`` (a key missing there is metered with no tenant and never billed).
    """

    kind: Literal["cognito_claim", "authorizer_context", "api_key"] = "cognito_claim"
    #: The ID token claim holding the tenant; API Gateway reads it as ``$context.authorizer.claims['<claim>']``.
    claim: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_:.-]+$", max_length=128)] = DEFAULT_TENANT_CLAIM
    #: The Lambda authorizer's context key holding the tenant, read as ``$context.authorizer.<context_key>``.
    context_key: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_]+$", max_length=128)] = "tenant_id"
    #: API key id (as API Gateway shows it, e.g. ``a1b2c3d4e5``) -> the tenant its requests are billed to.
    tenants_by_api_key: dict[Annotated[str, Meta(pattern=r"^[A-Za-z0-9]+$", max_length=128)], str] = msgspec.field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        if self.kind != TenantSourceKind.API_KEY.value and self.tenants_by_api_key:
            raise ValueError(f"tenants_by_api_key is only read when kind is 'api_key', not {self.kind!r}")
        if self.kind == TenantSourceKind.AUTHORIZER_CONTEXT.value and self.context_key == "claims":
            raise ValueError("context_key 'claims' is the Cognito claims map, not a key a Lambda authorizer returns")
        for key_id, tenant in self.tenants_by_api_key.items():
            if re.fullmatch(NO_TENANT_PATTERN_PYTHON, tenant):
                raise ValueError(f"tenants_by_api_key[{key_id!r}] = {tenant!r} is blank: it would never be billed")
        size = len(msgspec.json.encode(self.tenants_by_api_key))
        if size > TENANTS_BY_API_KEY_LIMIT_BYTES:
            raise ValueError(
                f"tenants_by_api_key is {size} bytes of JSON, over {TENANTS_BY_API_KEY_LIMIT_BYTES}: the transform "
                f"Lambda reads it from its environment, which Lambda limits to {LAMBDA_ENVIRONMENT_LIMIT_BYTES} bytes"
            )

    def source(self) -> TenantSource:
        """The ``$context`` variables that fill the access log's tenant and user fields."""
        kind = TenantSourceKind(self.kind)
        if kind is TenantSourceKind.COGNITO_CLAIM:
            return TenantSource.cognito_claim(self.claim)
        if kind is TenantSourceKind.AUTHORIZER_CONTEXT:
            return TenantSource.authorizer_context(self.context_key)
        return TenantSource.api_key()

    def access_log_format(self) -> str:
        """The access-log format a metered stage writes: the record, its tenant and user from this source."""
        return render_access_log_format(self.source())

    @property
    def api_key_tenants(self) -> Mapping[str, str] | None:
        """The transform's key-id-to-tenant mapping: set only when tenants come from API keys."""
        return self.tenants_by_api_key if self.kind == TenantSourceKind.API_KEY.value else None


class MeterlakeSettings(ConfigSection, frozen=True):
    """meterlake's own settings, beside the sample's keys."""

    unmetered_http_methods: tuple[Annotated[str, Meta(pattern=r"^[A-Z]+$")], ...] = ("OPTIONS",)
    #: API Gateway's rule for stage names: letters, digits, hyphens and underscores, at most 128.
    api_stage: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+$", max_length=128)] = "prod"
    local: LocalRuntime = msgspec.field(default_factory=LocalRuntime)
    aws: AwsDeployment = msgspec.field(default_factory=AwsDeployment)
    tenant_source: TenantSourceSettings = msgspec.field(default_factory=TenantSourceSettings)
    #: The metering service (``meterlake serve``): where it listens, what ingest accepts, who administers it.
    service: ServiceSettings = msgspec.field(default_factory=ServiceSettings)


#: S3 Tables namespace and table names (docs.aws.amazon.com/AmazonS3/latest/userguide/s3-tables-buckets-naming.html):
#: lower case letters, digits and underscores, beginning and ending with a letter or digit, not starting with "aws".
S3TablesName = Annotated[str, Meta(pattern=r"^(?!aws)[a-z0-9](?:[a-z0-9_]*[a-z0-9])?$", min_length=1, max_length=255)]
#: Table bucket names (same page): 3-63 lower case letters, digits and hyphens, beginning and ending with a letter or
#: digit, none of the reserved prefixes (xn--, sthree-, amzn-s3-demo-, aws) or suffixes (-s3alias, --ol-s3, --x-s3,
#: --table-s3).
TableBucketName = Annotated[
    str,
    Meta(
        pattern=(
            r"^(?!xn--|sthree-|amzn-s3-demo-|aws)[a-z0-9][a-z0-9-]*[a-z0-9]$"
            r"(?<!-s3alias)(?<!--ol-s3)(?<!--x-s3)(?<!--table-s3)"
        ),
        min_length=3,
        max_length=63,
    ),
]


class S3TablesDestination(ConfigSection, frozen=True):
    """The AWS sample's v3 ``s3_tables`` section: the metering table lives in an Amazon S3 table bucket (Iceberg
    tables S3 compacts and expires itself) instead of a Glue table on a general-purpose bucket.

    Firehose reaches the namespace through the ``s3tablescatalog`` federated catalog, so the sample's resource-link
    database (its ``destination_iceberg_table_configuration.database_name``) is not needed.
    """

    namespace_name: S3TablesName = "restapi_access_log_namespace"
    table_name: S3TablesName = "restapi_access_log_iceberg"
    #: None: a name unique to the Storage stack (``meterlake-<8 hex>``), so a redeploy never collides with a kept one.
    table_bucket_name: TableBucketName | None = None
    #: How the account integrated its table buckets with AWS analytics services (once per region): IAM only (the
    #: console's default), or Lake Formation grants on top, for which the stacks then grant every role it needs.
    access_control: Literal["iam", "lake_formation"] = "iam"


class Config(Struct, kw_only=True, frozen=True):
    """The whole configuration. Unknown top-level keys are CDK's own (feature flags, lookups) and are kept out."""

    data_firehose_configuration: DataFirehoseConfiguration = msgspec.field(default_factory=DataFirehoseConfiguration)
    meterlake: MeterlakeSettings = msgspec.field(default_factory=MeterlakeSettings)
    #: What is billed: each meter turns matching metering events into Amberflo records.
    meters: tuple[Meter, ...] = DEFAULT_METERS
    amberflo: AmberfloSettings = msgspec.field(default_factory=AmberfloSettings)
    #: Set: the table is in an S3 table bucket; None: a Glue Iceberg table in the lake bucket.
    s3_tables: S3TablesDestination | None = None

    def __post_init__(self) -> None:
        check_meters(self.meters)

    @property
    def database_name(self) -> str:
        """The Iceberg table's database: the Glue database, or the S3 Tables namespace."""
        if self.s3_tables is not None:
            return self.s3_tables.namespace_name
        return self.data_firehose_configuration.destination_iceberg_table_configuration.database_name

    @property
    def table_name(self) -> str:
        """The Iceberg table's name."""
        if self.s3_tables is not None:
            return self.s3_tables.table_name
        return self.data_firehose_configuration.destination_iceberg_table_configuration.table_name


#: Top-level keys of a cdk.context.json that the CDK itself writes: feature flags (``@aws-cdk/...``), cached
#: lookups (``availability-zones:account=...``, ``ssm:...``: always with a colon) and acknowledged notices.
CDK_CONTEXT_KEYS = frozenset({"acknowledged-issue-numbers"})


def _is_cdk_key(key: str) -> bool:
    return key.startswith("@") or ":" in key or key in CDK_CONTEXT_KEYS


def parse_config(raw: Any, *, source: str = DEFAULT_CONFIG_FILE) -> Config:
    """Validate an already-decoded context mapping into a :class:`Config`.

    A top-level key that is neither a section of the config nor one the CDK writes is a typo, and is refused (a
    misspelt section would otherwise be ignored and its defaults used).

    Raises:
        ConfigError: naming the offending key, e.g. ``data_firehose_configuration.buffering_hints.size_in_mbs``.
    """
    if isinstance(raw, dict):
        sections = Config.__struct_fields__
        for key in raw:
            if isinstance(key, str) and key not in sections and not _is_cdk_key(key):
                near = difflib.get_close_matches(key, sections, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f" (sections: {', '.join(sections)})"
                raise ConfigError(f"{source}: {key}: not a meterlake setting nor a CDK context key{hint}")
    try:
        return msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, raw, source)) from None


def config_file(path: Path | str | None = None) -> Path | None:
    """The file :func:`load_config` reads: ``path``, else ``$METERLAKE_CONFIG``, else ./cdk.context.json if it
    exists; None: there is none, and the defaults are used."""
    if path is not None:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_config(path: Path | str | None = None) -> Config:
    """Load the config from ``path``, else ``$METERLAKE_CONFIG``, else ./cdk.context.json, else the defaults.

    Raises:
        ConfigError: the file cannot be read, is not JSON, or holds a bad value.
    """
    path = config_file(path)
    if path is None:
        return Config()
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    try:
        raw = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse_config(raw, source=str(path))


def _describe(exc: msgspec.ValidationError, raw: Any, source: str) -> str:
    """Turn msgspec's ``Expected ... - at `$.a.b` `` into ``source: a.b: Expected ..., got <value>``."""
    message = str(exc)
    match = re.search(r" - at `\$\.?(.*)`$", message)
    if not match:
        return f"{source}: {message}"
    key = match.group(1) or "(top level)"
    text = message[: match.start()]
    found, value = _lookup(raw, match.group(1))
    if found and not isinstance(value, dict | list) and "got" not in text:
        text += f", got {value!r}"
    return f"{source}: {key}: {text}"


def _lookup(raw: Any, dotted: str) -> tuple[bool, Any]:
    """Follow a msgspec path such as ``a.b[0].c`` into ``raw``; (False, None) if it leads nowhere."""
    node = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        try:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, node
