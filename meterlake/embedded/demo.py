"""``make demo``: the whole local pipeline end to end, with an exact per-tenant reconciliation.

Starts the local stack on an ephemeral port, issues ID tokens for three tenants, drives the API with a load test
(some requests unauthenticated, some to a route that does not exist), commits everything, prints the per-tenant usage
table from sql/ and one line per tenant: requests the load test got answered == metering events counted in Iceberg.
As on API Gateway, a route that does not exist is answered 403 without running the authorizer, so those requests
are metered under no tenant and never billed, even when they carried a tenant's token.

Beside the API traffic, each tenant's application reports custom usage to the metering service (LLM tokens): half as
the toolkit's ingestUsage events, half as Amberflo records to /ingest with the tenant's own key. Their lines say,
per tenant: events and tokens the service acknowledged == counted in Iceberg (sql/meter_events/usage.sql) == tokens
in Amberflo.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meterlake.amberflo.reconcile import (
    CALLS_METER,
    RunReconciliation,
    Tally,
    Window,
    amberflo_usage,
    event_usage_tallies,
    reconcile_run,
    usage_tallies,
)
from meterlake.amberflo.server import LocalAmberflo
from meterlake.config import Config
from meterlake.embedded.stack import AmberfloTarget, LocalStack
from meterlake.lake.home import DataDir
from meterlake.lake.query import format_result, load_query, printable, run_local_query
from meterlake.loadtest import Caller, LoadTestPlan, run_load_test, summary_lines
from meterlake.meters import Meter
from meterlake.service.usage import run_event_usage_sql

#: (tenant id, user name) of the demo's callers.
DEMO_TENANTS: tuple[tuple[str, str], ...] = (("acme", "alice"), ("globex", "bob"), ("initech", "carol"))
USAGE_QUERY = "usage_per_tenant_day"
#: Where the reconciliation lines say the requests were counted.
COUNTED_IN = "Iceberg"
DEMO_AMBERFLO_KEY = "demo-api-key"
#: The custom usage the demo's tenants report to the metering service.
LLM_TOKENS = {
    "label": "LLM tokens",
    "meterApiName": "llm-tokens",
    "meterType": "sum_of_all_usage",
    "dimensions": ["model"],
}
#: Usage reports per tenant: as many toolkit events as /ingest records (batches of 20).
REPORTS_PER_TENANT = 40


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def emit_llm_tokens(stack: LocalStack, *, seed: int = 12) -> dict[str | None, Tally]:
    """Create the llm-tokens meter (a control-plane token) and report each demo tenant's LLM tokens: toolkit events
    with the tenant's ID token, /ingest records with a tenant key. Returns what the service acknowledged per tenant
    (events, tokens)."""
    rng = random.Random(seed)
    pool = stack.gateway.user_pool
    admin = pool.issue_access_token(user="demo-admin", groups=[stack.config.meterlake.service.admin_group])
    acknowledged: dict[str | None, Tally] = {}
    with httpx.Client(base_url=stack.service.url, timeout=60) as client:
        created = client.post("/meters", json=LLM_TOKENS, headers={"Authorization": f"Bearer {admin}"})
        if created.status_code != 201 and "is taken" not in created.text:  # a demo run before made it
            raise RuntimeError(f"creating the llm-tokens meter failed: {created.status_code} {created.text}")
        for tenant, user in DEMO_TENANTS:
            _, key = stack.service.keys.create(role="tenant", customer_id=tenant, label="make demo")
            token = pool.issue_id_token(user=user, tenant_id=tenant)
            events = units = 0
            half = REPORTS_PER_TENANT // 2
            values = [rng.randrange(50, 4000) for _ in range(REPORTS_PER_TENANT)]
            for value in values[:half]:
                event = {
                    "id": str(uuid.uuid4()),
                    "detail-type": "ingestUsage",
                    "source": "demo-application-plane",
                    "detail": {"tenantId": tenant, "meterApiName": "llm-tokens", "meterValue": value, "model": "m1"},
                }
                if client.post("/events", json=event, headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                    events, units = events + 1, units + value
            now_ms = int(datetime.now(UTC).timestamp() * 1000)
            rest = values[half:]
            for start in range(0, len(rest), 20):
                chunk = rest[start : start + 20]
                batch = [
                    {"customerId": tenant, "meterApiName": "llm-tokens", "meterValue": value,
                     "meterTimeInMillis": now_ms, "uniqueId": str(uuid.uuid4()), "dimensions": {"model": "m2"}}
                    for value in chunk
                ]  # fmt: skip
                if client.post("/ingest", json=batch, headers={"X-API-KEY": key}).status_code == 200:
                    events, units = events + len(chunk), units + sum(chunk)
            acknowledged[tenant] = Tally(events, units)
    return acknowledged


def run_demo(
    *, config: Config, data_dir: DataDir, requests: int = 3000, concurrency: int = 32, console: Console
) -> bool:
    """Run the demo and print its report; True when every tenant reconciles exactly."""
    query = load_query(USAGE_QUERY)
    console.print(f"[bold]meterlake demo[/bold]: data dir {escape(printable(str(data_dir.root)))}")
    with (
        LocalAmberflo(api_key=DEMO_AMBERFLO_KEY) as amberflo,
        LocalStack(
            config=config, data_dir=data_dir, port=0, amberflo=AmberfloTarget(amberflo.url, DEMO_AMBERFLO_KEY)
        ) as stack,
    ):
        pool = stack.gateway.user_pool
        callers = tuple(
            Caller(tenant_id=tenant, token=pool.issue_id_token(user=user, tenant_id=tenant))
            for tenant, user in DEMO_TENANTS
        )
        console.print(
            f"gateway {stack.gateway.invoke_url}  local Amberflo {amberflo.url}  "
            f"tenants: {', '.join(t for t, _ in DEMO_TENANTS)}"
        )
        plan = LoadTestPlan(
            invoke_url=stack.gateway.invoke_url,
            callers=callers,
            total=requests,
            concurrency=concurrency,
            unauthenticated_share=0.05,
            not_found_share=0.05,
        )
        window_start = datetime.now(UTC) - timedelta(milliseconds=1)
        with Progress(
            TextColumn("load test"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("requests", total=requests)
            report = run_load_test(plan, on_progress=lambda n: progress.advance(task, n))
        for summary in summary_lines(report):
            console.print(summary, markup=False)
        tokens_acknowledged = emit_llm_tokens(stack)
        console.print(
            f"custom usage: {sum(t.requests for t in tokens_acknowledged.values())} llm-tokens reports to the metering "
            f"service {stack.service.url} (toolkit events and /ingest), all acknowledged durable"
        )
        if report.interrupted:
            console.print("interrupted: committing and reconciling the requests answered so far", markup=False)
        settled = stack.settle()
        window_end = datetime.now(UTC) + timedelta(milliseconds=1)
        with httpx.Client() as client:
            units = amberflo_usage(
                client,
                base_url=amberflo.url,
                api_key=DEMO_AMBERFLO_KEY,
                meters=[m for m in config.meters if m.meter_api_name == CALLS_METER],
                window=Window.covering(window_start, window_end),
            )
            token_units = amberflo_usage(
                client,
                base_url=amberflo.url,
                api_key=DEMO_AMBERFLO_KEY,
                meters=[Meter(meter_api_name="llm-tokens", label="LLM tokens")],
                window=Window.covering(window_start, window_end),
            )
    flushed, forwarding = settled.flush, settled.forwarding
    console.print(
        f"delivery stream: {flushed.ok_written} events committed to Iceberg, {flushed.failed} rejected, "
        f"{flushed.duplicates_skipped} duplicates skipped"
    )
    console.print(
        f"forwarding (all runs so far): {forwarding.sent_records} records sent to Amberflo, "
        f"{forwarding.pending_records} pending, "
        f"{forwarding.dead_records} dead-lettered, {forwarding.untenanted_events} events without a tenant not forwarded"
    )
    params = {"start": _iso(window_start), "end": _iso(window_end)}
    usage = run_local_query(query, params, config=config, data_dir=data_dir)
    console.print(f"\n[bold]{USAGE_QUERY}[/bold] ({query.path.name}) for this run:")
    # The table is text already (tenants are data): printed as it is, not read as markup.
    console.print(format_result(usage, "table"), end="", markup=False, highlight=False)
    amberflo_units: dict[str, int] = {}
    for (customer, _meter, _hour), value in units.items():
        amberflo_units[customer] = amberflo_units.get(customer, 0) + int(value)
    answered = {
        tenant: Tally(count, report.billable_by_tenant[tenant]) for tenant, count in report.answered_by_tenant.items()
    }
    calls = reconcile_run(answered, usage_tallies(usage.columns, usage.rows), amberflo_units, counted_in=COUNTED_IN)
    tokens = run_event_usage_sql({"meter_api_name": "llm-tokens", **params}, config=config, data_dir=data_dir)
    forwarded_tokens: dict[str, int] = {}
    for (customer, _meter, _hour), value in token_units.items():
        forwarded_tokens[customer] = forwarded_tokens.get(customer, 0) + round(value)
    reconciliation = RunReconciliation(
        calls.lines
        + reconcile_run(
            tokens_acknowledged,
            event_usage_tallies(tokens.columns, tokens.rows),
            forwarded_tokens,
            counted_in=COUNTED_IN,
            meter="llm-tokens",
        ).lines
    )
    console.print(
        "\n[bold]reconciliation[/bold] (answered == counted in Iceberg; billable == units in Amberflo; custom usage: "
        "acknowledged by the service == counted in Iceberg == units in Amberflo):"
    )
    for line in reconciliation.lines:
        console.print(str(line), style="green" if line.matches else "bold red", markup=False, highlight=False)
    console.print(
        f"\nData kept in {escape(printable(str(data_dir.root)))}; try: meterlake query usage_per_tenant_hour "
        f"--param start={params['start']} --param end={params['end']}"
    )
    return reconciliation.ok and not report.interrupted
