"""What the AWS pipeline costs per month and per million metered requests, computed from the config.

Every unit price is in :data:`US_EAST_1_LIST_PRICES` (on-demand list prices, no free tier, no discounts), and every
figure the model assumes rather than reads from the config is in :class:`Assumptions`, so a reader can check both.
Quantities come from the config where it decides them: the access-log record's size (the rendered format filled
with typical values), Firehose's buffering (how many Lambda invocations and Iceberg commits a month takes), the
transform's memory and architecture, the meters (Amberflo records per request) and the forwarding Lambdas' sizing.

Not counted: API Gateway's own requests (the API costs them with or without metering), CloudWatch Logs and metrics,
KMS, Secrets Manager, data transfer, and Amberflo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Final

from meterlake.aws.stacks import FORWARDER_BATCH_SIZE, FORWARDER_MEMORY_MB, STAGER_MEMORY_MB, STAGER_SCHEDULE_MINUTES
from meterlake.config import Config
from meterlake.records import render_access_log_line

#: Binary units throughout: AWS bills Firehose and S3 per GB of 2^30 bytes.
GIB: Final = 1024**3
TIB: Final = 1024**4
MIB: Final = 1024**2
#: A month of the model: 30 days.
MONTH_S: Final = 30 * 86400
#: Firehose bills each ingested record rounded up to the next 5 KB.
FIREHOSE_RECORD_ROUNDING_BYTES: Final = 5 * 1024
#: Athena bills at least this much per query.
ATHENA_MIN_BYTES_PER_QUERY: Final = 10 * MIB
#: Lambda gives a function one full vCPU at this memory size; below it, a share in proportion.
LAMBDA_FULL_VCPU_MB: Final = 1769

#: The date the prices below were recorded for this model. They were not re-read from AWS's pages by the machine that
#: wrote them; check them against the pages before relying on a figure.
PRICES_AS_OF: Final = "2026-11-30"
#: The region the prices are for.
PRICES_REGION: Final = "us-east-1"


@dataclass(frozen=True, slots=True)
class UnitPrices:
    """On-demand list prices in USD, first pricing tier, no free tier.

    Pages: https://aws.amazon.com/firehose/pricing/ (Direct PUT ingestion, per GB in 5 KB increments),
    https://aws.amazon.com/lambda/pricing/ (per GB-second by architecture, per request),
    https://aws.amazon.com/s3/pricing/ (S3 Standard storage, PUT and GET requests),
    https://aws.amazon.com/athena/pricing/ (SQL queries per TB scanned, 10 MB minimum),
    https://aws.amazon.com/glue/pricing/ (Data Catalog table optimizers, per DPU-hour),
    https://aws.amazon.com/sqs/pricing/ (standard queue requests, per million).
    """

    firehose_per_gb: float = 0.029
    lambda_arm64_per_gb_s: float = 0.0000133334
    lambda_x86_64_per_gb_s: float = 0.0000166667
    lambda_per_million_requests: float = 0.20
    s3_storage_per_gb_month: float = 0.023
    s3_put_per_thousand: float = 0.005
    s3_get_per_thousand: float = 0.0004
    athena_per_tb: float = 5.0
    glue_per_dpu_hour: float = 0.44
    sqs_per_million_requests: float = 0.40


US_EAST_1_LIST_PRICES: Final = UnitPrices()


@dataclass(frozen=True, slots=True)
class Assumptions:
    """What the model assumes instead of reading it from the config; each is a parameter of ``meterlake aws cost``
    or documented here.

    Attributes:
        transform_records_per_vcpu_s: the transform's rate on one full vCPU (``make bench`` measured ~104k access-log
            records/s for a whole invocation on one core here; rounded down).
        invocation_overhead_s: the fixed time of each Lambda invocation beyond its records (decode, answer, start).
        stored_bytes_per_event: an event's size in the table's zstd Parquet files after compaction.
        iceberg_puts_per_commit / iceberg_gets_per_commit: S3 requests of one Firehose delivery (a data file, a
            manifest, a manifest list, a metadata file; reading the current metadata and manifest list).
        compaction_dpu_hours_per_gb: Glue compaction's DPU-hours per GB of new data (not measured).
        maintenance_dpu_hours_per_day: the retention and orphan-file optimizers' daily runs (not measured).
        athena_queries_per_month: queries of the table, each scanning one day of events (at least 10 MB).
        stager_run_s: one stager run's duration (every minute, mostly finding nothing new).
        forwarder_message_s: one SQS message's forwarding (an Amberflo request of up to 100 records).
        sqs_requests_per_message: send, receive and delete.
    """

    transform_records_per_vcpu_s: float = 100_000.0
    invocation_overhead_s: float = 0.05
    stored_bytes_per_event: float = 100.0
    iceberg_puts_per_commit: int = 4
    iceberg_gets_per_commit: int = 2
    compaction_dpu_hours_per_gb: float = 0.1
    maintenance_dpu_hours_per_day: float = 2 / 60
    athena_queries_per_month: int = 30
    stager_run_s: float = 1.0
    forwarder_message_s: float = 0.5
    sqs_requests_per_message: int = 3


#: Values an access-log line typically has: UUIDs for the request id, tenant and Cognito user, a browser agent.
TYPICAL_ACCESS_LOG_VALUES: Final[dict[str, object]] = {
    "request_id": "c0ffee00-1234-4abc-9def-0123456789ab",
    "api_id": "a1b2c3d4e5",
    "tenant_id": "5f0c2f0e-7d1b-4c4e-9a51-3b8e2f6d9c10",
    "user": "8d3e1a72-4b6f-4f0e-b2c9-6a1d7e5f3b24",
    "client_id": "1h2j3k4l5m6n7o8p9q0r1s2t3u",
    "ip": "203.0.113.195",
    "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "request_time": 1795910400000,
    "http_method": "GET",
    "resource_path": "/random/strings",
    "path": "/random/strings",
    "status": 200,
    "protocol": "HTTP/1.1",
    "response_length": 1024,
    "response_latency_ms": 45,
    "integration_latency_ms": 40,
}


def typical_record_bytes(config: Config) -> int:
    """The size of a typical access-log record: the record's format filled with :data:`TYPICAL_ACCESS_LOG_VALUES`."""
    return len(render_access_log_line(TYPICAL_ACCESS_LOG_VALUES | {"stage": config.meterlake.api_stage}))


