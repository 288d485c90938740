"""Sustained ingest through the local delivery stream: put_records -> spool -> transform -> Iceberg committed.

Lines are rendered with ``render_access_log_line`` (uuid4 request ids) and put in gateway-sized batches while the
background flusher runs on the config's size trigger; the clock stops when every line is committed. Peak RSS is
sampled in a thread with psutil.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from meterlake.config import Config, parse_config
from meterlake.lake.home import DataDir
from meterlake.local.stream import DeliveryStream
from meterlake.records import render_access_log_line

TARGET_EVENTS_PER_S = 50_000
TARGET_PEAK_RSS_MB = 500
FULL_EVENTS = 5_000_000
QUICK_EVENTS = 500_000
#: Lines per put_records call, as the gateway's access-log writer batches them.
PUT_BATCH = 1000
#: A size hint of 32 MB makes ~75k-record buffers with these ~430-byte lines.
SIZE_IN_MBS = 32
_TEMPLATES = 512
_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"


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

    The ids are cut from one ``os.urandom`` draw per batch: ``str(uuid.uuid4())`` costs ~4 us a line, a fifth of the
    GIL time of a run spent in the load generator rather than the pipeline; this costs under 1 us.
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


class _RssSampler(threading.Thread):
    """Samples this process's RSS every ``period`` seconds and keeps the peak."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.peak: int = 0
        self._stop_event = threading.Event()
        self._process = psutil.Process(os.getpid())

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop_event.wait(self.period)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        final: int = self._process.memory_info().rss
        return max(self.peak, final)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run(quick: bool = False) -> dict[str, object]:
    """Ingest 5M lines (quick: 500k) end to end; print and return events/s, peak RSS and the event count."""
    events = QUICK_EVENTS if quick else FULL_EVENTS
    config = bench_config()
    sampler = _RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="meterlake-bench-ingest-") as tmp:
        data_dir = DataDir(Path(tmp))
        stream = DeliveryStream(config=config, data_dir=data_dir)
        stream.start()
        started = time.perf_counter()
        for lines in generate_lines(events):
            stream.put_records(lines)
        put_done = time.perf_counter()
        # close() stops the flusher and delivers the rest: afterwards every line is committed (or rejected).
        report = stream.close()
        elapsed = time.perf_counter() - started
        committed_rows = _count_rows(data_dir, config)
    peak_rss_mb = sampler.stop() / (1024 * 1024)
    rate = events / elapsed
    print(
        f"ingest: {events:,} lines put in {put_done - started:.1f}s, all committed after {elapsed:.1f}s "
        f"({committed_rows:,} metered rows, final flush {report.ok_written:,})"
    )
    verdict = _verdict(rate >= TARGET_EVENTS_PER_S)
    print(f"ingest_events_per_s  {rate:,.0f}  (target >= {TARGET_EVENTS_PER_S:,})  {verdict}")
    print(
        f"ingest_peak_rss_mb   {peak_rss_mb:,.0f}  (target < {TARGET_PEAK_RSS_MB})  "
        f"{_verdict(peak_rss_mb < TARGET_PEAK_RSS_MB)}"
    )
    return {
        "ingest_events_per_s": round(rate),
        "ingest_peak_rss_mb": round(peak_rss_mb, 1),
        "ingest_events": events,
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
