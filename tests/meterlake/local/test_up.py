"""`meterlake up`: prints the invoke URL first, serves, and on SIGTERM flushes everything before it exits."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir


def test_up_serves_then_flushes_on_sigterm(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", "from meterlake.cli import main; main()", "--home", str(tmp_path), "up", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().split()
        assert first[0] == "RestApiEndpoint", first
        url = first[1]
        statuses = [
            httpx.get(f"{url}/random/strings", timeout=10).status_code,  # no token
            httpx.get(f"{url}/no/such/route", timeout=10).status_code,
            httpx.get(f"{url}/random/strings", headers={"Authorization": "garbage"}, timeout=10).status_code,
        ]
        assert statuses == [401, 403, 401]  # API Gateway answers a route that does not exist 403, not 404
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "stopped cleanly" in out
    # The default buffering interval (60 s) never fired: only the shutdown flush can have committed these.
    table = ensure_metering_table(open_catalog(DataDir.resolve(tmp_path)), Config())
    rows = table.scan().to_arrow().to_pylist()
    assert sorted(r["status"] for r in rows) == [401, 401, 403]
    assert all(r["tenant_id"] is None for r in rows)