@dataclass(frozen=True, slots=True)
class CostLine:
    """One component's usage in a month and what it costs."""

    component: str
    usage: str
    monthly_usd: float
    per_million_usd: float


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """The month's lines, their total, and everything they were computed from."""

    requests_per_month: int
    record_bytes: int
    lines: list[CostLine]
    assumptions: Assumptions
    prices: UnitPrices
    notes: list[str] = field(default_factory=list)
    prices_as_of: str = PRICES_AS_OF
    region: str = PRICES_REGION
    total_monthly_usd: float = field(init=False)
    per_million_usd: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_monthly_usd", sum(line.monthly_usd for line in self.lines))
        object.__setattr__(self, "per_million_usd", sum(line.per_million_usd for line in self.lines))

    def as_json(self) -> dict[str, object]:
        """A JSON-ready mapping of the estimate."""
        return {
            "requests_per_month": self.requests_per_month,
            "record_bytes": self.record_bytes,
            "region": self.region,
            "prices_as_of": self.prices_as_of,
            "total_monthly_usd": round(self.total_monthly_usd, 6),
            "per_million_usd": round(self.per_million_usd, 6),
            "lines": [asdict(line) for line in self.lines],
            "notes": self.notes,
            "assumptions": asdict(self.assumptions),
            "prices": asdict(self.prices),
        }


class CostModelError(ValueError):
    """A cost-model input is out of range (named with its value)."""


