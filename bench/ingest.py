"""Sustained ingest through the local delivery stream, against the transform alone on the same lines.

The lines (rendered with ``render_access_log_line``, a random version-4 request id each) are written to a file
first, untimed, so both measurements read the very same lines and the load generator's own Python does not compete
with the pipeline for the GIL:

- ingest: the lines are put in gateway-sized batches while the background flusher runs on the config's size trigger;
  the clock runs from the first put until every line is committed (``close``). The stream's backlog (spooled bytes
  not committed yet) is read the moment the writer stops putting, in buffers of ``size_in_mbs``;
- then the transform alone: the transform handler the stream runs, answering JSON bytes as the deployed Lambda
  does, called on Lambda-sized events of the same lines (cut as the stream cuts them), one after another; only the
  handler calls are timed.

Targets: committed lines/s at least 0.8x the transform's own records/s, at most two buffers uncommitted when the
writer stops (the stream's backpressure holds it there: the figure shows it held), peak memory from the stream's
opening to its close (this process's RSS plus its workers' own memory, USS, sampled from a process of its own, see
bench/memory.py) under 500 MB.

For the ratio's reading, the run also counts the CPU the ingest took (this process, whose writer reads the line file,
plus its transform workers, from ``getrusage``): per line, how many cores it kept busy, and the ratio it would reach
if the machine's cores were kept busy at that cost a line (``cores x transform seconds / ingest CPU seconds``). The
second says how far overlap alone could go: past it, only less work a line raises the ratio.
"""

from __future__ import annotations

import base64
import os
import random
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.memory import PeakMemory
from meterlake.config import Config, parse_config
from meterlake.lake.home import DataDir
from meterlake.local.stream import DeliveryStream, access_log_handler
from meterlake.records import render_access_log_line

TARGET_RATIO = 0.8
TARGET_BACKLOG_BUFFERS = 2.0
TARGET_PEAK_RSS_MB = 500
FULL_EVENTS = 5_000_000
QUICK_EVENTS = 500_000
#: Lines per put_records call, as the gateway's access-log writer batches them.
PUT_BATCH = 1000
#: A size hint of 32 MB makes ~75k-record buffers with these ~430-byte lines.
SIZE_IN_MBS = 32
_TEMPLATES = 512
_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
_READ_CHUNK = 4 * 1024 * 1024


def bench_config() -> Config:
    """The default config with a size hint giving 50-100k-record flushes and an interval that never fires first."""
    return parse_config(
        {"data_firehose_configuration": {"buffering_hints": {"size_in_mbs": SIZE_IN_MBS, "interval_in_seconds": 900}}}
    )


def _templates(seed: int = 7) -> list[tuple[bytes, bytes]]:
    """Realistic rendered lines split around the request id, so each line costs one uuid and one concatenation."""
    rng = random.Random(seed)
    paths = ["/random/strings", "/random/numbers", "/random/uuids", "/health"]
    methods = ["GET"] * 8 + ["POST", "OPTIONS"]
    templates = []
    for i in range(_TEMPLATES):
        resource = rng.choice(paths)
        line = render_access_log_line(
            {
                "request_id": _PLACEHOLDER,
                "api_id": "a1b2c3d4e5",
                "stage": "prod",
                "tenant_id": f"tenant-{rng.randrange(50):03d}",
                "user": f"user{rng.randrange(500)}",
                "client_id": "5example0client0id00000000",
                "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                "user_agent": rng.choice(["python-httpx/0.28.1", "curl/8.5.0", "Mozilla/5.0 (X11; Linux x86_64)"]),
                "request_time": 1_764_000_000_000 + i * 37,
                "http_method": rng.choice(methods),
                "resource_path": resource,
                "path": f"/prod{resource}",
                "status": rng.choice([200] * 18 + [404, 500]),
                "protocol": "HTTP/1.1",
                "response_length": rng.randrange(20, 4000),
                "response_latency_ms": rng.randrange(1, 300),
                "integration_latency_ms": rng.randrange(1, 250),
            }
        )
        head, tail = line.split(_PLACEHOLDER.encode())
        templates.append((head, tail))
    return templates


