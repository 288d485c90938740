"""The delivery stream under faults: a full disk, damaged spool segments, a damaged request_id index, repeated opens.

Each test holds the stream to the promise that matters for billing: every line ``put_records`` acknowledged is
committed exactly once, whatever happened to the disk in between.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from meterlake.config import Config
from meterlake.lake.catalog import ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.spool import QUARANTINE_DIR, Spool
from meterlake.local.stream import (
    REQUEST_ID_INDEX_FILE,
    DeliveryStream,
    SpoolDamagedError,
    StreamFullError,
)
from meterlake.schema import METERING_EVENT_PARTITION_SPEC, METERING_EVENT_SCHEMA, TABLE_PROPERTIES
from tests.conftest import FaultReport
from tests.meterlake.local.test_stream import gateway_line, make_config, metering_table

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "home")


@pytest.fixture
def config() -> Config:
    return make_config(buffering_hints={"size_in_mbs": 1, "interval_in_seconds": 900})


def committed_ids(data_dir: DataDir, config: Config) -> list[str]:
    table = metering_table(data_dir, config)
    ids: list[str] = table.scan(selected_fields=("request_id",)).to_arrow().column("request_id").to_pylist()
    return ids


def line_id(line: bytes) -> str:
    request_id: str = json.loads(line)["request_id"]
    return request_id


# -- a full disk ------------------------------------------------------------------------------------------------------

#: Puts batches of lines under a file-size limit (RLIMIT_FSIZE with SIGXFSZ ignored: write() fails with EFBIG as it
#: fails with ENOSPC on a full disk, after a short write), lifts the limit ("space returns"), puts more, and closes the
#: stream (which flushes). Prints which lines were acknowledged and how each refusal looked.
_FULL_DISK_SCRIPT = """
import json, resource, signal, sys
from pathlib import Path
from meterlake.config import parse_config
from meterlake.lake.home import DataDir
from meterlake.local.stream import DeliveryStream

home, lines_path, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
lines = lines_path.read_bytes().splitlines()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
hints = {"size_in_mbs": 1, "interval_in_seconds": 900}
config = parse_config({"data_firehose_configuration": {"buffering_hints": hints}})
acked, refusals, close_error = [], [], None
stream = DeliveryStream(config=config, data_dir=DataDir(home))

def put(batch):
    try:
        stream.put_records(batch)
    except Exception as exc:
        refusals.append({"type": type(exc).__name__, "message": str(exc), "lines": len(batch)})
    else:
        acked.extend(batch)

resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
for i in range(0, 100, 10):
    put(lines[i : i + 10])
put(lines[100:101])
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
for i in range(101, 150, 10):
    put(lines[i : i + 10])
try:
    stream.close()
except Exception as exc:
    close_error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"acked": [l.decode() for l in acked], "refusals": refusals, "close_error": close_error}))