def _flushes(requests: int, payload_bytes: float, buffer_bytes: float, interval_s: int) -> int:
    """How many times a Firehose buffer of ``buffer_bytes`` / ``interval_s`` fills or times out in a month of
    ``requests`` evenly spread records: by size, or once an interval while records arrive, whichever is more."""
    by_size = math.ceil(payload_bytes / buffer_bytes)
    by_time = requests if interval_s == 0 else min(requests, MONTH_S // interval_s)
    return max(by_size, by_time)


def estimate_cost(
    config: Config,
    *,
    requests_per_month: int,
    record_bytes: int | None = None,
    assumptions: Assumptions = Assumptions(),
    prices: UnitPrices = US_EAST_1_LIST_PRICES,
) -> CostEstimate:
    """Estimate a month of the AWS pipeline for ``requests_per_month`` metered requests.

    Raises:
        CostModelError: ``requests_per_month`` below 1 or ``record_bytes`` below 1.
    """
    if requests_per_month < 1:
        raise CostModelError(f"requests per month must be at least 1, got {requests_per_month}")
    if record_bytes is not None and record_bytes < 1:
        raise CostModelError(f"record bytes must be at least 1, got {record_bytes}")
    n = requests_per_month
    record = typical_record_bytes(config) if record_bytes is None else record_bytes
    aws = config.meterlake.aws
    firehose = config.data_firehose_configuration
    per_gb_s = prices.lambda_arm64_per_gb_s if aws.lambda_architecture == "arm64" else prices.lambda_x86_64_per_gb_s
    lines: list[CostLine] = []

    def add(component: str, usage: str, monthly: float) -> None:
        lines.append(CostLine(component, usage, monthly, monthly / n * 1_000_000))

    billed_bytes = math.ceil(record / FIREHOSE_RECORD_ROUNDING_BYTES) * FIREHOSE_RECORD_ROUNDING_BYTES
    billed_gb = n * billed_bytes / GIB
    add(
        "Firehose ingestion",
        f"{billed_gb:.3f} GB billed ({record} B records billed as {billed_bytes} B)",
        billed_gb * prices.firehose_per_gb,
    )

    processor = firehose.transform_records_with_aws_lambda
    invocations = _flushes(n, n * record, processor.effective_buffer_size * MIB, processor.buffer_interval)
    vcpu = min(1.0, aws.transform_memory_mb / LAMBDA_FULL_VCPU_MB)
    seconds = invocations * assumptions.invocation_overhead_s + n / (assumptions.transform_records_per_vcpu_s * vcpu)
    gb_s = seconds * aws.transform_memory_mb / 1024
    add(
        "Transform Lambda",
        f"{invocations:,} invocations, {gb_s:,.1f} GB-s at {aws.transform_memory_mb} MB {aws.lambda_architecture}",
        gb_s * per_gb_s + invocations * prices.lambda_per_million_requests / 1e6,
    )

    hints = firehose.buffering_hints
    commits = _flushes(n, n * record, hints.size_in_mbs * MIB, hints.interval_in_seconds)
    puts = commits * assumptions.iceberg_puts_per_commit
    gets = commits * assumptions.iceberg_gets_per_commit
    add(
        "S3 requests (Iceberg commits)",
        f"{commits:,} commits: {puts:,} PUT, {gets:,} GET",
        puts * prices.s3_put_per_thousand / 1000 + gets * prices.s3_get_per_thousand / 1000,
    )

    stored_gb = n * assumptions.stored_bytes_per_event / GIB
    add(
        "S3 storage (a month of events, kept a month)",
        f"{stored_gb:.3f} GB",
        stored_gb * prices.s3_storage_per_gb_month,
    )

    day_bytes = max(ATHENA_MIN_BYTES_PER_QUERY, n * assumptions.stored_bytes_per_event / 30)
    scanned_tb = assumptions.athena_queries_per_month * day_bytes / TIB
    add(
        "Athena",
        f"{assumptions.athena_queries_per_month} queries of a day, {scanned_tb * 1024:.3f} GB scanned",
        scanned_tb * prices.athena_per_tb,
    )

    dpu_hours = stored_gb * assumptions.compaction_dpu_hours_per_gb + 30 * assumptions.maintenance_dpu_hours_per_day
    add("Glue table optimizers", f"{dpu_hours:.3f} DPU-hours", dpu_hours * prices.glue_per_dpu_hour)

    records = n * len(config.meters)
    messages = math.ceil(records / config.amberflo.batch_size)
    forwarder_invocations = math.ceil(messages / FORWARDER_BATCH_SIZE)
    stager_runs = MONTH_S // (STAGER_SCHEDULE_MINUTES * 60)
    forwarding_gb_s = (
        stager_runs * assumptions.stager_run_s * STAGER_MEMORY_MB / 1024
        + messages * assumptions.forwarder_message_s * FORWARDER_MEMORY_MB / 1024
    )
    add(
        "Forwarding Lambdas",
        f"{stager_runs:,} stager runs, {forwarder_invocations:,} forwarder invocations, {forwarding_gb_s:,.1f} GB-s",
        forwarding_gb_s * per_gb_s + (stager_runs + forwarder_invocations) * prices.lambda_per_million_requests / 1e6,
    )

    sqs_requests = messages * assumptions.sqs_requests_per_message
    add(
        "SQS",
        f"{messages:,} messages of {config.amberflo.batch_size} records, {sqs_requests:,} requests",
        sqs_requests * prices.sqs_per_million_requests / 1e6,
    )

    notes = [
        "Firehose is priced as Direct PUT (each record rounded up to 5 KB); if API Gateway's access logs are billed "
        "as vended logs (per GB, no rounding), the Firehose line is record/rounded of the figure shown"
    ]
    if config.s3_tables is not None:
        notes.append(
            "the table is in S3 Tables: its storage, requests and maintenance are priced by S3 Tables, not as the "
            "S3 and Glue optimizer lines here (a Glue table's) assume"
        )
    return CostEstimate(n, record, lines, assumptions, prices, notes)


def format_estimate(estimate: CostEstimate) -> str:
    """The estimate as a text table, with where its prices come from."""
    width = max(len(line.component) for line in estimate.lines)
    out = [
        f"{estimate.requests_per_month:,} metered requests a month, {estimate.record_bytes}-byte access-log records; "
        f"{estimate.region} list prices as of {estimate.prices_as_of} (meterlake/aws/cost.py)",
        f"{'component':<{width}}  {'per month':>11}  {'per million':>11}  usage",
    ]
    for line in estimate.lines:
        out.append(f"{line.component:<{width}}  {line.monthly_usd:>11.4f}  {line.per_million_usd:>11.4f}  {line.usage}")
    out.append(f"{'total (USD)':<{width}}  {estimate.total_monthly_usd:>11.4f}  {estimate.per_million_usd:>11.4f}")
    out.extend(f"note: {note}" for note in estimate.notes)
    return "\n".join(out) + "\n"
