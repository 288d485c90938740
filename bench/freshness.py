"""Freshness: a request answered by the gateway -> visible to `meterlake query`, against the buffering interval.

The stack runs with its background flusher on a short buffering interval; each sample sends one authenticated request
and polls the usage query (the same path `meterlake query` takes) until that request is counted.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec

from meterlake.config import load_config
from meterlake.embedded.stack import LocalStack
from meterlake.lake.home import DataDir
from meterlake.lake.query import load_query, run_local_query

INTERVAL_S = 2
POLL_S = 0.02


def _counted(query_name: str, tenant: str, start: datetime, *, stack: LocalStack) -> int:
    query = load_query(query_name)
    end = datetime.now(UTC) + timedelta(seconds=1)
    result = run_local_query(
        query,
        {"start": start.isoformat(), "end": end.isoformat(), "tenant_id": tenant},
        config=stack.config,
        data_dir=stack.data_dir,
    )
    at = result.columns.index("requests")
    return sum(int(str(row[at])) for row in result.rows)


def run(quick: bool = False) -> dict[str, object]:
    """Measure answer -> visible latency over a few requests; target: at most interval + 1 s."""
    base = load_config()
    firehose = base.data_firehose_configuration
    config = msgspec.structs.replace(
        base,
        data_firehose_configuration=msgspec.structs.replace(
            firehose, buffering_hints=msgspec.structs.replace(firehose.buffering_hints, interval_in_seconds=INTERVAL_S)
        ),
    )
    samples: list[float] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalStack(config=config, data_dir=DataDir.resolve(Path(tmp)), port=0) as stack,
    ):
        token = stack.gateway.user_pool.issue_id_token(user="fresh", tenant_id="freshness")
        start = datetime.now(UTC) - timedelta(seconds=1)
        with httpx.Client() as client:
            for i in range(3 if quick else 6):
                seen = _counted("usage_per_tenant_day", "freshness", start, stack=stack)
                response = client.get(f"{stack.gateway.invoke_url}/random/strings", headers={"Authorization": token})
                answered = time.perf_counter()
                response.raise_for_status()
                while _counted("usage_per_tenant_day", "freshness", start, stack=stack) <= seen:
                    if time.perf_counter() - answered > 4 * INTERVAL_S + 10:
                        raise RuntimeError(f"request {i} not visible after {4 * INTERVAL_S + 10} s")
                    time.sleep(POLL_S)
                samples.append(time.perf_counter() - answered)
                time.sleep(0.3 * (i % 3))
    worst = max(samples)
    target = INTERVAL_S + 1.0
    print(
        f"  freshness: buffering interval {INTERVAL_S} s; answered -> visible to query: "
        f"median {statistics.median(samples):.2f} s, worst {worst:.2f} s (target <= {target:.1f} s) "
        f"{'PASS' if worst <= target else 'FAIL'}"
    )
    return {
        "freshness_interval_s": INTERVAL_S,
        "freshness_worst_s": round(worst, 3),
        "freshness_median_s": round(statistics.median(samples), 3),
        "freshness_target_s": target,
        "freshness_met": worst <= target,
    }
