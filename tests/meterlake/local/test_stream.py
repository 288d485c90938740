"""The local delivery stream: gateway lines in, Iceberg rows and Firehose-style error output out, exactly once."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.table import Table

from meterlake.amberflo.api import IngestRecord
from meterlake.config import Config, parse_config
from meterlake.lake.catalog import ensure_meter_events_table, ensure_metering_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.stream import (
    CHECKPOINT_FILE,
    REQUEST_ID_INDEX_FILE,
    SPOOL_OFFSET_PROPERTY,
    DeliveryStream,
    ErrorPrefixError,
    FlushReport,
    StreamInUseError,
    ingest_lines,
    render_error_prefix,
)
from meterlake.records import render_access_log_line
from meterlake.service.delivery import open_meter_event_stream
from meterlake.service.events import encode_rows, event_rows
from transform_lambda.handler import TransformSettings, make_handler
from transform_lambda.normalize import rejection_reason

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
BASE_TIME_MS = 1_764_000_000_000


def make_config(**firehose: Any) -> Config:
    """The default config with overrides of ``data_firehose_configuration`` (buffering hints etc.)."""
    return parse_config({"data_firehose_configuration": firehose})


def gateway_line(n: int, *, method: str = "GET", tenant: str | None = None, request_id: str | None = None) -> bytes:
    """An access-log line as the gateway renders it; the request id is a deterministic UUID of ``n``."""
    return render_access_log_line(
        {
            "request_id": request_id or str(uuid.UUID(int=n + 1)),
            "api_id": "api123",
            "stage": "prod",
            "tenant_id": tenant or f"tenant-{n % 3}",
            "user": f"user{n % 5}",
            "client_id": "client",
            "ip": "10.0.0.1",
            "user_agent": "pytest",
            "request_time": BASE_TIME_MS + n,
            "http_method": method,
            "resource_path": "/random/strings",
            "path": "/prod/random/strings",
            "status": 200 + n % 2,
            "protocol": "HTTP/1.1",
            "response_length": n,
            "response_latency_ms": 5,
            "integration_latency_ms": 3,
        }
    )


def default_handler(config: Config) -> Handler:
    settings = TransformSettings(
        database=config.database_name,
        table=config.table_name,
        unmetered_http_methods=frozenset(config.meterlake.unmetered_http_methods),
    )
    return make_handler(settings, emit_metrics=False)


def metering_table(data_dir: DataDir, config: Config) -> Table:
    return ensure_metering_table(open_catalog(data_dir), config)


def table_rows(data_dir: DataDir, config: Config) -> pa.Table:
    return metering_table(data_dir, config).scan().to_arrow().sort_by("request_id")


def error_rows(data_dir: DataDir) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(data_dir.errors.rglob("*.jsonl")):
        rows.extend(json.loads(line) for line in path.read_text().splitlines())
    return rows


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "home")


@pytest.fixture
def config() -> Config:
    return make_config(buffering_hints={"size_in_mbs": 1, "interval_in_seconds": 900})


def test_gateway_lines_become_table_rows_equal_to_the_input(data_dir: DataDir, config: Config) -> None:
    lines = [gateway_line(n) for n in range(300)]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(lines[:100])
        stream.put_records(lines[100:])
        report = stream.flush()
    assert report.records_read == report.ok_written == 300
    assert (report.failed, report.dropped, report.duplicates_skipped, report.commits) == (0, 0, 0, 1)
    rows = table_rows(data_dir, config).to_pylist()
    expected = sorted((json.loads(line) for line in lines), key=lambda r: r["request_id"])
    assert len(rows) == len(expected)
    for row, source in zip(rows, expected, strict=True):
        assert row["request_id"] == source["request_id"]
        assert row["tenant_id"] == source["tenant_id"]
        assert row["status"] == int(source["status"])
        assert row["response_length"] == int(source["response_length"])
        assert int(row["request_time"].timestamp() * 1000) == int(source["request_time"])
        assert row["ingested_at"] is not None


def test_a_duplicated_batch_in_one_flush_is_committed_once(data_dir: DataDir, config: Config) -> None:
    lines = [gateway_line(n) for n in range(50)]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(lines)
        stream.put_records(lines)
        report = stream.flush()
    assert (report.ok_written, report.duplicates_skipped) == (50, 50)
    assert table_rows(data_dir, config).num_rows == 50


def test_a_batch_redelivered_in_a_later_flush_or_after_a_restart_changes_nothing(
    data_dir: DataDir, config: Config
) -> None:
    lines = [gateway_line(n) for n in range(80)]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(lines)
        first = stream.flush()
        stream.put_records(lines[:40])
        second = stream.flush()
    before = table_rows(data_dir, config)
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(lines)
        third = stream.flush()
    assert first.ok_written == 80
    assert (second.ok_written, second.duplicates_skipped, second.commits) == (0, 40, 0)
    assert (third.ok_written, third.duplicates_skipped, third.commits) == (0, 80, 0)
    assert table_rows(data_dir, config).equals(before)


def test_the_request_id_index_is_rebuilt_from_the_table_when_lost(data_dir: DataDir, config: Config) -> None:
    lines = [gateway_line(n) for n in range(30)]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(lines)
        stream.flush()
    (data_dir.spool / REQUEST_ID_INDEX_FILE).unlink()
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records([*lines[:10], gateway_line(1000)])
        report = stream.flush()
    assert (report.ok_written, report.duplicates_skipped) == (1, 10)
    assert table_rows(data_dir, config).num_rows == 31


def test_bad_lines_go_to_the_error_folder_with_reasons_and_good_ones_commit(data_dir: DataDir) -> None:
    config = make_config(buffering_hints={"size_in_mbs": 8, "interval_in_seconds": 900})
    good = [gateway_line(n) for n in range(20)]
    missing_required = json.dumps({k: v for k, v in json.loads(gateway_line(99)).items() if k != "request_id"})
    wrong_type = json.dumps({**json.loads(gateway_line(98)), "status": "two hundred"})
    bad = [
        b"this is not json",
        missing_required.encode(),
        b'{"request_id": "\xff\xfe"}',
        gateway_line(97, tenant="x" * 1_100_000),
        wrong_type.encode(),
    ]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(good[:10] + bad + good[10:])
        report = stream.flush()
    assert (report.ok_written, report.failed) == (20, 5)
    assert table_rows(data_dir, config).num_rows == 20
    errors = error_rows(data_dir)
    assert [base64.b64decode(e["rawData"]) for e in errors] == bad
    for error, line in zip(errors, bad, strict=True):
        assert error["errorCode"] == "Lambda.ProcessingFailed"
        assert error["errorMessage"] == rejection_reason(line)
        assert error["errorMessage"]
        assert error["attemptsMade"] == 1
        assert error["arrivalTimestamp"] <= error["attemptEndingTimestamp"]
    paths = list(data_dir.errors.rglob("*.jsonl"))
    assert len(paths) == 1
    assert "processing-failed" in paths[0].parts
    assert "!{" not in str(paths[0])


def test_unmetered_methods_are_dropped_not_written(data_dir: DataDir, config: Config) -> None:
    lines = [gateway_line(n, method="OPTIONS" if n % 4 == 0 else "GET") for n in range(40)]
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.put_records(lines)
        report = stream.flush()
    assert (report.ok_written, report.dropped, report.failed) == (30, 10, 0)
    rows = table_rows(data_dir, config)
    assert "OPTIONS" not in rows.column("http_method").to_pylist()
    assert error_rows(data_dir) == []


def test_each_flush_is_exactly_one_iceberg_snapshot_carrying_its_offset(data_dir: DataDir, config: Config) -> None:
    small_events = make_config(
        buffering_hints={"size_in_mbs": 1, "interval_in_seconds": 900},
        transform_records_with_aws_lambda={"buffer_size": 0.2},
    )
    with DeliveryStream(config=small_events, data_dir=data_dir) as stream:
        for flush_number in range(3):
            stream.put_records([gateway_line(flush_number * 1000 + n) for n in range(1000)])
            report = stream.flush()
            assert report.invocations > 1
            assert report.commits == 1
            table = metering_table(data_dir, config)
            assert len(table.snapshots()) == flush_number + 1
            summary = table.current_snapshot().summary  # type: ignore[union-attr]
            assert summary is not None
            assert summary.get(SPOOL_OFFSET_PROPERTY) == str(report.committed_offset)
            assert summary.get("added-records") == "1000"


def test_a_buffer_beyond_the_event_limits_is_split_into_invocations_but_committed_once(
    data_dir: DataDir,
) -> None:
    config = make_config(
        buffering_hints={"size_in_mbs": 16, "interval_in_seconds": 900},
        transform_records_with_aws_lambda={"buffer_size": 0.5},
    )
    real = default_handler(config)
    raw_sizes: list[int] = []

    def measuring(event: dict[str, Any], context: Any) -> dict[str, Any]:
        raw_sizes.append(sum(len(base64.b64decode(r["data"])) for r in event["records"]))
        return real(event, context)

    lines = [gateway_line(n, tenant="t" * 2000) for n in range(4000)]  # ~9.5 MB of raw lines: > 6 MB and > 0.5 MB
    with DeliveryStream(config=config, data_dir=data_dir, handler=measuring) as stream:
        stream.put_records(lines)
        report = stream.flush()
    assert report.ok_written == 4000
    assert report.commits == 1
    assert report.invocations == len(raw_sizes) > 18
    # Firehose's processor buffer counts raw record bytes, not the request's base64 (4/3 of them).
    assert 0.45 * 1024 * 1024 < max(raw_sizes) <= 0.5 * 1024 * 1024
    assert len(metering_table(data_dir, config).snapshots()) == 1


def test_an_answer_over_lambdas_response_limit_fails_the_invocation_as_lambda_does(data_dir: DataDir) -> None:
    """Lambda refuses a response over 6,291,556 bytes (Function.ResponseSizeTooLarge); Firehose retries the
    invocation, then writes its records to the error prefix as a Lambda.FunctionError."""
    config = make_config(transform_records_with_aws_lambda={"number_of_retries": 1})
    real = default_handler(config)

    def bloated(event: dict[str, Any], context: Any) -> dict[str, Any]:
        answer = real(event, context)
        answer["records"][0]["data"] += "A" * 6_300_000
        return answer

    lines = [gateway_line(n) for n in range(5)]
    with DeliveryStream(config=config, data_dir=data_dir, handler=bloated) as stream:
        stream.put_records(lines)
        report = stream.flush()
    assert (report.invocations, report.failed, report.ok_written) == (2, 5, 0)
    errors = error_rows(data_dir)
    assert [base64.b64decode(e["rawData"]) for e in errors] == lines
    assert {e["errorCode"] for e in errors} == {"Lambda.FunctionError"}
    assert all("Function.ResponseSizeTooLarge" in e["errorMessage"] for e in errors)
    assert all("exceeded maximum allowed payload size (6291556 bytes)" in e["errorMessage"] for e in errors)


@pytest.mark.parametrize(("over", "taken"), [(0, True), (1, False)])
def test_the_response_limit_is_lambdas_byte_for_byte(data_dir: DataDir, over: int, taken: bool) -> None:
    """An answer of exactly 6,291,556 bytes, as the runtime marshals it, is taken; one byte more is refused."""
    config = make_config(transform_records_with_aws_lambda={"number_of_retries": 0})
    real = default_handler(config)
    sizes: list[int] = []

    def padded(event: dict[str, Any], context: Any) -> dict[str, Any]:
        answer = real(event, context)
        (dropped,) = [r for r in answer["records"] if r["result"] == "Dropped"]
        size = len(json.dumps(answer, ensure_ascii=False).encode())
        dropped["data"] += "A" * (6_291_556 + over - size)  # Firehose ignores a dropped record's data
        sizes.append(len(json.dumps(answer, ensure_ascii=False).encode()))
        return answer

    lines = [gateway_line(0, method="OPTIONS"), *(gateway_line(n) for n in range(1, 5))]
    with DeliveryStream(config=config, data_dir=data_dir, handler=padded) as stream:
        stream.put_records(lines)
        report = stream.flush()
    assert sizes == [6_291_556 + over]
    if taken:
        assert (report.ok_written, report.dropped, report.failed) == (4, 1, 0)
    else:
        assert (report.ok_written, report.dropped, report.failed) == (0, 0, 5)


def test_a_raising_handler_is_retried_then_its_records_go_to_the_error_folder(data_dir: DataDir) -> None:
    config = make_config(transform_records_with_aws_lambda={"number_of_retries": 2})
    calls: list[int] = []

    def broken(event: dict[str, Any], context: Any) -> dict[str, Any]:
        calls.append(len(event["records"]))
        raise RuntimeError("transform crashed")

    lines = [gateway_line(n) for n in range(10)]
    with DeliveryStream(config=config, data_dir=data_dir, handler=broken) as stream:
        stream.put_records(lines)
        report = stream.flush()
    assert calls == [10, 10, 10]
    assert (report.invocations, report.failed, report.ok_written) == (3, 10, 0)
    errors = error_rows(data_dir)
    assert [base64.b64decode(e["rawData"]) for e in errors] == lines
    assert {e["errorCode"] for e in errors} == {"Lambda.FunctionError"}
    assert all("transform crashed" in e["errorMessage"] and e["attemptsMade"] == 3 for e in errors)


def test_a_handler_that_recovers_within_the_retries_loses_nothing(data_dir: DataDir) -> None:
    config = make_config(transform_records_with_aws_lambda={"number_of_retries": 3})
    real = default_handler(config)
    attempts: list[str] = []

    def flaky(event: dict[str, Any], context: Any) -> dict[str, Any]:
        attempts.append(event["invocationId"])
        if len(attempts) == 1:
            raise TimeoutError("Task timed out")
        answer = real(event, context)
        if len(attempts) == 2:
            answer["records"] = answer["records"][1:]  # an answer that misses a recordId is a failed invocation
        return answer

    lines = [gateway_line(n) for n in range(25)]
    with DeliveryStream(config=config, data_dir=data_dir, handler=flaky) as stream:
        stream.put_records(lines)
        report = stream.flush()
    assert (report.invocations, report.ok_written, report.failed) == (3, 25, 0)
    assert len(set(attempts)) == 3
    assert table_rows(data_dir, config).num_rows == 25


def test_rows_routed_to_an_unknown_table_go_to_the_error_folder(data_dir: DataDir, config: Config) -> None:
    real = default_handler(config)

    def misrouting(event: dict[str, Any], context: Any) -> dict[str, Any]:
        answer = real(event, context)
        for record in answer["records"][:3]:
            record["metadata"] = {
                "otfMetadata": {
                    "destinationDatabaseName": config.database_name,
                    "destinationTableName": "no_such_table",
                    "operation": "insert",
                }
            }
        return answer

    with DeliveryStream(config=config, data_dir=data_dir, handler=misrouting) as stream:
        stream.put_records([gateway_line(n) for n in range(10)])
        report = stream.flush()
    assert (report.ok_written, report.failed) == (7, 3)
    errors = error_rows(data_dir)
    assert {e["errorCode"] for e in errors} == {"Iceberg.NoSuchTable"}
    assert all("no_such_table" in e["errorMessage"] for e in errors)


def test_a_second_stream_on_the_same_data_dir_is_refused(data_dir: DataDir, config: Config) -> None:
    with DeliveryStream(config=config, data_dir=data_dir), pytest.raises(StreamInUseError) as caught:
        DeliveryStream(config=config, data_dir=data_dir)
    assert caught.value.pid == os.getpid()
    assert f"in use by pid {os.getpid()}" in str(caught.value)


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the flusher"
        time.sleep(0.02)


def test_the_flusher_flushes_on_the_size_hint(data_dir: DataDir) -> None:
    config = make_config(buffering_hints={"size_in_mbs": 1, "interval_in_seconds": 900})
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.start()
        stream.put_records([gateway_line(n) for n in range(100)])
        time.sleep(0.3)
        assert stream.stats().pending_bytes > 0  # below the size hint and far from the interval: still buffered
        stream.put_records([gateway_line(n) for n in range(100, 3000)])  # > 1 MB spooled
        _wait_for(lambda: stream.stats().committed_offset > 0)
        stats = stream.stats()
        assert stats.last_error is None
        assert stats.pending_bytes < 1024 * 1024


def test_the_flusher_flushes_when_the_interval_elapses(data_dir: DataDir) -> None:
    config = make_config(buffering_hints={"size_in_mbs": 64, "interval_in_seconds": 1})
    with DeliveryStream(config=config, data_dir=data_dir) as stream:
        stream.start()
        stream.put_records([gateway_line(n) for n in range(20)])
        put_at = time.monotonic()
        _wait_for(lambda: stream.stats().pending_bytes == 0)
        assert time.monotonic() - put_at >= 0.5
        assert stream.stats().lag_seconds == 0.0
    assert table_rows(data_dir, config).num_rows == 20


def test_close_delivers_everything_acknowledged(data_dir: DataDir, config: Config) -> None:
    stream = DeliveryStream(config=config, data_dir=data_dir)
    stream.start()
    assert ingest_lines(stream, (gateway_line(n) for n in range(2500)), batch=300) == 2500
    report = stream.close()
    assert report.committed_offset == stream.stats().spooled_offset
    assert table_rows(data_dir, config).num_rows == 2500
    assert json.loads((data_dir.spool / CHECKPOINT_FILE).read_text())["offset"] == report.committed_offset


def test_reports_add_up() -> None:
    total = FlushReport(records_read=2, ok_written=1, snapshot_id=5, committed_offset=10) + FlushReport(
        records_read=3, dropped=1, committed_offset=20
    )
    assert (total.records_read, total.ok_written, total.dropped, total.snapshot_id, total.committed_offset) == (
        5,
        1,
        1,
        5,
        20,
    )


def test_the_error_prefix_renders_firehose_expressions() -> None:
    prefix = make_config().data_firehose_configuration.error_output_prefix
    rendered = render_error_prefix(prefix, when_ms=1_764_000_000_000, output_type="processing-failed")
    assert rendered == "error/year=2025/month=11/day=24/hour=16/processing-failed"
    with pytest.raises(ErrorPrefixError):
        render_error_prefix("error/!{firehose:random-string}", when_ms=0, output_type="x")


# -- kill -9 ----------------------------------------------------------------------------------------------------------


def _lines_for_kill_test(count: int) -> Iterator[bytes]:
    template = gateway_line(0).replace(str(uuid.UUID(int=1)).encode(), b"@ID@")
    rng = random.Random(1234)
    for n in range(count):
        if n % 5000 == 4999:
            yield b'{"not": "an access-log line", "n": ' + str(n).encode() + b"}"
        else:
            yield template.replace(b"@ID@", str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode())


def _run_ingest(home: Path, config_path: Path, source: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meterlake.local.stream",
            "ingest",
            "--home",
            str(home),
            "--config",
            str(config_path),
            "--batch",
            "1000",
            str(source),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )


@pytest.mark.slow
def test_kill_9_mid_ingest_then_restart_loses_nothing_acked_and_repeats_nothing(tmp_path: Path) -> None:
    total = 200_000
    lines = list(_lines_for_kill_test(total))
    config_path = tmp_path / "cdk.context.json"
    config_path.write_text(
        json.dumps({"data_firehose_configuration": {"buffering_hints": {"size_in_mbs": 4, "interval_in_seconds": 1}}})
    )
    home = tmp_path / "home"
    source = tmp_path / "lines.txt"
    source.write_bytes(b"\n".join(lines) + b"\n")
    kill_after = random.Random().randrange(30_000, 150_000)

    first = _run_ingest(home, config_path, source)
    assert first.stdout is not None
    acked = 0
    for output in first.stdout:
        # Only whole "acked N" lines: the transform's log records share the pipe.
        if match := re.fullmatch(r"acked (\d+)\n?", output):
            acked = int(match.group(1))
            if acked >= kill_after:
                first.send_signal(signal.SIGKILL)
                break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, (
        f"kill_after={kill_after}: {first.stderr.read() if first.stderr else ''}"
    )

    rest = tmp_path / "rest.txt"
    rest.write_bytes(b"\n".join(lines[acked:]) + b"\n")
    second = _run_ingest(home, config_path, rest)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err

    config = load_test_config(config_path)
    data_dir = DataDir(home)
    table = metering_table(data_dir, config)
    ids = table.scan(selected_fields=("request_id",)).to_arrow().column("request_id").to_pylist()
    good = [json.loads(line)["request_id"] for line in lines if b"access-log line" not in line]
    assert len(ids) == len(set(ids)), f"kill_after={kill_after}: a request_id was committed twice"
    assert set(ids) == set(good), f"kill_after={kill_after}: acked lines are missing"
    added = sum(int(s.summary.get("added-records", "0")) for s in table.snapshots() if s.summary is not None)
    assert added == len(ids), f"kill_after={kill_after}: a commit was repeated"
    bad = {line for line in lines if b"access-log line" in line}
    rejected = [base64.b64decode(e["rawData"]) for e in error_rows(data_dir)]
    assert set(rejected) == bad
    assert len(rejected) <= len(bad) + sum(1 for line in lines[acked : acked + 1000] if line in bad)


def load_test_config(path: Path) -> Config:
    return parse_config(json.loads(path.read_text()))


def test_a_stream_without_a_transform_delivers_each_record_s_rows_as_they_are(tmp_path: Path) -> None:
    """The meter-event stream has no Lambda (a Firehose stream without a processing configuration): a flush of
    several processor buffers' worth invokes nothing (no transform worker either) and commits every row of every
    record, deduplicated on the target's key. The records are what the service puts: a request's rows, one a line."""
    config = Config()
    data = DataDir(tmp_path / "home")
    records = [
        IngestRecord(f"c{i % 3}", "llm-tokens", float(i), 1_700_000_000_000 + i, f"u{i}", {"model": f"m{i % 2}"})
        for i in range(30_000)
    ]
    puts = [
        encode_rows(event_rows(records[start : start + 100], ingested_at_us=1_700_000_000_000_000, source="ingest"))
        for start in range(0, len(records), 100)
    ]
    assert sum(map(len, puts)) > 2 * 2.5 * 1024 * 1024  # more than two of the processor's events
    stream = open_meter_event_stream(config, data)
    try:
        for start in range(0, len(puts), 8):
            stream.put_records(puts[start : start + 8])
        stream.put_records(puts[:1])  # a retried request: its rows are already spooled
        report = stream.flush()
    finally:
        stream.close()
    assert (report.invocations, report.ok_written, report.failed) == (0, 30_000, 0)
    table = ensure_meter_events_table(open_catalog(data), config).scan().to_arrow()
    assert sorted(table.column("unique_id").to_pylist()) == sorted(f"u{i}" for i in range(30_000))
