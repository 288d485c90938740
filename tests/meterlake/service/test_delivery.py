"""The meter-event delivery process: group commit (concurrent requests share puts, each answered once durable; a
failed put fails every request in it), flush and stats answered by it, errors carried back, and no process left
behind when the service dies or the process itself does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest
from pyiceberg.table.snapshots import Operation

from meterlake.amberflo.api import IngestRecord
from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, open_catalog
from meterlake.lake.home import DataDir
from meterlake.local.stream import MAX_PUT_RECORD_BYTES, StreamError, StreamStats
from meterlake.service.delivery import DeliveryProcessError, MeterEventProcess, open_meter_event_stream
from meterlake.service.events import encode_rows, event_rows
from meterlake.service.ingest import NotDurableError
from meterlake.service.local import LocalMeteringService

from .conftest import NOW_MS, Served, record
from .test_app import METER, usage_body


def _lines(count: int, prefix: str) -> list[bytes]:
    """``count`` requests' worth of rows (one row each), as the service encodes them."""
    records = [IngestRecord("acme", "llm-tokens", i, NOW_MS, f"{prefix}{i}") for i in range(count)]
    return [encode_rows(event_rows([r], ingested_at_us=NOW_MS * 1000, source="ingest")) for r in records]


async def _commit_all(events: MeterEventProcess, batches: list[list[bytes]]) -> list[BaseException | None]:
    return await asyncio.gather(*(events.commit(batch) for batch in batches), return_exceptions=True)


def _service_script(data_dir: DataDir, *, then: str) -> str:
    """A program that starts a delivery process on ``data_dir``, prints its pid, then runs ``then``."""
    return (
        textwrap.dedent(f"""
        from meterlake.config import Config
        from meterlake.lake.home import DataDir
        from meterlake.service.delivery import MeterEventProcess
        events = MeterEventProcess(config=Config(), data_dir=DataDir.resolve({str(data_dir.root)!r}))
        events.start()
        print(events.pid, flush=True)
    """)
        + then
    )


def _committed_ids(data_dir: DataDir) -> list[str]:
    table = ensure_meter_events_table(open_catalog(data_dir), Config())
    return sorted(table.scan(selected_fields=("unique_id",)).to_arrow().column("unique_id").to_pylist())


def test_the_process_compacts_the_meter_events_tables_closed_days_on_its_schedule(tmp_path: Path) -> None:
    """The meter-events table is maintained where it is written, as `meterlake up` maintains the access-log table:
    a closed day's small files become one, and every event stays."""
    data_dir = DataDir(tmp_path / "home").ensure()
    closed_day_ms = NOW_MS - 3 * 86_400_000
    # Three small files in one long-closed day, committed before the schedule starts (a run between them would
    # compact the first two, and the third, a late file beside the day's compacted one, would rightly stay).
    with open_meter_event_stream(Config(), data_dir) as stream:
        for flush in range(3):
            records = [IngestRecord("acme", "llm-tokens", i, closed_day_ms + i, f"old-{flush}-{i}") for i in range(4)]
            stream.put_records(
                [encode_rows(event_rows([r], ingested_at_us=NOW_MS * 1000, source="ingest")) for r in records]
            )
            assert stream.flush().ok_written == 4
    table = ensure_meter_events_table(open_catalog(data_dir), Config())
    assert len(list(table.scan().plan_files())) == 3
    events = MeterEventProcess(config=Config(), data_dir=data_dir, maintenance_interval_s=0.2)
    events.start()
    try:
        deadline = time.monotonic() + 60
        while len(list(table.scan().plan_files())) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            table.refresh()
    finally:
        events.close()
    current = table.current_snapshot()
    assert current is not None
    assert current.summary is not None
    assert current.summary.operation == Operation.REPLACE
    assert len(list(table.scan().plan_files())) == 1
    assert _committed_ids(data_dir) == sorted(f"old-{flush}-{i}" for flush in range(3) for i in range(4))


