"""Gateway latency: answering once the access-log line is durable, against answering before it is.

Two gateways share one delivery stream (its spool fsyncs every put) and serve the same load, interleaved in rounds
(the order flips each round, so drift hits both alike), from a load generator in its own process:

- durable answer (what the gateway does): the response leaves once the put covering its line returned;
- early answer (what it did before): the same gateway over a sink that acknowledges a line as soon as it is
  queued and puts it into the stream from a background thread, so the answer never waits for the fsync.

The figure is the latency cost of "answered == metered": p50 and p99 request latency of each, and their ratio,
with 16 connections (concurrent answers share a put: the group commit) and with one (every answer waits for a put
of its own). The disk's own fsync latency is printed alongside: the durable answer's cost is bounded by it.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from meterlake.config import Config, parse_config
from meterlake.lake.home import DataDir
from meterlake.loadtest import Caller, LoadTestPlan, run_load_test
from meterlake.local.gateway import GatewayServer
from meterlake.local.stream import DeliveryStream

#: (connections, requests per variant and round in a full run, in a quick run).
SCENARIOS = ((16, 6000, 1500), (1, 1000, 250))
FULL_ROUNDS = 4
QUICK_ROUNDS = 2
WARMUP_REQUESTS = 200
FSYNC_SAMPLES = 200


class EarlyAckSink:
    """Acknowledges lines once queued; a background thread puts them into the stream afterwards.

    This is the promise the gateway made before answers waited for durability: a crash between the answer and the
    put loses answered requests.
    """

    def __init__(self, stream: DeliveryStream) -> None:
        self._stream = stream
        self._cond = threading.Condition()
        self._pending: collections.deque[bytes] = collections.deque()
        self._in_flight = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="early-ack-sink", daemon=True)
        self._thread.start()

    def put_records(self, lines: Sequence[bytes]) -> None:
        with self._cond:
            self._pending.extend(lines)
            self._cond.notify_all()

    def drain(self) -> None:
        """Block until every queued line is in the stream."""
        with self._cond:
            while self._pending or self._in_flight:
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
                self._in_flight = len(batch)
            self._stream.put_records(batch)
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()


def _load(invoke_url: str, token: str, requests: int, concurrency: int) -> list[float]:
    """Run in the load-generator process: send ``requests`` authenticated requests, return their latencies (ms)."""
    plan = LoadTestPlan(
        invoke_url=invoke_url, callers=(Caller("bench", token),), total=requests, concurrency=concurrency, seed=11
    )
    report = run_load_test(plan)
    if report.transport_errors or set(report.status_counts) != {200}:
        raise RuntimeError(f"load run not all 200: {dict(report.status_counts)}, {dict(report.transport_errors)}")
    return report.latencies_ms


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


def bench_config() -> Config:
    """The default config, with an interval that never fires during a run (flushes would only add noise)."""
    return parse_config({"data_firehose_configuration": {"buffering_hints": {"interval_in_seconds": 900}}})


def fsync_p50_ms(directory: Path) -> float:
    """Median latency of fsync after a 400-byte append (an access-log line) in ``directory``."""
    samples = []
    with tempfile.NamedTemporaryFile(dir=directory) as probe:
        for _ in range(FSYNC_SAMPLES):
            probe.write(b"x" * 400)
            probe.flush()
            started = time.perf_counter()
            os.fsync(probe.fileno())
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def run(quick: bool = False) -> dict[str, object]:
    """Measure p50/p99 latency of durable and early answers side by side; print them and their ratios."""
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    config = bench_config()
    figures: dict[str, object] = {}
    with (
        tempfile.TemporaryDirectory(prefix="meterlake-bench-gateway-") as tmp,
        ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as load_generator,
    ):
        data_dir = DataDir.resolve(Path(tmp))
        figures["gateway_fsync_p50_ms"] = round(fsync_p50_ms(data_dir.root), 3)
        stream = DeliveryStream(config=config, data_dir=data_dir)
        early_sink = EarlyAckSink(stream)
        try:
            with (
                GatewayServer(config=config, data_dir=data_dir, access_log=stream, port=0) as durable,
                GatewayServer(config=config, data_dir=data_dir, access_log=early_sink, port=0) as early,
            ):
                targets = {
                    name: (server.invoke_url, server.user_pool.issue_id_token(user="bench", tenant_id="bench"))
                    for name, server in (("durable", durable), ("early", early))
                }
                for url, token in targets.values():
                    load_generator.submit(_load, url, token, WARMUP_REQUESTS, 4).result()
                for connections, full_requests, quick_requests in SCENARIOS:
                    requests = quick_requests if quick else full_requests
                    latencies: dict[str, list[float]] = {"durable": [], "early": []}
                    for round_number in range(rounds):
                        order = ["durable", "early"] if round_number % 2 == 0 else ["early", "durable"]
                        for name in order:
                            url, token = targets[name]
                            run_latencies = load_generator.submit(_load, url, token, requests, connections).result()
                            latencies[name] += run_latencies
                            early_sink.drain()  # neither variant's puts run during the other's turn
                    figures.update(_figures(f"gateway_c{connections}", latencies))
                    _report(connections, requests * rounds, rounds, figures)
        finally:
            early_sink.close()
            stream.close()
    print(f"    (fsync of a 400-byte append on this disk: p50 {figures['gateway_fsync_p50_ms']} ms)")
    return figures


def _figures(prefix: str, latencies: dict[str, list[float]]) -> dict[str, object]:
    figures: dict[str, object] = {f"{prefix}_requests_per_variant": len(latencies["durable"])}
    for name, values in latencies.items():
        figures[f"{prefix}_{name}_p50_ms"] = round(_percentile(values, 0.50), 2)
        figures[f"{prefix}_{name}_p99_ms"] = round(_percentile(values, 0.99), 2)
    for q in ("p50", "p99"):
        ratio = _percentile(latencies["durable"], _QUANTILES[q]) / _percentile(latencies["early"], _QUANTILES[q])
        figures[f"{prefix}_{q}_ratio"] = round(ratio, 2)
    return figures


_QUANTILES = {"p50": 0.50, "p99": 0.99}


def _report(connections: int, requests: int, rounds: int, figures: dict[str, object]) -> None:
    prefix = f"gateway_c{connections}"
    print(f"  gateway latency, {connections} connection(s), {requests:,} requests per variant in {rounds} rounds:")
    for name, label in (("durable", "durable answer (line fsynced first)"), ("early", "early answer (before)")):
        p50, p99 = figures[f"{prefix}_{name}_p50_ms"], figures[f"{prefix}_{name}_p99_ms"]
        print(f"    {label:<38} p50 {p50:>6} ms   p99 {p99:>6} ms")
    p50_ratio, p99_ratio = figures[f"{prefix}_p50_ratio"], figures[f"{prefix}_p99_ratio"]
    print(f"    {'durable / early':<38} p50 {p50_ratio:>5}x    p99 {p99_ratio:>5}x")


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
