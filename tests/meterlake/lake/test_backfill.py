"""Backfill: old access logs loaded with `meterlake ingest` land in their own days, once, however often loaded.

The README's Operations section runs these commands as written.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meterlake.records import render_access_log_line
from tests.meterlake.cli_process import meterlake

#: Two days, 40 days back: past the metering service's 35-day lateness window, which access logs do not have.
FIRST_DAY = (datetime.now(UTC) - timedelta(days=40)).replace(hour=0, minute=0, second=0, microsecond=0)
#: (tenant, day offset, requests)
TRAFFIC = [("acme", 0, 7), ("globex", 0, 3), ("acme", 1, 5)]


def _old_log(path: Path) -> int:
    lines = []
    for tenant, offset, requests in TRAFFIC:
        for n in range(requests):
            moment = FIRST_DAY + timedelta(days=offset, minutes=n)
            values = {
                "request_id": f"{tenant}-{offset}-{n}",
                "tenant_id": tenant,
                "request_time": int(moment.timestamp() * 1000),
                "http_method": "GET",
                "resource_path": "/random/strings",
                "status": 200,
                "response_length": 10,
            }
            lines.append(render_access_log_line(values).decode())
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def test_old_access_logs_are_backfilled_once_into_their_own_days(tmp_path: Path) -> None:
    total = _old_log(tmp_path / "old-access.log")
    first = meterlake("ingest", "old-access.log", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = meterlake("ingest", "old-access.log", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    start = FIRST_DAY.strftime("%Y-%m-%dT%H:%M:%SZ")
    end = (FIRST_DAY + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    query = meterlake(
        "query", "usage_per_tenant_day", "--param", f"start={start}", "--param", f"end={end}", "--format", "json",
        cwd=tmp_path,
    )  # fmt: skip
    assert query.returncode == 0, query.stderr
    rows = json.loads(query.stdout)
    usage = {(row["tenant_id"], row["usage_date"], row["requests"]) for row in rows}
    assert usage == {
        (tenant, (FIRST_DAY + timedelta(days=offset)).date().isoformat(), requests)
        for tenant, offset, requests in TRAFFIC
    }
    assert sum(row["requests"] for row in rows) == total  # the second ingest added nothing
