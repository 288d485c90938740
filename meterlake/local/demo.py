"""``make demo``: the whole local pipeline end to end, with an exact per-tenant reconciliation.

Starts the local stack on an ephemeral port, issues ID tokens for three tenants, drives the API with a load test
(some requests unauthenticated, some to a route that does not exist), commits everything, prints the per-tenant usage
table from sql/ and one line per tenant: requests the load test got answered == metering events counted in Iceberg.
As on API Gateway, a route that does not exist is answered 403 without running the authorizer, so those requests
are metered under no tenant and never billed, even when they carried a tenant's token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meterlake.amberflo.reconcile import Window, amberflo_usage
from meterlake.amberflo.server import LocalAmberflo
from meterlake.config import Config
from meterlake.loadtest import Caller, LoadTestPlan, run_load_test, summary_lines
from meterlake.local.home import DataDir
from meterlake.local.stack import AmberfloTarget, LocalStack
from meterlake.query import format_result, load_query, printable, run_local_query

#: (tenant id, user name) of the demo's callers.
DEMO_TENANTS: tuple[tuple[str, str], ...] = (("acme", "alice"), ("globex", "bob"), ("initech", "carol"))
USAGE_QUERY = "usage_per_tenant_day"
NO_TENANT = "(no tenant)"
#: The meter whose units the demo reconciles: one unit per billable request.
CALLS_METER = "api-calls"
DEMO_AMBERFLO_KEY = "demo-api-key"


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """One tenant's line: answered by the API, counted in Iceberg (and billable there), units in Amberflo."""

    tenant: str | None
    answered: int
    counted: int
    billable: int = 0
    #: api-calls units Amberflo holds; None for traffic without a tenant, which is never forwarded.
    amberflo_units: int | None = None

    @property
    def matches(self) -> bool:
        """True when the lake counted exactly what was answered, and Amberflo holds exactly the billable units."""
        forwarded_ok = self.amberflo_units is None or self.amberflo_units == self.billable
        return self.answered == self.counted and forwarded_ok

    def __str__(self) -> str:
        mark = "==" if self.answered == self.counted else "!="
        tenant = NO_TENANT if self.tenant is None else printable(self.tenant)
        line = f"{tenant:>12}: answered {self.answered:>5} {mark} counted in Iceberg {self.counted:>5}"
        if self.amberflo_units is None:
            line += "  (no tenant: not forwarded)"
        else:
            umark = "==" if self.amberflo_units == self.billable else "!="
            line += f"  billable {self.billable:>5} {umark} {CALLS_METER} units in Amberflo {self.amberflo_units:>5}"
        return f"{line}  {'OK' if self.matches else 'MISMATCH'}"


def reconcile(
    answered: dict[str | None, int],
    counted: dict[str | None, int],
    billable: dict[str | None, int] | None = None,
    amberflo: dict[str, int] | None = None,
) -> list[Reconciliation]:
    """Pair answered, counted (and billable/forwarded) requests per tenant (tenants seen on any side)."""
    billable = billable or {}
    tenants = sorted(set(answered) | set(counted) | set(amberflo or {}), key=lambda t: (t is None, t or ""))
    return [
        Reconciliation(
            t,
            answered.get(t, 0),
            counted.get(t, 0),
            billable.get(t, 0),
            None if amberflo is None or t is None else amberflo.get(t, 0),
        )
        for t in tenants
    ]


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _sum_by_tenant(rows: Iterable[tuple[object, ...]], columns: list[str], column: str) -> dict[str | None, int]:
    tenant_at, value_at = columns.index("tenant_id"), columns.index(column)
    totals: dict[str | None, int] = {}
    for row in rows:
        tenant = row[tenant_at]
        key = tenant if isinstance(tenant, str) else None
        totals[key] = totals.get(key, 0) + int(str(row[value_at]))
    return totals


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
    lines = reconcile(
        dict(report.answered_by_tenant),
        _sum_by_tenant(usage.rows, usage.columns, "requests"),
        _sum_by_tenant(usage.rows, usage.columns, "billable_requests"),
        amberflo_units,
    )
    console.print("\n[bold]reconciliation[/bold] (answered == counted in Iceberg; billable == units in Amberflo):")
    for line in lines:
        console.print(str(line), style="green" if line.matches else "bold red", markup=False, highlight=False)
    console.print(
        f"\nData kept in {escape(printable(str(data_dir.root)))}; try: meterlake query usage_per_tenant_hour "
        f"--param start={params['start']} --param end={params['end']}"
    )
    return all(line.matches for line in lines)