def generate_lines(count: int, batch: int = PUT_BATCH) -> Iterator[list[bytes]]:
    """Yield ``count`` access-log lines in batches, each with a fresh random (version 4) request id.

    The ids are cut from one ``os.urandom`` draw per batch (``str(uuid.uuid4())`` costs several times more).
    """
    templates = _templates()
    made = 0
    while made < count:
        size = min(batch, count - made)
        digits = os.urandom(16 * size).hex()
        lines = []
        for i in range(size):
            head, tail = templates[(made + i) % _TEMPLATES]
            h = digits[32 * i : 32 * i + 32]
            lines.append(head + f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}".encode() + tail)
        yield lines
        made += size


def write_lines(path: Path, count: int) -> None:
    """Write ``count`` generated lines to ``path``, one a line."""
    with open(path, "wb") as handle:
        for lines in generate_lines(count):
            handle.write(b"\n".join(lines) + b"\n")


def read_batches(path: Path, batch: int = PUT_BATCH) -> Iterator[list[bytes]]:
    """The lines of ``path`` in batches of ``batch`` (split in C, a chunk of the file at a time)."""
    pending: list[bytes] = []
    rest = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            pending.extend(lines)
            while len(pending) >= batch:
                yield pending[:batch]
                del pending[:batch]
    if rest:
        pending.append(rest)
    while pending:
        yield pending[:batch]
        del pending[:batch]


def transform_alone(path: Path, config: Config) -> float:
    """Seconds the stream's transform handler takes over every line of ``path``, in Lambda-sized events.

    The events are cut at the processor buffer's raw bytes, as the stream cuts them, and built outside the clock.
    """
    # The very handler the stream runs (``access_log_handler``), answering JSON bytes: rendered straight from its
    # outcomes, that answer costs less than make_handler's dict of one dict per record, so it is the stricter baseline.
    handler = access_log_handler(config)
    processing = config.data_firehose_configuration.transform_records_with_aws_lambda
    event_raw_bytes = int(processing.effective_buffer_size * 1024 * 1024)
    arrival_ms = int(time.time() * 1000)
    elapsed = 0.0
    event: list[bytes] = []
    raw = 0
    offset = 0

    def invoke(records: list[bytes], first: int) -> float:
        built = {
            "invocationId": "00000000-0000-4000-8000-000000000000",
            "deliveryStreamArn": "arn:aws:firehose:local:000000000000:deliverystream/bench",
            "region": "local",
            "records": [
                {"recordId": str(first + i), "approximateArrivalTimestamp": arrival_ms, "data": data}
                for i, data in enumerate(base64.b64encode(record).decode("ascii") for record in records)
            ],
        }
        started = time.perf_counter()
        handler(built, None)
        return time.perf_counter() - started

    for lines in read_batches(path):
        for line in lines:
            if event and raw + len(line) > event_raw_bytes:
                elapsed += invoke(event, offset)
                offset += len(event)
                event, raw = [], 0
            event.append(line)
            raw += len(line)
    if event:
        elapsed += invoke(event, offset)
    return elapsed


