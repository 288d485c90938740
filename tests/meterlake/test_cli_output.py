"""Data values reach the terminal as text: never read as rich markup, control characters made visible; csv and json
carry them raw. Through the real command line, with tenants chosen to break a naive renderer."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest

from tests.meterlake.amberflo.lake import commit_events, make_events, metering_table
from tests.meterlake.cli_process import meterlake

#: An unbalanced closing tag, a tag pair that would render as the plain tenant next to it, that plain tenant, and
#: ANSI colour escapes.
TENANTS = ("[/bold]", "[red]x[/red]", "x", "\x1b[31mevil\x1b[0m")
#: How the table and reconcile lines show each tenant.
SHOWN = ("[/bold]", "[red]x[/red]", "x", r"\x1b[31mevil\x1b[0m")
WINDOW = ("2025-11-24T00:00:00Z", "2025-11-25T00:00:00Z")


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working dir whose data dir (``home``) holds 40 events, 10 per hostile tenant, within WINDOW."""
    cwd = tmp_path_factory.mktemp("hostile")
    events = make_events(0, 40)
    tenants = pa.array([TENANTS[n % len(TENANTS)] for n in range(40)], pa.string())
    events = events.set_column(events.schema.get_field_index("tenant_id"), "tenant_id", tenants)
    commit_events(metering_table(cwd / "home"), events, offset=40)
    return cwd


def query(lake: Path, fmt: str) -> str:
    result = meterlake(
        "query", "usage_per_tenant_day", "--param", f"start={WINDOW[0]}", "--param", f"end={WINDOW[1]}",
        "--format", fmt, cwd=lake,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_query_table_shows_tenants_as_text(lake: Path) -> None:
    out = query(lake, "table")
    assert "\x1b" not in out
    rows = [line for line in out.splitlines() if "2025-11-24" in line]
    assert len(rows) == len(TENANTS)
    shown = sorted(line.split("│")[1].strip() for line in rows)
    assert shown == sorted(SHOWN)


def test_query_csv_carries_the_raw_tenants(lake: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(query(lake, "csv"))))
    assert sorted(row["tenant_id"] for row in rows) == sorted(TENANTS)
    assert all(row["requests"] == "10" for row in rows)


def test_query_json_carries_the_raw_tenants(lake: Path) -> None:
    objects = json.loads(query(lake, "json"))
    assert sorted(o["tenant_id"] for o in objects) == sorted(TENANTS)


def test_reconcile_lines_show_tenants_as_text(lake: Path) -> None:
    # Dry run (no Amberflo key) against an empty outbox: every tenant's buckets differ and are listed.
    result = meterlake("reconcile", "--from", WINDOW[0], "--to", WINDOW[1], cwd=lake)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "\x1b" not in result.stdout
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(SHOWN)


def test_an_error_line_shows_control_characters(tmp_path: Path) -> None:
    result = meterlake("ingest", "\x1b[2Jgone\nfake line", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr == "error: \\x1b[2Jgone\\nfake line: no such file\n"
