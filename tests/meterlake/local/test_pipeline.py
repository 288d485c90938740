"""End to end on loopback: gateway -> spool -> transform -> Iceberg -> SQL equals what was sent."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from meterlake.amberflo.reconcile import Tally, reconcile_run, usage_tallies
from meterlake.config import Config
from meterlake.embedded.stack import LocalStack
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.lake.query import load_query, run_local_query
from meterlake.loadtest import Caller, LoadTestPlan, run_load_test


def _window() -> tuple[str, str]:
    now = datetime.now(UTC)
    return (now - timedelta(minutes=5)).isoformat(), (now + timedelta(minutes=5)).isoformat()


def test_requests_sent_equal_events_in_the_lake_and_usage_sql(tmp_path: Path) -> None:
    config = Config()
    data_dir = DataDir.resolve(tmp_path)
    with LocalStack(config=config, data_dir=data_dir, port=0) as stack:
        pool = stack.gateway.user_pool
        callers = tuple(
            Caller(tenant_id=t, token=pool.issue_id_token(user=f"user-{t}", tenant_id=t)) for t in ("t1", "t2")
        )
        plan = LoadTestPlan(
            invoke_url=stack.gateway.invoke_url,
            callers=callers,
            total=400,
            concurrency=8,
            unauthenticated_share=0.1,
            not_found_share=0.1,
            seed=7,
        )
        report = run_load_test(plan)
        # One request the load test does not make: a valid token without a tenant claim.
        tenantless = pool.issue_id_token(user="no-tenant", tenant_id=None)
        extra = httpx.get(f"{stack.gateway.invoke_url}/random/strings?len=3", headers={"Authorization": tenantless})
        assert extra.status_code == 200
        flushed = stack.settle().flush

    assert report.answered == 400
    # The route that does not exist is answered as API Gateway answers it: 403, never 404.
    assert set(report.status_counts) == {200, 401, 403}
    assert flushed.ok_written == 401
    table = ensure_metering_table(open_catalog(data_dir), config)
    rows = table.scan().to_arrow().to_pylist()
    assert sorted(r["request_id"] for r in rows) == sorted([*report.request_ids, extra.headers["x-amzn-requestid"]])
    statuses = Counter(r["status"] for r in rows)
    assert statuses == report.status_counts + Counter({200: 1})

    start, end = _window()
    usage = run_local_query(
        load_query("usage_per_tenant_day"), {"start": start, "end": end}, config=config, data_dir=data_dir
    )
    counted = usage_tallies(usage.columns, usage.rows)
    expected = {t: Tally(n, report.billable_by_tenant[t]) for t, n in report.answered_by_tenant.items()}
    # The tenant-less token is kept, with a null tenant, and never billed.
    expected[None] = Tally(expected[None].requests + 1, 0)
    assert counted == expected
    assert reconcile_run(expected, counted, None, counted_in="Iceberg").ok