def test_puts_flush_stats_and_close_are_answered_by_the_process(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "home").ensure()
    events = MeterEventProcess(config=Config(), data_dir=data_dir)
    events.start()
    try:
        assert events.pid is not None
        assert events.pid != os.getpid()
        asyncio.run(events.commit(_lines(3, "a")))
        stats = events.stats()
        assert stats.spooled_offset > stats.committed_offset  # acknowledged, not committed yet
        assert events.flush().ok_written == 3
        assert _committed_ids(data_dir) == ["a0", "a1", "a2"]
        asyncio.run(events.commit(_lines(2, "b")))
    finally:
        report = events.close()
    assert report is not None
    assert report.ok_written == 2  # close commits what was acknowledged
    assert _committed_ids(data_dir) == ["a0", "a1", "a2", "b0", "b1"]
    with pytest.raises(NotDurableError, match="closed"):
        asyncio.run(events.commit(_lines(1, "c")))


def test_concurrent_commits_share_puts_and_a_failed_put_fails_only_its_requests(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "home").ensure()
    events = MeterEventProcess(config=Config(), data_dir=data_dir)
    events.start()
    try:
        lines = _lines(200, "c")
        assert asyncio.run(_commit_all(events, [[line] for line in lines])) == [None] * 200
        assert events.lines == 200
        assert events.puts < 200  # grouped: fewer puts (fsyncs) than requests
        too_large = [b"x" * (MAX_PUT_RECORD_BYTES + 1)]
        [refused] = asyncio.run(_commit_all(events, [too_large]))
        assert isinstance(refused, NotDurableError)
        assert "at most" in str(refused)  # the stream's reason, carried back
        assert asyncio.run(_commit_all(events, [_lines(1, "d")])) == [None]  # the next put is taken
        assert events.flush().ok_written == 201
    finally:
        events.close()
    assert _committed_ids(data_dir) == sorted([f"c{i}" for i in range(200)] + ["d0"])


def test_a_start_names_the_process_holding_the_spool(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "home").ensure()
    holder = open_meter_event_stream(Config(), data_dir)
    try:
        events = MeterEventProcess(config=Config(), data_dir=data_dir, spool_wait_s=0.3)
        with pytest.raises(StreamError, match=f"in use by .*{os.getpid()}"):
            events.start()
    finally:
        holder.close()


def test_when_the_process_dies_ingest_answers_503_and_nothing_hangs(served: Served) -> None:
    events = served.service.events
    assert events is not None
    assert events.pid is not None
    os.kill(events.pid, signal.SIGKILL)
    with served.client(key=served.admin_key) as client:
        assert client.post("/meters", json={"label": "T", "meterApiName": "llm-tokens",
                                            "meterType": "sum_of_all_usage"}).status_code == 200  # fmt: skip
        answer = client.post("/ingest", json=record())
        usage = client.post("/usage", json=usage_body())
    assert answer.status_code == 503, answer.text
    assert "delivery process exited" in answer.text
    # A usage query cannot commit what was acknowledged: 503 with the reason, not a 500 (it was before).
    assert usage.status_code == 503, usage.text
    assert "acknowledged usage cannot be committed" in usage.json()["message"]
    assert "delivery process exited" in usage.json()["message"]