"""


def test_a_full_disk_refuses_puts_and_loses_no_acknowledged_line(
    data_dir: DataDir, config: Config, fault_report: FaultReport
) -> None:
    lines = [gateway_line(n) for n in range(150)]
    source = data_dir.root.parent / "lines.txt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"\n".join(lines) + b"\n")
    # ~6 batches of 10 lines fit in the first segment; the 7th is cut short by the limit.
    limit = 10 * 6 * (len(lines[0]) + 16) + 2000
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(data_dir.root), str(source), str(limit)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=True,
    )
    outcome = json.loads(done.stdout.splitlines()[-1])
    acked = {line_id(line.encode()) for line in outcome["acked"]}
    # What `meterlake flush` does after the run.
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.flush()
    ids = committed_ids(data_dir, config)
    refused = len(lines) - len(acked)
    fault_report(
        "full disk while lines are put (stream)",
        answered=len(acked),
        committed=len(set(ids)),
        lost=len(acked - set(ids)),
        duplicated=len(ids) - len(set(ids)),
    )
    assert len(ids) == len(set(ids)), "a line was committed twice"
    assert set(ids) == acked, f"acked {len(acked)}, committed {len(ids)}, lost {len(acked - set(ids))}"
    assert outcome["close_error"] is None
    assert refused == sum(r["lines"] for r in outcome["refusals"]) > 0
    assert {r["type"] for r in outcome["refusals"]} == {StreamFullError.__name__}
    segment = data_dir.spool / "00000000000000000000.seg"
    assert f"spool segment {segment} has no room for " in outcome["refusals"][0]["message"]
    assert "EFBIG" in outcome["refusals"][0]["message"]
    assert line_id(lines[100]) in acked, "a batch that fits after a refused one must be accepted"
    assert {line_id(line) for line in lines[101:]} <= acked, "puts must succeed again once space returns"


# -- damaged spool segments -------------------------------------------------------------------------------------------


def _spool_lines(data_dir: DataDir, lines: list[bytes]) -> list[int]:
    """Append ``lines`` to the stream's spool as a crashed `up` leaves them (acknowledged, not committed); their
    offsets."""
    with Spool(data_dir.spool) as spool:
        start = spool.end
        spool.append(lines)
        return spool.read(start, 1 << 30).offsets


def _flip(path: Path, file_offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[file_offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_uncommitted_region_is_refused_then_recovered(
    data_dir: DataDir, config: Config, fault_report: FaultReport
) -> None:
    with DeliveryStream(config=config, data_dir=data_dir):
        pass
    lines = [gateway_line(n) for n in range(90)]
    offsets = _spool_lines(data_dir, lines[:30]) + _spool_lines(data_dir, lines[30:60])
    offsets += _spool_lines(data_dir, lines[60:])
    segment = data_dir.spool / "00000000000000000000.seg"
    _flip(segment, offsets[45] + 40)

    with pytest.raises(SpoolDamagedError) as caught:
        DeliveryStream(config=config, data_dir=data_dir)
    message = str(caught.value)
    assert f"spool segment {segment} is damaged at byte {offsets[45]}" in message
    assert "meterlake flush --recover" in message
    with pytest.raises(SpoolDamagedError):
        DeliveryStream(config=config, data_dir=data_dir)  # refused again: nothing was changed by refusing

    with DeliveryStream(config=config, data_dir=data_dir, recover=True) as stream:
        assert [(r.path, r.damages[0].file_offset) for r in stream.recovered] == [(segment, offsets[45])]
        report = stream.flush()
    readable = {line_id(line) for i, line in enumerate(lines) if i != 45}
    ids = committed_ids(data_dir, config)
    fault_report(
        "flipped byte, uncommitted spool (its 1 record unreadable)",
        answered=len(readable),
        committed=len(set(ids)),
        lost=len(readable - set(ids)),
        duplicated=len(ids) - len(set(ids)),
    )
    assert report.ok_written == 89
    assert sorted(ids) == sorted(readable)
    assert len(list((data_dir.spool / QUARANTINE_DIR).glob("*.json"))) == 1
    with DeliveryStream(config=config, data_dir=data_dir) as again:
        again.put_records([gateway_line(1000)])
    assert len(committed_ids(data_dir, config)) == 90


def test_a_flipped_byte_in_the_committed_region_is_refused_then_recovered(
    data_dir: DataDir, config: Config, fault_report: FaultReport
) -> None:
    committed = [gateway_line(n) for n in range(40)]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(committed)
        stream.flush()
    pending = [gateway_line(n) for n in range(40, 100)]
    _spool_lines(data_dir, pending)
    segment = data_dir.spool / "00000000000000000000.seg"
    _flip(segment, 500)

    with pytest.raises(SpoolDamagedError) as caught:
        DeliveryStream(config=config, data_dir=data_dir)
    assert f"spool segment {segment} is damaged at byte " in str(caught.value)

    with DeliveryStream(config=config, data_dir=data_dir, recover=True) as stream:
        report = stream.flush()
    ids = committed_ids(data_dir, config)
    answered = {line_id(line) for line in committed + pending}
    fault_report(
        "flipped byte, committed spool",
        answered=len(answered),
        committed=len(set(ids)),
        lost=len(answered - set(ids)),
        duplicated=len(ids) - len(set(ids)),
    )
    assert report.ok_written == 60, "the uncommitted tail behind committed damage must all be delivered"
    assert sorted(ids) == sorted(line_id(line) for line in committed + pending)
    with DeliveryStream(config=config, data_dir=data_dir) as again:
        again.put_records([gateway_line(1000)])
    assert len(committed_ids(data_dir, config)) == 101


def test_damage_at_the_very_end_of_the_log_is_passed_over(data_dir: DataDir, config: Config) -> None:
    with DeliveryStream(config=config, data_dir=data_dir):
        pass
    lines = [gateway_line(n) for n in range(10)]
    offsets = _spool_lines(data_dir, lines)
    with Spool(data_dir.spool) as spool:
        end = spool.end
    # What a roll leaves when the first append to the new segment finds the disk full: an empty last segment.
    (data_dir.spool / f"{end:020d}.seg").touch()
    _flip(data_dir.spool / "00000000000000000000.seg", offsets[-1] + 30)

    with pytest.raises(SpoolDamagedError):
        DeliveryStream(config=config, data_dir=data_dir)
    with DeliveryStream(config=config, data_dir=data_dir, recover=True) as stream:
        report = stream.flush()
        assert stream.stats().pending_bytes == 0
    assert report.ok_written == 9
    with DeliveryStream(config=config, data_dir=data_dir) as again:
        assert again.stats().committed_offset == end


# -- the request_id index ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["tail-cut", "half-cut", "garbled-data-block"])
def test_a_damaged_request_id_index_is_set_aside_and_rebuilt(
    data_dir: DataDir, config: Config, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [gateway_line(n) for n in range(3000)]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(lines[:2000])
        stream.flush()
        stream.put_records(lines[2000:])
    index = data_dir.spool / REQUEST_ID_INDEX_FILE
    size = index.stat().st_size
    if damage == "garbled-data-block":
        # DuckDB's file: a 12 KiB header, then 256 KiB blocks; here the second holds keys, so opening the file works
        # and only reading the keys finds the damage (by the block's checksum).
        at = 3 * 4096 + 256 * 1024 + 100
        assert size > at + 64
        data = bytearray(index.read_bytes())
        data[at : at + 64] = bytes(b ^ 0x5A for b in data[at : at + 64])
        index.write_bytes(bytes(data))
    else:
        with open(index, "r+b") as handle:
            handle.truncate(size - 4096 if damage == "tail-cut" else size // 2)

    with caplog.at_level(logging.WARNING), DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records([*lines[:10], gateway_line(5000)])
        report = stream.flush()
    assert (report.ok_written, report.duplicates_skipped) == (1, 10)
    assert len(committed_ids(data_dir, config)) == 3001
    aside = index.with_name(REQUEST_ID_INDEX_FILE + ".damaged")
    assert aside.exists(), "the damaged index is kept aside, not deleted"
    assert any(str(index) in record.getMessage() and "rebuil" in record.getMessage() for record in caplog.records)


# -- the table's metadata ---------------------------------------------------------------------------------------------


def _metadata_files(data_dir: DataDir, config: Config) -> list[Path]:
    return sorted((data_dir.warehouse / config.database_name / config.table_name / "metadata").glob("*.metadata.json"))


def test_opening_the_table_again_writes_no_metadata_file(data_dir: DataDir, config: Config) -> None:
    first = ensure_metering_table(open_catalog(data_dir), config)
    for _ in range(5):
        again = ensure_metering_table(open_catalog(data_dir), config)
        assert again.metadata_location == first.metadata_location
    assert len(_metadata_files(data_dir, config)) == 1


def test_metadata_orphaned_by_earlier_opens_is_removed_when_the_stream_opens(data_dir: DataDir, config: Config) -> None:
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records([gateway_line(n) for n in range(10)])
        stream.flush()
    live = set(_metadata_files(data_dir, config))
    catalog = open_catalog(data_dir)
    for _ in range(3):  # what every open did before: create first, then find that the table exists
        with pytest.raises(Exception, match="already exists"):
            catalog.create_table(
                (config.database_name, config.table_name),
                schema=METERING_EVENT_SCHEMA,
                partition_spec=METERING_EVENT_PARTITION_SPEC,
                properties=dict(TABLE_PROPERTIES),
            )
    assert len(_metadata_files(data_dir, config)) == len(live) + 3
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records([gateway_line(n) for n in range(10, 20)])
    after = set(_metadata_files(data_dir, config))
    assert live <= after, "metadata the table references must stay"
    assert len(after) == len(live) + 1  # the one commit since
    assert len(committed_ids(data_dir, config)) == 20
