"""``make demo``: the whole local pipeline end to end, with an exact per-tenant reconciliation.

Starts the local stack on an ephemeral port, issues ID tokens for three tenants, drives the API with a load test
(some requests unauthenticated, some to a route that does not exist), commits everything, prints the per-tenant usage
table from sql/ and one line per tenant: requests the load test got answered == metering events counted in Iceberg.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meterlake.config import Config
from meterlake.loadtest import Caller, LoadTestPlan, run_load_test, summary_lines
from meterlake.local.home import DataDir
from meterlake.local.stack import LocalStack
from meterlake.query import format_result, load_query, run_local_query

#: (tenant id, user name) of the demo's callers.
DEMO_TENANTS: tuple[tuple[str, str], ...] = (("acme", "alice"), ("globex", "bob"), ("initech", "carol"))
USAGE_QUERY = "usage_per_tenant_day"
NO_TENANT = "(no tenant)"


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """One tenant's line: what the load test got answered against what the lake counted."""

    tenant: str | None
    answered: int
    counted: int

    @property
    def matches(self) -> bool:
        """True when the lake counted exactly what was answered."""
        return self.answered == self.counted

    def __str__(self) -> str:
        mark = "==" if self.matches else "!="
        verdict = "OK" if self.matches else "MISMATCH"
        return (
            f"{self.tenant or NO_TENANT:>12}: answered {self.answered:>5} {mark} "
            f"counted in Iceberg {self.counted:>5}  {verdict}"
        )


def reconcile(answered: dict[str | None, int], counted: dict[str | None, int]) -> list[Reconciliation]:
    """Pair answered and counted requests per tenant (tenants seen on either side)."""
    tenants = sorted(set(answered) | set(counted), key=lambda t: (t is None, t or ""))
    return [Reconciliation(t, answered.get(t, 0), counted.get(t, 0)) for t in tenants]


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _counted_by_tenant(rows: Iterable[tuple[object, ...]], columns: list[str]) -> dict[str | None, int]:
    tenant_at, requests_at = columns.index("tenant_id"), columns.index("requests")
    counted: dict[str | None, int] = {}
    for row in rows:
        tenant = row[tenant_at]
        key = tenant if isinstance(tenant, str) else None
        counted[key] = counted.get(key, 0) + int(str(row[requests_at]))
    return counted


def run_demo(
    *, config: Config, data_dir: DataDir, requests: int = 3000, concurrency: int = 32, console: Console
) -> bool:
    """Run the demo and print its report; True when every tenant reconciles exactly."""
    query = load_query(USAGE_QUERY)
    console.print(f"[bold]meterlake demo[/bold]: data dir {data_dir.root}")
    with LocalStack(config=config, data_dir=data_dir, port=0) as stack:
        pool = stack.gateway.user_pool
        callers = tuple(
            Caller(tenant_id=tenant, token=pool.issue_id_token(user=user, tenant_id=tenant))
            for tenant, user in DEMO_TENANTS
        )
        console.print(f"gateway {stack.gateway.invoke_url}  tenants: {', '.join(t for t, _ in DEMO_TENANTS)}")
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
            console.print(summary)
        flushed = stack.settle()
        window_end = datetime.now(UTC) + timedelta(milliseconds=1)
    console.print(
        f"delivery stream: {flushed.ok_written} events committed to Iceberg, {flushed.failed} rejected, "
        f"{flushed.duplicates_skipped} duplicates skipped"
    )
    params = {"start": _iso(window_start), "end": _iso(window_end)}
    usage = run_local_query(query, params, config=config, data_dir=data_dir)
    console.print(f"\n[bold]{USAGE_QUERY}[/bold] ({query.path.name}) for this run:")
    console.print(format_result(usage, "table"), end="")
    lines = reconcile(dict(report.answered_by_tenant), _counted_by_tenant(usage.rows, usage.columns))
    console.print("\n[bold]reconciliation[/bold] (load test answered == metering events in Iceberg):")
    for line in lines:
        console.print(str(line), style="green" if line.matches else "bold red", highlight=False)
    console.print(
        f"\nData kept in {data_dir.root}; try: meterlake query usage_per_tenant_hour "
        f"--param start={params['start']} --param end={params['end']}"
    )
    return all(line.matches for line in lines)