def test_a_process_that_does_not_answer_fails_requests_in_time_then_answers_again(tmp_path: Path) -> None:
    """A stopped (wedged) process: flush fails after the control timeout with the reason, a request behind it too;
    once it runs again, the late answer is skipped and each request gets its own answer."""
    data_dir = DataDir(tmp_path / "home").ensure()
    events = MeterEventProcess(config=Config(), data_dir=data_dir, control_timeout_s=1.0)
    events.start()
    try:
        assert events.pid is not None
        asyncio.run(events.commit(_lines(3, "w")))
        os.kill(events.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(DeliveryProcessError, match="did not answer 'flush' within 1 s"):
                events.flush()
            with pytest.raises(DeliveryProcessError, match="still busy with 1 earlier request"):
                events.stats()
            assert time.monotonic() - started < 10
        finally:
            os.kill(events.pid, signal.SIGCONT)
        stats = events.stats()  # its own answer, not the late flush's report
        assert isinstance(stats, StreamStats)
        assert stats.committed_offset == stats.spooled_offset  # the late flush did commit
        assert events.flush().ok_written == 0
    finally:
        report = events.close()
    assert report is not None
    assert _committed_ids(data_dir) == ["w0", "w1", "w2"]


def test_the_process_exits_when_the_service_is_killed(tmp_path: Path) -> None:
    """A SIGKILL'd service leaves no process holding the spool: the next start gets it at once."""
    data_dir = DataDir(tmp_path / "home").ensure()
    script = _service_script(data_dir, then="import time; time.sleep(600)")
    service = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None
        child = psutil.Process(int(service.stdout.readline()))
        assert child.is_running()
        service.kill()
        service.wait(timeout=30)
        child.wait(timeout=10)  # psutil.TimeoutExpired if it were left running
    finally:
        service.kill()
    started = time.monotonic()
    with LocalMeteringService(config=Config(), data_dir=data_dir, port=0) as again:
        _, key = again.keys.create(role="admin")
        with httpx.Client(base_url=again.url, headers={"X-API-KEY": key}) as client:
            assert client.get("/meters").status_code == 200
    assert time.monotonic() - started < 30


def test_a_commit_from_a_new_loop_after_one_closed_mid_put_is_answered_by_its_own_put(tmp_path: Path) -> None:
    """A test's asyncio.run (or a restarted server) may leave a put unanswered with its loop: the next loop's commits
    work, and the stale answer is not taken for theirs."""
    data_dir = DataDir(tmp_path / "home").ensure()
    events = MeterEventProcess(config=Config(), data_dir=data_dir)
    events.start()

    async def abandoned() -> None:
        asyncio.get_running_loop().create_task(events.commit(_lines(1, "gone")))
        await asyncio.sleep(0)  # the commit sent its put; the loop ends before the answer (its task is cancelled)

    try:
        asyncio.run(abandoned())
        assert asyncio.run(_commit_all(events, [_lines(1, "e"), _lines(1, "f")])) == [None, None]
        assert asyncio.run(_commit_all(events, [_lines(1, "g")])) == [None]
        events.flush()
    finally:
        events.close()
    assert {"e0", "f0", "g0"} <= set(_committed_ids(data_dir))


def test_a_service_that_exits_without_close_does_not_hang(tmp_path: Path) -> None:
    """multiprocessing waits for its children at exit, and the process ignores SIGTERM: its pipes close first."""
    data_dir = DataDir(tmp_path / "home").ensure()
    script = _service_script(data_dir, then="")  # and exit, without close
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    child = int(finished.stdout)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the delivery process outlived the service"
        time.sleep(0.1)


WEIRD = ["<b>\"x'</b>", "tab\there\x01\x1f", "line\u2028sep", "emoji😀", "nul\x00byte", "back\\slash"]


def test_values_with_markup_quotes_and_control_characters_come_back_exactly(served: Served) -> None:
    """Through ingest, the delivery process's row decoding and the lake, to usage grouped by them; a lone surrogate
    (not UTF-8) is refused with the reason, nothing stored."""
    with served.client(key=served.admin_key) as client:
        assert client.post("/meters", json=METER).status_code == 200
        for i, value in enumerate(WEIRD):
            answer = client.post(
                "/ingest", json=record(customerId=value, uniqueId=f"w{i}", dimensions={"model": value})
            )
            assert answer.status_code == 200, answer.text
        lone = json.dumps([{**record(uniqueId="s1"), "customerId": "\ud800lone"}], ensure_ascii=True)
        refused = client.post("/ingest", content=lone, headers={"content-type": "application/json"})
        by_customer = client.post("/usage", json=usage_body()).json()
        by_model = client.post("/usage", json=usage_body(groupBy=["model"])).json()
    assert refused.status_code == 400
    assert "surrogate" in refused.json()["message"]
    assert sorted(g["group"]["groupInfo"]["customerId"] for g in by_customer["clientMeters"]) == sorted(WEIRD)
    assert sorted(g["group"]["groupInfo"]["model"] for g in by_model["clientMeters"]) == sorted(WEIRD)
