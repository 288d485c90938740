"""Reconciliation's lake side runs DuckDB in the local queries' sandbox: it reads the table's files and no other."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from meterlake.amberflo.reconcile import aggregate_lake
from meterlake.lake.query import sandboxed_duckdb
from meterlake.meters import DEFAULT_METERS, expected_usage
from tests.meterlake.amberflo.lake import make_events


def test_the_lake_side_reads_only_the_files_it_is_given(tmp_path: Path) -> None:
    events = make_events(0, 200)
    given, other = tmp_path / "given.parquet", tmp_path / "other.parquet"
    pq.write_table(events, given)
    pq.write_table(events, other)
    assert aggregate_lake([str(given)], DEFAULT_METERS) == expected_usage(events, DEFAULT_METERS)
    con = sandboxed_duckdb([str(given)])
    try:
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"SELECT count(*) FROM read_parquet('{other}')").fetchall()
    finally:
        con.close()
