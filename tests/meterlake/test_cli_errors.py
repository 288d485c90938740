"""Failures of the environment and of the input, through the real command line: one ``error:`` line, a non-zero exit,
never a traceback: a bad .sql file or key, bad options, a read-only data dir, a full disk, an oversized line."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.stream import MAX_PUT_RECORD_BYTES
from meterlake.records import render_access_log_line
from meterlake.service.delivery import METER_EVENT_SPOOL_DIR
from tests.conftest import FaultReport
from tests.meterlake.cli_process import meterlake, one_error_line

#: 2025-11-24T16:00:00Z in epoch milliseconds.
BASE_TIME_MS = 1_764_000_000_000


def access_log_line(n: int, tenant: str = "acme") -> bytes:
    """An access-log line as the gateway renders it; the request id is a deterministic UUID of ``n``."""
    return render_access_log_line(
        {
            "request_id": str(uuid.UUID(int=n + 1)),
            "api_id": "api123",
            "stage": "prod",
            "tenant_id": tenant,
            "user": "alice",
            "client_id": "client",
            "ip": "10.0.0.1",
            "user_agent": "pytest",
            "request_time": BASE_TIME_MS + n,
            "http_method": "GET",
            "resource_path": "/random/strings",
            "path": "/prod/random/strings",
            "status": 200,
            "protocol": "HTTP/1.1",
            "response_length": 12,
            "response_latency_ms": 3,
        }
    )


def write_lines(path: Path, first: int, count: int) -> Path:
    path.write_bytes(b"".join(access_log_line(first + n) + b"\n" for n in range(count)))
    return path


def test_a_sql_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "latin1.sql").write_bytes(b"-- caf\xe9\nSELECT 1 FROM metering_events\n")
    line = one_error_line(meterlake("query", "latin1.sql", cwd=tmp_path))
    assert "latin1.sql: not UTF-8 text" in line


def test_a_signing_key_readable_by_others(tmp_path: Path) -> None:
    assert meterlake("token", "--tenant", "acme", cwd=tmp_path).returncode == 0
    key = next((tmp_path / "home" / "keys").glob("*.pem"))
    key.chmod(0o644)
    line = one_error_line(meterlake("token", "--tenant", "acme", cwd=tmp_path))
    assert f"{key}: the signing key is accessible to others" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "--user", ""], "--user must not be empty"),
        (["token", "--ttl", "0"], "--ttl must be at least 1"),
        (["token", "--tenant", "-"], "custom:tenant_id '-' is what the access log writes for no value"),
        (["token", "--tenant", ""], "custom:tenant_id '' is empty"),
        (["up", "--port", "99999"], "--port must be 0-65535, got 99999"),
        (["up", "--port", "-1"], "--port must be 0-65535, got -1"),
    ],
)
def test_bad_option_values(tmp_path: Path, args: list[str], message: str) -> None:
    assert message in one_error_line(meterlake(*args, cwd=tmp_path))


def test_home_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("not a directory")
    line = one_error_line(meterlake("flush", cwd=tmp_path))
    assert f"data dir {tmp_path / 'home'}" in line


# -- a read-only data dir -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def used_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir that has been used: events committed, a signing key made."""
    cwd = tmp_path_factory.mktemp("used")
    write_lines(cwd / "lines.txt", 0, 5)
    for args in (["ingest", "lines.txt"], ["token", "--tenant", "acme"]):
        result = meterlake(*args, cwd=cwd)
        assert result.returncode == 0, result.stderr
    return cwd


@pytest.mark.parametrize(
    "args",
    [
        ["flush"],
        ["ingest", "more.txt"],
        ["up", "--port", "0"],
        ["forward", "run"],
        ["forward", "status"],
        ["reconcile", "--from", "2025-11-24T00:00:00Z", "--to", "2025-11-25T00:00:00Z"],
    ],
)
def test_a_read_only_data_dir(used_home: Path, args: list[str]) -> None:
    write_lines(used_home / "more.txt", 100, 3)
    home = used_home / "home"
    line = one_error_line(meterlake(*args, cwd=used_home, read_only=home, timeout=60))
    assert f"data dir {home} is not writable (Read-only file system)" in line


