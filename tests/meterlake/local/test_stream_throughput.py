"""The delivery stream keeping up: the transform in its worker process, pieces in flight, and backpressure on puts."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from meterlake.config import LAMBDA_REQUEST_LIMIT_BYTES, Config
from meterlake.lake.home import DataDir
from meterlake.local.invoker import event_ranges
from meterlake.local.spool import Spool, SpoolBatch
from meterlake.local.stream import BACKLOG_BUFFERS, DeliveryStream, SpoolDamagedError, access_log_handler
from tests.meterlake.local.test_stream import error_rows, gateway_line, make_config, table_rows
from transform_lambda.normalize import rejection_reason

_MIB = 1024 * 1024


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "home")


def small_events_config(size_in_mbs: int = 1) -> Config:
    """Events of 0.2 MB (the smallest processor buffer), so a 1 MB buffer is several events and uses the worker."""
    return make_config(
        buffering_hints={"size_in_mbs": size_in_mbs, "interval_in_seconds": 900},
        transform_records_with_aws_lambda={"buffer_size": 0.2},
    )


def mixed_lines(count: int) -> tuple[list[bytes], list[bytes]]:
    """``count`` good lines with a bad one every 500th; returns (all lines, the bad ones)."""
    lines: list[bytes] = []
    bad: list[bytes] = []
    for n in range(count):
        if n % 500 == 499:
            line = f"not json {n}".encode()
            bad.append(line)
        else:
            line = gateway_line(n, method="OPTIONS" if n % 97 == 0 else "GET")
        lines.append(line)
    return lines, bad


def test_the_worker_transforms_as_the_stream_process_does(tmp_path: Path) -> None:
    """The same lines, flushed by the worker (default transform) and in process (the same handler passed in): the
    same rows, drops and rejects; the worker was used, and is gone after close."""
    config = small_events_config()
    lines, bad = mixed_lines(6000)
    outcomes = []
    for name, handler in (("worker", None), ("in-process", access_log_handler(config))):
        data_dir = DataDir(tmp_path / name)
        with DeliveryStream(config=config, data_dir=data_dir, handler=handler) as stream:
            for start in range(0, len(lines), 1000):
                stream.put_records(lines[start : start + 1000])
            report = stream.flush()
            workers = stream._workers.processes() if stream._workers is not None else []
            assert bool(workers) == (handler is None)
        for process in workers:
            assert process.wait(timeout=10) == 0
        rows = table_rows(data_dir, config).drop_columns(["ingested_at"])
        errors = error_rows(data_dir)
        outcomes.append((report.ok_written, report.dropped, report.failed, rows, errors))
    (ok, dropped, failed, rows, errors), (ok2, dropped2, failed2, rows2, errors2) = outcomes
    assert (ok, dropped, failed) == (ok2, dropped2, failed2)
    assert failed == len(bad)
    assert dropped == sum(1 for n in range(6000) if n % 97 == 0 and n % 500 != 499)  # OPTIONS is not metered
    assert rows.equals(rows2)
    assert [base64.b64decode(e["rawData"]) for e in errors] == bad
    assert [e["errorMessage"] for e in errors] == [rejection_reason(line) for line in bad]
    assert [e["errorMessage"] for e in errors2] == [e["errorMessage"] for e in errors]


def test_a_worker_that_dies_costs_nothing(data_dir: DataDir) -> None:
    """Killed between flushes, the worker's pieces are transformed in process and the next flush starts another."""
    config = small_events_config()
    lines = [gateway_line(n) for n in range(9000)]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(lines[:3000])
        stream.flush()
        assert stream._workers is not None
        first = stream._workers.processes()
        assert first
        for process in first:
            process.kill()
            process.wait(timeout=10)
        stream.put_records(lines[3000:])
        report = stream.flush()
        second = stream._workers.processes()
        assert second
        assert {process.pid for process in second}.isdisjoint(process.pid for process in first)
    assert report.ok_written == 6000
    assert table_rows(data_dir, config).num_rows == 9000


def _records_read_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the records the stream's own process reads from its spool (the list grows with each read)."""
    counts: list[int] = []
    read = Spool.read

    def counting_read(spool: Spool, offset: int, max_bytes: int) -> SpoolBatch:
        batch = read(spool, offset, max_bytes)
        counts.append(len(batch.records))
        return batch

    monkeypatch.setattr(Spool, "read", counting_read)
    return counts


