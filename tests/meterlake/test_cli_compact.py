"""`meterlake compact`: closed days compacted in one replace commit; a busy table or nothing to do said in one line."""

from __future__ import annotations

from pathlib import Path

from meterlake.config import Config
from meterlake.lake.compact import maintenance_lock
from meterlake.lake.home import DataDir
from tests.meterlake.amberflo.lake import (
    commit_events,
    make_events,
    make_meter_events,
    meter_events_table,
    metering_table,
)
from tests.meterlake.test_cli import meterlake

CONFIG = Config()


def test_compact_rewrites_closed_days_and_says_what_it_did(tmp_path: Path) -> None:
    table = metering_table(tmp_path / "home")  # make_events' times: 2025-11-24, long closed
    for flush in range(5):
        commit_events(table, make_events(flush * 20, 20), offset=flush + 1)

    result = meterlake("compact", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "compacted 1 day(s): 5 files -> 1, 100 rows unchanged (replace snapshot" in result.stdout
    # The forwarding outbox has staged nothing yet: every snapshot stays for it.
    assert "expired 0 snapshot(s), kept 6" in result.stdout
    table.refresh()
    assert len(list(table.scan().plan_files())) == 1

    again = meterlake("compact", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to compact" in again.stdout


def test_a_damaged_data_file_is_one_warning_and_the_other_table_is_still_maintained(tmp_path: Path) -> None:
    table = metering_table(tmp_path / "home")
    for flush in range(3):
        commit_events(table, make_events(flush * 20, 20), offset=flush + 1)
    events = meter_events_table(tmp_path / "home")
    for flush in range(2):
        events.append(make_meter_events(f"e{flush}-", 10))
    damaged = Path(next(iter(table.scan().plan_files())).file.file_path.removeprefix("file://"))
    data = bytearray(damaged.read_bytes())
    data[200:260] = bytes(byte ^ 0xFF for byte in data[200:260])
    damaged.write_bytes(bytes(data))

    result = meterlake("compact", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert f"day 2025-11-24: {damaged} cannot be read" in warnings[0]
    assert "nothing compacted" in result.stdout
    assert "meter events: compacted 1 day(s): 2 files -> 1, 20 rows unchanged" in result.stdout


def test_compact_maintains_the_meter_events_table_too(tmp_path: Path) -> None:
    metering_table(tmp_path / "home")
    events = meter_events_table(tmp_path / "home")  # make_meter_events' times: 2025-11-24, long closed
    for flush in range(4):
        events.append(make_meter_events(f"e{flush}-", 10))

    result = meterlake("compact", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to compact: no closed day holds two small files" in result.stdout  # the access-log table
    assert "meter events: compacted 1 day(s): 4 files -> 1, 40 rows unchanged (replace snapshot" in result.stdout
    # The meter-event outbox has staged nothing yet: every snapshot stays for it.
    assert "meter events: expired 0 snapshot(s), kept 5" in result.stdout
    events.refresh()
    assert len(list(events.scan().plan_files())) == 1


def test_compact_while_another_maintains_the_table_is_one_error_line(tmp_path: Path) -> None:
    metering_table(tmp_path / "home")
    with maintenance_lock(DataDir.resolve(tmp_path / "home"), (CONFIG.database_name, CONFIG.table_name)):
        result = meterlake("compact", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: another process is compacting this table")