def _cpu_s() -> float:
    """User plus system CPU seconds of this process and of its children waited for so far."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run(quick: bool = False) -> dict[str, object]:
    """Transform alone, then ingest end to end, the same 5M lines (quick: 500k); print and return the figures."""
    events = QUICK_EVENTS if quick else FULL_EVENTS
    config = bench_config()
    buffer_bytes = config.data_firehose_configuration.buffering_hints.size_in_mbs * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="meterlake-bench-ingest-") as tmp:
        lines_path = Path(tmp) / "access-log.jsonl"
        write_lines(lines_path, events)

        data_dir = DataDir(Path(tmp) / "home")
        # Memory is sampled from the stream's opening to its close: the ingest's peak, not the line file's writing
        # or the transform-alone baseline's.
        sampler = PeakMemory()
        stream = DeliveryStream(config=config, data_dir=data_dir)
        # The workers are waited for when the stream closes, so from then on their CPU counts among the children's;
        # the memory sampler, also a child, is waited for only after the CPU is read.
        cpu_before = _cpu_s()
        stream.start()
        started = time.perf_counter()
        for lines in read_batches(lines_path):
            stream.put_records(lines)
        put_done = time.perf_counter()
        backlog_bytes = stream.stats().pending_bytes
        # close() stops the flusher and delivers the rest: afterwards every line is committed (or rejected).
        report = stream.close()
        elapsed = time.perf_counter() - started
        cpu_s = _cpu_s() - cpu_before
        peak_rss_mb = sampler.stop() / (1024 * 1024)
        committed_rows = _count_rows(data_dir, config)
        transform_s = transform_alone(lines_path, config)
    transform_rate = events / transform_s
    rate = events / elapsed
    ratio = rate / transform_rate
    backlog_buffers = backlog_bytes / buffer_bytes
    ratio_met = ratio >= TARGET_RATIO
    backlog_met = backlog_buffers <= TARGET_BACKLOG_BUFFERS
    rss_met = peak_rss_mb < TARGET_PEAK_RSS_MB
    cores = os.cpu_count() or 1
    cores_used = cpu_s / elapsed
    bound = cores * transform_s / cpu_s
    print(
        f"ingest: {events:,} lines put in {put_done - started:.1f}s, all committed after {elapsed:.1f}s "
        f"({committed_rows:,} metered rows, final flush {report.ok_written:,}); transform alone {transform_s:.1f}s"
    )
    print(f"ingest_events_per_s            {rate:,.0f}  (lines put -> all committed)")
    print(f"ingest_transform_records_per_s {transform_rate:,.0f}  (the handler alone, same lines)")
    print(f"ingest_ratio                   {ratio:.2f}  (target >= {TARGET_RATIO})  {_verdict(ratio_met)}")
    print(
        f"ingest_backlog_buffers         {backlog_buffers:.2f}  ({backlog_bytes / 1024 / 1024:,.1f} MB uncommitted "
        f"when the writer stopped; target <= {TARGET_BACKLOG_BUFFERS:g})  {_verdict(backlog_met)}"
    )
    print(f"ingest_peak_rss_mb             {peak_rss_mb:,.0f}  (target < {TARGET_PEAK_RSS_MB})  {_verdict(rss_met)}")
    print(
        f"ingest_cpu_us_per_line         {cpu_s / events * 1e6:.1f}  (the stream's process and its workers; the "
        f"handler alone {transform_s / events * 1e6:.1f})"
    )
    print(f"ingest_cores_used              {cores_used:.2f}  (of {cores})")
    print(
        f"ingest_ratio_all_cores_busy    {bound:.2f}  (the ratio with all {cores} cores busy at this CPU a line; "
        "overlap alone cannot go past it)"
    )
    return {
        "ingest_events_per_s": round(rate),
        "ingest_transform_records_per_s": round(transform_rate),
        "ingest_ratio": round(ratio, 3),
        "ingest_ratio_met": ratio_met,
        "ingest_put_s": round(put_done - started, 1),
        "ingest_backlog_buffers": round(backlog_buffers, 2),
        "ingest_backlog_met": backlog_met,
        "ingest_peak_rss_mb": round(peak_rss_mb, 1),
        "ingest_rss_met": rss_met,
        "ingest_events": events,
        "ingest_metered_rows": committed_rows,
        "ingest_cpu_us_per_line": round(cpu_s / events * 1e6, 2),
        "ingest_transform_us_per_line": round(transform_s / events * 1e6, 2),
        "ingest_cores_used": round(cores_used, 2),
        "ingest_ratio_all_cores_busy": round(bound, 3),
    }


def _count_rows(data_dir: DataDir, config: Config) -> int:
    from meterlake.lake.catalog import ensure_metering_table, open_catalog

    table = ensure_metering_table(open_catalog(data_dir), config)
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return 0
    return int(snapshot.summary.get("total-records", "0"))


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