def test_the_workers_read_the_spool_themselves(data_dir: DataDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces that end where puts ended are read, transformed and decoded by the workers: the stream's process reads
    at most the pieces cut at a buffer's end (where no put ended), a small part of the records, and every line is
    committed once."""
    config = small_events_config()
    lines = [gateway_line(n) for n in range(9000)]
    read_here = _records_read_here(monkeypatch)
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        for start in range(0, len(lines), 100):
            stream.put_records(lines[start : start + 100])
        report = stream.flush()
    assert report.ok_written == 9000
    assert sum(read_here) < len(lines) // 10
    assert sorted(table_rows(data_dir, config).column("request_id").to_pylist()) == sorted(
        str(uuid.UUID(int=n + 1)) for n in range(9000)
    )


def test_damage_done_after_open_to_a_range_a_worker_reads_stops_the_flush_as_before(data_dir: DataDir) -> None:
    """A byte flipped after open in a piece a worker reads: the worker cannot read it, the stream reads the piece
    itself and refuses with SpoolDamagedError naming the byte; nothing of that buffer is committed, and
    ``recover=True`` then delivers every other record."""
    config = small_events_config()
    lines = [gateway_line(n) for n in range(3000)]
    stream = DeliveryStream(config=config, data_dir=data_dir)
    for start in range(0, len(lines), 100):
        stream.put_records(lines[start : start + 100])
    offsets = stream._spool.read(0, 1 << 30).offsets
    segment = data_dir.spool / "00000000000000000000.seg"
    data = bytearray(segment.read_bytes())
    data[offsets[1234] + 40] ^= 0x5A
    segment.write_bytes(bytes(data))
    with pytest.raises(SpoolDamagedError) as caught:
        stream.flush()
    assert f"damaged at byte {offsets[1234]}" in str(caught.value)
    with pytest.raises(SpoolDamagedError):
        stream.close()
    with DeliveryStream(config=config, data_dir=data_dir, recover=True) as recovered:
        recovered.flush()
    ids = table_rows(data_dir, config).column("request_id").to_pylist()
    assert sorted(ids) == sorted(str(uuid.UUID(int=n + 1)) for n in range(3000) if n != 1234)


def test_puts_wait_while_two_buffers_are_uncommitted(data_dir: DataDir) -> None:
    """A writer faster than the transform is held to at most BACKLOG_BUFFERS buffers spooled and not committed."""
    config = make_config(buffering_hints={"size_in_mbs": 1, "interval_in_seconds": 900})
    transform = access_log_handler(config)

    def slow_transform(event: dict[str, Any], context: Any) -> dict[str, Any] | bytes:
        time.sleep(0.05)
        return transform(event, context)

    line_bytes = len(gateway_line(0)) + 16
    backlog: list[int] = []
    with DeliveryStream(config=config, data_dir=data_dir, handler=slow_transform) as stream:
        stream.start()
        for start in range(0, 20_000, 500):
            stream.put_records([gateway_line(n) for n in range(start, start + 500)])
            backlog.append(stream.stats().pending_bytes)
        stream.close()
    assert max(backlog) <= BACKLOG_BUFFERS * _MIB
    assert max(backlog) > BACKLOG_BUFFERS * _MIB - 1000 * line_bytes  # the writer did get ahead, and was held
    assert table_rows(data_dir, config).num_rows == 20_000


def test_puts_do_not_wait_without_a_flusher(data_dir: DataDir) -> None:
    """Nothing would make room: the backlog grows on disk, and flush delivers it."""
    config = make_config(buffering_hints={"size_in_mbs": 1, "interval_in_seconds": 900})
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        done = threading.Event()

        def put() -> None:
            for start in range(0, 12_000, 1000):
                stream.put_records([gateway_line(n) for n in range(start, start + 1000)])
            done.set()

        writer = threading.Thread(target=put)
        writer.start()
        writer.join(timeout=60)
        assert done.is_set()
        assert stream.stats().pending_bytes > BACKLOG_BUFFERS * _MIB
        assert stream.flush().ok_written == 12_000


def test_events_are_cut_as_firehose_cuts_them() -> None:
    """At most the processor buffer's raw bytes an event, at least one record, and a request under Lambda's limit even
    for tiny records."""
    records = [b"x" * (n % 700 + 1) for n in range(20_000)]
    ranges = list(event_ranges(records, 200_000, LAMBDA_REQUEST_LIMIT_BYTES))
    assert [i for r in ranges for i in r] == list(range(len(records)))
    for r in ranges:
        raw = sum(len(records[i]) for i in r)
        assert raw <= 200_000
        if r.stop < len(records):
            assert raw + len(records[r.stop]) > 200_000
    tiny = [b"1"] * 100_000
    requests = [
        len(json.dumps([{"recordId": "9" * 20, "data": base64.b64encode(tiny[i]).decode()} for i in r]))
        for r in event_ranges(tiny, 6_000_000, LAMBDA_REQUEST_LIMIT_BYTES)
    ]
    assert len(requests) > 1
    assert max(requests) < LAMBDA_REQUEST_LIMIT_BYTES
    assert list(event_ranges([b"y" * 300_000], 200_000, LAMBDA_REQUEST_LIMIT_BYTES)) == [range(0, 1)]