def test_token_on_a_fresh_read_only_data_dir(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    line = one_error_line(meterlake("token", "--tenant", "acme", cwd=tmp_path, read_only=home))
    assert f"data dir {home}" in line
    assert "Read-only file system" in line


def test_token_on_a_read_only_data_dir_without_a_key(tmp_path: Path) -> None:
    assert meterlake("flush", cwd=tmp_path).returncode == 0  # the data dir exists, the signing key does not
    home = tmp_path / "home"
    line = one_error_line(meterlake("token", "--tenant", "acme", cwd=tmp_path, read_only=home))
    assert line.startswith(f"error: {home / 'keys'}/")
    assert line.endswith(": Read-only file system (EROFS)")


# -- a full disk (RLIMIT_FSIZE: writes past the limit fail with EFBIG, as they would with ENOSPC) ----------------------


def test_ingest_on_a_full_disk(tmp_path: Path) -> None:
    write_lines(tmp_path / "lines.txt", 0, 2000)  # ~900 KB: the spool segment outgrows the limit
    line = one_error_line(meterlake("ingest", "lines.txt", cwd=tmp_path, file_size_limit=200_000))
    assert "File too large" in line


def _crash_after_put(home: Path, count: int) -> None:
    """Acknowledge ``count`` lines into the stream of ``home`` and die before any flush, as a killed `up` would."""
    script = (
        "import os, sys, uuid\n"
        "from meterlake.config import Config\n"
        "from meterlake.lake.home import DataDir\n"
        "from meterlake.local.stream import DeliveryStream\n"
        "from tests.meterlake.test_cli_errors import access_log_line\n"
        "stream = DeliveryStream(config=Config(), data_dir=DataDir.resolve(sys.argv[1]))\n"
        "stream.put_records([access_log_line(n) for n in range(int(sys.argv[2]))])\n"
        "os._exit(0)\n"
    )
    root = Path(__file__).parents[2]
    subprocess.run([sys.executable, "-c", script, str(home), str(count)], cwd=root, check=True, timeout=120)


@pytest.mark.parametrize("limit", [2_000, 8_000])
def test_flush_on_a_full_disk_then_after_space_returns(tmp_path: Path, limit: int) -> None:
    _crash_after_put(tmp_path / "home", 300)
    line = one_error_line(meterlake("flush", cwd=tmp_path, file_size_limit=limit))
    assert "File too large" in line
    recovered = meterlake("flush", cwd=tmp_path)
    assert recovered.returncode == 0, recovered.stderr
    assert "committed 300," in recovered.stdout


# -- an oversized line ----------------------------------------------------------------------------------------------


def test_ingest_names_the_file_line_of_an_oversized_record_and_what_was_committed(tmp_path: Path) -> None:
    lines = [access_log_line(n) for n in range(4)]
    lines.insert(1, b"")  # a blank line still counts as a line of the file
    lines.insert(4, b"x" * (MAX_PUT_RECORD_BYTES + 1))
    (tmp_path / "lines.txt").write_bytes(b"\n".join(lines) + b"\n")
    line = one_error_line(meterlake("ingest", "lines.txt", cwd=tmp_path))
    assert line == (
        f"error: lines.txt line 5 is {MAX_PUT_RECORD_BYTES + 1} bytes; a record may be at most {MAX_PUT_RECORD_BYTES}: "
        "ingest stopped there; the 3 lines before it were acknowledged and flushed (committed 3, rejected 0, "
        "dropped 0); nothing after it was read"
    )
    again = meterlake("flush", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("committed 0,")


# -- a damaged spool ------------------------------------------------------------------------------------------------


def test_a_damaged_spool_is_refused_with_one_line_and_flush_recover_delivers_the_rest(tmp_path: Path) -> None:
    _crash_after_put(tmp_path / "home", 90)
    (segment,) = (tmp_path / "home" / "spool").glob("*.seg")
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the uncommitted records
    segment.write_bytes(bytes(data))
    refused = one_error_line(meterlake("flush", cwd=tmp_path))
    assert "is damaged at byte" in refused
    assert "`meterlake flush --recover`" in refused
    recovered = meterlake("flush", "--recover", cwd=tmp_path)
    assert recovered.returncode == 0, recovered.stderr
    lines = recovered.stdout.splitlines()
    assert lines[0].startswith("recovered ")
    assert lines[-1].startswith("committed 89,")  # every record but the damaged one
    assert list((tmp_path / "home" / "spool" / "quarantine").glob("*.json"))
    again = meterlake("flush", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("committed 0,")


def test_a_damaged_meter_event_spool_is_refused_and_flush_recover_delivers_the_rest(
    tmp_path: Path, fault_report: FaultReport
) -> None:
    """The metering service's spool is a durable file like the gateway's: the advice its refusal gives works."""
    home = tmp_path / "home"
    script = (
        "import os, sys\n"
        "from meterlake.amberflo.api import IngestRecord\n"
        "from meterlake.config import Config\n"
        "from meterlake.lake.home import DataDir\n"
        "from meterlake.service.delivery import open_meter_event_stream\n"
        "from meterlake.service.events import encode_rows, event_rows\n"
        "stream = open_meter_event_stream(Config(), DataDir.resolve(sys.argv[1]).ensure())\n"
        "records = [IngestRecord('acme', 'llm-tokens', 1, 1796000000000, f'u{n}') for n in range(90)]\n"
        "stream.put_records([encode_rows(event_rows([r], ingested_at_us=0, source='ingest')) for r in records])\n"
        "os._exit(0)\n"  # acknowledged, never committed: a killed serve
    )
    subprocess.run([sys.executable, "-c", script, str(home)], check=True, timeout=120)
    (segment,) = (home / METER_EVENT_SPOOL_DIR).glob("*.seg")
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the uncommitted records
    segment.write_bytes(bytes(data))
    refused = one_error_line(meterlake("flush", cwd=tmp_path))
    assert f"spool segment {segment} is damaged at byte" in refused
    assert "`meterlake flush --recover`" in refused
    recovered = meterlake("flush", "--recover", cwd=tmp_path)
    assert recovered.returncode == 0, recovered.stderr
    lines = recovered.stdout.splitlines()
    assert any(line.startswith("recovered ") and METER_EVENT_SPOOL_DIR in line for line in lines), lines
    assert lines[-1].startswith("meter events: committed 89,")  # every record but the damaged one
    table = ensure_meter_events_table(open_catalog(DataDir.resolve(home)), Config())
    ids = table.scan(selected_fields=("unique_id",)).to_arrow().column("unique_id").to_pylist()
    fault_report(
        "flipped byte, uncommitted meter-event spool (its 1 record unreadable)",
        answered=89,
        committed=len(set(ids)),
        lost=89 - len(set(ids)),
        duplicated=len(ids) - len(set(ids)),
    )
    assert (len(ids), len(set(ids))) == (89, 89)
    again = meterlake("flush", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1].startswith("meter events: committed 0,")


# -- a damaged catalog ----------------------------------------------------------------------------------------------


def _used(cwd: Path) -> Path:
    """A data dir under ``cwd`` with 5 events committed; its catalog file."""
    write_lines(cwd / "lines.txt", 0, 5)
    result = meterlake("ingest", "lines.txt", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return DataDir(cwd / "home").catalog_db


def test_a_catalog_that_is_not_a_database_is_named_in_one_line(tmp_path: Path) -> None:
    catalog = _used(tmp_path)
    catalog.write_bytes(b"not a database " * 100)
    line = one_error_line(meterlake("query", "usage_per_tenant_day", cwd=tmp_path))
    assert f"has a damaged catalog, {catalog} (file is not a database)" in line


def test_flipped_bytes_inside_the_catalog_are_one_line_and_a_failed_ingest_acknowledges_nothing(tmp_path: Path) -> None:
    catalog = _used(tmp_path)
    intact = catalog.read_bytes()
    damaged = bytearray(intact)
    for offset in range(200, len(damaged), 997):  # past SQLite's 100-byte header: rows and pages, not the format
        damaged[offset] ^= 0xFF
    catalog.write_bytes(bytes(damaged))
    write_lines(tmp_path / "more.txt", 100, 3)
    for args in (["query", "usage_per_tenant_day"], ["ingest", "more.txt"]):
        assert "the data dir's Iceberg catalog (catalog.db) failed: " in one_error_line(meterlake(*args, cwd=tmp_path))
    catalog.write_bytes(intact)  # restored from a copy, as the message says
    identifier = (Config().database_name, Config().table_name)
    result = meterlake("flush", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # The failed ingest acknowledged nothing (it stopped opening the catalog, before its spool took a line) ...
    assert open_catalog(DataDir(tmp_path / "home")).load_table(identifier).scan().to_arrow().num_rows == 5
    result = meterlake("ingest", "more.txt", cwd=tmp_path)  # ... so running it again commits its lines, once
    assert result.returncode == 0, result.stderr
    assert open_catalog(DataDir(tmp_path / "home")).load_table(identifier).scan().to_arrow().num_rows == 8
